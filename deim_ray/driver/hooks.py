"""driver layer: hooks that connect a worker's Trainer to the run's storage and to Ray Train.

`RunSyncHook` (rank 0) saves the epoch's TrainState once, then hands `last`, any new best and `metrics.jsonl`
to a background uploader so training does not wait on object storage; a stage ends only after every upload
is durable. `RayReportHook` (all ranks, same number of calls) reports metrics and rank 0's checkpoint so Ray
can resume the stage after a worker failure.

After a failure Ray resumes from its latest *committed* checkpoint, which may be an epoch behind what rank 0 had
already uploaded, and a killed upload may leave an object the manifest does not record yet. Hence three rules:
a best artifact is only replaced by one with a strictly higher AP than the manifest records; every TrainState
carries the metrics lines of its own history, so a resumed stage rewrites `metrics.jsonl` from exactly the
epochs it continues; and before a resumed stage trains, rank 0 reconciles the run directory with the state it
resumes from (records an orphaned object truthfully, re-publishes a `last` or best whose upload was lost).

`FaultHook` is test-only fault injection (see its docstring).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray.train import Checkpoint
from ray.train.v2.api.report_config import CheckpointUploadMode

from deim_ray.config.schedule import BEST_STG1, BEST_STG2, LAST, best_artifact
from deim_ray.engine.hooks import Hook
from deim_ray.engine.state import load_train_state, save_train_state
from deim_ray.storage import RunStore, Storage, artifact_key
from deim_ray.storage.transfer import BackgroundUploader

log = logging.getLogger("deim_ray.worker")

METRICS_FILE = "metrics.jsonl"
_COPY_EPOCH = re.compile(r"-e(\d+)\.pt$")
"""Epoch in the name of the per-artifact link RunSyncHook uploads (`<artifact>-e0007.pt`)."""


def _artifact_meta(trainer, metrics: list[dict]) -> dict:
    data = trainer.data
    return {"category_ids": list(data.category_ids), "class_names": list(data.class_names),
            "num_classes": data.num_classes, "image_size": list(trainer.cfg.data.image_size),
            "world_size": trainer.world_size, "metrics": list(metrics)}


def _epoch_ap(state: dict) -> float | None:
    """AP of the epoch a TrainState was saved after, from the metrics lines it carries."""
    lines = state.get("extra", {}).get("metrics") or []
    return next((r["ap"] for r in reversed(lines) if r["epoch"] == state["last_epoch"]), None)


class RunSyncHook(Hook):
    """Rank 0: artifacts/{last,best_stg1,best_stg2}.pth and metrics.jsonl, uploaded in the background."""

    def __init__(self, store: RunStore, scratch: Path, resume: dict | None = None):
        self.store = store
        self.scratch = scratch
        self.resume = resume
        self.uploader: BackgroundUploader | None = None
        self.metrics: list[dict] = []
        self.latest_state_path: Path | None = None

    def before_stage(self, trainer):
        if not trainer.is_main:
            return
        self.metrics = self._history(trainer.epoch + 1)
        if self.resume is not None:
            self._reconcile(trainer)
        self.uploader = BackgroundUploader()

    def _history(self, first_epoch: int) -> list[dict]:
        """Metrics lines before this worker's first epoch: those the resumed checkpoint carries (the history it
        continues), else metrics.jsonl's (a fresh stage 2 keeps stage 1's lines and drops a failed try's)."""
        lines = (self.resume or {}).get("extra", {}).get("metrics")
        if lines is None:
            text = self.store.read_text(METRICS_FILE) if self.store.exists(METRICS_FILE) else ""
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [r for r in lines if r["epoch"] < first_epoch]

    def _reconcile(self, trainer) -> None:
        """Before a resumed stage trains (nothing is in flight): make storage agree with the resumed state."""
        best = best_artifact(trainer.stage)
        for name in (LAST, best):
            self._record_orphan(name)
        self._republish(trainer, best)
        self.store.write_text(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.metrics))

    def _record_orphan(self, name: str) -> None:
        """An object stored but never recorded (killed between upload and manifest) is recorded as what it is."""
        key = self.store.key(artifact_key(name))
        info = self.store.storage.stat(key)
        manifest = self.store.read_manifest()
        record = manifest.artifacts.get(name)
        if info is None or (record is not None and (info.sha256 or self.store.storage.hash_object(key))
                            == record.sha256):
            return
        path = self.scratch / f"orphan-{name}.pt"
        self.store.storage.download_file(key, path)
        state = load_train_state(path)
        if _dt.datetime.fromisoformat(state["date"]) < _dt.datetime.fromisoformat(manifest.created_at):
            path.unlink(missing_ok=True)  # left by an earlier attempt of this name (--restart): not ours
            return
        ap = _epoch_ap(state)
        log.warning("%s was stored (epoch %d, AP %s) but not recorded by a killed worker; recording it", name,
                    state["last_epoch"], ap)
        self.store.put_artifact(name, path, epoch=state["last_epoch"], stage=state["stage"], ap=ap)
        path.unlink(missing_ok=True)

    def _republish(self, trainer, best: str) -> None:
        """Ray committed the resumed epoch but its `last` or best upload was lost with the killed worker."""
        epoch, stage = trainer.epoch, int(trainer.stage)
        last = self.store.read_manifest().artifacts.get(LAST)
        names = [LAST] if last is None or (last.stage, last.epoch) < (stage, epoch) else []
        tracked = trainer.tracker.stage_best.get(str(stage))
        if tracked and tracked["epoch"] == epoch and self._improves(best, tracked["ap"], epoch):
            names.append(best)
        if not names:
            return
        path = save_train_state(self.resume, self.scratch / f"resumed-e{epoch:04d}.pt")
        for name in names:
            log.warning("re-publishing %s from the resumed checkpoint (epoch %d)", name, epoch)
            self.store.put_artifact(name, path, epoch=epoch, stage=stage, ap=_epoch_ap(self.resume))
        path.unlink(missing_ok=True)

    def _improves(self, name: str, ap: float, epoch: int) -> bool:
        """A best artifact is replaced only by a strictly higher AP than the manifest records: after a resume an
        epoch runs again and may evaluate lower than its first run, whose best was already written."""
        record = self.store.read_manifest().artifacts.get(name)
        if record is None or record.ap is None or ap > record.ap:
            return True
        log.warning("%s: epoch %d (AP %.4f) does not beat the recorded %s (epoch %d, AP %.4f, written before a "
                    "resume); keeping the recorded one", name, epoch, ap, name, record.epoch, record.ap)
        return False

    def after_epoch(self, trainer, record, decision):
        if not trainer.is_main:
            return
        self.metrics.append(record.to_json())
        path = self.scratch / f"state-e{record.epoch:04d}.pt"
        save_train_state(trainer.state_dict(extra=_artifact_meta(trainer, self.metrics)), path)
        if self.latest_state_path is not None:  # its uploads and Ray's checkpoint hold their own links
            self.latest_state_path.unlink(missing_ok=True)
        self.latest_state_path = path
        for name in [LAST] + ([decision.save] if decision.save else []):
            copy = self.scratch / f"{name}-e{record.epoch:04d}.pt"
            os.link(path, copy)
            self.uploader.submit(self._put, name, copy, record.epoch, record.stage, record.ap)
        body = "".join(json.dumps(r) + "\n" for r in self.metrics)
        self.uploader.submit(self.store.write_text, METRICS_FILE, body)

    def _put(self, name: str, path: Path, epoch: int, stage: int, ap: float) -> None:
        try:  # runs on the uploader thread, in order: the manifest already holds every earlier upload
            if name == LAST or self._improves(name, ap, epoch):
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

    def __init__(self, sync: RunSyncHook, ckpt_file: str, resumed: bool = False):
        self.sync = sync
        self.ckpt_file = ckpt_file
        self.resumed = resumed

    def after_epoch(self, trainer, record, decision):
        metrics = {"epoch": record.epoch, "stage": record.stage, "ap": record.ap, "ap50": record.coco_stats[1],
                   "loss": record.loss, "best_ap": trainer.tracker.top1,
                   "saved": decision.save or "", "restarted_from_stg1": decision.restart_from_stg1,
                   "start_digests": ",".join(trainer.stage_start_digests), "resumed": self.resumed}
        checkpoint = None
        if trainer.is_main:
            ckpt_dir = Path(tempfile.mkdtemp(prefix="deim_ray_ckpt_"))
            os.link(self.sync.latest_state_path, ckpt_dir / self.ckpt_file)
            checkpoint = Checkpoint.from_directory(str(ckpt_dir))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{record.epoch:04d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)


