"""End to end on real Ray (2 CPU workers, gloo), the real tiny DEIMv2 and real COCO evaluation:
a two-stage run ends DONE with verified artifacts, an identical stage-2 start on both workers, the
EMA restart decay in effect, and a final artifact that reproduces its recorded AP (and per-class AP) through
`deim-ray eval`, in PyTorch and exported to ONNX."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deim_ray.cli.main import main
from deim_ray.config.loader import load_config
from deim_ray.data.coco import CocoDetection
from deim_ray.driver.console import Console
from deim_ray.driver.evaluation import detect_all, open_detector, val_split_of
from deim_ray.driver.run import RunError, RunRequest, run_training
from deim_ray.engine.data import build_data
from deim_ray.engine.evaluator import COCO_STAT_NAMES, DetectionCollector, coco_evaluation, merge_detections
from deim_ray.engine.loop import evaluate
from deim_ray.engine.state import load_train_state
from deim_ray.engine.trainer import state_digest
from deim_ray.models.build import build_model
from deim_ray.models.export import load_final
from deim_ray.models.postprocess import postprocess

from tests.driver.conftest import FINISHED_OVERRIDES, TINY, data_overrides, relative_cfg, tracking_overrides
from tests.engine.test_evaluator import one_category_ap
from tests.models.conftest import matched_box_error

pytestmark = pytest.mark.slow

RESTART_DECAY = 0.9995
"""The shared run's `schedule.ema_restart_decay` (FINISHED_OVERRIDES)."""


@pytest.fixture(scope="module")
def run(finished_run):
    """The session's finished run (tests/driver/conftest.py), read only: (config, run dir, manifest)."""
    assert finished_run.cfg.schedule.ema_restart_decay == RESTART_DECAY
    return finished_run.cfg, finished_run.run_dir, finished_run.manifest


@pytest.fixture(autouse=True)
def _in_the_runs_folder(finished_run, monkeypatch):
    """The run's data paths are relative to the folder it was started from: every test works from there too."""
    monkeypatch.chdir(finished_run.data_root.parent)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_is_done_with_switch_and_verified_artifacts(run):
    cfg, run_dir, _ = run
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["state"] == "DONE" and m["epochs"] == 4 and m["stop_epoch"] == 2
    assert m["switch"]["epoch"] == 2 and m["switch"]["from"] == "best_stg1"
    assert m["switch"]["sha256"] == m["artifacts"]["best_stg1"]["sha256"]
    for name in ("last", "best_stg1", "final"):
        rec = m["artifacts"][name]
        assert _sha(run_dir / rec["key"]) == rec["sha256"], name
    # `last` is the epoch's stored TrainState itself (Ray's checkpoint of the last stage run), not a second copy
    assert m["artifacts"]["last"]["key"].startswith("ray/stage2-g") and not (run_dir / "artifacts/last.pth").exists()
    assert m["generation"] == 3  # claimed by the driver's start and by each stage run
    assert m["artifacts"]["best_stg1"]["stage"] == 1 and m["artifacts"]["best_stg1"]["epoch"] < 2
    if m["artifacts"]["best_stg2"] is not None:
        assert m["artifacts"]["best_stg2"]["stage"] == 2
        assert m["artifacts"]["best_stg2"]["ap"] > m["artifacts"]["best_stg1"]["ap"]
    assert m["final"]["artifact"] in ("best_stg1", "best_stg2") and m["final"]["reason"]
    assert [t["state"] for t in m["transitions"]][-1] == "DONE"


def test_metrics_are_contiguous_one_line_per_epoch(run):
    _, run_dir, _ = run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2]
    for r in rows:
        assert len(r["coco_stats"]) == 12 and r["ap"] == r["coco_stats"][0]
        assert r["loss"] > 0 and r["lr"] > 0
        assert r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1
        assert [c["category_id"] for c in r["per_class"]] == [1, 3, 5]
        scored = [c["ap"] for c in r["per_class"] if c["instances"]]  # COCO AP averages the classes with boxes
        assert sum(scored) / len(scored) == pytest.approx(r["ap"], abs=1e-9)


