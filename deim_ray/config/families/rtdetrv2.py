"""config layer: upstream DEIM's RT-DETRv2 configs (`RTDETRTransformerv2` over `PResNet`), resolved per variant."""

from __future__ import annotations

from typing import Any

from deim_ray.config.errors import ConfigError
from deim_ray.config.families.dfine import NORM
from deim_ray.config.families.common import UpstreamFamily
from deim_ray.config.upstream_model import Reader

# configs/base/rtdetrv2_r50vd.yml + base/rt_deim.yml (DEIM unfreezes the backbone, SiLU heads, `as_reg` queries)
_BACKBONE = {"variant": "d", "return_idx": [1, 2, 3], "num_stages": 4, "freeze_at": -1, "freeze_norm": False}
_ENCODER = {
    "in_channels": [512, 1024, 2048], "feat_strides": [8, 16, 32], "hidden_dim": 256, "use_encoder_idx": [2],
    "num_encoder_layers": 1, "nhead": 8, "dim_feedforward": 1024, "dropout": 0.0, "enc_act": "gelu",
    "expansion": 1.0, "depth_mult": 1, "act": "silu", "version": "rt_detrv2",
}
_DECODER = {
    "feat_channels": [256, 256, 256], "feat_strides": [8, 16, 32], "hidden_dim": 256, "num_levels": 3,
    "num_layers": 6, "num_queries": 300, "num_denoising": 100, "label_noise_ratio": 0.5, "box_noise_scale": 1.0,
    "eval_idx": -1, "num_points": [4, 4, 4], "cross_attn_method": "default", "query_select_method": "default",
    "dim_feedforward": 1024, "activation": "silu", "mlp_act": "silu", "query_pos_method": "as_reg",
}
_SMALL_ENCODER = {"in_channels": [128, 256, 512], "expansion": 0.5}
# Per variant: the keys of upstream's model files (configs/deim_rtdetrv2/deim_r*vd_*_coco.yml and their bases).
_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "r18": {"backbone": {"depth": 18}, "encoder": _SMALL_ENCODER, "decoder": {"num_layers": 3}},
    "r34": {"backbone": {"depth": 34}, "encoder": _SMALL_ENCODER, "decoder": {"num_layers": 4}},
    "r50": {"backbone": {"depth": 50}, "encoder": {}, "decoder": {}},
    "r50m": {"backbone": {"depth": 50}, "encoder": {"expansion": 0.5}, "decoder": {"num_layers": 3}},
    "r101": {"backbone": {"depth": 101}, "encoder": {"hidden_dim": 384, "dim_feedforward": 2048},
             "decoder": {"feat_channels": [384, 384, 384]}},
}

# The ImageNet files upstream's PResNet loads (`local_weights`), per depth.
RESNET_FILES = {18: "ResNet18_vd_pretrained_from_paddle.pth", 34: "ResNet34_vd_pretrained_from_paddle.pth",
                50: "ResNet50_vd_ssld_v2_pretrained_from_paddle.pth",
                101: "ResNet101_vd_ssld_pretrained_from_paddle.pth"}

# Upstream param-group regexes -> transformers' names. Upstream's PResNet names its batch norms `norm`
# (transformers: `normalization`); encoder/decoder norms as for D-FINE.
PARAM_REGEX = {
    r"^(?=.*backbone)(?!.*norm|bn).*$": r"^model\.backbone\.(?!.*normalization)",
    r"^(?=.*backbone)(?!.*norm).*$": r"^model\.backbone\.(?!.*normalization)",
    r"^(?=.*backbone)(?=.*norm|bn).*$": r"^model\.backbone\..*normalization",
    r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$": rf"^(?!model\.backbone\.)(?=.*{NORM})",
    r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$": rf"^(?!model\.backbone\.)(?=.*(?:{NORM}|bias))",
    r"^(?=.*(?:norm|bn)).*$": rf"(?=.*{NORM})",
}


def _variant(r: Reader) -> str:
    depth = r.get("PResNet.depth", 50)
    if depth == 50:
        return "r50m" if r.peek("HybridEncoder.expansion") == 0.5 else "r50"
    if f"r{depth}" not in _VARIANTS:
        raise ConfigError(f"`PResNet.depth: {depth}` matches no RT-DETRv2 variant; known: 18, 34, 50, 101")
    return f"r{depth}"


RTDETRV2 = UpstreamFamily(
    family="rtdetrv2", backbone="PResNet", decoder="RTDETRTransformerv2", variant_of=_variant,
    backbone_keys={v: {**_BACKBONE, **s["backbone"]} for v, s in _VARIANTS.items()},
    encoder_keys={v: {**_ENCODER, **s["encoder"]} for v, s in _VARIANTS.items()},
    decoder_keys={v: {**_DECODER, **s["decoder"]} for v, s in _VARIANTS.items()},
    losses=["mal", "boxes"], use_uni_set=False, param_regex=PARAM_REGEX,
    # transformers' RT-DETRv2 always evaluates its last layer: another eval_idx is reported, not mapped
    decoder_defaults={"activation": "relu", "mlp_act": "relu", "query_pos_method": "default"},
    decoder_kw={"mlp_act": "mlp_act", "query_pos_method": "query_pos_method", "eval_idx": None},
    weights_file=lambda r: RESNET_FILES[r.peek("PResNet.depth", 50)], weights_dir="weights/resnets",
)
