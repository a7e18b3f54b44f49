"""models layer: load upstream DEIMv2 / DEIM weights into deim_ray's (transformers) model, every tensor counted.

    sd, which = read_upstream_checkpoint("best_stg2.pth")      # EMA weights when present ("ema"), else "model"
    report = load_upstream_state(model, sd, "best_stg2.pth", which)   # strict: raises ModelError naming tensors

`to_transformers_names(sd, family)` only renames (no model needed); `model.pretrained` uses it to fine-tune from an
upstream checkpoint with another class count. The name rules are in `keys.py` (DEIMv2, Intellindust-AI-Lab/DEIMv2)
and `family_keys.py` (D-FINE and RT-DETRv2 as trained by ShihuaHuang95/DEIM); the model's config says which.

Strict loading refuses a checkpoint when an upstream tensor has no rule or no counterpart in the model, when a
shape differs, or when a model tensor gets no value, except these, whose fresh value is what upstream computes:
- `layer_scale{1,2}.lambda1` of ViTs without layer scale (upstream's distilled ViT-Tiny): initialised to 1.0;
- empty `register_tokens` (ViTs without registers);
- `embeddings.mask_token`: unused at inference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deim_ray.models.convert.family_keys import FAMILY_KEYS
from deim_ray.models.convert.family_keys import IGNORED as FAMILY_IGNORED
from deim_ray.models.convert.keys import IGNORED, rename, split_fused
from deim_ray.models.errors import ModelError
from deim_ray.models.load_refusal import load_failure
from deim_ray.models.families import family_of_config

_KEEP_INIT = re.compile(r"(layer_scale[12]\.lambda1|register_tokens|embeddings\.mask_token)$")
# upstream tensors that may have no place: the decoder layers' `norm2`, which upstream keeps but skips when the
# layer has a gateway (transformers then builds no such norm)
_UNUSED = re.compile(r"\.encoder_attn_layer_norm\.weight$")
_ADVICE = "pass the upstream config the checkpoint was trained with"
_TIED = re.compile(r"^model\.decoder\.((?:class|bbox)_embed\..+)$")


@dataclass(frozen=True)
class ConversionReport:
    """What `load_upstream_state` did; names are transformers names unless said otherwise."""

    source: str
    weights: str
    """Which weights of the checkpoint: "ema" (`ema.module`), "model", or "state dict" (a bare one)."""
    loaded: int
    kept_init: tuple[str, ...]
    dropped: tuple[str, ...]
    """Upstream tensors left out by design (anchors, RoPE periods, the key-bias mask, unused norms)."""

    def summary(self) -> str:
        return (f"converted {self.source} ({self.weights} weights): {self.loaded} tensors loaded, "
                f"{len(self.kept_init)} kept at their initial value, {len(self.dropped)} upstream tensors not "
                "needed")


def is_upstream_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """True for upstream DEIM module names (`backbone.`, `encoder.`, `decoder.` at the top)."""
    return bool(sd) and all(k.split(".", 1)[0] in ("backbone", "encoder", "decoder") for k in sd)


def read_upstream_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of an upstream checkpoint and which one it is: `ema.module` first (what upstream evaluates
    and deploys), then `model`, then the file itself when it is a bare state dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint {path} does not exist; check the path") from None
    except Exception as e:  # torch raises several types for corrupt files and refused pickles
        raise ModelError(f"cannot load {path} with weights_only=True ({load_failure(e)}); give an upstream "
                         "checkpoint") from None
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict) and isinstance(obj["ema"].get("module"), dict):
        sd, which = obj["ema"]["module"], "ema"
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd, which = obj["model"], "model"
    else:
        sd, which = obj, "state dict"
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path} holds no state dict (looked for ema.module, model, or a dict of tensors)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if not is_upstream_state_dict(sd):
        raise ModelError(f"{path} is not an upstream DEIM/DEIMv2 checkpoint (tensor names such as "
                         f"{next(iter(sd), '-')!r} do not start with backbone./encoder./decoder.)")
    return sd, which


def to_transformers_names(sd: dict[str, torch.Tensor], family: str = "deimv2"
                          ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(renamed tensors, upstream names without a rule, upstream names dropped by design) for a model of
    `family`. Decoder heads are emitted under both names transformers ties (`model.decoder.class_embed.i` and
    `class_embed.i`)."""
    renamer, ignored = _rules(sd, family)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    dropped: list[str] = []
    for key, tensor in sd.items():
        if ignored.search(key):
            dropped.append(key)
            continue
        mask = sd.get(key + "_mask") if key.endswith("qkv.bias") else None
        parts = split_fused(key, tensor, mask)
        if parts is None:
            name = renamer(key)
            if name is None:
                unmapped.append(key)
                continue
            parts = {name: tensor}
        for name, value in parts.items():
            out[name] = value
            tied = _TIED.match(name)
            if tied:
                out[tied.group(1)] = value
    return out, unmapped, dropped