def test_both_workers_started_stage2_from_best_stg1_bit_identical(run):
    cfg, run_dir, _ = run
    m = json.loads((run_dir / "manifest.json").read_text())
    digests = m["switch"]["worker_start_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1
    state = load_train_state(run_dir / "artifacts" / "best_stg1.pth")
    model = build_model(cfg.model, state["extra"]["num_classes"])
    model.load_state_dict(state["model"])
    ema = build_model(cfg.model, state["extra"]["num_classes"])
    ema.load_state_dict(state["ema"]["module"])
    expected = hashlib.sha256((state_digest(model) + state_digest(ema)).encode()).hexdigest()
    assert digests[0] == expected


def test_ema_restart_decay_is_in_effect_in_stage2(run):
    cfg, run_dir, _ = run
    last = load_train_state(run_dir / json.loads((run_dir / "manifest.json").read_text())["artifacts"]["last"]["key"])
    stg1 = load_train_state(run_dir / "artifacts" / "best_stg1.pth")
    assert last["stage"] == 2 and last["last_epoch"] == 3
    assert stg1["ema"]["decay"] == cfg.ema.decay
    assert last["ema"]["decay"] == RESTART_DECAY


def test_final_rebuilds_and_reproduces_recorded_ap(run):
    cfg, run_dir, manifest = run
    path = run_dir / "artifacts" / "final.pth"
    raw = torch.load(path, weights_only=True)
    assert "optimizer" not in raw
    model, meta = load_final(path)
    assert meta["meta"]["num_top_queries"] == cfg.eval.num_top_queries  # what predict, eval and export keep
    data = build_data(cfg, 0, 1)
    result = evaluate(model, data.val_loader, coco_gt=data.coco_gt, category_ids=data.category_ids,
                      device=torch.device("cpu"), num_top_queries=cfg.eval.num_top_queries)
    assert result.ap == pytest.approx(manifest.final["ap"], abs=1e-6)


def test_rerun_of_a_done_run_trains_nothing(run):
    cfg, run_dir, _ = run
    before = (run_dir / "manifest.json").read_text()
    m = run_training(RunRequest(cfg=cfg, storage_uri=str(run_dir.parent), name="t1", workers=2))
    assert m.state.value == "DONE"
    assert (run_dir / "manifest.json").read_text() == before


def test_other_config_under_same_name_is_refused(run, tiny_data_root):
    cfg, run_dir, _ = run
    other = relative_cfg(tiny_data_root, *FINISHED_OVERRIDES, "optimizer.lr=0.001", *tracking_overrides(
        cfg.train.mlflow_tracking_uri))
    with pytest.raises(RunError, match="optimizer.lr"):
        run_training(RunRequest(cfg=other, storage_uri=str(run_dir.parent), name="t1", workers=2))


def test_console_printed_each_epoch_once_in_order(finished_run):
    lines = finished_run.console.splitlines()
    assert [line.split()[:4] for line in lines] == [["epoch", f"{e}/3", "stage", str(s)]
                                                    for e, s in [(0, 1), (1, 1), (2, 2), (3, 2)]]
    assert "saved best_stg1" in lines[0]


def test_run_has_its_picture_and_tensorboard_events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = run
    assert (run_dir / "plots" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 2  # one writer per stage run
    seen = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        assert {"coco/AP", "coco/AR100", "loss/total", "lr", "time/epoch_s"} <= set(acc.Tags()["scalars"])
        seen |= {e.step: e.value for e in acc.Scalars("coco/AP")}
    assert seen == pytest.approx({r["epoch"]: r["ap"] for r in rows})


def test_mlflow_run_holds_the_config_every_epoch_the_plot_and_the_final_uri(run):
    from mlflow.tracking import MlflowClient

    from deim_ray.driver.trackers import FINAL_URI_TAG, flat_params
    from deim_ray.config.loader import config_to_dict

    cfg, run_dir, manifest = run
    client = MlflowClient(cfg.train.mlflow_tracking_uri)
    m = json.loads((run_dir / "manifest.json").read_text())
    logged = client.get_run(m["trackers"]["mlflow_run"])
    assert logged.info.run_name == "t1" and logged.info.status == "FINISHED"
    assert logged.data.params == flat_params(config_to_dict(load_config(run_dir / "config.yaml")))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key, field in (("coco/AP", "ap"), ("loss/total", "loss"), ("lr", "lr"), ("stage", "stage")):
        history = {h.step: h.value for h in client.get_metric_history(logged.info.run_id, key)}
        assert history == pytest.approx({r["epoch"]: r[field] for r in rows}), key
    assert logged.data.tags[FINAL_URI_TAG] == manifest.final["uri"] == m["final"]["uri"]
    assert logged.data.metrics["final_ap"] == pytest.approx(m["final"]["ap"])
    plots = client.list_artifacts(logged.info.run_id, "plots")
    assert [a.path for a in plots] == ["plots/metrics.png"] and plots[0].file_size > 1000


def test_predict_uses_the_runs_final_model(run, tmp_path, tiny_data_root):
    _, run_dir, _ = run
    image = sorted((tiny_data_root / "val").glob("*.jpg"))[0]
    assert main(["predict", str(run_dir), str(image), "-o", str(tmp_path / "p"), "--score", "0"]) == 0
    results = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 3, 5}


def _final_row(run_dir: Path, manifest) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["epoch"] == manifest.final["epoch"])


