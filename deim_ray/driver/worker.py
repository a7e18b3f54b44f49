"""driver layer: the function every Ray Train worker runs for one stage.

It rebuilds the config, picks the stage's starting state (the manifest's `last` when it belongs to this stage,
after a worker failure or a driver restart; otherwise, for stage 2, the verified best_stg1), every rank reading
the same verified object from storage, and runs the engine's `Trainer` with the hooks that connect it to Ray and
to the run's storage. The worker writes with the fencing generation the driver claimed for this stage run. A
stage-2 branch's workers write through the branch's view of the run (its own `last`, best_stg2 and files) and
check best_stg1 against the run's own config, the one stage 1 trained with.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import ray.train
import ray.train.torch

from deim_ray.config.loader import config_from_dict
from deim_ray.config.schedule import BEST_STG1, LAST, Stage
from deim_ray.driver.checkpoint_hook import CheckpointHook
from deim_ray.driver.console import BoardHook
from deim_ray.driver.fault_injection import FaultHook
from deim_ray.driver.plots import PlotHook
from deim_ray.driver.scratch import sweep_dead_scratch
from deim_ray.driver.tensorboard import TensorBoardHook
from deim_ray.driver.trackers import tracker_hooks
from deim_ray.engine.hooks import ProgressHook
from deim_ray.engine.state import load_train_state
from deim_ray.engine.trainer import StageStart, Trainer
from deim_ray.logs import setup_logging
from deim_ray.storage import RunStore, open_storage

log = logging.getLogger("deim_ray.worker")


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker (plain data: it is pickled to the workers; never secrets)."""

    config: dict
    config_sha256: str
    stage: int
    storage_uri: str
    run_name: str
    generation: int
    ray_run: str
    best_stg1_sha256: str | None = None
    board: str | None = None
    """Name of the driver's console board (driver/console.py); None where no console watches (Tune)."""
    verbose: bool = False
    branch: str | None = None
    """The stage-2 branch these workers train (None: the run's own stage)."""
    stage1_config_sha256: str | None = None
    """Identity of the config best_stg1 was trained with, when it differs from `config_sha256` (a branch)."""
    tracking: dict | None = None
    """The MLflow / W&B runs the driver opened for this run or branch (`trackers.Tracking`), or None."""


def _read_state(store: RunStore, name: str, config_sha: str, expected_sha256: str | None = None) -> dict:
    """Every rank reads the same verified object from storage (no node-local path, no shared filesystem)."""
    with tempfile.TemporaryDirectory(prefix="deim_ray_state_") as tmp:
        record = store.record(name)
        if expected_sha256 is not None and record.sha256 != expected_sha256:
            raise RuntimeError(f"{name} changed after the switch was recorded ({record.sha256[:12]} != "
                               f"{expected_sha256[:12]}); re-run the command to resume from the manifest")
        return load_train_state(store.open_artifact(name, tmp), expected_config_sha256=config_sha)


def _resume_state(store: RunStore, stage: Stage, config_sha: str) -> dict | None:
    """The manifest's `last`, when it was saved in this stage (the state every commit keeps consistent)."""
    last = store.recorded(LAST)
    if last is None or last.stage != int(stage):
        return None
    state = _read_state(store, LAST, config_sha)
    # a warning: a resume means a worker or the driver failed, which the console shows even without -v
    log.warning("resuming stage %d after epoch %d from %s", state["stage"], state["last_epoch"], last.uri)
    return state


def train_stage(args_dict: dict) -> None:
    """Ray Train entry point (`train_loop_per_worker`)."""
    args = WorkerArgs(**args_dict)
    setup_logging(quiet=not args.verbose, verbose=args.verbose)
    sweep_dead_scratch()  # what killed workers of this node left behind
    cfg = config_from_dict(args.config)
    stage = Stage(args.stage)
    fault = FaultHook.from_env(os.environ, args.generation)  # test-only; None unless DEIM_RAY_FAULT is set
    storage = open_storage(args.storage_uri, cfg.storage)
    store = RunStore(fault.wrap_storage(storage) if fault else storage, args.run_name, generation=args.generation,
                     branch=args.branch)
    resume = _resume_state(store, stage, args.config_sha256)
    # stage 2 keeps best_stg1 in memory for its restarts, resumed or not
    stage1_best = (_read_state(store, BEST_STG1, args.stage1_config_sha256 or args.config_sha256,
                               args.best_stg1_sha256)
                   if stage is Stage.TWO else None)
    checkpoints = CheckpointHook(store, args.ray_run, resume=resume)
    hooks = [ProgressHook() if args.verbose else None, BoardHook(args.board) if args.board else None, checkpoints,
             fault, PlotHook(checkpoints, store),
             TensorBoardHook(checkpoints, store) if "tensorboard" in cfg.train.active_trackers else None,
             *tracker_hooks(checkpoints, args.tracking, args.config)]
    trainer = Trainer(cfg, args.config_sha256, device=ray.train.torch.get_device(), hooks=[h for h in hooks if h])
    trainer.run_stage(StageStart(stage=stage, resume=resume, stage1_best=stage1_best))
