"""config layer: the part of the D-FINE / RT-DETRv2 import both families share (see the package docstring)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from deim_ray.config.errors import ConfigError
from deim_ray.config.upstream_model import (DECODER_FIELDS, DECODER_KW, ENCODER_KW, Reader, compare_section,
                                            convert_matcher, section_of)

# Upstream DEIMCriterion weight -> transformers config keyword (MAL and VFL share the classification weight).
_WEIGHTS = {"loss_mal": "weight_loss_vfl", "loss_vfl": "weight_loss_vfl", "loss_bbox": "weight_loss_bbox",
            "loss_giou": "weight_loss_giou", "loss_fgl": "weight_loss_fgl", "loss_ddf": "weight_loss_ddf"}
_WEIGHT_DEFAULTS = {"weight_loss_vfl": 1, "weight_loss_bbox": 5, "weight_loss_giou": 2, "weight_loss_fgl": 0.15,
                    "weight_loss_ddf": 1.5}
# Backbone keys with a transformers setting: upstream key -> (model.extra path, value transform).
_BACKBONE_KW: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "freeze_norm": ("freeze_backbone_batch_norms", bool),
    "use_lab": ("backbone_config.use_learnable_affine_block", bool),
}


@dataclass(frozen=True)
class UpstreamFamily:
    """What one family's upstream DEIM configs resolve to, per deim_ray variant."""

    family: str
    backbone: str
    decoder: str
    variant_of: Callable[[Reader], str]
    backbone_keys: dict[str, dict[str, Any]]
    encoder_keys: dict[str, dict[str, Any]]
    decoder_keys: dict[str, dict[str, Any]]
    losses: list[str]
    use_uni_set: bool
    param_regex: dict[str, str]
    decoder_defaults: dict[str, Any] = field(default_factory=dict)
    """Upstream decoder class defaults that differ from the DEIM recipe: a config that leaves such a key out
    (the plain baselines) gets the class default, not the DEIM value."""
    decoder_kw: dict[str, str | None] = field(default_factory=dict)
    """Decoder keys whose transformers / head-option keyword differs from DEIMv2's (None: no keyword)."""
    weights_file: Callable[[Reader], str] = lambda r: ""
    """The backbone-only weights file upstream's backbone loads when `pretrained` is set (its file name)."""
    weights_dir: str = ""
    """Upstream's default `local_model_dir`, the folder that file is read from (or downloaded to)."""


def convert_family(r: Reader, fam: UpstreamFamily) -> str:
    """Map one family's upstream model sections onto `model.*`, `eval.*` and `schedule.*`; returns the variant."""
    r.expect("model", "DEIM")
    encoder = r.get("DEIM.encoder", "HybridEncoder")
    backbone = r.get("DEIM.backbone", fam.backbone)
    if backbone != fam.backbone or encoder != "HybridEncoder":
        raise ConfigError(f"upstream {fam.decoder} over {backbone}/{encoder} is not supported; deim_ray builds it "
                          f"over {fam.backbone}/HybridEncoder")
    variant = fam.variant_of(r)
    r.put("model.family", fam.family, "DEIM.decoder")
    r.put("model.variant", variant, f"{backbone}.name" if backbone == "HGNetv2" else f"{backbone}.depth")
    _convert_backbone(r, backbone, fam.backbone_keys[variant])
    _convert_backbone_weights(r, backbone, fam)
    compare_section(r, encoder, fam.encoder_keys[variant], {}, ENCODER_KW)
    decoder_keys = _normalise_decoder(r, fam.decoder, fam.decoder_keys[variant])
    keywords = {k: v for k, v in {**DECODER_KW, **fam.decoder_kw}.items() if v is not None}
    for key, default in fam.decoder_defaults.items():
        if not r.has(f"{fam.decoder}.{key}"):
            r.put(f"model.extra.{keywords[key]}", default, fam.decoder)
    compare_section(r, fam.decoder, decoder_keys, DECODER_FIELDS, keywords)
    for unused in {"HGNetv2", "PResNet", "DINOv3STAs", "LiteEncoder", "DEIMTransformer"} - {backbone}:
        r.ignore(unused)  # sections upstream's base files define but this model does not build
    if r.has("PostProcessor.num_top_queries"):
        r.put("eval.num_top_queries", r.get("PostProcessor.num_top_queries"), "PostProcessor.num_top_queries")
    _convert_criterion(r, fam)
    return variant


