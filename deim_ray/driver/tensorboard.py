"""driver layer: TensorBoard event files under the run directory (`tb/`), local or S3 alike.

Rank 0 writes the events of each stage run to a local file (one file per stage run, as TensorBoard expects of a
restarted writer) and, after every epoch, uploads a snapshot of it to `<run>/tb/` on the run's uploader thread.
Point TensorBoard at the run directory (`tensorboard --logdir runs/demo/tb`, or an `s3://` URI where TensorBoard
has S3 support) or `deim-ray fetch`-style copy it down first. On when `train.trackers` names tensorboard (the default).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from deim_ray.driver.scratch import process_scratch
from deim_ray.engine.evaluator import COCO_STAT_NAMES
from deim_ray.engine.hooks import Hook
from deim_ray.storage import RunStore

TB_PREFIX = "tb"


def epoch_scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl line: losses, every COCO stat, LR, times, throughput."""
    scalars = {"loss/total": record["loss"], "lr": record["lr"], "time/epoch_s": record.get("epoch_time_s"),
               "time/eval_s": record.get("eval_time_s"), "data/images_per_s": record.get("images_per_s"),
               "data/wait_fraction": record.get("data_wait"), "stage": record["stage"]}
    scalars |= {f"loss/{k}": v for k, v in record.get("losses", {}).items()}
    scalars |= {f"coco/{name}": v for name, v in zip(COCO_STAT_NAMES, record["coco_stats"])}
    return {k: float(v) for k, v in scalars.items() if v is not None}


class TensorBoardHook(Hook):
    """Rank 0: one event per scalar per epoch, step = epoch; the file goes to `<run>/tb/` after each epoch."""

    def __init__(self, sync, store: RunStore):
        self.sync, self.store = sync, store
        self.dir: Path | None = None
        self.writer = None

    def before_stage(self, trainer):
        if not trainer.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(tempfile.mkdtemp(prefix="tb_", dir=process_scratch()))
        self.writer = SummaryWriter(log_dir=str(self.dir), flush_secs=3600)

    def after_epoch(self, trainer, record, decision):
        if self.writer is None:
            return
        for tag, value in epoch_scalars(record.to_json()).items():
            self.writer.add_scalar(tag, value, global_step=record.epoch)
        self.writer.flush()
        for path in self.dir.glob("events.out.tfevents.*"):
            snapshot = self.sync.scratch / f"{path.name}.e{record.epoch:04d}"  # removed with the scratch dir
            shutil.copyfile(path, snapshot)  # the writer appends next epoch while this one uploads
            self.sync.uploader.submit(self._upload, snapshot, f"{TB_PREFIX}/{path.name}")

    def _upload(self, snapshot: Path, rel: str) -> None:
        try:  # fenced: an attempt that was taken over writes nothing (StaleWriter ends up in the uploader's log)
            self.store.write_bytes(rel, snapshot.read_bytes())
        finally:
            snapshot.unlink(missing_ok=True)

    def after_stage(self, trainer):
        if self.writer is not None:  # every epoch's events are uploaded already
            self.writer.close()
            shutil.rmtree(self.dir, ignore_errors=True)
