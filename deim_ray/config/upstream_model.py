"""config layer: upstream DEIMv2 model sections -> `model.variant` (+ overrides), for `upstream.py`.

Upstream describes a model by class-named sections (`HGNetv2`/`DINOv3STAs`, `HybridEncoder`/`LiteEncoder`,
`DEIMTransformer`, `DEIMCriterion`, `PostProcessor`). deim_ray names a variant instead. We read the variant
from the backbone name, then compare every key of the sections upstream actually uses with what upstream's
own config for that variant resolves to (the tables below, read from upstream's `configs/base/deimv2.yml` and
`configs/deimv2/*.yml`). A difference becomes a `model.*` field or a `model.extra` (`Deimv2Config` keyword)
when one exists, and is reported otherwise. Parameter-group regexes are rewritten from upstream module
names to the transformers parameter names deim_ray trains (`model.conv_encoder...`).
"""

from __future__ import annotations

from typing import Any, Protocol

from deim_ray.config.errors import ConfigError

HGNET_NAMES = {"Atto": "atto", "Femto": "femto", "Pico": "pico", "B0": "n", "B2": "hgnetv2_m", "B4": "hgnetv2_l",
               "B5": "hgnetv2_x"}
# B0 builds N with two feature levels (return_idx [2, 3]) and upstream's HGNetv2-S with three ([1, 2, 3])
_B0_THREE_LEVELS = "hgnetv2_s"
DINOV3_NAMES = {"vit_tiny": "s", "vit_tinyplus": "m", "dinov3_vits16": "l", "dinov3_vits16plus": "x"}
LITE_VARIANTS = ("atto", "femto", "pico")

# What upstream's configs/base/deimv2.yml sets for each section (before a model file overrides it).
_BASE_HGNET = {"return_idx": [1, 2, 3], "freeze_at": -1, "freeze_stem_only": True, "freeze_norm": False}
_BASE_HYBRID = {
    "in_channels": [512, 1024, 2048], "feat_strides": [8, 16, 32], "hidden_dim": 256, "use_encoder_idx": [2],
    "num_encoder_layers": 1, "nhead": 8, "dim_feedforward": 1024, "dropout": 0.0, "enc_act": "gelu",
    "expansion": 1.0, "depth_mult": 1, "act": "silu", "version": "deim", "csp_type": "csp2", "fuse_op": "sum",
}
_BASE_DECODER = {
    "feat_channels": [256, 256, 256], "feat_strides": [8, 16, 32], "hidden_dim": 256, "num_levels": 3,
    "num_layers": 6, "eval_idx": -1, "num_queries": 300, "num_denoising": 100, "label_noise_ratio": 0.5,
    "box_noise_scale": 1.0, "reg_max": 32, "reg_scale": 4, "layer_scale": 1, "num_points": [3, 6, 3],
    "cross_attn_method": "default", "query_select_method": "default", "activation": "silu", "mlp_act": "silu",
    "dim_feedforward": 2048,
}
_LITE_ENCODER = {"feat_strides": [16], "expansion": 0.34, "depth_mult": 0.5, "act": "silu"}
_LITE_DECODER = {"feat_strides": [16, 32], "num_levels": 2, "num_points": [4, 2], "num_layers": 3,
                 "share_bbox_head": True, "use_gateway": False}


def _lite(channels: int, width: int, queries: int, ffn: int) -> dict[str, Any]:
    return {
        "backbone": {"return_idx": [2], "use_lab": True},
        "encoder": {**_LITE_ENCODER, "in_channels": [channels], "hidden_dim": width},
        "decoder": {**_LITE_DECODER, "feat_channels": [width, width], "hidden_dim": width,
                    "num_queries": queries, "dim_feedforward": ffn},
    }


def _hgnet(name: str, backbone: dict[str, Any], encoder: dict[str, Any], decoder: dict[str, Any]
           ) -> dict[str, Any]:
    return {"backbone": {"name": name, **backbone}, "encoder": encoder, "decoder": decoder}


