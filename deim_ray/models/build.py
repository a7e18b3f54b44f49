"""models layer: build a transformers `Deimv2ForObjectDetection` from a `ModelConfig`.

The engine calls::

    model = build_model(cfg.model, num_classes)        # random init, backbone from cfg.model.backbone_pretrained,
                                                       # or fine-tuned from cfg.model.pretrained
    validate_input_size(h, w, model.config.num_queries, feature_strides(model.config))

Order of settings: the variant's architecture (`variants.py`), then the project-wide choices that upstream DEIM
makes and transformers' defaults do not (class prior from `prior_prob`, MAL gamma, trainable backbone batch
norms), then the `num_queries` / `decoder_layers` / `num_denoising` overrides, then `extra` (any further
`Deimv2Config` keyword; a `backbone_config` dict there is merged into the variant's backbone).

Fine-tuning from released weights: set `model.pretrained` (see `pretrained.py` for the accepted sources)::

    model:
      variant: n
      pretrained: path/or/hub-id   # a transformers `save_pretrained` folder, a hub id, or a .pth file

Tensors whose name and shape match are loaded; the rest (class heads when the class count differs) keep their
fresh initialisation, and a one-line report is logged.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import fields
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import Deimv2Config, Deimv2ForObjectDetection

from deim_ray.config.schema import ModelConfig
from deim_ray.models.backbone_weights import load_backbone_weights
from deim_ray.models.errors import ModelError
from deim_ray.models.pretrained import PretrainedReport, load_pretrained
from deim_ray.models.variants import VARIANTS, variant_kwargs

log = logging.getLogger(__name__)

_CONFIG_FIELDS = frozenset(f.name for f in fields(Deimv2Config))


def build_model_config(cfg: ModelConfig, num_classes: int) -> Deimv2Config:
    """The `Deimv2Config` for `cfg.variant` with `num_classes` labels and every override applied."""
    if cfg.variant not in VARIANTS:
        raise ModelError(f"unknown model variant {cfg.variant!r}; choose one of: {', '.join(VARIANTS)}")
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}; check the dataset's categories")
    kwargs = variant_kwargs(cfg.variant)
    kwargs.update(
        initializer_bias_prior_prob=cfg.prior_prob,
        focal_loss_gamma=cfg.focal_loss_gamma,
        # upstream trains every layer's batch norm (freeze_norm: False); transformers freezes them by default
        freeze_backbone_batch_norms=False,
    )
    kwargs.update(_overrides(cfg))
    _merge_extra(kwargs, cfg.extra)
    kwargs["num_labels"] = num_classes
    try:
        return Deimv2Config(**kwargs)
    except (ValueError, TypeError, StrictDataclassError) as e:
        reason = str(e.__cause__ or e).strip()  # the validator's own message, not the dataclass wrapper
        first = reason.splitlines()[0] if reason else type(e).__name__
        raise ModelError(f"invalid model config for variant {cfg.variant!r}: {first}; fix model.extra or the "
                         "model overrides") from None


def _overrides(cfg: ModelConfig) -> dict[str, int]:
    chosen = {"num_queries": cfg.num_queries, "decoder_layers": cfg.decoder_layers,
              "num_denoising": cfg.num_denoising}
    out = {k: v for k, v in chosen.items() if v is not None}
    for key, value in out.items():
        minimum = 0 if key == "num_denoising" else 1
        if value < minimum:
            raise ModelError(f"model.{key} must be >= {minimum}, got {value}")
    return out


def _merge_extra(kwargs: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if key == "num_labels":
            raise ModelError("model.extra must not set num_labels; the class count comes from the dataset")
        if key not in _CONFIG_FIELDS:
            close = difflib.get_close_matches(key, _CONFIG_FIELDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see transformers' Deimv2Config for valid keys"
            raise ModelError(f"model.extra has unknown Deimv2Config key {key!r}; {hint}")
        if key == "backbone_config" and isinstance(value, dict):
            kwargs["backbone_config"] = {**kwargs["backbone_config"], **value}
        else:
            kwargs[key] = value


def build_model(cfg: ModelConfig, num_classes: int) -> Deimv2ForObjectDetection:
    """A freshly initialised model (never downloads anything), fine-tuned from `cfg.pretrained` when set."""
    model, _ = build_model_with_report(cfg, num_classes)
    return model


def build_model_with_report(cfg: ModelConfig, num_classes: int
                            ) -> tuple[Deimv2ForObjectDetection, PretrainedReport | None]:
    """`build_model` that also returns what was loaded from `cfg.pretrained` (None when it is unset)."""
    model = Deimv2ForObjectDetection(build_model_config(cfg, num_classes))
    if cfg.backbone_pretrained is not None:
        log.info("%s", load_backbone_weights(model, cfg.variant, cfg.backbone_pretrained).summary())
    if cfg.pretrained is None:
        return model, None
    report = load_pretrained(model, cfg.pretrained)
    log.info("%s", report.summary())
    return model, report


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter values; tensors shared between heads (tied weights) count once."""
    seen: dict[tuple[int, int], int] = {}
    for p in model.parameters():
        seen[(p.data_ptr(), p.numel())] = p.numel()
    return sum(seen.values())


def feature_strides(config: Deimv2Config) -> tuple[int, ...]:
    """Strides of the decoder's feature levels: the first encoder level, doubling per extra level."""
    first = int(config.feat_strides[0])
    return tuple(first * 2**i for i in range(config.num_feature_levels))


def validate_input_size(h: int, w: int, num_queries: int, strides: tuple[int, ...] = (16, 32)) -> None:
    """Raise ModelError unless an h x w image works: both sides multiples of 32 and at least `num_queries`
    encoder tokens over the feature levels (`strides`; (16, 32) for HGNetV2 sizes, (8, 16, 32) for DINOv3)."""
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        fix_h, fix_w = max(32, round(h / 32) * 32), max(32, round(w / 32) * 32)
        raise ModelError(f"image size {h}x{w} (HxW) is not a multiple of 32; use e.g. {fix_h}x{fix_w}")
    tokens = sum((h // s) * (w // s) for s in strides)
    if tokens < num_queries:
        side = 32
        while sum((side // s) ** 2 for s in strides) < num_queries:
            side += 32
        raise ModelError(f"image size {h}x{w} gives {tokens} encoder tokens, fewer than num_queries="
                         f"{num_queries}; use at least {side}x{side} or lower model.num_queries")