FAULT_POINTS = ("stage_start", "mid_epoch", "eval", "checkpoint_write", "upload")


@dataclass(frozen=True)
class Fault:
    point: str
    epoch: int
    rank: int

    @property
    def marker(self) -> str:
        return f"{self.point}-e{self.epoch}-r{self.rank}.fired"


class FaultHook(Hook):
    """Test-only fault injection: SIGKILL this worker at chosen points, each fault once.

    DEIM_RAY_FAULT="<point>:<epoch>:<rank>[,<point>:<epoch>:<rank>...]", point one of
      stage_start        before the first epoch of a stage run (epoch = that first epoch)
      mid_epoch          after the middle training step of the epoch
      eval               after this rank's first evaluation batch
      checkpoint_write   after rank 0 saved the epoch's TrainState and queued its uploads, before Ray's report
      upload             on rank 0's uploader thread, after the epoch's best_* object is stored and before the
                         manifest records it (an epoch without a new best never fires)
    DEIM_RAY_FAULT_DIR=<dir> receives one marker per fired fault (holding the kill time), so the retried worker
    survives, and `epochs.jsonl`, rank 0's epoch completion times, from which tests measure recovery.
    Workers of a local Ray instance inherit the environment of the driver process that started it.
    """

    def __init__(self, faults: list[Fault], fault_dir: Path):
        self.faults, self.dir, self.rank = faults, fault_dir, -1

    @classmethod
    def from_env(cls, env) -> "FaultHook | None":
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
        return cls(faults, fault_dir)

    def _fire(self, point: str, epoch: int) -> None:
        for fault in self.faults:
            marker = self.dir / fault.marker
            if fault != Fault(point, epoch, self.rank) or marker.exists():
                continue
            marker.write_text(json.dumps({"point": point, "epoch": epoch, "rank": self.rank, "time": time.time()}))
            log.warning("fault injection: killing rank %d at %s of epoch %d", self.rank, point, epoch)
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap_storage(self, storage: Storage) -> Storage:
        """`storage` with the `upload` fault point after each artifact upload."""
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
        if trainer.is_main:
            with open(self.dir / "epochs.jsonl", "a") as f:
                f.write(json.dumps({"epoch": record.epoch, "stage": record.stage, "time": time.time()}) + "\n")
        self._fire("checkpoint_write", record.epoch)


class _UploadFaultStorage:
    """A Storage that runs the FaultHook's `upload` point after storing a best artifact (test-only)."""

    def __init__(self, storage: Storage, hook: FaultHook):
        self._storage, self._hook = storage, hook

    def __getattr__(self, name):
        return getattr(self._storage, name)

    def upload_file(self, key: str, local_path):
        info = self._storage.upload_file(key, local_path)
        epoch = _COPY_EPOCH.search(str(local_path))
        if epoch and key.endswith((artifact_key(BEST_STG1), artifact_key(BEST_STG2))):
            self._hook._fire("upload", int(epoch.group(1)))
        return info
