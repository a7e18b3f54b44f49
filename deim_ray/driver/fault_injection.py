"""driver layer, test-only: `FaultHook` SIGKILLs a worker (or poisons its loss) at chosen points so tests can prove
recovery.

Inactive unless DEIM_RAY_FAULT is set (`worker.py` asks `FaultHook.from_env`); production hooks never depend on it.

DEIM_RAY_FAULT="<point>:<epoch>:<rank>[,<point>:<epoch>:<rank>...]", point one of
  stage_start        before the first epoch of a stage run (epoch = that first epoch)
  mid_epoch          after the middle training step of the epoch
  eval               after this rank's first evaluation batch
  checkpoint_write   after rank 0 saved the epoch's TrainState and handed it to Ray's report (upload under way)
  upload             on rank 0's upload thread, after the epoch's best was copied onto its fixed name and before
                     the manifest points there (an epoch without a new best never fires)
  nan                not a kill: this rank's loss is NaN from the epoch's second step on, until the epoch reaches
                     `train.nan_tolerance` skipped steps and the stage rolls back (then the epoch runs clean)
DEIM_RAY_FAULT_DIR=<dir> receives one marker per fired fault (holding the kill time), so the retried worker
survives, and `epochs.jsonl`, rank 0's epoch completion times and fencing generation, from which tests measure
recovery. Workers of a local Ray instance inherit the environment of the driver process that started it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from deim_ray.config.schedule import BEST_STG1, BEST_STG2
from deim_ray.engine.hooks import Hook
from deim_ray.storage import Storage, artifact_key

log = logging.getLogger("deim_ray.worker")

FAULT_POINTS = ("stage_start", "mid_epoch", "eval", "checkpoint_write", "upload", "nan")
_STATE_EPOCH = re.compile(r"/epoch_(\d+)/")
"""Epoch in the key of a stored TrainState (`.../epoch_0007/state.pt`)."""


@dataclass(frozen=True)
class Fault:
    point: str
    epoch: int
    rank: int

    @property
    def marker(self) -> str:
        return f"{self.point}-e{self.epoch}-r{self.rank}.fired"


class FaultHook(Hook):
    """See the module docstring."""

    def __init__(self, faults: list[Fault], fault_dir: Path, generation: int | None = None):
        self.faults, self.dir, self.rank, self.generation = faults, fault_dir, -1, generation
        self.nans = 0

    @classmethod
    def from_env(cls, env, generation: int | None = None) -> "FaultHook | None":
        spec = env.get("DEIM_RAY_FAULT")
        if not spec:
            return None
        faults = []
        for item in filter(None, spec.split(",")):
            point, epoch, rank = item.strip().split(":")
            if point not in FAULT_POINTS:
                raise ValueError(f"DEIM_RAY_FAULT point {point!r} is not one of {', '.join(FAULT_POINTS)}")
            faults.append(Fault(point, int(epoch), int(rank)))
        fault_dir = Path(env.get("DEIM_RAY_FAULT_DIR", Path(tempfile.gettempdir()) / "deim_ray_faults"))
        fault_dir.mkdir(parents=True, exist_ok=True)
        return cls(faults, fault_dir, generation)

    def _armed(self, point: str, epoch: int) -> Fault | None:
        fault = Fault(point, epoch, self.rank)
        return fault if fault in self.faults and not (self.dir / fault.marker).exists() else None

    def _mark(self, fault: Fault) -> None:
        (self.dir / fault.marker).write_text(json.dumps({"point": fault.point, "epoch": fault.epoch,
                                                         "rank": fault.rank, "time": time.time()}))

    def _fire(self, point: str, epoch: int) -> None:
        fault = self._armed(point, epoch)
        if fault is not None:
            self._mark(fault)
            log.warning("fault injection: killing rank %d at %s of epoch %d", self.rank, point, epoch)
            os.kill(os.getpid(), signal.SIGKILL)

    def on_loss(self, trainer, epoch, iteration, loss):
        fault = self._armed("nan", epoch)
        if fault is None or iteration < 1:
            return loss
        self.nans += 1
        if self.nans >= trainer.cfg.train.nan_tolerance:
            self._mark(fault)  # this NaN completes the tolerance: the epoch's rerun after the rollback is clean
        log.warning("fault injection: NaN loss on rank %d at epoch %d step %d", self.rank, epoch, iteration)
        return loss * float("nan")

    def wrap_storage(self, storage: Storage) -> Storage:
        """`storage` with the `upload` fault point after each copy onto a best artifact."""
        return _UploadFaultStorage(storage, self)

    def before_stage(self, trainer):
        self.rank = trainer.rank
        self._fire("stage_start", trainer.epoch + 1)

    def on_step(self, trainer, epoch, iteration):
        if iteration == len(trainer.data.train_loader) // 2:
            self._fire("mid_epoch", epoch)

    def on_eval_batch(self, trainer, epoch, batch):
        if batch == 0:
            self._fire("eval", epoch)

    def after_epoch(self, trainer, record, decision):
        if trainer.stop_reason:
            return  # fenced off: this epoch was not committed
        if trainer.is_main:
            with open(self.dir / "epochs.jsonl", "a") as f:
                f.write(json.dumps({"epoch": record.epoch, "stage": record.stage, "time": time.time(),
                                    "generation": self.generation}) + "\n")
        self._fire("checkpoint_write", record.epoch)


class _UploadFaultStorage:
    """A Storage that runs the FaultHook's `upload` point after copying a TrainState onto a best artifact."""

    def __init__(self, storage: Storage, hook: FaultHook):
        self._storage, self._hook = storage, hook

    def __getattr__(self, name):
        return getattr(self._storage, name)

    def copy(self, src: str, dst: str, **conditions):
        info = self._storage.copy(src, dst, **conditions)
        epoch = _STATE_EPOCH.search(src)
        if epoch and dst.endswith((artifact_key(BEST_STG1), artifact_key(BEST_STG2))):
            self._hook._fire("upload", int(epoch.group(1)))
        return info
