"""models layer: the model families deim_ray trains, and what each one brings.

`model.family` in the config picks one; everything above `models/` stays family-agnostic. A family names the
transformers config and model classes, its sizes (`model.variant`: the names `config.variants.FAMILY_VARIANTS` lists,
each built by the family module's function of that name), and the loss it trains with under the DEIM recipe (None:
`loss.DeimLoss`, upstream's DEIMv2 criterion, which `forward_loss` installs).

| family | upstream | sizes |
|---|---|---|
| deimv2   | Intellindust-AI-Lab/DEIMv2, `configs/deimv2/`         | atto, femto, pico, n (HGNetv2); s, m, l, x (DINOv3); hgnetv2_s..x |
| dfine    | ShihuaHuang95/DEIM, `configs/deim_dfine/`             | n, s, m, l, x (HGNetv2 B0/B0/B2/B4/B5) |
| rtdetrv2 | ShihuaHuang95/DEIM, `configs/deim_rtdetrv2/`          | r18, r34, r50, r50m, r101 (ResNet-vd) |

Each family also has a `tiny` size for tests.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from transformers import (DFineConfig, DFineForObjectDetection, Deimv2Config, Deimv2ForObjectDetection,
                          PreTrainedConfig, PreTrainedModel, RTDetrV2Config, RTDetrV2ForObjectDetection)

from deim_ray.config.variants import FAMILY_VARIANTS
from deim_ray.models.family_loss import LossRecipe
from deim_ray.models import variants as deimv2_variants
from deim_ray.models.dfine import variants as dfine_variants
from deim_ray.models.errors import ModelError
from deim_ray.models.heads import FREEZE_OPTIONS, MLP_ACTS, QUERY_POS_METHODS
from deim_ray.models.rtdetrv2 import variants as rtdetrv2_variants


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    """Display name, e.g. "D-FINE"."""
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    variants: dict[str, Callable[[], dict[str, Any]]]
    """Size name (`config.variants.FAMILY_VARIANTS`) -> function returning fresh config keyword arguments (without
    `num_labels`)."""
    loss: LossRecipe | None
    """The DEIM-recipe loss of D-FINE / RT-DETRv2; None: DEIMv2 (`loss.DeimLoss`)."""
    head_options: dict[str, tuple[Any, ...]]
    """Upstream options this family accepts in `model.extra` on top of its config's fields (decoder heads,
    frozen backbone layers), each with its accepted values."""

    def variant_kwargs(self, variant: str) -> dict[str, Any]:
        if variant not in self.variants:
            raise ModelError(f"unknown {self.title} variant {variant!r}; choose one of: {', '.join(self.variants)}")
        return copy.deepcopy(self.variants[variant]())


def _builders(module: ModuleType, family: str) -> dict[str, Callable[[], dict[str, Any]]]:
    """The sizes the config layer accepts for `family` (`config.variants`), each built by `module`'s function of
    that name: a size listed there without a builder here fails on import, not in a user's run."""
    return {name: getattr(module, name) for name in FAMILY_VARIANTS[family]}


FAMILIES: dict[str, Family] = {
    "deimv2": Family("deimv2", "DEIMv2", Deimv2Config, Deimv2ForObjectDetection,
                     _builders(deimv2_variants, "deimv2"), None, {}),
    "dfine": Family("dfine", "D-FINE", DFineConfig, DFineForObjectDetection, _builders(dfine_variants, "dfine"),
                    LossRecipe(("mal", "boxes", "local"), use_uni_set=True), {"mlp_act": MLP_ACTS, **FREEZE_OPTIONS}),
    "rtdetrv2": Family("rtdetrv2", "RT-DETRv2", RTDetrV2Config, RTDetrV2ForObjectDetection,
                       _builders(rtdetrv2_variants, "rtdetrv2"), LossRecipe(("mal", "boxes"), use_uni_set=False),
                       {"mlp_act": MLP_ACTS, "query_pos_method": QUERY_POS_METHODS, **FREEZE_OPTIONS}),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(config: PreTrainedConfig) -> Family:
    """The family whose config class built `config`."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family
    raise ModelError(f"{type(config).__name__} belongs to no deim_ray model family")