def _convert_backbone(r: Reader, section: str, expected: dict[str, Any]) -> None:
    for key, (keyword, cast) in _BACKBONE_KW.items():
        path = f"{section}.{key}"
        value = r.get(path, expected.get(key))
        if value != expected.get(key):
            r.put(f"model.extra.{keyword}", cast(value), path)
    _convert_freeze(r, section)
    for key in section_of(r, section):
        if key in expected and key not in (*_BACKBONE_KW, "freeze_at"):
            r.expect(f"{section}.{key}", expected[key])


def _convert_freeze(r: Reader, section: str) -> None:
    """`freeze_at` -> `model.extra.freeze_stem` / `freeze_stages`: HGNetv2 freezes its stem and, unless
    `freeze_stem_only` (its default), stages 0..freeze_at; PResNet its stem and the first `freeze_at` stages."""
    freeze_at = r.get(f"{section}.freeze_at", -1)
    stem_only = r.get(f"{section}.freeze_stem_only", True) if section == "HGNetv2" else False
    if freeze_at < 0:
        return
    stages = 0 if stem_only else (freeze_at + 1 if section == "HGNetv2" else freeze_at)
    r.put("model.extra.freeze_stem", True, f"{section}.freeze_at")
    if stages:
        r.put("model.extra.freeze_stages", min(stages, 4), f"{section}.freeze_at")


def _convert_backbone_weights(r: Reader, section: str, fam: UpstreamFamily) -> None:
    """`pretrained: True` -> `model.backbone_pretrained`: the file upstream's backbone reads, `local_model_dir` +
    its file name (where upstream also downloads it to); a path instead of True names the file itself."""
    pretrained = r.get(f"{section}.pretrained", False)
    folder = r.get(f"{section}.local_model_dir", fam.weights_dir)
    if not pretrained:
        return
    use_path = isinstance(pretrained, str) and not pretrained.startswith(("http://", "https://"))
    path = pretrained if use_path else os.path.join(folder, fam.weights_file(r))
    r.put("model.backbone_pretrained", path, f"{section}.pretrained")


def _normalise_decoder(r: Reader, section: str, expected: dict[str, Any]) -> dict[str, Any]:
    """Upstream spellings that mean the same model: `eval_idx` of the last layer is -1."""
    layers = r.peek(f"{section}.num_layers", expected["num_layers"])
    if isinstance(layers, int) and r.peek(f"{section}.eval_idx") == layers - 1:
        r.ignore(f"{section}.eval_idx")
        return {**expected, "eval_idx": layers - 1}
    return expected


def _convert_criterion(r: Reader, fam: UpstreamFamily) -> None:
    c = "DEIMCriterion"
    losses = r.get(f"{c}.losses", fam.losses)
    if list(losses) != fam.losses:
        r.put("model.losses", list(losses), f"{c}.losses")
    r.put("model.focal_loss_gamma", r.get(f"{c}.gamma", 2.0), f"{c}.gamma")  # upstream's default gamma is 2.0
    for key, value in (r.get(f"{c}.weight_dict") or {}).items():
        keyword = _WEIGHTS.get(key)
        if keyword is None:
            r.note(f"{c}.weight_dict.{key}", value, "unknown loss term")
        elif value != _WEIGHT_DEFAULTS[keyword]:
            r.put(f"model.extra.{keyword}", value, f"{c}.weight_dict.{key}")
    r.ignore(f"{c}.weight_dict")
    r.expect(f"{c}.use_uni_set", fam.use_uni_set)
    for key, keyword, default in (("alpha", "focal_loss_alpha", 0.75), ("reg_max", "max_num_bins", 32)):
        if r.get(f"{c}.{key}", default) != default:
            r.put(f"model.extra.{keyword}", r.get(f"{c}.{key}"), f"{c}.{key}")
        r.ignore(f"{c}.{key}")
    convert_matcher(r, f"{c}.matcher")


def translate_family_regex(fam: UpstreamFamily, pattern: str) -> str | None:
    return fam.param_regex.get(pattern.strip())
