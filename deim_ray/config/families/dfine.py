"""config layer: upstream DEIM's D-FINE configs (`DFINETransformer` over `HGNetv2`), resolved per variant."""

from __future__ import annotations

from typing import Any

from deim_ray.config.errors import ConfigError
from deim_ray.config.families.common import UpstreamFamily
from deim_ray.config.upstream_model import Reader

_NAMES = {"B2": "m", "B4": "l", "B5": "x"}  # B0 is n (two levels, return_idx [2, 3]) or s (three levels)

# configs/base/dfine_hgnetv2.yml + base/deim.yml (DEIM unfreezes the backbone norms and uses SiLU heads)
_BACKBONE = {"return_idx": [1, 2, 3], "use_lab": False, "freeze_at": -1, "freeze_norm": False}
_ENCODER = {
    "in_channels": [512, 1024, 2048], "feat_strides": [8, 16, 32], "hidden_dim": 256, "use_encoder_idx": [2],
    "num_encoder_layers": 1, "nhead": 8, "dim_feedforward": 1024, "dropout": 0.0, "enc_act": "gelu",
    "expansion": 1.0, "depth_mult": 1, "act": "silu", "version": "dfine",
}
_DECODER = {
    "feat_channels": [256, 256, 256], "feat_strides": [8, 16, 32], "hidden_dim": 256, "num_levels": 3,
    "num_layers": 6, "eval_idx": -1, "num_queries": 300, "num_denoising": 100, "label_noise_ratio": 0.5,
    "box_noise_scale": 1.0, "reg_max": 32, "reg_scale": 4, "layer_scale": 1, "num_points": [3, 6, 3],
    "cross_attn_method": "default", "query_select_method": "default", "dim_feedforward": 1024,
    "activation": "silu", "mlp_act": "silu",
}
# Per variant: the keys upstream's model file (configs/deim_dfine/dfine_hgnetv2_*_coco.yml) sets on the base.
_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "n": {"backbone": {"return_idx": [2, 3], "use_lab": True},
          "encoder": {"in_channels": [512, 1024], "feat_strides": [16, 32], "hidden_dim": 128,
                      "use_encoder_idx": [1], "dim_feedforward": 512, "expansion": 0.34, "depth_mult": 0.5},
          "decoder": {"feat_channels": [128, 128], "feat_strides": [16, 32], "hidden_dim": 128,
                      "dim_feedforward": 512, "num_levels": 2, "num_layers": 3, "num_points": [6, 6]}},
    "s": {"backbone": {"use_lab": True},
          "encoder": {"in_channels": [256, 512, 1024], "depth_mult": 0.34, "expansion": 0.5},
          "decoder": {"num_layers": 3}},
    "m": {"backbone": {"use_lab": True},
          "encoder": {"in_channels": [384, 768, 1536], "depth_mult": 0.67},
          "decoder": {"num_layers": 4}},
    "l": {"backbone": {}, "encoder": {}, "decoder": {}},
    "x": {"backbone": {}, "encoder": {"hidden_dim": 384, "dim_feedforward": 2048},
          "decoder": {"feat_channels": [384, 384, 384], "reg_scale": 8}},
}

# Upstream param-group regexes -> the same parameters under transformers' names. Upstream's HGNetv2 names its
# batch norms `bn` and has no `norm` in any name; transformers' calls them `normalization`; the encoder/decoder
# norms upstream calls `norm` are `*norm*`, `enc_output.1` and `*input_proj.N.1` in transformers.
NORM = r"(?:norm|enc_output\.1\.|input_proj\.\d+\.1\.)"
PARAM_REGEX = {
    r"^(?=.*backbone)(?!.*norm|bn).*$": r"^model\.backbone\.",  # every HGNetv2 parameter (no `norm` upstream)
    r"^(?=.*backbone)(?!.*norm).*$": r"^model\.backbone\.",
    r"^(?=.*backbone)(?!.*bn).*$": r"^model\.backbone\.(?!.*normalization)",
    r"^(?=.*backbone)(?=.*norm|bn).*$": r"(?!)",  # matches no HGNetv2 parameter upstream either
    r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$": rf"^(?!model\.backbone\.)(?=.*{NORM})",
    r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$": rf"^(?!model\.backbone\.)(?=.*(?:{NORM}|bias))",
    r"^(?=.*(?:norm|bn)).*$": rf"(?=.*{NORM})",
}


def _variant(r: Reader) -> str:
    name = r.get("HGNetv2.name")
    if name == "B0":
        return "n" if r.peek("HGNetv2.return_idx") == [2, 3] else "s"
    if name not in _NAMES:
        raise ConfigError(f"`HGNetv2.name: {name}` matches no D-FINE variant; known: B0 (n, s), "
                          + ", ".join(f"{k} ({v})" for k, v in _NAMES.items()))
    return _NAMES[name]


DFINE = UpstreamFamily(
    family="dfine", backbone="HGNetv2", decoder="DFINETransformer", variant_of=_variant,
    backbone_keys={v: {**_BACKBONE, **s["backbone"]} for v, s in _VARIANTS.items()},
    encoder_keys={v: {**_ENCODER, **s["encoder"]} for v, s in _VARIANTS.items()},
    decoder_keys={v: {**_DECODER, **s["decoder"]} for v, s in _VARIANTS.items()},
    losses=["mal", "boxes", "local"], use_uni_set=True, param_regex=PARAM_REGEX,
    decoder_defaults={"activation": "relu", "mlp_act": "relu"},
    decoder_kw={"mlp_act": "mlp_act"},
    weights_file=lambda r: f"PPHGNetV2_{r.peek('HGNetv2.name')}_stage1.pth", weights_dir="weight/hgnetv2/",
)
