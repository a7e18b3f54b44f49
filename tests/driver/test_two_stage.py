"""End to end on real Ray (2 CPU workers, gloo), the real tiny DEIMv2 and real COCO evaluation:
a two-stage run ends DONE with verified artifacts, an identical stage-2 start on both workers, the
EMA restart decay in effect, and a final artifact that reproduces its recorded AP."""

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import torch

from deim_ray.cli.main import main
from deim_ray.config.loader import load_config
from deim_ray.driver.console import Console
from deim_ray.driver.run import RunError, RunRequest, run_training
from deim_ray.engine.data import build_data
from deim_ray.engine.loop import evaluate
from deim_ray.engine.state import load_train_state
from deim_ray.engine.trainer import state_digest
from deim_ray.models.build import build_model
from deim_ray.models.export import load_final

from tests.driver.conftest import TINY, data_overrides

pytestmark = pytest.mark.slow

RESTART_DECAY = 0.9995


REPO = Path(__file__).resolve().parents[2]


def _relative_cfg(tiny_data_root, *overrides):
    return load_config(REPO / TINY, [*data_overrides(tiny_data_root.name), *overrides])


@pytest.fixture(scope="module")
def run(ray_local, tiny_data_root, tmp_path_factory, mlflow_server):
    """The module runs from the data's parent folder with RELATIVE data paths, as the README allows: the driver
    generates the synthetic set there once and hands the workers (other working directories) absolute paths.
    The run logs to TensorBoard and to a real MLflow server."""
    storage = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(tiny_data_root.parent)
    try:
        cfg = _relative_cfg(tiny_data_root, f"schedule.ema_restart_decay={RESTART_DECAY}",
                            "train.trackers=[tensorboard,mlflow]", f"train.mlflow_tracking_uri={mlflow_server}")
        console = Console(stream=io.StringIO())
        manifest = run_training(RunRequest(cfg=cfg, storage_uri=str(storage), name="t1", workers=2,
                                           console=console))
        (storage / "console.txt").write_text(console.stream.getvalue())
        yield cfg, storage / "t1", manifest
    finally:
        os.chdir(cwd)


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
    data = build_data(cfg, 0, 1)
    stats = evaluate(model, data.val_loader, coco_gt=data.coco_gt, category_ids=data.category_ids,
                     device=torch.device("cpu"), num_top_queries=cfg.eval.num_top_queries)
    assert stats[0] == pytest.approx(manifest.final["ap"], abs=1e-6)


def test_rerun_of_a_done_run_trains_nothing(run):
    cfg, run_dir, _ = run
    before = (run_dir / "manifest.json").read_text()
    m = run_training(RunRequest(cfg=cfg, storage_uri=str(run_dir.parent), name="t1", workers=2))
    assert m.state.value == "DONE"
    assert (run_dir / "manifest.json").read_text() == before


def test_other_config_under_same_name_is_refused(run, tiny_data_root):
    cfg, run_dir, _ = run
    other = _relative_cfg(tiny_data_root, f"schedule.ema_restart_decay={RESTART_DECAY}", "optimizer.lr=0.001",
                          "train.trackers=[tensorboard,mlflow]",
                          f"train.mlflow_tracking_uri={cfg.train.mlflow_tracking_uri}")
    with pytest.raises(RunError, match="optimizer.lr"):
        run_training(RunRequest(cfg=other, storage_uri=str(run_dir.parent), name="t1", workers=2))


def test_console_printed_each_epoch_once_in_order(run):
    _, run_dir, _ = run
    lines = (run_dir.parent / "console.txt").read_text().splitlines()
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