def _rules(sd: dict[str, torch.Tensor], family: str):
    if family in FAMILY_KEYS:
        return FAMILY_KEYS[family].rename, FAMILY_IGNORED
    hybrid = any(k.startswith(("encoder.fpn_blocks.", "encoder.encoder.")) for k in sd)
    return (lambda key: rename(key, hybrid=hybrid)), IGNORED


def load_upstream_state(model: nn.Module, sd: dict[str, torch.Tensor], source: str, weights: str
                        ) -> ConversionReport:
    """Copy upstream state dict `sd` into `model` (in place); every tensor must find its place (module doc)."""
    converted, kept, dropped = match_upstream_state(sd, model.state_dict(), model.config, source)
    with torch.no_grad():
        model.load_state_dict(converted, strict=False)
    return ConversionReport(source=source, weights=weights, loaded=len(converted), kept_init=tuple(kept),
                            dropped=tuple(dropped))


def match_upstream_state(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], config, source: str,
                         advice: str = _ADVICE) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(tensors by model name, model tensors kept at init, upstream tensors not needed) for a model with state
    dict `target` built from `config` (or a part of one); raises ModelError naming what does not fit, ending
    with `advice`. Shapes only: works on meta tensors."""
    converted, unmapped, dropped = to_transformers_names(sd, family_of_config(config).name)
    for name in [n for n in converted if n not in target and _UNUSED.search(n)]:
        dropped.append(name)
        del converted[name]
    _fit_mask_token(converted, target)
    unexpected = sorted(n for n in converted if n not in target)
    wrong = sorted(f"{n} {tuple(converted[n].shape)} vs {tuple(target[n].shape)}" for n in converted
                   if n in target and converted[n].shape != target[n].shape)
    missing = [n for n in target if n not in converted]
    kept = [n for n in missing if _keeps_init(config, target[n], n)]
    missing = [n for n in missing if n not in kept]
    _refuse(source, unmapped, unexpected, wrong, missing, advice)
    return converted, kept, dropped


def _fit_mask_token(converted: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    for name, value in list(converted.items()):
        if name.endswith("mask_token") and name in target and value.numel() == target[name].numel():
            converted[name] = value.reshape(target[name].shape)


def _keeps_init(config, tensor: torch.Tensor, name: str) -> bool:
    if not _KEEP_INIT.search(name):
        return False
    backbone = config.backbone_config
    if name.endswith("register_tokens"):
        return tensor.numel() == 0
    if name.endswith("lambda1"):
        return getattr(backbone, "layerscale_value", None) == 1.0
    return True


def _refuse(source: str, unmapped: list[str], unexpected: list[str], wrong: list[str], missing: list[str],
            advice: str) -> None:
    problems = [(unmapped, "upstream tensors with no deim_ray counterpart"),
                (unexpected, "converted tensors the model does not have"),
                (wrong, "tensors with another shape"), (missing, "model tensors the checkpoint does not provide")]
    found = [f"{len(names)} {what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
             for names, what in problems if names]
    if found:
        raise ModelError(f"{source} does not fit the model built from the config ({'; '.join(found)}); {advice}")