def _vit(backbone: dict[str, Any], width: int, encoder: dict[str, Any], decoder: dict[str, Any]) -> dict[str, Any]:
    return {
        "backbone": {"interaction_indexes": [5, 8, 11], **backbone},  # S and M override: [3, 7, 11]
        "encoder": {"in_channels": [width] * 3, "hidden_dim": width, **encoder},
        "decoder": {"feat_channels": [width] * 3, "hidden_dim": width, **decoder},
    }


# Per variant: the keys upstream's model file sets on top of the base (see module docstring).
_VARIANT_SECTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "atto": _lite(256, 64, 100, 160),
    "femto": _lite(512, 96, 150, 256),
    "pico": _lite(512, 112, 200, 320),
    "n": {
        "backbone": {"return_idx": [2, 3], "use_lab": True},
        "encoder": {"in_channels": [512, 1024], "feat_strides": [16, 32], "hidden_dim": 128, "use_encoder_idx": [1],
                    "dim_feedforward": 512, "expansion": 0.34, "depth_mult": 0.5, "version": "dfine"},
        "decoder": {"feat_channels": [128, 128], "feat_strides": [16, 32], "hidden_dim": 128, "num_levels": 2,
                    "num_points": [6, 6], "num_layers": 3, "num_queries": 300, "dim_feedforward": 512},
    },
    "hgnetv2_s": _hgnet("B0", {"return_idx": [1, 2, 3], "use_lab": True},
                        {"in_channels": [256, 512, 1024], "depth_mult": 0.34, "expansion": 0.5, "version": "dfine"},
                        {"num_layers": 3}),
    "hgnetv2_m": _hgnet("B2", {"use_lab": True}, {"in_channels": [384, 768, 1536], "depth_mult": 0.67},
                        {"num_layers": 4}),
    "hgnetv2_l": _hgnet("B4", {}, {}, {}),
    "hgnetv2_x": _hgnet("B5", {"freeze_at": 0, "freeze_norm": True}, {"hidden_dim": 384, "dim_feedforward": 2048},
                        {"feat_channels": [384] * 3, "reg_scale": 8, "dim_feedforward": 2048}),
    "s": _vit({"embed_dim": 192, "num_heads": 3, "interaction_indexes": [3, 7, 11]}, 192, {"depth_mult": 0.67, "expansion": 0.34, "dim_feedforward": 512},
              {"dim_feedforward": 512, "num_layers": 4}),
    "m": _vit({"embed_dim": 256, "num_heads": 4, "interaction_indexes": [3, 7, 11]}, 256, {"depth_mult": 1, "expansion": 0.67, "dim_feedforward": 512},
              {"dim_feedforward": 512, "num_layers": 4}),
    "l": _vit({"finetune": True, "conv_inplane": 32, "hidden_dim": 224}, 224, {"dim_feedforward": 896},
              {"num_layers": 4, "dim_feedforward": 1792}),
    "x": _vit({"finetune": True, "conv_inplane": 64, "hidden_dim": 256}, 256,
              {"dim_feedforward": 1024, "expansion": 1.25, "depth_mult": 1.37},
              {"num_layers": 6, "dim_feedforward": 2048}),
}

