"""config layer: upstream DEIM's D-FINE and RT-DETRv2 model sections -> `model.family`, `model.variant` (+ overrides).

ShihuaHuang95/DEIM trains D-FINE (`DFINETransformer` over `HGNetv2`) and RT-DETRv2 (`RTDETRTransformerv2` over
`PResNet`) with the DEIM recipe. As for DEIMv2 (`upstream_model.py`), the variant comes from the backbone; every
key of the model sections is compared with what upstream's own DEIM config of that variant resolves to
(`dfine.py`, `rtdetrv2.py`, read from upstream's `configs/base/{dfine_hgnetv2,deim,rtdetrv2_r50vd,rt_deim}.yml`
and `configs/deim_{dfine,rtdetrv2}/deim_*.yml`). A difference becomes a `model.*` field or a `model.extra` keyword
(of `DFineConfig` / `RTDetrV2Config`, or the upstream head options `mlp_act` / `query_pos_method`) when one exists
and is reported otherwise. The plain `dfine_*` / `rtdetrv2_*` baselines import as the same variant with their
differences (VFL instead of MAL, ReLU heads, frozen backbone norms) spelled out.
"""

from deim_ray.config.families.common import convert_family, translate_family_regex
from deim_ray.config.families.dfine import DFINE
from deim_ray.config.families.rtdetrv2 import RTDETRV2

FAMILY_DECODERS = {"DFINETransformer": DFINE, "RTDETRTransformerv2": RTDETRV2}
"""Upstream decoder section name -> the family it builds."""

__all__ = ["FAMILY_DECODERS", "convert_family", "translate_family_regex"]
