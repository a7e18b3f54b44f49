"""config layer: the configs shipped with deim_ray, by the model names `train --model` takes.

Each name is a shipped COCO config of that model (the DEIM recipe of its family); `train --data DIR --model NAME`
starts from it and fits it to the data (`config.fit`).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from deim_ray.config.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DEMO_CONFIG = CONFIGS_DIR / "demo" / "shapes.yml"

MODEL_CONFIGS: dict[str, str] = {
    **{f"deimv2-{v}": f"deimv2/deimv2_hgnetv2_{v}_coco.yml" for v in ("atto", "femto", "pico", "n")},
    **{f"deimv2-{v}": f"deimv2/deimv2_dinov3_{v}_coco.yml" for v in ("s", "m", "l", "x")},
    **{f"dfine-{v}": f"dfine/deim_hgnetv2_{v}_coco.yml" for v in ("n", "s", "m", "l", "x")},
    "rtdetrv2-r18": "rtdetrv2/deim_r18vd_120e_coco.yml",
    "rtdetrv2-r34": "rtdetrv2/deim_r34vd_120e_coco.yml",
    "rtdetrv2-r50": "rtdetrv2/deim_r50vd_60e_coco.yml",
    "rtdetrv2-r50m": "rtdetrv2/deim_r50vd_m_60e_coco.yml",
    "rtdetrv2-r101": "rtdetrv2/deim_r101vd_60e_coco.yml",
}
"""`--model` name -> shipped config (relative to CONFIGS_DIR): DEIMv2 sizes, and D-FINE / RT-DETRv2 with DEIM."""


def model_config(name: str) -> Path:
    """The shipped config of model `name`; ConfigError naming the choices for an unknown name."""
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_CONFIGS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown --model {name!r}; {hint}choose one of {', '.join(MODEL_CONFIGS)}")
    path = CONFIGS_DIR / MODEL_CONFIGS[name]
    if not path.is_file():
        raise ConfigError(f"the config of --model {name} ({path}) is missing; run from a deim_ray checkout or use -c")
    return path