# Upstream key -> our model field (a difference from the variant sets the field).
DECODER_FIELDS = {"num_queries": "num_queries", "num_layers": "decoder_layers", "num_denoising": "num_denoising"}
# Upstream key -> Deimv2Config keyword (a difference goes to model.extra).
DECODER_KW = {
    "hidden_dim": "d_model", "dim_feedforward": "decoder_ffn_dim", "num_points": "decoder_n_points",
    "num_levels": "num_feature_levels", "feat_channels": "decoder_in_channels", "eval_idx": "eval_idx",
    "label_noise_ratio": "label_noise_ratio", "box_noise_scale": "box_noise_scale", "reg_max": "max_num_bins",
    "reg_scale": "reg_scale", "layer_scale": "layer_scale", "activation": "decoder_activation_function",
    "share_bbox_head": "share_bbox_head", "use_gateway": "use_gateway", "cross_attn_method": "decoder_method",
}
ENCODER_KW = {
    "in_channels": "encoder_in_channels", "feat_strides": "feat_strides", "hidden_dim": "encoder_hidden_dim",
    "use_encoder_idx": "encode_proj_layers", "num_encoder_layers": "encoder_layers", "nhead": "encoder_attention_heads",
    "dim_feedforward": "encoder_ffn_dim", "dropout": "dropout", "enc_act": "encoder_activation_function",
    "expansion": "hidden_expansion", "depth_mult": "depth_mult", "act": "activation_function",
    "fuse_op": "encoder_fuse_op",
}
_LOSS_WEIGHTS = {"loss_mal": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}
_MATCHER_COSTS = {"cost_class": "matcher_class_cost", "cost_bbox": "matcher_bbox_cost",
                  "cost_giou": "matcher_giou_cost"}

# Upstream param-group regexes (module names) -> the same members over transformers parameter names. Upstream's
# HGNetv2 names its batch norms `bn` and nothing `norm`, and `(?!.*norm|bn)` tests `bn` only at the name's start:
# that group holds every backbone parameter, batch norms included (weight-decayed), and `(?=.*norm|bn)` none.
# Checked parameter by parameter against upstream's own optimizer (tests/engine/test_param_groups_upstream.py).
PARAM_REGEX = {
    r"^(?=.*backbone)(?!.*norm|bn).*$": r"conv_encoder\.model\.",
    r"^(?=.*backbone)(?=.*norm|bn).*$": r"(?!)",
    r"^(?=.*backbone)(?!.*bn).*$": r"conv_encoder\.model\.(?!.*normalization)",
    r"^(?=.*(?:norm|bn)).*$": r"(?=.*(?:norm|bn))",
    # the lite encoder's downsampling batch norms are `encoder.down_sample{1,2}.2` upstream (no `norm` in the name)
    r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$":
        r"^(?!.*conv_encoder\.model\.)(?!.*encoder\.down_conv\d\.norm\.weight)(?=.*(?:norm|bn|bias))",
    r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$":
        r"^(?!.*conv_encoder\.model\.)(?!.*encoder\.down_conv\d\.norm\.)(?=.*(?:norm|bn))",
    r"^(?=.*.dinov3)(?!.*(?:norm|bn|bias)).*$": r"conv_encoder\.backbone\.(?!.*(?:norm|bn|bias))",
    r"^(?=.*.dinov3)(?=.*(?:norm|bn|bias)).*$": r"conv_encoder\.backbone\..*(?:norm|bn|bias)",
    # the ViT feature projections are `backbone.convs.N` / `backbone.norms.N` upstream (not sta/encoder/decoder),
    # the STA's batch norms `backbone.sta.<conv>.<index>` (only their biases match)
    r"^(?=.*(?:sta|encoder|decoder))(?=.*(?:norm|bn|bias)).*$":
        r"^(?!.*conv_encoder\.(?:backbone|fusion_proj)\.)(?!.*spatial_tuning_adapter\..*norm\.weight)"
        r"(?=.*(?:norm|bn|bias))",
}


class Reader(Protocol):
    """The part of upstream.py's reader this module uses."""

    def has(self, key: str) -> bool: ...
    def get(self, key: str, default: Any = None) -> Any: ...
    def peek(self, key: str, default: Any = None) -> Any: ...
    def put(self, ours: str, value: Any, upstream: str | None) -> None: ...
    def expect(self, key: str, expected: Any) -> None: ...
    def note(self, key: str, value: Any, reason: str) -> None: ...
    def ignore(self, key: str) -> None: ...


