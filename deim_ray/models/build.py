"""models layer: build a transformers detector of `cfg.family` (see `families.py`) from a `ModelConfig`.

The engine calls::

    model = build_model(cfg.model, num_classes)        # random init, backbone from cfg.model.backbone_pretrained,
                                                       # or fine-tuned from cfg.model.pretrained
    validate_input_size(h, w, model.config.num_queries, feature_strides(model.config))

Order of settings: the family's variant architecture (`variants.py`, `dfine/variants.py`,
`rtdetrv2/variants.py`), then the project-wide choices that upstream DEIM makes and transformers' defaults do not
(class prior from `prior_prob`, MAL gamma, trainable backbone batch norms), then the `num_queries` /
`decoder_layers` / `num_denoising` / `losses` overrides, then `extra` (any further keyword of the family's
transformers config, plus the family's upstream head options; a `backbone_config` dict there is merged into the
variant's backbone).

Everything that defines the model lives in the resulting transformers config (the D-FINE/RT-DETRv2 loss terms
and head options as extra attributes), so `build_from_config` rebuilds the same model from it alone.

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
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from deim_ray.config.schema import ModelConfig
from deim_ray.models.backbone_weights import load_backbone_weights
from deim_ray.models.deimv2 import UPSTREAM_ARCH_KEY, apply_upstream_arch
from deim_ray.models.errors import ModelError
from deim_ray.models.family_loss import DeimCriterionLoss, LossRecipe
from deim_ray.models.families import Family, family_of_config, get_family
from deim_ray.models.family_backbones import load_family_backbone
from deim_ray.models.heads import apply_head_options
from deim_ray.models.pretrained import PretrainedReport, load_pretrained
from deim_ray.models.sizes import feature_strides, validate_input_size
from deim_ray.models.upstream_init import init_as_upstream_deim

__all__ = ["build_from_config", "build_model", "build_model_config", "build_model_with_report", "check_buildable",
           "count_parameters", "feature_strides", "validate_input_size"]

log = logging.getLogger(__name__)


def build_model_config(cfg: ModelConfig, num_classes: int) -> PreTrainedConfig:
    """The transformers config of `cfg.family`/`cfg.variant` with `num_classes` labels and every override."""
    family = get_family(cfg.family)
    kwargs = family.variant_kwargs(cfg.variant)
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}; check the dataset's categories")
    kwargs.update(initializer_bias_prior_prob=cfg.prior_prob, focal_loss_gamma=cfg.focal_loss_gamma)
    # upstream trains the backbone's batch norms (freeze_norm: False) except for HGNetV2-X; transformers
    # freezes them by default
    kwargs.setdefault("freeze_backbone_batch_norms", False)
    if cfg.family == "deimv2":
        # see models/deimv2/arch.py; a variant may add its own entries (HGNetV2-X's frozen stem)
        kwargs[UPSTREAM_ARCH_KEY] = {"mlp_act": "silu", "query_pos": "once", **kwargs.get(UPSTREAM_ARCH_KEY, {})}
    kwargs.update(_overrides(cfg))
    kwargs.update(_loss_terms(cfg, family))
    _merge_extra(kwargs, cfg.extra, family)
    kwargs["num_labels"] = num_classes
    try:
        return family.config_class(**kwargs)
    except (ValueError, TypeError, StrictDataclassError) as e:
        reason = str(e.__cause__ or e).strip()  # the validator's own message, not the dataclass wrapper
        first = reason.splitlines()[0] if reason else type(e).__name__
        raise ModelError(f"invalid model config for {family.title} variant {cfg.variant!r}: {first}; fix "
                         "model.extra or the model overrides") from None


def _loss_terms(cfg: ModelConfig, family: Family) -> dict[str, list[str]]:
    if family.loss is None:
        if cfg.losses is not None:
            raise ModelError(f"model.losses applies to the D-FINE and RT-DETRv2 families; {family.title} sets its "
                             "loss terms through model.extra (weight_loss_*)")
        return {}
    recipe = LossRecipe(tuple(cfg.losses) if cfg.losses is not None else family.loss.losses, family.loss.use_uni_set)
    recipe.check(has_corners=family.name == "dfine")
    return {"losses": list(recipe.losses)}


def _overrides(cfg: ModelConfig) -> dict[str, int]:
    chosen = {"num_queries": cfg.num_queries, "decoder_layers": cfg.decoder_layers,
              "num_denoising": cfg.num_denoising}
    out = {k: v for k, v in chosen.items() if v is not None}
    for key, value in out.items():
        minimum = 0 if key == "num_denoising" else 1
        if value < minimum:
            raise ModelError(f"model.{key} must be >= {minimum}, got {value}")
    return out


def _merge_extra(kwargs: dict[str, Any], extra: dict[str, Any], family: Family) -> None:
    known = frozenset(f.name for f in fields(family.config_class)) | frozenset(family.head_options)
    name = family.config_class.__name__
    for key, value in extra.items():
        if key in ("num_labels", "losses"):
            raise ModelError(f"model.extra must not set {key}; " + ("the class count comes from the dataset"
                             if key == "num_labels" else "use model.losses"))
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"see transformers' {name} for valid keys"
            raise ModelError(f"model.extra has unknown {name} key {key!r}; {hint}")
        if key in family.head_options and value not in family.head_options[key]:
            raise ModelError(f"model.extra.{key} must be one of {', '.join(map(str, family.head_options[key]))}, "
                             f"got {value!r}")
        if key == "backbone_config" and isinstance(value, dict):
            kwargs["backbone_config"] = {**kwargs["backbone_config"], **value}
        else:
            kwargs[key] = value


def build_model(cfg: ModelConfig, num_classes: int) -> PreTrainedModel:
    """A freshly initialised model (never downloads anything), fine-tuned from `cfg.pretrained` when set."""
    model, _ = build_model_with_report(cfg, num_classes)
    return model


def build_from_config(config: PreTrainedConfig) -> PreTrainedModel:
    """The model of a config made by `build_model_config` (random init, drawn as upstream draws it): the family's
    transformers model with upstream's head options applied and, for D-FINE/RT-DETRv2, the DEIM criterion as its
    loss."""
    family = family_of_config(config)
    model = family.model_class(config)
    apply_head_options(model)
    apply_upstream_arch(model)  # DEIMv2: upstream's architecture and init (models/deimv2)
    if family.loss is not None:
        init_as_upstream_deim(model)
        losses = tuple(getattr(config, "losses", family.loss.losses))
        model.loss_function = DeimCriterionLoss(LossRecipe(losses, family.loss.use_uni_set))
    return model


def build_model_with_report(cfg: ModelConfig, num_classes: int) -> tuple[PreTrainedModel, PretrainedReport | None]:
    """`build_model` that also returns what was loaded from `cfg.pretrained` (None when it is unset)."""
    model = build_from_config(build_model_config(cfg, num_classes))
    if cfg.backbone_pretrained is not None:
        log.info("%s", _load_backbone(model, cfg).summary())
    if cfg.pretrained is None:
        return model, None
    report = load_pretrained(model, cfg.pretrained)
    log.info("%s", report.summary())
    return model, report


def check_buildable(cfg: ModelConfig, num_classes: int, image_size: tuple[int, int], files: bool = True) -> int:
    """Everything `build_model` and the first training step would refuse, checked without allocating weights:
    the model config, the input size for its queries and strides, and (`files`) the backbone file and a local
    `pretrained` file or folder with their loading rules (read, matched by name and shape into a model on the meta
    device; a hub id is left to the workers, which may download it). Returns the parameter count; raises the same
    one-line ModelError a worker would."""
    config = build_model_config(cfg, num_classes)
    validate_input_size(*image_size, config.num_queries, feature_strides(config))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*meta parameter.*")  # copying into meta tensors is a no-op
        model = build_from_config(config)
        if files and cfg.backbone_pretrained is not None:
            _load_backbone(model, cfg)
        if files and cfg.pretrained is not None and Path(cfg.pretrained).expanduser().exists():
            load_pretrained(model, cfg.pretrained)
    return count_parameters(model)


def _load_backbone(model: PreTrainedModel, cfg: ModelConfig):
    if cfg.family == "deimv2":
        return load_backbone_weights(model, cfg.variant, cfg.backbone_pretrained)
    return load_family_backbone(model, cfg.family, cfg.variant, cfg.backbone_pretrained)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter values; tensors shared between heads (tied weights) count once, as
    `parameters()` yields each parameter object once (this also works for models built on the meta device)."""
    return sum(p.numel() for p in model.parameters())
