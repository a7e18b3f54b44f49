"""A worker failure caused by the run's input is reported at once, not retried `max_failures` times.

On a cluster (RAY_ADDRESS set) the driver's preflight cannot see the workers' data, so a wrong data folder is
first found by the workers; real Ray, real workers, a real DataError."""

import json

import pytest
import ray

from deim_ray.driver.run import RunError, RunRequest, run_training

pytestmark = pytest.mark.slow


def test_data_error_on_the_workers_ends_the_stage_without_retries(ray_local, tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)  # "connected to a cluster"
    missing = tmp_path / "not-on-this-node"
    cfg = tiny_cfg("data.synthetic=null", f"data.train.img_folder={missing}/train",
                   f"data.train.ann_file={missing}/train.json", f"data.val.img_folder={missing}/val",
                   f"data.val.ann_file={missing}/val.json")
    with pytest.raises(RunError) as info:
        run_training(RunRequest(cfg=cfg, storage_uri=str(tmp_path / "runs"), name="bad-data", workers=2,
                                max_failures=3))
    message = str(info.value)
    # "not retried" is only written when the FIRST failed poll ends the stage (Ray's retries would say otherwise)
    assert "does not exist" in message and "not retried" in message and "\n" not in message, message
    manifest = json.loads((tmp_path / "runs" / "bad-data" / "manifest.json").read_text())
    assert manifest["state"] == "FAILED" and "not retried" in manifest["transitions"][-1]["note"]


def test_spent_nan_rollbacks_end_the_stage_but_a_lost_worker_is_retried():
    """The stage's own rollbacks already retried the epoch; Ray's retries stay for crashes and lost nodes."""
    from deim_ray.driver.ray_stage import InputFailure, StopOnInputErrors
    from deim_ray.engine.loop import NonFiniteLossError

    callback = StopOnInputErrors()
    callback.after_exception(None, {0: RuntimeError("worker died"), 1: OSError("connection reset")})
    with pytest.raises(InputFailure) as info:
        callback.after_exception(None, {1: NonFiniteLossError("stage 1: epoch 3 kept producing non-finite losses")})
    assert str(info.value) == ("stage 1: epoch 3 kept producing non-finite losses (worker 1; not retried: its "
                               "rollbacks are spent; a retry would resume into the same losses)")
