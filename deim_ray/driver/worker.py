"""driver layer: the function every Ray Train worker runs for one stage.

It rebuilds the config, picks the stage's starting state (Ray's latest committed checkpoint after a worker
failure; otherwise, for stage 2, the verified best_stg1 that every rank reads from storage), and runs the
engine's `Trainer` with the hooks that connect it to Ray and to the run's storage.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch

from deim_ray.config.loader import config_from_dict
from deim_ray.config.schedule import BEST_STG1, Stage
from deim_ray.driver.console import BoardHook
from deim_ray.driver.hooks import FaultHook, RayReportHook, RunSyncHook
from deim_ray.driver.plots import PlotHook
from deim_ray.driver.tensorboard import TensorBoardHook
from deim_ray.engine.hooks import ProgressHook
from deim_ray.logs import setup_logging
from deim_ray.engine.state import load_train_state
from deim_ray.engine.trainer import StageStart, Trainer
from deim_ray.storage import RunStore, open_storage

log = logging.getLogger("deim_ray.worker")

CKPT_FILE = "state.pt"


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker (plain data: it is pickled to the workers; never secrets)."""

    config: dict
    config_sha256: str
    stage: int
    storage_uri: str
    run_name: str
    best_stg1_sha256: str | None = None
    board: str | None = None
    """Name of the driver's console board (driver/console.py); None where no console watches (Tune)."""
    verbose: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _resume_state(sha: str) -> dict | None:
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state = load_train_state(Path(d) / CKPT_FILE, expected_config_sha256=sha)
    # a warning: a resume means a worker or the driver failed, which the console shows even without -v
    log.warning("resuming stage %d after epoch %d from Ray checkpoint %s", state["stage"], state["last_epoch"],
                ckpt.path)
    return state


def _read_best_stg1(store: RunStore, expected_sha256: str, sha: str) -> dict:
    """Every rank reads the same verified object from storage (no node-local path, no shared filesystem)."""
    with tempfile.TemporaryDirectory(prefix="deim_ray_stg1_") as tmp:
        path = store.open_artifact(BEST_STG1, tmp)
        record = store.read_manifest().artifacts[BEST_STG1]
        if record.sha256 != expected_sha256:
            raise RuntimeError(f"best_stg1 changed after the switch was recorded ({record.sha256[:12]} != "
                               f"{expected_sha256[:12]}); re-run the command to resume from the manifest")
        return load_train_state(path, expected_config_sha256=sha)


def train_stage(args_dict: dict) -> None:
    """Ray Train entry point (`train_loop_per_worker`)."""
    args = WorkerArgs(**args_dict)
    setup_logging(quiet=not args.verbose, verbose=args.verbose)
    cfg = config_from_dict(args.config)
    stage = Stage(args.stage)
    fault = FaultHook.from_env(os.environ)  # test-only; None unless DEIM_RAY_FAULT is set
    storage = open_storage(args.storage_uri, cfg.storage)
    store = RunStore(fault.wrap_storage(storage) if fault else storage, args.run_name)
    resume = _resume_state(args.config_sha256)
    stage1_best = _read_best_stg1(store, args.best_stg1_sha256, args.config_sha256) if stage is Stage.TWO else None
    scratch = Path(tempfile.mkdtemp(prefix="deim_ray_scratch_"))
    sync = RunSyncHook(store, scratch, resume=resume)
    # the fault hook sits between the state save (sync) and Ray's report: its `checkpoint_write` point
    hooks = [ProgressHook() if args.verbose else None, BoardHook(args.board) if args.board else None, sync, fault,
             RayReportHook(sync, CKPT_FILE, resumed=resume is not None), PlotHook(sync, store),
             TensorBoardHook(sync, store) if cfg.train.tensorboard else None]
    trainer = Trainer(cfg, args.config_sha256, device=ray.train.torch.get_device(), hooks=[h for h in hooks if h])
    trainer.run_stage(StageStart(stage=stage, resume=resume, stage1_best=stage1_best))
