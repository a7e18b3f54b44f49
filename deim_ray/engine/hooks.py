"""engine layer: hooks, the home of everything cross-cutting.

The epoch loop only trains, evaluates and asks the best tracker; progress lines, metrics files, artifact
uploads, Ray reports and fault injection attach as hooks. Each method runs on every rank (a hook that writes
checks `trainer.is_main` itself), in the order the hooks were given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from deim_ray.engine.stages import Decision
    from deim_ray.engine.trainer import Trainer

log = logging.getLogger("deim_ray.engine")


@dataclass(frozen=True)
class EpochRecord:
    """One line of metrics.jsonl."""

    epoch: int
    stage: int
    ap: float
    coco_stats: list[float]
    loss: float
    losses: dict[str, float]
    lr: float
    epoch_time_s: float
    eval_time_s: float
    images_per_s: float = 0.0
    """Training images per second of the epoch's train part, all ranks together."""
    data_wait: float = 0.0
    """Fraction of the train part's wall time spent waiting for the loader (mean over ranks); near 1 = starved."""
    restarted_from_stg1: bool = False
    per_class: list[dict] = field(default_factory=list)
    """{name, category_id, ap, ap50, instances, images} per class (`evaluator.CocoResult.per_class`)."""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        main = ("loss", "loss_mal", "loss_bbox", "loss_giou", "loss_fgl", "loss_ddf")
        return {"epoch": self.epoch, "stage": self.stage, "ap": self.ap, "coco_stats": self.coco_stats,
                "loss": self.loss, "losses": {k: v for k, v in self.losses.items() if k in main},
                "lr": self.lr, "epoch_time_s": round(self.epoch_time_s, 3),
                "eval_time_s": round(self.eval_time_s, 3), "images_per_s": round(self.images_per_s, 2),
                "data_wait": round(self.data_wait, 4),
                "restarted_from_stg1": self.restarted_from_stg1, "per_class": self.per_class, **self.extra}


class Hook:
    def before_stage(self, trainer: "Trainer") -> None:
        """After state is loaded and the model wrapped, before the first epoch of the stage."""

    def on_step(self, trainer: "Trainer", epoch: int, iteration: int) -> None:
        """After each optimizer step."""

    def on_loss(self, trainer: "Trainer", epoch: int, iteration: int, loss: "torch.Tensor") -> "torch.Tensor":
        """Before backward; returns the loss to use (test hooks inject non-finite values here)."""
        return loss

    def on_eval_batch(self, trainer: "Trainer", epoch: int, batch: int) -> None:
        """After each evaluation batch of this rank (before the cross-rank merge)."""

    def after_epoch(self, trainer: "Trainer", record: EpochRecord, decision: "Decision") -> None:
        """After evaluation and the best rule; `trainer.state_dict()` is the state to resume from."""

    def after_stage(self, trainer: "Trainer") -> None:
        """After the last epoch of the stage."""


class ProgressHook(Hook):
    """One line per epoch on rank 0: stage, loss, AP, best so far, time, images/s and data wait."""

    def after_epoch(self, trainer, record, decision):
        if not trainer.is_main:
            return
        tags = [decision.save] if decision.save else []
        if decision.restart_from_stg1:
            tags.append("next epoch restarts from best_stg1")
        log.info("epoch %3d  stage %d  loss %.4f  AP %.4f  AP50 %.4f  best %.4f  %.1fs  %.1f img/s  data wait %.0f%%%s",
                 record.epoch, record.stage, record.loss, record.ap, record.coco_stats[1], trainer.tracker.top1,
                 record.epoch_time_s + record.eval_time_s, record.images_per_s, 100 * record.data_wait,
                 f"  [{', '.join(tags)}]" if tags else "")
