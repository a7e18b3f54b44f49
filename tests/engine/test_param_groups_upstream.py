"""Every parameter gets upstream's learning rate and weight decay: the shipped DEIMv2, D-FINE and RT-DETRv2 configs
and the imported upstream configs against the settings upstream's own optimizer gives each parameter
(`tests/models/fixtures/upstream/param_groups.json.gz`, written by `make_param_groups.py` from DEIMv2's and DEIM's
code)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from deim_ray.config.loader import load_config
from deim_ray.engine.optim import build_param_groups
from deim_ray.models import build_model_config
from deim_ray.models.build import build_from_config

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "models" / "fixtures" / "upstream" / "param_groups.json.gz"
UPSTREAM_CONFIGS = ROOT / "tests" / "config" / "fixtures" / "upstream" / "deimv2"
SHIPPED = ROOT / "configs" / "deimv2"
NAMES = ["hgnetv2_atto", "hgnetv2_femto", "hgnetv2_pico", "hgnetv2_n", "hgnetv2_s", "hgnetv2_m", "hgnetv2_l",
         "hgnetv2_x", "dinov3_s", "dinov3_m", "dinov3_l", "dinov3_x"]
UPSTREAM_DEIM = ROOT / "tests" / "config" / "fixtures" / "upstream_deim"
SHIPPED_DIRS = {"deim_dfine": ROOT / "configs" / "dfine", "deim_rtdetrv2": ROOT / "configs" / "rtdetrv2"}
with gzip.open(FIXTURE, "rt") as _f:
    SETTINGS = json.load(_f)
DEIM_CONFIGS = sorted(k for k in SETTINGS if k.endswith(".yml"))


@pytest.fixture(scope="module")
def upstream_settings() -> dict:
    return SETTINGS


def differences(config: Path, expected: dict) -> list[str]:
    cfg = load_config(config, ["model.backbone_pretrained=null"])
    with torch.device("meta"):  # names and shapes only
        model = build_from_config(build_model_config(cfg.model, 80))
    ours = {}
    for group in build_param_groups(model, cfg.optimizer):
        for name in group["names"]:
            ours[name] = [group.get("lr", cfg.optimizer.lr), group.get("weight_decay", cfg.optimizer.weight_decay)]
    theirs = {name: expected["groups"][i] for name, i in expected["member"].items()}
    missing = sorted(set(ours) - set(theirs))
    assert not missing, f"{len(missing)} deim_ray parameters unknown upstream, e.g. {missing[:3]}"
    return [f"{n}: lr/wd {ours[n]} (upstream {theirs[n]})" for n in sorted(ours)
            if any(abs(a - b) > 1e-9 * max(abs(b), 1e-12) for a, b in zip(ours[n], theirs[n]))]


@pytest.mark.parametrize("name", NAMES)
def test_imported_upstream_config_gives_upstream_groups(name, upstream_settings):
    wrong = differences(UPSTREAM_CONFIGS / f"deimv2_{name}_coco.yml", upstream_settings[name])
    assert not wrong, f"{len(wrong)} parameters differ: " + "; ".join(wrong[:4])


@pytest.mark.parametrize("name", [n for n in NAMES if (SHIPPED / f"deimv2_{n}_coco.yml").exists()])
def test_shipped_config_gives_upstream_groups(name, upstream_settings):
    wrong = differences(SHIPPED / f"deimv2_{name}_coco.yml", upstream_settings[name])
    assert not wrong, f"{len(wrong)} parameters differ: " + "; ".join(wrong[:4])


@pytest.mark.parametrize("rel", DEIM_CONFIGS)
def test_imported_and_shipped_dfine_rtdetrv2_configs_give_upstream_groups(rel, upstream_settings):
    family_dir, rest = rel.split("/", 1)
    for config in (UPSTREAM_DEIM / rel, SHIPPED_DIRS[family_dir] / rest):
        wrong = differences(config, upstream_settings[rel])
        assert not wrong, f"{config}: {len(wrong)} parameters differ: " + "; ".join(wrong[:4])
