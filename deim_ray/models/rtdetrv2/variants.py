"""models layer: the RT-DETRv2 sizes (ResNet-vd backbones) as `RTDetrV2Config` keyword dicts.

Each variant mirrors the architecture upstream DEIM builds from `configs/deim_rtdetrv2/deim_r*vd_*_coco.yml`
(RT-DETRv2 trained with the DEIM recipe, `configs/base/rt_deim.yml`: SiLU decoder activation and MLP heads,
the 3-layer `as_reg` query position head, trainable backbone batch norms):

| variant | backbone | encoder width / expansion | decoder layers | params (80 classes, upstream) |
|---|---|---|---|---|
| tiny | ResNet-vd, 1 block per stage, 1/4 width | 32 / 0.5 | 2 | tests and CPU smoke runs |
| r18 | ResNet18-vd | 256 / 0.5 | 3 | 20.18M |
| r34 | ResNet34-vd | 256 / 0.5 | 4 | 31.44M |
| r50 | ResNet50-vd | 256 / 1.0 | 6 | 42.94M |
| r50m | ResNet50-vd | 256 / 0.5 | 3 | 33.20M |
| r101 | ResNet101-vd | 384 / 1.0 | 6 | 76.66M |

`mlp_act` and `query_pos_method` are upstream's decoder options; transformers' config carries them as extra
attributes and `heads.apply_head_options` applies them after the model is built. The plain RT-DETRv2 baselines
(`rtdetrv2_*`) set them back to `relu` / `default` (see `configs/rtdetrv2/`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_RESNETS = {  # depth -> (layer type, blocks per stage, stage widths)
    18: ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    34: ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    50: ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    101: ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048]),
}


def resnet_vd(depth: int) -> dict[str, Any]:
    """ResNet-vd backbone dict for transformers' `rt_detr_resnet` (deep stem, avg-pool shortcuts), stages 2-4."""
    layer_type, depths, widths = _RESNETS[depth]
    return {"model_type": "rt_detr_resnet", "layer_type": layer_type, "depths": depths, "hidden_sizes": widths,
            "embedding_size": 64, "out_indices": [2, 3, 4]}


def _rtdetrv2(depth: int, *, hidden: int = 256, expansion: float = 1.0, layers: int = 6,
              ffn: int = 1024) -> dict[str, Any]:
    widths = _RESNETS[depth][2]
    return {
        "backbone_config": resnet_vd(depth),
        "encoder_in_channels": widths[1:],
        "feat_strides": [8, 16, 32],
        "encoder_hidden_dim": hidden,
        "encode_proj_layers": [2],
        "encoder_layers": 1,
        "encoder_ffn_dim": ffn,
        "hidden_expansion": expansion,
        "activation_function": "silu",
        "d_model": 256,
        "decoder_in_channels": [hidden] * 3,
        "num_feature_levels": 3,
        "decoder_n_levels": 3,
        "decoder_n_points": 4,
        "decoder_layers": layers,
        "decoder_ffn_dim": 1024,
        "decoder_activation_function": "silu",
        "num_queries": 300,
        "mlp_act": "silu",
        "query_pos_method": "as_reg",
    }


def tiny() -> dict[str, Any]:
    """R18's layout with one block per stage at a quarter of its width, a 32-wide head with 2 decoder layers
    and 30 queries: fast enough for tests on one CPU core."""
    kwargs = _rtdetrv2(18, hidden=32, expansion=0.5, layers=2, ffn=64)
    kwargs["backbone_config"].update(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], embedding_size=16)
    kwargs.update(encoder_in_channels=[32, 64, 128], d_model=32, decoder_ffn_dim=64, decoder_attention_heads=4, encoder_attention_heads=4,
                  num_queries=30, num_denoising=30)
    return kwargs


def r18() -> dict[str, Any]:
    return _rtdetrv2(18, expansion=0.5, layers=3)


def r34() -> dict[str, Any]:
    return _rtdetrv2(34, expansion=0.5, layers=4)


def r50() -> dict[str, Any]:
    return _rtdetrv2(50)


def r50m() -> dict[str, Any]:
    return _rtdetrv2(50, expansion=0.5, layers=3)


def r101() -> dict[str, Any]:
    return _rtdetrv2(101, hidden=384, ffn=2048)


VARIANTS: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": tiny, "r18": r18, "r34": r34, "r50": r50, "r50m": r50m, "r101": r101,
}
"""Variant name -> function returning fresh `RTDetrV2Config` keyword arguments (without `num_labels`)."""