def convert_model(r: Reader) -> str:
    """Map the upstream model sections onto `model.*`, `eval.*` and `schedule.matcher_change_epoch`."""
    if r.get("model", "DEIM") != "DEIM":
        raise ConfigError(f"upstream model {r.get('model')!r} is not supported: deim_ray imports DEIMv2 (model: DEIM)")
    backbone = r.get("DEIM.backbone", "HGNetv2")
    encoder = r.get("DEIM.encoder", "HybridEncoder")
    decoder = r.get("DEIM.decoder", "DEIMTransformer")
    variant = _variant(r, backbone, decoder)
    r.put("model.variant", variant, f"{backbone}.name")
    expected = _VARIANT_SECTIONS[variant]
    base_backbone = _BASE_HGNET if backbone == "HGNetv2" else {}
    _compare_backbone(r, backbone, {**base_backbone, **expected["backbone"]})
    wanted_encoder = "LiteEncoder" if variant in LITE_VARIANTS else "HybridEncoder"
    if encoder != wanted_encoder:
        r.note("DEIM.encoder", encoder, f"DEIMv2-{variant.upper()} uses {wanted_encoder}; others are not supported")
    base_encoder = _BASE_HYBRID if encoder == "HybridEncoder" else {}
    compare_section(r, encoder, {**base_encoder, **expected["encoder"]}, {}, ENCODER_KW)
    compare_section(r, decoder, {**_BASE_DECODER, **expected["decoder"]}, DECODER_FIELDS, DECODER_KW)
    for unused in {"HGNetv2", "DINOv3STAs", "HybridEncoder", "LiteEncoder"} - {backbone, encoder}:
        r.ignore(unused)  # sections upstream defines but this model does not build
    if r.has("PostProcessor.num_top_queries"):
        r.put("eval.num_top_queries", r.get("PostProcessor.num_top_queries"), "PostProcessor.num_top_queries")
    _convert_criterion(r, variant)
    return variant


def _variant(r: Reader, backbone: str, decoder: str) -> str:
    if decoder != "DEIMTransformer":
        raise ConfigError(f"upstream decoder {decoder!r} is not supported: deim_ray imports DEIMv2 (DEIMTransformer)")
    names = {"HGNetv2": HGNET_NAMES, "DINOv3STAs": DINOV3_NAMES}.get(backbone)
    if names is None:
        raise ConfigError(f"upstream backbone {backbone!r} is not supported; DEIMv2 uses HGNetv2 or DINOv3STAs")
    name = r.get(f"{backbone}.name")
    if name == "B0" and r.peek(f"{backbone}.return_idx") == [1, 2, 3]:
        return _B0_THREE_LEVELS
    if name not in names:
        raise ConfigError(
            f"`{backbone}.name: {name}` matches no DEIMv2 variant; known: "
            + ", ".join(f"{k} ({v})" for k, v in names.items())
        )
    return names[name]


def _compare_backbone(r: Reader, section: str, expected: dict[str, Any]) -> None:
    if r.get(f"{section}.pretrained", False):
        # upstream: local_model_dir + PPHGNetV2_<name>_stage1.pth, where Atto/Femto/Pico start from B0's file
        name = r.get(f"{section}.name")
        stem = "B0" if name in ("Atto", "Femto", "Pico") else name
        path = f"{r.get(f'{section}.local_model_dir', './weight/hgnetv2/')}PPHGNetV2_{stem}_stage1.pth"
        r.put("model.backbone_pretrained", path, f"{section}.pretrained")
        r.ignore(f"{section}.pretrained")
    if r.get(f"{section}.weights_path", None):  # DINOv3STAs: the ViT file (upstream skips a missing one silently)
        r.put("model.backbone_pretrained", r.get(f"{section}.weights_path"), f"{section}.weights_path")
    r.ignore(f"{section}.weights_path")
    r.ignore(f"{section}.local_model_dir")
    if r.get(f"{section}.freeze_at", -1) == -1:
        r.ignore(f"{section}.freeze_stem_only")  # only read when freezing is on
    for key in section_of(r, section):
        if key in expected:
            r.expect(f"{section}.{key}", expected[key])


