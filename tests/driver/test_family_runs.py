"""End to end on real Ray (2 CPU workers, gloo) for the D-FINE and RT-DETRv2 families: the tiny model of each
runs the full two-stage job (both stages, DONE, resolved final), and its `final.pth` rebuilds the same family
with `load_final` and reproduces the recorded AP."""

import json

import pytest
import torch

from deim_ray.config.loader import load_config
from deim_ray.driver.run import RunRequest, run_training
from deim_ray.engine.data import build_data
from deim_ray.engine.loop import evaluate
from deim_ray.models.export import load_final
from tests.driver.conftest import data_overrides

pytestmark = pytest.mark.slow

MODEL_CLASSES = {"dfine": "DFineForObjectDetection", "rtdetrv2": "RTDetrV2ForObjectDetection"}


@pytest.fixture(scope="module", params=sorted(MODEL_CLASSES))
def family_run(request, ray_local, tiny_data_root, tmp_path_factory):
    family = request.param
    cfg = load_config(f"configs/demo/{family}_tiny.yml", data_overrides(tiny_data_root))
    storage = tmp_path_factory.mktemp(f"runs_{family}")
    manifest = run_training(RunRequest(cfg=cfg, storage_uri=str(storage), name=family, workers=2))
    return family, cfg, storage / family, manifest


def test_two_stage_run_is_done_with_a_resolved_final(family_run):
    _, _, run_dir, manifest = family_run
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["state"] == "DONE" and manifest.state.value == "DONE"
    assert m["switch"]["epoch"] == 1 and m["switch"]["from"] == "best_stg1"
    assert len(set(m["switch"]["worker_start_digests"])) == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert m["final"]["artifact"] in ("best_stg1", "best_stg2") and m["final"]["reason"]


def test_final_rebuilds_the_family_and_reproduces_its_ap(family_run):
    family, cfg, run_dir, manifest = family_run
    model, meta = load_final(run_dir / "artifacts" / "final.pth")
    assert type(model).__name__ == MODEL_CLASSES[family] and meta["family"] == family
    data = build_data(cfg, 0, 1)
    result = evaluate(model, data.val_loader, coco_gt=data.coco_gt, category_ids=data.category_ids,
                      device=torch.device("cpu"), num_top_queries=cfg.eval.num_top_queries)
    assert result.ap == pytest.approx(manifest.final["ap"], abs=1e-6)
