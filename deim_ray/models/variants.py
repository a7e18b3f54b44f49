"""models layer: the DEIMv2 sizes as `Deimv2Config` keyword dicts.

Each variant mirrors the architecture of the released DEIMv2 COCO configs
(`configs/deimv2/deimv2_{hgnetv2,dinov3}_*_coco.yml` in Intellindust-AI-Lab/DEIMv2) expressed with the
switches of transformers' `Deimv2Config`:

| variant | backbone | encoder | d_model | decoder layers | queries | params (80 classes) |
|---|---|---|---|---|---|---|
| tiny  | HGNetV2-Atto | lite   | 32  | 2 | 30  | ~0.3M (tests, CPU smoke runs) |
| atto  | HGNetV2-Atto | lite   | 64  | 3 | 100 | 0.49M |
| femto | HGNetV2-Femto| lite   | 96  | 3 | 150 | 0.96M |
| pico  | HGNetV2-Pico | lite   | 112 | 3 | 200 | 1.5M  |
| n     | HGNetV2-B0   | hybrid | 128 | 3 | 300 | 3.6M  |
| s     | ViT-Tiny (distilled) + STA  | hybrid | 192 | 4 | 300 | 9.7M  |
| m     | ViT-Tiny+ (distilled) + STA | hybrid | 256 | 4 | 300 | 18.1M |
| l     | DINOv3 ViT-S/16 + STA       | hybrid | 224 | 4 | 300 | 32.2M |
| x     | DINOv3 ViT-S+/16 + STA      | hybrid | 256 | 6 | 300 | 50.3M |
| hgnetv2_s | HGNetV2-B0, 3 levels    | hybrid | 256 | 3 | 300 | 9.3M  |
| hgnetv2_m | HGNetV2-B2, 3 levels    | hybrid | 256 | 4 | 300 | 17.3M |
| hgnetv2_l | HGNetV2-B4, 3 levels    | hybrid | 256 | 6 | 300 | 28.7M |
| hgnetv2_x | HGNetV2-B5, 3 levels    | hybrid | 256 | 6 | 300 | 57.9M |

The `hgnetv2_*` sizes are upstream's `configs/deimv2/deimv2_hgnetv2_{s,m,l,x}_coco.yml` (D-FINE-style HGNetV2
detectors inside DEIMv2; their parameter counts are those of upstream's built models, not the paper's).

Loss settings that differ per size live here too: upstream trains Atto/Femto/Pico with the MAL and box losses
only (no FGL/DDF distillation) and without the dense one-to-one union of matches (`use_uni_set: False`).
Settings that come from `ModelConfig` (class prior, focal gamma, overrides) are applied by `build.py`.
"""

from __future__ import annotations

from typing import Any

# Stage layouts of the HGNetV2 backbones (stem 3->16->16; per-stage in/mid/out channels, blocks, kernel).
_HGNETV2_STAGES: dict[str, dict[str, list]] = {
    "Atto": {"in": [16, 64, 256], "mid": [16, 32, 64], "out": [64, 256, 256], "blocks": [1, 1, 1],
             "kernel": [3, 3, 3]},
    "Femto": {"in": [16, 64, 256], "mid": [16, 32, 64], "out": [64, 256, 512], "blocks": [1, 1, 1],
              "kernel": [3, 3, 5]},
    "Pico": {"in": [16, 64, 256], "mid": [16, 32, 64], "out": [64, 256, 512], "blocks": [1, 1, 2],
             "kernel": [3, 3, 5]},
    "B0": {"in": [16, 64, 256, 512], "mid": [16, 32, 64, 128], "out": [64, 256, 512, 1024],
           "blocks": [1, 1, 2, 1], "kernel": [3, 3, 5, 5]},
    "B2": {"stem": [3, 24, 32], "in": [32, 96, 384, 768], "mid": [32, 64, 128, 256], "out": [96, 384, 768, 1536],
           "blocks": [1, 1, 3, 1], "kernel": [3, 3, 5, 5], "layers": 4},
    "B4": {"stem": [3, 32, 48], "in": [48, 128, 512, 1024], "mid": [48, 96, 192, 384],
           "out": [128, 512, 1024, 2048], "blocks": [1, 1, 3, 1], "kernel": [3, 3, 5, 5], "layers": 6},
    "B5": {"stem": [3, 32, 64], "in": [64, 128, 512, 1024], "mid": [64, 128, 256, 512],
           "out": [128, 512, 1024, 2048], "blocks": [1, 2, 5, 2], "kernel": [3, 3, 5, 5], "layers": 6},
}


