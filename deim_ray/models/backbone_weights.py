"""models layer: backbone-only pretrained weights in upstream's files (`model.backbone_pretrained`).

Upstream DEIMv2 starts every COCO run from ImageNet weights of its backbone. For the HGNetV2 sizes that is
`PPHGNetV2_<B>_stage1.pth` (Atto, Femto, Pico, N and HGNetV2-S start from B0's file; HGNetV2-M/L/X from B2/B4/B5),
a plain state dict of upstream's `HGNetv2` module, loaded with upstream's rules:

- Atto: every tensor whose name and shape match (its narrower last stage keeps its initialisation);
- Femto, Pico: every tensor whose name matches; a matching name with another shape is an error;
- N and HGNetV2-S/M/L/X (the file's own backbone): every backbone tensor must come from the file.

Names map to transformers' HGNetV2 (`stem.` -> `embedder.`, `stages.` -> `encoder.stages.`, `conv` ->
`convolution`, `bn` -> `normalization`, under `model.conv_encoder.model.`); `num_batches_tracked` counters are
never required.

The DINOv3 sizes start their ViT from the file upstream's `DINOv3STAs.weights_path` names, loaded as upstream
does (strict, into the ViT only; the spatial tuning adapter and the fusion layers start from their
initialisation):

- S, M: the distilled ViT-Tiny / ViT-Tiny+ (`vitt_distill.pt`, `vittplus_distill.pt`), a state dict of
  upstream's ViT-Tiny `_model` (`blocks.N.attn.qkv`, `patch_embed.proj`, `cls_token`, ...);
- L, X: the official DINOv3 ViT-S/16 and ViT-S+/16 checkpoints, a state dict of DINOv3's
  `DinoVisionTransformer` (`storage_tokens`, `blocks.N.ls1.gamma`, `qkv.bias_mask`, ...).

Their names and fused tensors go through the same mapping as whole upstream checkpoints (`models.convert`): every
ViT tensor must come from the file (except what that mapping keeps at its initial value: layer-scale vectors of
ViTs without layer scale, an empty register-token tensor, the mask token), and a file tensor with no place or
another shape is an error that names it.

Without backbone weights (and without `model.pretrained`) a run starts from a random backbone; `backbone_note`
is the one line the trainer logs and `deim-ray info` prints about it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deim_ray.models.convert.upstream import match_upstream_state
from deim_ray.models.errors import ModelError
from deim_ray.models.load_refusal import load_failure

_HGNETV2_URL = "https://github.com/Peterande/storage/releases/download/dfinev1.0/PPHGNetV2_{}_stage1.pth"
_VIT = "model.conv_encoder.backbone."
_VIT_FILES = {
    "s": ("backbone.dinov3._model.", "vitt_distill.pt",
          "https://drive.google.com/file/d/1YMTq_woOLjAcZnHSYNTsNg7f0ahj5LPs/view (DEIMv2's README)"),
    "m": ("backbone.dinov3._model.", "vittplus_distill.pt",
          "https://drive.google.com/file/d/1COHfjzq5KfnEaXTluVGEOMdhpuVcG6Jt/view (DEIMv2's README)"),
    "l": ("backbone.dinov3.", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
          "https://github.com/facebookresearch/dinov3 (ViT-S/16 distilled, LVD-1689M)"),
    "x": ("backbone.dinov3.", "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
          "https://github.com/facebookresearch/dinov3 (ViT-S+/16 distilled, LVD-1689M)"),
}
"""Per DINOv3 size: where the file's names sit in upstream's DEIM model, upstream's file name, where to get it."""
_PREFIX = "model.conv_encoder.model."
_RULES = ((r"^stem\.", "embedder."), (r"^stages\.", "encoder.stages."), (r"\.conv\.weight$", ".convolution.weight"),
          (r"\.bn\.", ".normalization."))
_HGNETV2_FILES = {"tiny": ("B0", "shape"), "atto": ("B0", "shape"), "femto": ("B0", "name"), "pico": ("B0", "name"),
                  "n": ("B0", "strict"), "hgnetv2_s": ("B0", "strict"), "hgnetv2_m": ("B2", "strict"),
                  "hgnetv2_l": ("B4", "strict"), "hgnetv2_x": ("B5", "strict")}
"""Which file each HGNetV2 size starts from, and how it takes it (upstream's rules; `tiny` shares Atto's backbone)."""


