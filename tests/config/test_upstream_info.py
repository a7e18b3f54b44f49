"""Every upstream training config, as a file in upstream's layout, passes `train`'s validation and `deim-ray info`
with upstream's parameter count.

The configs are the copies under fixtures/: Intellindust-AI-Lab/DEIMv2 `configs/deimv2/` (fixtures/upstream) and
ShihuaHuang95/DEIM `configs/deim_dfine/` (with `object365/`) and `configs/deim_rtdetrv2/` (fixtures/upstream_deim).
The counts are those of upstream's own built models (80 classes), recorded by the scripts beside them under
tests/models/fixtures. Every one of these configs names a backbone file that is not on this machine, so the run
sets `model.backbone_pretrained` to null: the model is built on the meta device either way and reads no weights.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from deim_ray.cli.main import main
from deim_ray.config import load_config, validate

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_FIXTURES = Path(__file__).parents[1] / "models" / "fixtures"
DEIMV2 = FIXTURES / "upstream"
DEIM = FIXTURES / "upstream_deim"
NO_WEIGHTS = ["model.backbone_pretrained=null"]
# README "Differences": transformers' ViT builds a mask token and layer-scale vectors upstream's ViT-Tiny(+) lacks
EXTRA_PARAMS = {"deimv2/deimv2_dinov3_s_coco.yml": 4800, "deimv2/deimv2_dinov3_m_coco.yml": 6400}


def _upstream_counts() -> dict[str, int]:
    """Config path (relative to its upstream checkout's `configs/`) -> upstream's parameter count."""
    deimv2 = json.loads(gzip.open(MODEL_FIXTURES / "upstream" / "models.json.gz", "rt").read())
    deim = json.loads((MODEL_FIXTURES / "family_params.json").read_text())
    return {**{f"deimv2/deimv2_{name}_coco.yml": entry["parameters"] for name, entry in deimv2.items()},
            **deim["params"]}


COUNTS = _upstream_counts()
CONFIGS = {str(p.relative_to(root)): p for root, families in ((DEIMV2, ("deimv2",)),
                                                              (DEIM, ("deim_dfine", "deim_rtdetrv2")))
           for family in families for p in sorted((root / family).rglob("*.yml"))}


def test_every_upstream_training_config_has_upstreams_count():
    assert len(CONFIGS) == 34  # DEIMv2 12, D-FINE 10 + 2 (Objects365), RT-DETRv2 10
    assert set(CONFIGS) == set(COUNTS)


@pytest.mark.parametrize("rel", sorted(CONFIGS))
def test_upstream_config_passes_train_validation_and_info(rel, capsys):
    path = CONFIGS[rel]
    validate(load_config(path, NO_WEIGHTS), workers=2)  # what `train` checks before Ray starts
    capsys.readouterr()
    assert main(["info", "-c", str(path), "--no-loader", "--no-data", "-u", *NO_WEIGHTS]) == 0, capsys.readouterr().err
    found = re.search(r"^parameters: (\d+)$", capsys.readouterr().out, re.MULTILINE)
    assert found, "info printed no parameter count"
    assert int(found.group(1)) == COUNTS[rel] + EXTRA_PARAMS.get(rel, 0)
