"""driver layer: the console of `deim-ray tune`, one line per trial event in deim_ray's words.

    trial-0 started: optimizer.lr=0.00213 schedule.stop_epoch=4
    trial-0  epoch  3/14  stage 1  loss  13.212  AP 0.004  AP50 0.012  best 0.004    8.1s
    trial-2 stopped by ASHA after epoch 3: its loss 14.1 was not among the best 1/2 of the trials at that rung
    trial-3 failed: RunError: stage 1 of run `trial-3` failed: ...
    trial-0 finished: 15 epochs, best AP 0.3012

Trials are named as their runs are (`trial-<n>`, n counted from 0 in the order Tune created them). Epoch lines come
every `every` epochs and at each trial's last one. Ray's own output (status tables every 30 s, result tables with
internal fields, the trial actors' stdout and stderr, which include Python's "Exception ignored ... SystemExit"
when ASHA kills a trial) stays out of the console unless -v: `ray_output` gives the Tuner's settings for that, and
the search's driver connects with `log_to_driver=False`, which keeps the trial processes' output in Ray's session
logs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from ray import cloudpickle, tune

from deim_ray.driver.console import epoch_line
from deim_ray.logs import is_verbose

EPOCH_LINES_PER_TRIAL = 4
"""Epoch lines a trial prints by default (`--report-every` 0): a 4-trial search of the demo fits a screen."""


def trial_index(trial_id: str) -> int:
    """Tune's trial ids end in the trial's counter (`122c8_00003` -> 3)."""
    return int(trial_id.rsplit("_", 1)[-1])


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_index(trial_id)}"


def epochs_between_lines(requested: int, epochs: int) -> int:
    """Epochs between two epoch lines of a trial: `requested`, or (0) about EPOCH_LINES_PER_TRIAL per trial."""
    return requested if requested > 0 else max(1, -(-epochs // EPOCH_LINES_PER_TRIAL))


class TrialConsole(tune.Callback):
    """Tune callback (on the search's driver) printing the console lines of the module docstring."""

    def __init__(self, epochs_of: Callable[[dict], int], every: int, metric: str, reduction_factor: int,
                 stream: IO[str] | None = None):
        self.epochs_of, self.every, self.metric = epochs_of, every, metric
        self.reduction_factor = reduction_factor
        self.stream = stream
        self.epochs: dict[str, int] = {}

    def _print(self, trial, text: str) -> None:
        print(f"{trial_run_name(trial.trial_id)}{text}", file=self.stream or sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        params = trial.config or {}
        self.epochs[trial.trial_id] = self.epochs_of(params)
        self._print(trial, " started: " + " ".join(f"{k}={_short(v)}" for k, v in params.items()))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:
            return
        epoch, epochs = int(result["epoch"]), self.epochs.get(trial.trial_id)
        if (epoch + 1) % self.every and epoch + 1 != epochs:
            return
        line = epoch_line({"epoch": epoch, "stage": result["stage"], "loss": result["loss"], "ap": result["ap"],
                           "coco_stats": [result["ap"], result["ap50"]], "best": result.get("best_ap"),
                           "epoch_time_s": result.get("time_this_iter_s", 0.0)}, epochs)
        self._print(trial, f"  {line}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        run = int(last.get("epoch", -1)) + 1
        if run < self.epochs.get(trial.trial_id, 0):
            value = last.get(self.metric, 0.0)
            self._print(trial, f" stopped by ASHA after epoch {run - 1}: its {self.metric} {value:.4g} was not "
                               f"among the best 1/{self.reduction_factor} of the trials at that rung")
        else:
            self._print(trial, f" finished: {run} epochs, best AP {last.get('best_ap', 0.0):.4f}")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = _raised(trial)
        self._print(trial, f" failed: {error_line(error) if error else 'its error is in the table below'}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def _raised(trial) -> BaseException | None:
    """What a failed trial raised: Tune pickles it into the trial's local folder before the callbacks run (its
    copy in the search's storage comes later)."""
    path = trial.pickled_error_file
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return cloudpickle.load(f)


def error_line(error: BaseException) -> str:
    """`Type: first line` of what a trial raised (a RayTaskError wraps it as its `cause`)."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


@contextmanager
def ray_output() -> Iterator[dict]:
    """The Tuner's RunConfig settings for Ray's own output (unless -v: no progress reporting), with Ray Tune's
    legacy reporter (the one verbose=0 silences) and its logger quiet while the search runs."""
    if is_verbose():
        yield {}
        return
    tune_log = logging.getLogger("ray.tune")
    old_level, old_env = tune_log.level, os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_log.setLevel(logging.CRITICAL)  # its "Trials did not complete: [_trial_main_...]": the failed lines say it
    try:
        yield {"verbose": 0}
    finally:
        tune_log.setLevel(old_level)
        if old_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old_env
