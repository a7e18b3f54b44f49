"""driver layer: `CheckpointHook`, the one owner of a stage's checkpoints in storage.

Each epoch rank 0 saves the TrainState once; Ray's report uploads it (in the background, in epoch order) through
`checkpoint_upload_fn`, which stores it once, under this stage run's own Ray checkpoint folder, and commits it:
the manifest records it as `last` (and as the stage's best on an improving epoch, then copied server-side onto
`artifacts/best_stg<N>.pth`), and metrics.jsonl is rewritten from the lines the state carries. The same stored
object is Ray's checkpoint, so an epoch is uploaded exactly once.

A stage resumes from the manifest's `last` (see `worker.py`), which every commit keeps in step with the bests
and the metrics, so there is nothing to reconcile after a failure. Every write is fenced (`RunStore`): when a
newer attempt has taken the run over, rank 0 finds out at the start of the stage or after an epoch, and every
rank stops the stage together without writing.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
from pathlib import Path

import ray.train
from ray.train import Checkpoint
from ray.train.v2.api.report_config import CheckpointUploadMode

from deim_ray.config.schedule import best_artifact
from deim_ray.driver.scratch import process_scratch
from deim_ray.engine import dist
from deim_ray.engine.hooks import EpochRecord, Hook
from deim_ray.engine.state import save_train_state
from deim_ray.storage import RunStore
from deim_ray.storage.errors import StaleWriter
from deim_ray.storage.transfer import BackgroundUploader

log = logging.getLogger("deim_ray.worker")

CKPT_FILE = "state.pt"


def _artifact_meta(trainer, metrics: list[dict]) -> dict:
    data = trainer.data
    return {"category_ids": list(data.category_ids), "class_names": list(data.class_names),
            "num_classes": data.num_classes, "image_size": list(trainer.cfg.data.image_size),
            "world_size": trainer.world_size, "metrics": list(metrics)}


class CheckpointHook(Hook):
    """Every rank: fence checks and Ray reports; rank 0: the TrainState and its commit (module docstring)."""

    def __init__(self, store: RunStore, ray_run: str, resume: dict | None = None):
        self.store = store
        self.ray_run = ray_run
        self.resume = resume
        self.metrics: list[dict] = []
        """Rank 0: the metrics lines of the run so far (plots and TensorBoard read them too)."""
        self.scratch: Path | None = None
        self.uploader: BackgroundUploader | None = None
        """Rank 0: a scratch folder and an upload thread for the run's side files (plots, TensorBoard events)."""

    def _stale(self, trainer) -> bool:
        """Collective: whether a newer attempt owns the run (rank 0 reads the manifest, every rank learns it)."""
        reason = None
        if trainer.is_main:
            try:
                self.store.check_fence()
            except StaleWriter as e:
                reason = str(e)
        reason = dist.broadcast_object(reason)
        if reason:
            trainer.stop_reason = reason
        return bool(reason)

    def before_stage(self, trainer):
        if self._stale(trainer) or not trainer.is_main:
            return
        resumed_lines = (self.resume or {}).get("extra", {}).get("metrics")
        lines = resumed_lines if resumed_lines is not None else self.store.read_metrics()
        self.metrics = [r for r in lines if r["epoch"] <= trainer.epoch]
        # in case a worker died between the two steps of an epoch's commit
        self.store.publish_best(best_artifact(trainer.stage))
        self.scratch = Path(tempfile.mkdtemp(prefix="side_", dir=process_scratch()))
        self.uploader = BackgroundUploader()

    def after_epoch(self, trainer, record: EpochRecord, decision):
        if self._stale(trainer):
            return
        metrics = {"epoch": record.epoch, "stage": record.stage, "ap": record.ap, "ap50": record.coco_stats[1],
                   "loss": record.loss, "best_ap": trainer.tracker.top1, "saved": decision.save or "",
                   "restarted_from_stg1": decision.restart_from_stg1,
                   "start_digests": ",".join(trainer.stage_start_digests), "resumed": self.resume is not None}
        checkpoint, upload = None, None
        if trainer.is_main:
            self.metrics.append(record.to_json())
            folder = Path(tempfile.mkdtemp(prefix="ckpt_", dir=process_scratch()))
            save_train_state(trainer.state_dict(extra=_artifact_meta(trainer, self.metrics)), folder / CKPT_FILE)
            checkpoint = Checkpoint.from_directory(str(folder))
            upload = functools.partial(self._publish, record=record, best=decision.save,
                                       metrics="".join(json.dumps(r) + "\n" for r in self.metrics))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{record.epoch:04d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, checkpoint_upload_fn=upload)

    def _publish(self, checkpoint: Checkpoint, dir_name: str, *, record: EpochRecord, best: str | None,
                 metrics: str) -> Checkpoint:
        """Ray's upload of rank 0's checkpoint (on Ray's upload thread, in report order): store it once, commit it,
        and hand Ray the stored folder as its checkpoint."""
        stored = self.store.put_state(f"ray/{self.ray_run}/{dir_name}/{CKPT_FILE}",
                                      Path(checkpoint.path) / CKPT_FILE)
        self.store.commit_epoch(stored, epoch=record.epoch, stage=record.stage, ap=record.ap, best=best,
                                metrics=metrics)
        ray_storage = ray.train.get_context().get_storage()
        return Checkpoint(path=f"{ray_storage.experiment_fs_path}/{dir_name}",
                          filesystem=ray_storage.storage_filesystem)

    def after_stage(self, trainer):
        if self.uploader is not None:  # the side files of the last epoch are stored before the stage ends
            self.uploader.close()
            shutil.rmtree(self.scratch, ignore_errors=True)