def _hgnetv2_backbone(name: str, out_indices: list[int], lab: bool = True) -> dict[str, Any]:
    """HGNetV2 backbone dict; `out_indices` count stages from 1 (upstream `return_idx` + 1); `lab`: upstream
    `use_lab` (learnable affine blocks)."""
    stages = _HGNETV2_STAGES[name]
    n = len(stages["out"])
    layers = stages.get("layers", 3)
    return {
        "model_type": "hgnet_v2",
        "out_indices": out_indices,
        "use_learnable_affine_block": lab,
        "stem_channels": list(stages.get("stem", [3, 16, 16])),
        "hidden_sizes": list(stages["out"]),
        "depths": [layers] * n,
        "stage_in_channels": list(stages["in"]),
        "stage_mid_channels": list(stages["mid"]),
        "stage_out_channels": list(stages["out"]),
        "stage_num_blocks": list(stages["blocks"]),
        "stage_downsample": [False] + [True] * (n - 1),
        # the last two stages of B0 (and the last of the small ones) use light (depthwise) blocks
        "stage_light_block": [False, False] + [True] * (n - 2),
        "stage_kernel_size": list(stages["kernel"]),
        "stage_numb_of_layers": [layers] * n,
    }


def _lite(backbone: str, backbone_channels: int, width: int, queries: int, ffn: int) -> dict[str, Any]:
    """Atto/Femto/Pico layout: one stride-16 backbone map, LiteEncoder, two decoder levels (16, 32)."""
    return {
        "backbone_config": _hgnetv2_backbone(backbone, out_indices=[3]),
        "encoder_type": "lite",
        "encoder_layers": 0,
        "encoder_in_channels": [backbone_channels],
        "feat_strides": [16],
        "encoder_hidden_dim": width,
        "hidden_expansion": 0.34,
        "depth_mult": 0.5,
        "activation_function": "silu",
        "d_model": width,
        "decoder_in_channels": [width, width],
        "num_feature_levels": 2,
        "decoder_n_points": [4, 2],
        "decoder_layers": 3,
        "decoder_ffn_dim": ffn,
        "decoder_activation_function": "silu",
        "num_queries": queries,
        "share_bbox_head": True,
        "use_gateway": False,
        # upstream DEIMCriterion for these sizes: losses ['mal', 'boxes'], use_uni_set False
        "weight_loss_fgl": 0.0,
        "weight_loss_ddf": 0.0,
        "use_dense_one_to_one": False,
    }


def tiny() -> dict[str, Any]:
    """Atto's backbone under a 32-wide, 2-layer, 30-query head: fast enough for unit tests on one CPU core."""
    kwargs = _lite("Atto", 256, width=32, queries=30, ffn=64)
    kwargs.update(decoder_layers=2, decoder_attention_heads=4, num_denoising=30)
    return kwargs


def atto() -> dict[str, Any]:
    return _lite("Atto", 256, width=64, queries=100, ffn=160)


def femto() -> dict[str, Any]:
    return _lite("Femto", 512, width=96, queries=150, ffn=256)


def pico() -> dict[str, Any]:
    return _lite("Pico", 512, width=112, queries=200, ffn=320)


def n() -> dict[str, Any]:
    """HGNetV2-B0 stages 3 and 4 (strides 16, 32), hybrid encoder with one AIFI layer on the stride-32 map."""
    return {
        "backbone_config": _hgnetv2_backbone("B0", out_indices=[3, 4]),
        "encoder_type": "hybrid",
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
    }


def _hgnetv2_hybrid(backbone: str, *, lab: bool, width: int, depth_mult: float, expansion: float,
                    trailing_conv: bool, decoder_layers: int, enc_ffn: int = 1024) -> dict[str, Any]:
    """HGNetV2 stages 2-4 (strides 8, 16, 32) under the three-level hybrid head with a 256-wide decoder:
    upstream's `deimv2_hgnetv2_{s,m,l,x}` layout. `trailing_conv`: upstream encoder `version: dfine`
    (RepNCSPELAN4) rather than `deim` (RepNCSPELAN5)."""
    kwargs = _three_level_head(width, enc_ffn=enc_ffn, expansion=expansion, depth_mult=depth_mult, dec_ffn=2048,
                               layers=decoder_layers, d_model=256)
    kwargs.update(backbone_config=_hgnetv2_backbone(backbone, out_indices=[2, 3, 4], lab=lab),
                  encoder_in_channels=list(_HGNETV2_STAGES[backbone]["out"][1:]),
                  encoder_has_trailing_conv=trailing_conv)
    return kwargs


def hgnetv2_s() -> dict[str, Any]:
    return _hgnetv2_hybrid("B0", lab=True, width=256, depth_mult=0.34, expansion=0.5, trailing_conv=True,
                           decoder_layers=3)


def hgnetv2_m() -> dict[str, Any]:
    return _hgnetv2_hybrid("B2", lab=True, width=256, depth_mult=0.67, expansion=1.0, trailing_conv=False,
                           decoder_layers=4)


def hgnetv2_l() -> dict[str, Any]:
    return _hgnetv2_hybrid("B4", lab=False, width=256, depth_mult=1.0, expansion=1.0, trailing_conv=False,
                           decoder_layers=6)


def hgnetv2_x() -> dict[str, Any]:
    """B5 with frozen backbone batch norms (upstream `freeze_norm: True`) and a frozen stem (`freeze_at: 0`,
    `freeze_stem_only: True`), a 384-wide encoder, reg_scale 8."""
    kwargs = _hgnetv2_hybrid("B5", lab=False, width=384, depth_mult=1.0, expansion=1.0, trailing_conv=False,
                             decoder_layers=6, enc_ffn=2048)
    kwargs.update(reg_scale=8.0, freeze_backbone_batch_norms=True, upstream_arch={"freeze_stem": True})
    return kwargs


