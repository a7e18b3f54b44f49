"""models layer: backbone-only pretrained weights for D-FINE and RT-DETRv2 (`model.backbone_pretrained`).

Upstream DEIM (ShihuaHuang95/DEIM) starts every COCO run of these families from ImageNet weights of the backbone,
one file per backbone, loaded strictly (`load_state_dict(state)` in its `HGNetv2` / `PResNet`):

| family | sizes | upstream's file | where upstream downloads it from |
|---|---|---|---|
| D-FINE | n, s | `PPHGNetV2_B0_stage1.pth` | github.com/Peterande/storage, release dfinev1.0 |
| D-FINE | m / l / x | `PPHGNetV2_B2` / `_B4` / `_B5_stage1.pth` | the same release |
| RT-DETRv2 | r18 / r34 | `ResNet18_vd_pretrained_from_paddle.pth` / `ResNet34_vd_...` | github.com/lyuwenyu/storage |
| RT-DETRv2 | r50, r50m / r101 | `ResNet50_vd_ssld_v2_pretrained_from_paddle.pth` / `ResNet101_vd_ssld_...` | (v0.1) |

A file is a plain state dict of upstream's backbone module. Its names go through the same mapping as whole
upstream checkpoints (`convert.family_keys`, behind the `backbone.` prefix upstream's model adds), and the load is
strict as upstream's: every backbone tensor of the model must come from the file, every file tensor must find its
place with its shape. `num_batches_tracked` counters are never required, and a model with frozen backbone norms
(the D-FINE L/X and RT-DETRv2 R50/R101 baselines) has none, so the file's are then not used.
"""

from __future__ import annotations

import torch
from torch import nn

from deim_ray.config.families.rtdetrv2 import RESNET_FILES
from deim_ray.models.backbone_weights import BackboneReport, read_backbone_file
from deim_ray.models.convert.family_keys import FAMILY_KEYS
from deim_ray.models.errors import ModelError

_HGNET_URL = "https://github.com/Peterande/storage/releases/download/dfinev1.0/"
_RESNET_URL = "https://github.com/lyuwenyu/storage/releases/download/v0.1/"
_BACKBONE = "model.backbone."
_COUNTER = "num_batches_tracked"

BACKBONE_FILES: dict[str, dict[str, str]] = {
    "dfine": {"tiny": "PPHGNetV2_B0_stage1.pth", "n": "PPHGNetV2_B0_stage1.pth", "s": "PPHGNetV2_B0_stage1.pth",
              "m": "PPHGNetV2_B2_stage1.pth", "l": "PPHGNetV2_B4_stage1.pth", "x": "PPHGNetV2_B5_stage1.pth"},
    "rtdetrv2": {"r18": RESNET_FILES[18], "r34": RESNET_FILES[34], "r50": RESNET_FILES[50], "r50m": RESNET_FILES[50],
                 "r101": RESNET_FILES[101]},
}
"""Per family and size: the name of upstream's backbone file (`tiny` D-FINE has B0's backbone)."""


def backbone_url(family: str, variant: str) -> str:
    """Where upstream downloads the backbone file of `family`/`variant`."""
    return (_HGNET_URL if family == "dfine" else _RESNET_URL) + BACKBONE_FILES[family][variant]


def load_family_backbone(model: nn.Module, family: str, variant: str, path: str) -> BackboneReport:
    """Copy upstream backbone file `path` into `model` (in place), strictly as upstream does (module doc)."""
    name = BACKBONE_FILES[family].get(variant)
    if name is None:
        raise ModelError(f"model.backbone_pretrained: no upstream backbone file fits {family} size {variant!r}; "
                         "unset it")
    source = read_backbone_file(path, f"download {backbone_url(family, variant)} there (see README)")
    target = {k: v for k, v in model.state_dict().items() if k.startswith(_BACKBONE)}
    renamed = {k: FAMILY_KEYS[family].rename("backbone." + k) for k in source}
    take = {renamed[k]: v for k, v in source.items() if renamed[k] in target and v.shape == target[renamed[k]].shape}
    unused = tuple(k for k in source if renamed[k] not in take and not k.endswith(_COUNTER))
    missing = tuple(k for k in target if k not in take and not k.endswith(_COUNTER))
    if unused or missing:
        example = unused[0] if unused else missing[0]
        raise ModelError(f"{path} does not fit the {family} {variant} backbone ({len(unused)} file tensors without a "
                         f"place or with another shape, {len(missing)} backbone tensors missing, e.g. {example}); "
                         f"give {name} ({backbone_url(family, variant)})")
    with torch.no_grad():
        model.load_state_dict(take, strict=False)
    return BackboneReport(source=path, loaded=tuple(k for k in target if k in take), missing=(),
                          unused=tuple(k for k in source if renamed[k] not in take))
