"""models layer: the D-FINE sizes (HGNetv2 B0-B5 backbones) as `DFineConfig` keyword dicts.

Each variant mirrors the architecture upstream DEIM builds from `configs/deim_dfine/deim_hgnetv2_*_coco.yml`
(D-FINE trained with the DEIM recipe: SiLU decoder activation, trainable backbone batch norms):

| variant | backbone | feature levels | d_model | decoder layers | params (80 classes, upstream) |
|---|---|---|---|---|---|
| tiny | HGNetv2-B0 | 16, 32 | 32 | 2 | tests and CPU smoke runs |
| n | HGNetv2-B0 | 16, 32 | 128 | 3 | 3.78M |
| s | HGNetv2-B0 | 8, 16, 32 | 256 | 3 | 9.53M |
| m | HGNetv2-B2 | 8, 16, 32 | 256 | 4 | 19.59M |
| l | HGNetv2-B4 | 8, 16, 32 | 256 | 6 | 31.29M |
| x | HGNetv2-B5 | 8, 16, 32 | 256 (encoder 384) | 6 | 61.14M |

`mlp_act` is upstream's activation of the decoder's MLP heads (SiLU under DEIM) and `upstream_lqe_act` gives the
LQE the decoder activation, as upstream does; transformers' config carries both as extra attributes and
`heads.apply_head_options` applies them. The plain D-FINE baselines (`dfine_hgnetv2_*`)
are the same networks with ReLU in the decoder and its heads, and frozen backbone norms for L and X
(`model.extra` carries those differences; see `configs/dfine/`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Upstream HGNetv2 stage layouts: stem channels; per stage in/mid/out channels, blocks, light block, kernel, layers.
_STAGES = {
    "B0": ([3, 16, 16], [[16, 16, 64, 1, False, 3, 3], [64, 32, 256, 1, False, 3, 3],
                         [256, 64, 512, 2, True, 5, 3], [512, 128, 1024, 1, True, 5, 3]]),
    "B2": ([3, 24, 32], [[32, 32, 96, 1, False, 3, 4], [96, 64, 384, 1, False, 3, 4],
                         [384, 128, 768, 3, True, 5, 4], [768, 256, 1536, 1, True, 5, 4]]),
    "B4": ([3, 32, 48], [[48, 48, 128, 1, False, 3, 6], [128, 96, 512, 1, False, 3, 6],
                         [512, 192, 1024, 3, True, 5, 6], [1024, 384, 2048, 1, True, 5, 6]]),
    "B5": ([3, 32, 64], [[64, 64, 128, 1, False, 3, 6], [128, 128, 512, 2, False, 3, 6],
                         [512, 256, 1024, 5, True, 5, 6], [1024, 512, 2048, 2, True, 5, 6]]),
}


def hgnetv2(name: str, return_idx: list[int], use_lab: bool) -> dict[str, Any]:
    """HGNetv2 backbone dict for transformers' `hgnet_v2`; `return_idx` as upstream (stages counted from 0)."""
    stem, stages = _STAGES[name]
    column = list(zip(*stages))
    return {
        "model_type": "hgnet_v2",
        "out_indices": [i + 1 for i in return_idx],
        "use_learnable_affine_block": use_lab,
        "stem_channels": list(stem),
        "hidden_sizes": list(column[2]),
        "depths": [3] * len(stages),
        "stage_in_channels": list(column[0]),
        "stage_mid_channels": list(column[1]),
        "stage_out_channels": list(column[2]),
        "stage_num_blocks": list(column[3]),
        "stage_downsample": [False] + [True] * (len(stages) - 1),
        "stage_light_block": list(column[4]),
        "stage_kernel_size": list(column[5]),
        "stage_numb_of_layers": list(column[6]),
    }


def _three_levels(backbone: dict[str, Any], in_channels: list[int], *, hidden: int = 256, expansion: float = 1.0,
                  depth_mult: float = 1.0, layers: int = 6) -> dict[str, Any]:
    """Hybrid encoder over strides 8, 16, 32 (AIFI on the last) and a 256-wide decoder with [3, 6, 3] points."""
    return {
        "backbone_config": backbone,
        "encoder_in_channels": in_channels,
        "feat_strides": [8, 16, 32],
        "encoder_hidden_dim": hidden,
        "encode_proj_layers": [2],
        "encoder_layers": 1,
        "encoder_ffn_dim": 1024,
        "hidden_expansion": expansion,
        "depth_mult": depth_mult,
        "activation_function": "silu",
        "d_model": 256,
        "decoder_in_channels": [hidden] * 3,
        "num_feature_levels": 3,
        "decoder_n_points": [3, 6, 3],
        "decoder_layers": layers,
        "decoder_ffn_dim": 1024,
        "decoder_activation_function": "silu",
        "num_queries": 300,
        "mlp_act": "silu",
        "upstream_lqe_act": True,
    }


def n() -> dict[str, Any]:
    return {
        "backbone_config": hgnetv2("B0", [2, 3], use_lab=True),
        "encoder_in_channels": [512, 1024],
        "feat_strides": [16, 32],
        "encoder_hidden_dim": 128,
        "encode_proj_layers": [1],
        "encoder_layers": 1,
        "encoder_ffn_dim": 512,
        "hidden_expansion": 0.34,
        "depth_mult": 0.5,
        "activation_function": "silu",
        "d_model": 128,
        "decoder_in_channels": [128, 128],
        "num_feature_levels": 2,
        "decoder_n_points": [6, 6],
        "decoder_layers": 3,
        "decoder_ffn_dim": 512,
        "decoder_activation_function": "silu",
        "num_queries": 300,
        "mlp_act": "silu",
        "upstream_lqe_act": True,
    }


def tiny() -> dict[str, Any]:
    """N's layout at 32 wide with 2 decoder layers and 30 queries: fast enough for tests on one CPU core."""
    kwargs = n()
    kwargs.update(encoder_hidden_dim=32, encoder_ffn_dim=64, d_model=32, decoder_in_channels=[32, 32],
                  decoder_ffn_dim=64, decoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
                  num_queries=30, num_denoising=30, lqe_hidden_dim=16)
    return kwargs


def s() -> dict[str, Any]:
    return _three_levels(hgnetv2("B0", [1, 2, 3], use_lab=True), [256, 512, 1024], expansion=0.5,
                         depth_mult=0.34, layers=3)


def m() -> dict[str, Any]:
    return _three_levels(hgnetv2("B2", [1, 2, 3], use_lab=True), [384, 768, 1536], depth_mult=0.67, layers=4)


def l() -> dict[str, Any]:  # noqa: E743 - the size is called L
    return _three_levels(hgnetv2("B4", [1, 2, 3], use_lab=False), [512, 1024, 2048])


def x() -> dict[str, Any]:
    kwargs = _three_levels(hgnetv2("B5", [1, 2, 3], use_lab=False), [512, 1024, 2048], hidden=384)
    kwargs.update(encoder_ffn_dim=2048, reg_scale=8.0)
    return kwargs


VARIANTS: dict[str, Callable[[], dict[str, Any]]] = {"tiny": tiny, "n": n, "s": s, "m": m, "l": l, "x": x}
"""Variant name -> function returning fresh `DFineConfig` keyword arguments (without `num_labels`)."""