def test_eval_reproduces_the_final_ap_in_pytorch_and_onnx(run, tiny_data_root, tmp_path, capsys):
    _, run_dir, manifest = run
    torch_json, onnx_json, onnx = tmp_path / "torch.json", tmp_path / "onnx.json", tmp_path / "model.onnx"
    assert main(["eval", str(run_dir), "--data", str(tiny_data_root), "--device", "cpu", "-o", str(torch_json),
                 "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    doc = json.loads(torch_json.read_text())
    assert list(doc["stats"]) == list(COCO_STAT_NAMES) and doc["images"] == 12
    assert doc["stats"]["AP"] == pytest.approx(manifest.final["ap"], abs=1e-3)
    trained = _final_row(run_dir, manifest)["per_class"]
    assert [(c["name"], c["category_id"], c["instances"]) for c in doc["per_class"]] == \
        [(c["name"], c["category_id"], c["instances"]) for c in trained]
    for got, want in zip(doc["per_class"], trained):
        assert got["ap"] == pytest.approx(want["ap"], abs=1e-3) and got["ap50"] == pytest.approx(want["ap50"], abs=1e-3)
        assert f"{got['ap']:6.3f}" in next(line for line in out.splitlines() if line.startswith(got["name"] + " "))
    assert (tmp_path / "plots" / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["export", str(run_dir), "-o", str(onnx)]) == 0
    assert main(["eval", str(onnx), "--data", str(tiny_data_root), "-o", str(onnx_json)]) == 0
    onnx_doc = json.loads(onnx_json.read_text())
    assert abs(onnx_doc["stats"]["AP"] - doc["stats"]["AP"]) <= 0.002
    print(f"final AP {manifest.final['ap']:.5f}  eval (PyTorch) {doc['stats']['AP']:.5f}  "
          f"eval (ONNX Runtime) {onnx_doc['stats']['AP']:.5f}")


def test_per_class_ap_of_the_final_model_is_the_per_category_evaluation(run, tiny_data_root):
    _, run_dir, _ = run
    split = val_split_of(tiny_data_root)
    dataset = CocoDetection(split.img_folder, split.ann_file)
    detections = detect_all(open_detector(str(run_dir), device="cpu"), dataset)
    result = coco_evaluation(dataset.coco_gt, detections)
    for row in result.per_class:
        assert (row["ap"], row["ap50"]) == pytest.approx(one_category_ap(dataset.coco_gt, detections,
                                                                          row["category_id"]), abs=1e-12)
    assert sum(r["ap"] for r in result.per_class) / 3 == pytest.approx(result.ap, abs=1e-12)


def test_eval_scores_the_detections_training_scored(run, tiny_data_root):
    """Stronger than equal APs (a 4-epoch tiny run scores little): the same boxes and scores per image."""
    cfg, run_dir, _ = run
    model, _ = load_final(run_dir / "artifacts" / "final.pth")
    data = build_data(cfg, 0, 1)
    trained = DetectionCollector(data.category_ids)  # what evaluate() collects each epoch
    with torch.no_grad():
        for images, targets in data.val_loader:
            out = model(pixel_values=images)
            sizes = torch.stack([t["orig_size"] for t in targets])
            trained.add([int(t["image_id"]) for t in targets],
                        postprocess(out.logits, out.pred_boxes, sizes, cfg.eval.num_top_queries))
    split = val_split_of(tiny_data_root)
    evaluated = detect_all(open_detector(str(run_dir), device="cpu"), CocoDetection(split.img_folder, split.ann_file))
    expected = merge_detections([trained.by_image])
    assert len(evaluated) == len(expected) == 12 * cfg.eval.num_top_queries
    for image_id in trained.by_image:
        got, want = ([d for d in dets if d["image_id"] == image_id] for dets in (evaluated, expected))
        as_arrays = [tuple(np.array([d[k] for d in dets]) for k in ("category_id", "bbox", "score"))
                     for dets in (got, want)]
        assert matched_box_error(*as_arrays) <= 1e-2  # each detection has its partner: class, score, box