@dataclass(frozen=True)
class BackboneReport:
    """What `load_backbone_weights` did; names are the model's."""

    source: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    """Backbone tensors of the model the file did not provide (they keep their initialisation)."""
    unused: tuple[str, ...]
    """File tensors (upstream names) with no place in this model, e.g. B0's fourth stage for Atto."""

    def summary(self) -> str:
        example = f" (e.g. {self.missing[0]})" if self.missing else ""
        return (f"backbone weights {self.source}: loaded {len(self.loaded)}/{len(self.loaded) + len(self.missing)} "
                f"backbone tensors, {len(self.missing)} kept their initialisation{example}, "
                f"{len(self.unused)} file tensors unused")


def backbone_note(variant: str, backbone_pretrained: str | None, pretrained: str | None) -> str | None:
    """The line to show when a run's backbone starts from random weights (None when it does not, or for `tiny`)."""
    if backbone_pretrained or pretrained or variant == "tiny":
        return None
    return ("model.backbone_pretrained is not set: the backbone starts from random weights, while upstream's COCO "
            "recipe starts from ImageNet (HGNetV2, ResNet-vd) or DINOv3 weights; see README 'Your data and "
            "pretrained weights'")


def load_backbone_weights(model: nn.Module, variant: str, path: str) -> BackboneReport:
    """Copy upstream backbone file `path` into `model` (in place) with upstream's rules for `variant`."""
    if variant in _VIT_FILES:
        return _load_vit(model, variant, path)
    if variant not in _HGNETV2_FILES:
        raise ModelError(f"model.backbone_pretrained is not supported for DEIMv2-{variant}; unset it, or "
                         "fine-tune a whole model with model.pretrained")
    stem, rule = _HGNETV2_FILES[variant]
    file, url = f"PPHGNetV2_{stem}_stage1.pth", _HGNETV2_URL.format(stem)
    source = read_backbone_file(path, f"download {url} there (see README)")
    target = {k: v for k, v in model.state_dict().items() if k.startswith(_PREFIX)}
    renamed = {_rename(k): (k, v) for k, v in source.items()}
    other_shape = [f"{name} {tuple(v.shape)} in the file, {tuple(target[name].shape)} here"
                   for name, (_, v) in renamed.items() if name in target and v.shape != target[name].shape]
    if other_shape and rule != "shape":
        raise ModelError(f"{path} does not fit DEIMv2-{variant}'s backbone ({len(other_shape)} tensors of another "
                         f"shape, e.g. {other_shape[0]}); give {file}")
    take = {name: v for name, (_, v) in renamed.items() if name in target and v.shape == target[name].shape}
    missing = tuple(k for k in target if k not in take and not k.endswith("num_batches_tracked"))
    if not take or (rule == "strict" and missing):
        raise ModelError(f"{path} is not an HGNetV2-{stem} backbone file for DEIMv2-{variant}: {len(take)} tensors "
                         f"match, {len(missing)} backbone tensors missing (e.g. {missing[0] if missing else '-'}); "
                         f"give {file} ({url})")
    with torch.no_grad():
        model.load_state_dict(take, strict=False)
    return BackboneReport(source=path, loaded=tuple(k for k in target if k in take), missing=missing,
                          unused=tuple(k for k in source if _rename(k) not in take))


def _load_vit(model: nn.Module, variant: str, path: str) -> BackboneReport:
    """Upstream's strict load of a ViT file (module doc) into the model's ViT."""
    prefix, name, where = _VIT_FILES[variant]
    source = read_backbone_file(path, f"get {name} from {where} (see README)")
    target = {k: v for k, v in model.state_dict().items() if k.startswith(_VIT)}
    advice = f"give {name}, the file upstream's DEIMv2-{variant.upper()} config names"
    take, kept, unused = match_upstream_state({prefix + k: v for k, v in source.items()}, target, model.config,
                                              path, advice)
    with torch.no_grad():
        model.load_state_dict(take, strict=False)
    return BackboneReport(source=path, loaded=tuple(k for k in target if k in take), missing=tuple(kept),
                          unused=tuple(k.removeprefix(prefix) for k in unused))


def _rename(key: str) -> str:
    for pattern, replacement in _RULES:
        key = re.sub(pattern, replacement, key)
    return _PREFIX + key


def read_backbone_file(path: str, fetch: str) -> dict[str, torch.Tensor]:
    """The state dict in file `path`; `fetch` says where to get the file when it does not exist."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelError(f"model.backbone_pretrained {path} does not exist; {fetch}, or set "
                         "model.backbone_pretrained: null to start from a random backbone")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files and refused pickles
        raise ModelError(f"cannot load {path} with weights_only=True ({load_failure(e)})") from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelError(f"{path} is not a state dict of tensors (the layout of upstream's backbone files)")
    return state
