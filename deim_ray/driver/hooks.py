"""driver layer: hooks that connect a worker's Trainer to the run's storage and to Ray Train.

`RunSyncHook` (rank 0) saves the epoch's TrainState once, then hands `last`, any new best and `metrics.jsonl`
to a background uploader so training does not wait on object storage; a stage ends only after every upload
is durable. `RayReportHook` (all ranks, same number of calls) reports metrics and rank 0's checkpoint so Ray
can resume the stage after a worker failure.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import ray.train
from ray.train import Checkpoint
from ray.train.v2.api.report_config import CheckpointUploadMode

from deim_ray.engine.hooks import Hook
from deim_ray.engine.state import save_train_state
from deim_ray.storage import LAST, RunStore
from deim_ray.storage.transfer import BackgroundUploader

log = logging.getLogger("deim_ray.worker")

METRICS_FILE = "metrics.jsonl"


def _artifact_meta(trainer) -> dict:
    data = trainer.data
    return {"category_ids": list(data.category_ids), "class_names": list(data.class_names),
            "num_classes": data.num_classes, "image_size": list(trainer.cfg.data.image_size),
            "world_size": trainer.world_size}


class RunSyncHook(Hook):
    """Rank 0: artifacts/{last,best_stg1,best_stg2}.pth and metrics.jsonl, uploaded in the background."""

    def __init__(self, store: RunStore, scratch: Path):
        self.store = store
        self.scratch = scratch
        self.uploader: BackgroundUploader | None = None
        self.metrics: list[dict] = []
        self.latest_state_path: Path | None = None

    def before_stage(self, trainer):
        if not trainer.is_main:
            return
        self.uploader = BackgroundUploader()
        first_epoch = trainer.epoch + 1
        text = self.store.read_text(METRICS_FILE) if self.store.exists(METRICS_FILE) else ""
        # a resumed or restarted stage rewrites the epochs it runs again: lines stay contiguous
        self.metrics = [r for r in map(json.loads, filter(None, text.splitlines())) if r["epoch"] < first_epoch]

    def after_epoch(self, trainer, record, decision):
        if not trainer.is_main:
            return
        path = self.scratch / f"state-e{record.epoch:04d}.pt"
        save_train_state(trainer.state_dict(extra=_artifact_meta(trainer)), path)
        if self.latest_state_path is not None:  # its uploads and Ray's checkpoint hold their own links
            self.latest_state_path.unlink(missing_ok=True)
        self.latest_state_path = path
        self.metrics.append(record.to_json())
        names = [LAST] + ([decision.save] if decision.save else [])
        ap = {LAST: record.ap}
        for name in names:
            copy = self.scratch / f"{name}-e{record.epoch:04d}.pt"
            os.link(path, copy)
            self.uploader.submit(self._put, name, copy, record.epoch, record.stage, ap.get(name, record.ap))
        body = "".join(json.dumps(r) + "\n" for r in self.metrics)
        self.uploader.submit(self.store.write_text, METRICS_FILE, body)

    def _put(self, name: str, path: Path, epoch: int, stage: int, ap: float) -> None:
        try:
            self.store.put_artifact(name, path, epoch=epoch, stage=stage, ap=ap)
        finally:
            path.unlink(missing_ok=True)

    def after_stage(self, trainer):
        if trainer.is_main and self.uploader is not None:
            self.uploader.flush()
            self.uploader.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


class RayReportHook(Hook):
    """Every rank reports each epoch; rank 0 attaches the TrainState as a Ray checkpoint (uploaded async)."""

    def __init__(self, sync: RunSyncHook, ckpt_file: str):
        self.sync = sync
        self.ckpt_file = ckpt_file

    def after_epoch(self, trainer, record, decision):
        metrics = {"epoch": record.epoch, "stage": record.stage, "ap": record.ap, "ap50": record.coco_stats[1],
                   "loss": record.loss, "best_ap": trainer.tracker.top1,
                   "saved": decision.save or "", "restarted_from_stg1": decision.restart_from_stg1,
                   "start_digests": ",".join(trainer.stage_start_digests)}
        checkpoint = None
        if trainer.is_main:
            ckpt_dir = Path(tempfile.mkdtemp(prefix="deim_ray_ckpt_"))
            os.link(self.sync.latest_state_path, ckpt_dir / self.ckpt_file)
            checkpoint = Checkpoint.from_directory(str(ckpt_dir))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{record.epoch:04d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)


class FaultHook(Hook):
    """Test-only fault injection: SIGKILL one worker at a chosen point, once per marker file.

    DEIM_RAY_FAULT="<point>:<epoch>:<rank>" with point in {mid_epoch, after_epoch, stage_start} and
    DEIM_RAY_FAULT_MARKER=<path> (created when the fault fires, so the retried worker survives).
    """

    def __init__(self, point: str, epoch: int, rank: int, marker: Path):
        self.point, self.epoch, self.rank, self.marker = point, epoch, rank, marker

    @classmethod
    def from_env(cls, env) -> "FaultHook | None":
        spec = env.get("DEIM_RAY_FAULT")
        if not spec:
            return None
        point, epoch, rank = spec.split(":")
        marker = Path(env.get("DEIM_RAY_FAULT_MARKER", Path(tempfile.gettempdir()) / "deim_ray_fault.fired"))
        return cls(point, int(epoch), int(rank), marker)

    def _fire(self, trainer, point: str, epoch: int) -> None:
        if point != self.point or epoch != self.epoch or trainer.rank != self.rank or self.marker.exists():
            return
        self.marker.write_text(f"{point}:{epoch}:{trainer.rank}\n")
        log.warning("fault injection: killing rank %d at %s of epoch %d", trainer.rank, point, epoch)
        os.kill(os.getpid(), signal.SIGKILL)

    def before_stage(self, trainer):
        self._fire(trainer, "stage_start", trainer.epoch + 1)

    def on_step(self, trainer, epoch, iteration):
        if iteration == len(trainer.data.train_loader) // 2:
            self._fire(trainer, "mid_epoch", epoch)

    def after_epoch(self, trainer, record, decision):
        self._fire(trainer, "after_epoch", record.epoch)
