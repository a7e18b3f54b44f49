"""driver layer: what a run is asked to do (`RunRequest`) and one stage run started from the driver (`fit_stage`).

`fit_stage` hands the workers their arguments (`WorkerArgs` in worker.py) and runs one Ray Train run under the
generation the RunStore holds, watched by the console. The run's state machine (`run.py`) calls it once per
stage; the stage-2 branches (`branch_run.py`) call it once per branch, each with a branch view of the RunStore.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from deim_ray.config.loader import config_sha256, config_to_dict
from deim_ray.config.schedule import Stage
from deim_ray.config.schema import Config
from deim_ray.driver.console import Console
from deim_ray.driver.preflight import absolute_paths
from deim_ray.driver.ray_stage import StageRunFailed, run_stage
from deim_ray.driver.trackers import Tracking
from deim_ray.logs import is_verbose
from deim_ray.storage import RunStore


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


@dataclass(frozen=True)
class RunRequest:
    cfg: Config
    storage_uri: str = "./runs"
    name: str = "run"
    workers: int = 2
    gpu: bool = False
    max_failures: int = 3
    restart: bool = False
    cpus_per_worker: float = 1.0
    console: Console | None = None
    """Prints one line per epoch (and a progress bar on a terminal); None under Tune or `-q`."""
    stage2_branches: int = 1
    """Stage-2 branches run in parallel from best_stg1 (`branch_run.py`); 1 is a plain stage 2."""
    explicit: frozenset[str] = frozenset()
    """Dotted config keys the user gave on the command line (`-u`, `--batch`): fitting the schedule to the data
    (`config.fit`) keeps them as given."""
    take_over: bool = False
    """Claim the run even while another live driver holds it (that driver is fenced out)."""
    tracking_parent: Tracking | None = None
    """The tracker run this run's tracker run is a child of (a Tune search's); None: a top-level run."""
    tracking: Tracking | None = None
    """The tracker runs the workers log to (set by the driver once the run is open)."""


def _stage_args(req: RunRequest, store: RunStore, stage: Stage, stg1_sha: str | None, ray_run: str,
                board: str | None, stage1_config_sha: str | None) -> dict:
    """What every worker gets: the config with paths made absolute here (the workers' working directory is
    not ours), the identity of the config as the user wrote it, the fencing generation it writes with and the
    console's board; a branch's workers also get their branch and the identity of the run's own config (the one
    best_stg1 was trained with)."""
    tree = config_to_dict(absolute_paths(req.cfg))
    tree.pop("source", None)
    return {"config": tree, "config_sha256": config_sha256(req.cfg), "stage": int(stage),
            "storage_uri": store.storage.uri, "run_name": req.name, "generation": store.generation,
            "ray_run": ray_run, "best_stg1_sha256": stg1_sha, "board": board, "verbose": is_verbose(),
            "branch": store.branch_name, "stage1_config_sha256": stage1_config_sha,
            "tracking": req.tracking.to_dict() if req.tracking else None}


def fit_stage(req: RunRequest, store: RunStore, stage: Stage, stg1_sha: str | None = None, *,
              stage1_config_sha: str | None = None, label: str = "") -> dict:
    """Run one stage to its end under the generation `store` holds (the workers resume from the `last` of
    `store`'s view when it belongs to this stage); returns the last report: per-worker digests of the weights the
    workers started from and whether they resumed (an empty dict when there was nothing left to train).
    StageRunFailed, whose message is the workers' own one-line error when they raised one of ours."""
    ray_run = f"stage{int(stage)}-g{store.generation}"
    watch = req.console.watch(req.cfg.schedule.epochs, label) if req.console else contextlib.nullcontext()
    try:
        with watch as board:
            args = _stage_args(req, store, stage, stg1_sha, ray_run, board, stage1_config_sha)
            result = run_stage(stage=stage, args=args, store=store, ray_run=ray_run, workers=req.workers,
                               gpu=req.gpu, max_failures=req.max_failures, cpus_per_worker=req.cpus_per_worker,
                               keep_checkpoints=req.cfg.train.keep_checkpoints)
    except StageRunFailed as e:
        raise StageRunFailed(worker_error(e.__cause__) or str(e)) from e.__cause__
    return dict(result.metrics or {})


def worker_error(error: BaseException | None) -> str | None:
    """The one-line message of a deim_ray error a worker raised (Ray's own summary starts "Training failed due to
    worker errors:" and buries it in a traceback)."""
    for exc in getattr(error, "worker_failures", {}).values():
        if type(exc).__module__.startswith("deim_ray.") and str(exc).strip():
            return str(exc).strip().splitlines()[0]
    return None