def _vit(hidden: int, heads: int, out_indices: list[int], *, dinov3: bool, gated: bool = False) -> dict[str, Any]:
    """ViT backbone dict. `dinov3=True`: the official DINOv3 small models (register tokens, layer scale,
    final norm); False: the distilled tiny ViTs used by S and M. Both have a key bias: the distilled ViTs
    learn one, and RoPE rotates it differently per position, so softmax does not cancel it (the official
    models' is masked to zero)."""
    ffn_ratio = 6 if gated else 4
    intermediate = hidden * ffn_ratio
    if gated:  # SwiGLU keeps 2/3 of the hidden width, rounded up to a multiple of 8
        intermediate = int(intermediate * 2 / 3)
        intermediate += -intermediate % 8
    return {
        "model_type": "dinov3_vit",
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_hidden_layers": 12,
        "intermediate_size": intermediate,
        "use_gated_mlp": gated,
        "hidden_act": "silu" if gated else "gelu",  # upstream's SwiGLU FFN: silu(w1 x) * w2 x
        "layerscale_value": 1e-5 if dinov3 else 1.0,
        "num_register_tokens": 4 if dinov3 else 0,
        "pos_embed_rescale": 2.0 if dinov3 else None,
        "key_bias": True,
        "apply_layernorm": dinov3,
        "rope_theta": 100.0,
        "layer_norm_eps": 1e-5 if dinov3 else 1e-6,  # upstream: DINOv3 "layernormbf16", ViT-Tiny eps 1e-6
        "out_indices": out_indices,
        "reshape_hidden_states": True,
    }


def _three_level_head(width: int, *, enc_ffn: int, expansion: float, depth_mult: float, dec_ffn: int,
                      layers: int, d_model: int | None = None) -> dict[str, Any]:
    """Hybrid encoder (`width` channels, AIFI on the stride-32 level) + decoder over three levels (strides 8,
    16, 32); the decoder is `d_model` wide (default: `width`)."""
    return {
        "encoder_type": "hybrid",
        "encoder_has_trailing_conv": False,
        "encoder_in_channels": [width] * 3,
        "feat_strides": [8, 16, 32],
        "encoder_hidden_dim": width,
        "encode_proj_layers": [2],
        "encoder_layers": 1,
        "encoder_ffn_dim": enc_ffn,
        "hidden_expansion": expansion,
        "depth_mult": depth_mult,
        "activation_function": "silu",
        "d_model": d_model or width,
        "decoder_in_channels": [width] * 3,
        "num_feature_levels": 3,
        "decoder_n_points": [3, 6, 3],
        "decoder_layers": layers,
        "decoder_ffn_dim": dec_ffn,
        "decoder_activation_function": "silu",
        "num_queries": 300,
    }


def _dinov3_head(width: int, *, sta: int, enc_ffn: int, expansion: float, depth_mult: float, dec_ffn: int,
                 layers: int) -> dict[str, Any]:
    """The three-level head over ViT features fused with the spatial tuning adapter's (`sta` channels)."""
    kwargs = _three_level_head(width, enc_ffn=enc_ffn, expansion=expansion, depth_mult=depth_mult, dec_ffn=dec_ffn,
                               layers=layers)
    kwargs["spatial_tuning_adapter_inplanes"] = sta
    return kwargs


def s() -> dict[str, Any]:
    kwargs = _dinov3_head(192, sta=16, enc_ffn=512, expansion=0.34, depth_mult=0.67, dec_ffn=512, layers=4)
    kwargs["backbone_config"] = _vit(192, 3, [4, 8, 12], dinov3=False)
    return kwargs


def m() -> dict[str, Any]:
    kwargs = _dinov3_head(256, sta=16, enc_ffn=512, expansion=0.67, depth_mult=1.0, dec_ffn=512, layers=4)
    kwargs["backbone_config"] = _vit(256, 4, [4, 8, 12], dinov3=False)
    return kwargs


def l() -> dict[str, Any]:  # noqa: E743 - the size is called L
    kwargs = _dinov3_head(224, sta=32, enc_ffn=896, expansion=1.0, depth_mult=1.0, dec_ffn=1792, layers=4)
    kwargs["backbone_config"] = _vit(384, 6, [6, 9, 12], dinov3=True)
    return kwargs


def x() -> dict[str, Any]:
    kwargs = _dinov3_head(256, sta=64, enc_ffn=1024, expansion=1.25, depth_mult=1.37, dec_ffn=2048, layers=6)
    kwargs["backbone_config"] = _vit(384, 6, [6, 9, 12], dinov3=True, gated=True)
    return kwargs


PAPER_PARAMS_M: dict[str, float] = {
    "atto": 0.49, "femto": 0.96, "pico": 1.5, "n": 3.6, "s": 9.7, "m": 18.1, "l": 32.2, "x": 50.3,
}
"""Parameter counts (millions, 80 COCO classes) reported by the DEIMv2 paper."""

