"""A worker failure caused by the run's input is reported at once, not retried `max_failures` times.

On a cluster (RAY_ADDRESS set) the driver's preflight cannot see the workers' data, so a wrong data folder is
first found by the workers; real Ray, real workers, a real DataError."""

import json
import time

import pytest
import ray

from deim_ray.driver.run import RunError, RunRequest, run_training

pytestmark = pytest.mark.slow


def test_data_error_on_the_workers_ends_the_stage_without_retries(ray_local, tiny_cfg, tmp_path, monkeypatch,
                                                                  capfd):
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
    # the hint is true: nothing was committed, so the same command starts over (a changed config included)
    assert "No epoch was committed" in message and "starts over" in message, message
    # the workers' tracebacks went to the log file the message names, not to the console
    log = message.rsplit("the workers' full output: ", 1)[1].rstrip(")")
    deadline = time.monotonic() + 20
    while "does not exist" not in _read(log) and time.monotonic() < deadline:
        time.sleep(0.2)  # Ray forwards worker output asynchronously
    assert "Traceback (most recent call last)" in _read(log) and "does not exist" in _read(log)
    console = capfd.readouterr()
    assert "Traceback" not in console.out + console.err, console.err[-3000:]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def test_traceback_blocks_and_rays_failure_summaries_stay_off_the_console():
    from deim_ray.driver.worker_output import without_tracebacks

    lines = ["epoch note from a worker", "Traceback (most recent call last):", '  File "x.py", line 1, in f',
             "    raise DataError(msg)", "deim_ray.data.errors.DataError: image folder /x does not exist", "",
             "The above exception was the direct cause of the following exception:", "",
             "Traceback (most recent call last):", '  File "y.py", line 2, in g', "RuntimeError: wrapped",
             "Training failed due to worker errors:", "a warning the user should see"]
    assert without_tracebacks(lines) == ["epoch note from a worker", "a warning the user should see"]


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