def compare_section(r: Reader, section: str, expected: dict[str, Any], fields: dict[str, str],
                     keywords: dict[str, str]) -> None:
    for key, value in section_of(r, section).items():
        path = f"{section}.{key}"
        if key not in expected:
            continue  # left for the reader's "not recognised" report
        r.ignore(path)
        if value == expected[key]:
            continue
        if key in fields:
            r.put(f"model.{fields[key]}", value, path)
        elif key in keywords:
            r.put(f"model.extra.{keywords[key]}", value, path)
        else:
            r.note(path, value, f"differs from the variant ({expected[key]!r}) and has no deim_ray setting")


def section_of(r: Reader, name: str) -> dict[str, Any]:
    value = r.peek(name)
    return value if isinstance(value, dict) else {}


def _convert_criterion(r: Reader, variant: str) -> None:
    c = "DEIMCriterion"
    if r.has(f"{c}.gamma"):
        r.put("model.focal_loss_gamma", r.get(f"{c}.gamma"), f"{c}.gamma")
    weights = r.get(f"{c}.weight_dict") or {}
    r.ignore(f"{c}.weight_dict")
    for key, value in weights.items():
        if key not in _LOSS_WEIGHTS:
            r.note(f"{c}.weight_dict.{key}", value, "unknown loss term")
        elif value != _LOSS_WEIGHTS[key]:
            r.put(f"model.extra.weight_{key}", value, f"{c}.weight_dict.{key}")
    losses = ["mal", "boxes"] if variant in LITE_VARIANTS else ["mal", "boxes", "local"]
    r.expect(f"{c}.losses", losses)
    r.expect(f"{c}.use_uni_set", variant not in LITE_VARIANTS)
    for key, keyword, default in (("alpha", "focal_loss_alpha", 0.75), ("reg_max", "max_num_bins", 32)):
        if r.get(f"{c}.{key}", default) != default:
            r.put(f"model.extra.{keyword}", r.get(f"{c}.{key}"), f"{c}.{key}")
        r.ignore(f"{c}.{key}")
    convert_matcher(r, f"{c}.matcher")


def convert_matcher(r: Reader, m: str) -> None:
    r.expect(f"{m}.type", "HungarianMatcher")
    for key, value in (r.get(f"{m}.weight_dict") or {}).items():
        if key not in _MATCHER_COSTS:
            r.note(f"{m}.weight_dict.{key}", value, "unknown matcher cost")
        elif value != {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}[key]:
            r.put(f"model.extra.{_MATCHER_COSTS[key]}", value, f"{m}.weight_dict.{key}")
    r.ignore(f"{m}.weight_dict")
    for key, keyword, default in (("alpha", "matcher_alpha", 0.25), ("gamma", "matcher_gamma", 2.0)):
        if r.get(f"{m}.{key}", default) != default:
            r.put(f"model.extra.{keyword}", r.get(f"{m}.{key}"), f"{m}.{key}")
        r.ignore(f"{m}.{key}")
    if r.has(f"{m}.iou_order_alpha"):
        r.put("schedule.iou_order_alpha", r.get(f"{m}.iou_order_alpha"), f"{m}.iou_order_alpha")
    if r.get(f"{m}.change_matcher", False) and r.has(f"{m}.matcher_change_epoch"):
        r.put("schedule.matcher_change_epoch", r.get(f"{m}.matcher_change_epoch"), f"{m}.matcher_change_epoch")
    else:
        r.put("schedule.matcher_change_epoch", None, f"{m}.change_matcher")
        r.ignore(f"{m}.matcher_change_epoch")
    r.ignore(f"{m}.change_matcher")


def translate_param_regex(pattern: str) -> str | None:
    """The transformers-name regex for a known upstream param-group regex, or None when unknown."""
    return PARAM_REGEX.get(pattern.strip())
