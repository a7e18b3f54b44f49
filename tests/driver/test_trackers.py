"""Experiment trackers against the real things: a real MLflow tracking server (sqlite, local artifact root) and
W&B in offline mode, driven as a run drives them (the driver opens and closes the tracker run, rank 0's hook logs
synthetic epoch records) and read back through MLflow's client and W&B's run files. A requested tracker that
cannot work is a one-line error before Ray starts."""

import sys
from types import SimpleNamespace

import pytest
import ray

from deim_ray.cli.main import main
from deim_ray.config.loader import config_to_dict, override_config
from deim_ray.driver.plots import write_plot
from deim_ray.driver.trackers import (FINAL_URI_TAG, MLflowHook, WandbHook, close_tracking, flat_params,
                                      open_tracking)
from deim_ray.engine.hooks import EpochRecord
from deim_ray.storage import Manifest, RunStore, open_storage
from deim_ray.storage.manifest import BranchRecord
from deim_ray.storage.transfer import BackgroundUploader
from tests.driver.conftest import TINY, data_overrides
from tests.fixtures_trackers import read_wandb_run

STATS = [0.1, 0.3, 0.05, 0.0, 0.1, 0.2, 0.1, 0.2, 0.25, 0.0, 0.2, 0.3]


def _records(n: int, stop_epoch: int) -> list[EpochRecord]:
    return [EpochRecord(epoch=e, stage=1 if e < stop_epoch else 2, ap=0.1 * (e + 1),
                        coco_stats=[0.1 * (e + 1), *STATS[1:]], loss=9.0 - e, losses={"loss_mal": 1.0}, lr=1e-3,
                        epoch_time_s=1.0, eval_time_s=0.1) for e in range(n)]


def _run_store(tmp_path, cfg) -> RunStore:
    store = RunStore(open_storage(str(tmp_path / "runs")), "t1")
    store.claim(Manifest.new(name="t1", config_sha256="0" * 64, epochs=cfg.schedule.epochs,
                             stop_epoch=cfg.schedule.stop_epoch))
    return store


def _drive(hook, records: list[EpochRecord]) -> None:
    """What the Trainer does with a hook on rank 0 over one stage."""
    trainer = SimpleNamespace(is_main=True, stop_reason=None)
    hook.before_stage(trainer)
    for record in records:
        hook.after_epoch(trainer, record, SimpleNamespace(save=None, restart_from_stg1=False))
    hook.after_stage(trainer)


def _finished(store: RunStore, uri: str, ap: float) -> Manifest:
    return store.update_manifest(lambda m: setattr(m, "final", {"artifact": "best_stg2", "uri": uri, "ap": ap}))


def test_flat_params_are_the_resolved_config_as_dotted_keys(tiny_cfg):
    params = flat_params(config_to_dict(tiny_cfg()))
    assert params["optimizer.lr"] == "0.002" and params["schedule.stop_epoch"] == "2"
    assert params["data.synthetic.num_classes"] == "3" and params["train.trackers"] == "['tensorboard']"
    assert "source" not in params and not any(isinstance(v, dict) for v in params.values())


def test_a_requested_tracker_that_cannot_work_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch,
                                                                            tiny_data_root):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ray_was_up = ray.is_initialized()
    train = ["train", "-c", TINY, "--storage", str(tmp_path), "--name", "run", "-u", *data_overrides(tiny_data_root)]
    code = main([*train, "train.trackers=[mlflow]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "set MLFLOW_TRACKING_URI or train.mlflow_tracking_uri" in err
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if W&B were not installed
    code = main([*train, "train.trackers=[tensorboard,wandb]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("deim-ray: error: `train.trackers` names wandb but the wandb package is not "
                                 "installed; `pip install wandb` (or drop wandb from train.trackers)")
    assert ray.is_initialized() == ray_was_up and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mlflow_run_holds_params_every_epoch_the_plot_and_the_final_uri(mlflow_server, tiny_cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = tiny_cfg("train.trackers=[mlflow]", f"train.mlflow_tracking_uri={mlflow_server}",
                   "train.mlflow_experiment=unit")
    store = _run_store(tmp_path, cfg)
    tracking = open_tracking(cfg, store)
    records = _records(4, cfg.schedule.stop_epoch)
    for stage_records in (records[:2], records[2:]):  # two stage runs, each with its own hook and uploader
        sync = SimpleNamespace(uploader=BackgroundUploader())
        _drive(MLflowHook(sync, tracking), stage_records)
        sync.uploader.close()
    # a driver that restarts continues the same MLflow run (its id is in the manifest)
    assert open_tracking(cfg, store) == tracking
    assert store.read_manifest().extra["trackers"]["mlflow_run"] == tracking.mlflow_run
    write_plot(store, [r.to_json() for r in records], cfg.schedule.stop_epoch)
    close_tracking(tracking, store, _finished(store, "file:///runs/t1/artifacts/final.pth", 0.4))

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracking.mlflow_run)
    assert run.info.run_name == "t1" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    assert run.data.params["optimizer.lr"] == "0.002" and run.data.params["train.trackers"] == "['mlflow']"
    assert len(run.data.params) == len(flat_params(config_to_dict(cfg)))
    ap = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "coco/AP")}
    assert ap == pytest.approx({r.epoch: r.ap for r in records})
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss/total")] == [9.0, 8.0, 7.0, 6.0]
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "stage")} == {0: 1, 1: 1, 2: 2, 3: 2}
    assert run.data.tags[FINAL_URI_TAG] == "file:///runs/t1/artifacts/final.pth" and run.data.metrics["final_ap"] == 0.4
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/metrics.png"]
    assert "manifest.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # a stage-2 branch's run is a child of the run's, with the branch's own config as params
    store.record_branches([BranchRecord(name="b1", params={"schedule.ema_restart_decay": 0.99})])
    branch_cfg = override_config(cfg, {"schedule.ema_restart_decay": 0.99})
    child = open_tracking(branch_cfg, store.branch("b1"), parent=tracking)
    close_tracking(child, store.branch("b1"), None)
    child_run = client.get_run(child.mlflow_run)
    assert child_run.info.run_name == "t1/b1" and child_run.data.tags["mlflow.parentRunId"] == tracking.mlflow_run
    assert child_run.data.params["schedule.ema_restart_decay"] == "0.99"
    assert store.read_manifest().branch("b1").extra["trackers"]["mlflow_run"] == child.mlflow_run


@pytest.mark.slow
def test_wandb_offline_run_holds_config_every_epoch_and_the_final_uri(wandb_offline, tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.trackers=[wandb]", "train.wandb_project=unit")
    store = _run_store(tmp_path, cfg)
    tracking = open_tracking(cfg, store)
    assert tracking.wandb_mode == "offline" and tracking.wandb_dir == str(wandb_offline)
    records = _records(3, cfg.schedule.stop_epoch)
    _drive(WandbHook(tracking, config_to_dict(cfg)), records)
    close_tracking(tracking, store, _finished(store, "s3://b/runs/t1/artifacts/final.pth", 0.3))

    logged = read_wandb_run(wandb_offline, tracking.wandb_id)
    assert {r["name"] for r in logged["runs"]} == {"t1"}
    assert logged["runs"][0]["config"]["optimizer.lr"] == "0.002"
    epochs = [h for h in logged["history"] if "coco/AP" in h]
    assert [(h["epoch"], h["coco/AP"], h["loss/total"]) for h in epochs] == [
        (r.epoch, pytest.approx(r.ap), r.loss) for r in records]
    assert logged["summary"]["final_uri"] == "s3://b/runs/t1/artifacts/final.pth"
