"""engine layer: one worker's training of one stage.

`Trainer` builds the model, EMA, optimizer, scaler, loaders and evaluator from the config, loads whatever state
the stage starts from (a resume checkpoint, or best_stg1 at the stage switch), and runs the stage's epochs:

    for epoch in stage epochs:
        train_one_epoch -> evaluate EMA -> best rule -> hooks (artifacts, reports) -> maybe restart from best_stg1

It never imports ray; the driver reaches it through hooks and through the states it passes in.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from deim_ray.config.schedule import Stage, stage_epochs
from deim_ray.config.schema import Config
from deim_ray.engine import dist
from deim_ray.engine.ema import ModelEMA
from deim_ray.engine.hooks import EpochRecord, Hook
from deim_ray.engine.loop import NonFiniteLossError, NonFiniteSteps, StepSettings, evaluate, train_one_epoch
from deim_ray.engine.lr import LRSchedule
from deim_ray.engine.optim import build_optimizer
from deim_ray.engine.stages import BestTracker
from deim_ray.engine.state import CheckpointError, make_train_state
from deim_ray.engine.data import DataBundle, build_data
from deim_ray.models.backbone_weights import backbone_note
from deim_ray.models.build import build_model
from deim_ray.models.loss import set_matcher_epoch

log = logging.getLogger("deim_ray.engine")


class StageStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class StageStart:
    """Where a stage begins. Stage 2 without `resume` starts from `stage1_best`; a `resume` state wins."""

    stage: Stage
    resume: dict | None = None
    stage1_best: dict | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state_dict tensors, in key order (equal digests = bit-identical weights)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_same_shapes(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """A TrainState of another architecture or class count is a one-line CheckpointError, not torch's report."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    other = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or other or len(weights) != len(own):
        example = (f"{other[0]} is {tuple(weights[other[0]].shape)} there, {tuple(own[other[0]].shape)} here"
                   if other else f"{(missing or sorted(set(weights) - set(own)))[0]} differs")
        raise CheckpointError(f"checkpoint holds another model ({len(other)} tensors of another shape, "
                              f"{len(missing)} missing; e.g. {example}): resume with the model and data it was "
                              "trained with, or fine-tune from it with model.pretrained under a new run name")


def _check_same_groups(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """An optimizer state of another parameter grouping (other trainable parameters, or other `optimizer.params`
    groups) is a one-line CheckpointError, not torch's "doesn't match the size of optimizer's group"."""
    own = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in saved.get("param_groups", [])]
    if own != theirs:
        raise CheckpointError(f"checkpoint's optimizer holds {len(theirs)} parameter groups of {theirs} tensors, this "
                              f"model's optimizer {len(own)} of {own} (another set of trainable parameters or "
                              "optimizer.params groups): resume with the config and version it was trained with, or "
                              "fine-tune from it with model.pretrained under a new run name")


def _amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if not cfg.train.use_amp or device.type != "cuda":
        return None
    return torch.float16 if cfg.train.amp_dtype == "float16" else torch.bfloat16


def _cpu_copy(state):
    """A detached CPU copy of a (nested) state dict: a rollback point that training does not alter."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_copy(v) for v in state)
    return copy.deepcopy(state)


class Trainer:
    def __init__(self, cfg: Config, config_sha256: str, *, device: torch.device | None = None,
                 hooks: Sequence[Hook] = (), data: DataBundle | None = None):
        self.cfg = cfg
        self.config_sha256 = config_sha256
        self.device = device or dist.local_device()
        self.hooks = list(hooks)
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.data = data or build_data(cfg, self.rank, self.world_size)
        self.model = build_model(cfg.model, self.data.num_classes).to(self.device)
        self.ema = ModelEMA(self.model, cfg.ema.decay, cfg.ema.warmups, cfg.ema.start) if cfg.ema.enabled else None
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.amp_dtype = _amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.lr_schedule = LRSchedule(self.optimizer, cfg.lr_scheduler, cfg.schedule.epochs,
                                      len(self.data.train_loader))
        self.tracker = BestTracker()
        self.epoch = -1
        self.stage = Stage.ONE
        self.stage_start_digests: list[str] = []
        self.stop_reason: str | None = None
        """Set by a hook (on every rank at once) to end the stage before its next epoch."""
        self.rollbacks = 0
        """Rollbacks to the last good state after non-finite steps, in this stage run."""
        self._good: dict | None = None
        seed_everything(cfg.train.seed + self.rank)

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self, extra: dict | None = None) -> dict[str, Any]:
        return make_train_state(
            model=dist.unwrap(self.model).state_dict(),
            ema=self.ema.state_dict() if self.ema else None,
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else None,
            epoch=self.epoch, stage=int(self.stage), best=self.tracker.state_dict(),
            config_sha256=self.config_sha256, extra=extra,
            remedies={"lr_scale": self.lr_schedule.scale, "amp_off": self._amp_off})

    def load_weights(self, state: dict, ema_decay: float | None = None) -> None:
        """Model, EMA, optimizer and scaler from a TrainState (not the epoch or the tracker)."""
        _check_same_shapes(dist.unwrap(self.model), state["model"])
        _check_same_groups(self.optimizer, state["optimizer"])
        dist.unwrap(self.model).load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"], decay=ema_decay)
            else:
                self.ema.module.load_state_dict(state["model"])
        # a copy: torch keeps the given CPU tensors as the optimizer's state and steps them in place, which
        # would alter best_stg1's in-memory state that later stage-2 restarts load again
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        for group in self.optimizer.param_groups:  # the LR is recomputed from the iteration anyway
            group.setdefault("initial_lr", group["lr"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def load_state(self, state: dict) -> None:
        """Everything, for a resume: weights, epoch, stage, tracker, and the remedies of earlier rollbacks in the
        stage (a lowered LR, AMP off), so a resumed stage keeps them."""
        remedies = state.get("remedies") or {}
        if remedies.get("amp_off"):
            self._turn_amp_off()
        self.load_weights(state, ema_decay=self._ema_decay_for(Stage(state["stage"])))
        self.epoch = int(state["last_epoch"])
        self.stage = Stage(state["stage"])
        self.tracker = BestTracker.from_state(state["best"])
        self.lr_schedule.scale = float(remedies.get("lr_scale", 1.0))

    @property
    def _amp_off(self) -> bool:
        """Whether a rollback turned the configured mixed precision off."""
        return self.amp_dtype is None and _amp_dtype(self.cfg, self.device) is not None

    def _turn_amp_off(self) -> None:
        self.amp_dtype, self.scaler = None, None

    def _ema_decay_for(self, stage: Stage) -> float:
        return self.cfg.schedule.ema_restart_decay if stage is Stage.TWO else self.cfg.ema.decay

    # ---- stage -------------------------------------------------------------------------------------------
    def _begin(self, start: StageStart) -> range:
        sched = self.cfg.schedule
        epochs = stage_epochs(start.stage, sched.epochs, sched.stop_epoch)
        if start.resume is not None:
            self.load_state(start.resume)
        elif start.stage is Stage.TWO:
            if start.stage1_best is None:
                raise StageStartError("stage 2 needs best_stg1; the driver did not provide it")
            self.load_weights(start.stage1_best, ema_decay=sched.ema_restart_decay)
            self.tracker = BestTracker.from_state(start.stage1_best["best"])
            self.epoch = sched.stop_epoch - 1
        else:
            self._note_random_backbone()
        self.stage = start.stage
        self.model = dist.wrap_ddp(dist.unwrap(self.model), self.device, self.cfg.train.sync_bn)
        self._check_identical_start()
        return range(max(epochs.start, self.epoch + 1), epochs.stop)

    def _check_identical_start(self) -> None:
        """Collective: every rank must start the stage from bit-identical model and EMA weights."""
        mine = state_digest(dist.unwrap(self.model)) + (state_digest(self.ema.module) if self.ema else "")
        self.stage_start_digests = dist.all_gather_objects(hashlib.sha256(mine.encode()).hexdigest())
        if len(set(self.stage_start_digests)) != 1:
            raise StageStartError(f"ranks start stage {int(self.stage)} from different weights: "
                                  f"{self.stage_start_digests}")

    def _note_random_backbone(self) -> None:
        """Rank 0, at the run's fresh start only: say once that the backbone starts from random weights (a resumed
        stage or stage 2 starts from trained weights, so the note would repeat what the run already said). An info
        line: under Ray the driver says it on the console (`driver.run`), the worker's log keeps it."""
        model = self.cfg.model
        note = backbone_note(model.variant, model.backbone_pretrained, model.pretrained)
        if note and self.is_main:
            log.info("%s", note)

    def run_stage(self, start: StageStart) -> BestTracker:
        """Run the remaining epochs of `start.stage`; returns the best tracker."""
        epochs = self._begin(start)
        self._good = _cpu_copy(self.state_dict())
        for hook in self.hooks:
            hook.before_stage(self)
        for epoch in epochs:
            if self.stop_reason:
                log.warning("rank %d stops stage %d before epoch %d: %s", self.rank, int(self.stage), epoch,
                            self.stop_reason)
                break
            self._run_epoch(epoch, start.stage1_best)
            self._good = _cpu_copy(self.state_dict())
        for hook in self.hooks:
            hook.after_stage(self)
        return self.tracker

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], dict]:
        """One training pass of `epoch`, rolled back to the last good state and run again after too many
        non-finite steps (at most `train.nan_retries` times per stage run); returns the losses and the events."""
        train_cfg = self.cfg.train
        events = {"nonfinite_rollbacks": 0, "nonfinite_steps_rolled_back": 0}
        while True:
            settings = StepSettings(self.device, self.amp_dtype, train_cfg.clip_max_norm, train_cfg.print_freq)
            try:
                losses = train_one_epoch(
                    self.model, self.data.train_loader, self.optimizer, epoch=epoch, lr_schedule=self.lr_schedule,
                    ema=self.ema, scaler=self.scaler, settings=settings, tolerance=train_cfg.nan_tolerance,
                    on_step=lambda i: [h.on_step(self, epoch, i) for h in self.hooks],
                    on_loss=lambda i, loss: self._on_loss(epoch, i, loss))
                return losses, events
            except NonFiniteSteps as e:
                self.rollbacks += 1
                if self.rollbacks > train_cfg.nan_retries:
                    raise NonFiniteLossError(
                        f"stage {int(self.stage)}: epoch {epoch} kept producing non-finite losses or gradients after "
                        f"{train_cfg.nan_retries} rollback(s) to the last good state; lower optimizer.lr, set "
                        "train.nan_lr_factor or train.nan_amp_off, or check the annotations") from None
                events["nonfinite_rollbacks"] += 1
                events["nonfinite_steps_rolled_back"] += e.skipped
                self._roll_back(e)

    def _on_loss(self, epoch: int, i: int, loss):
        for hook in self.hooks:
            loss = hook.on_loss(self, epoch, i, loss)
        return loss

    def _roll_back(self, cause: NonFiniteSteps) -> None:
        """Back to the state after the last good epoch (or the stage start), with the configured remedies."""
        log.warning("%s: rolling back to the state after epoch %d (rollback %d of at most %d)", cause,
                    self._good["last_epoch"], self.rollbacks, self.cfg.train.nan_retries)
        scale = self.lr_schedule.scale  # remedies add up over the rollbacks of an epoch
        self.load_state(self._good)
        self.lr_schedule.scale = scale * self.cfg.train.nan_lr_factor
        if self.cfg.train.nan_amp_off and self.amp_dtype is not None:
            log.warning("mixed precision is off for the rest of this stage")
            self._turn_amp_off()

    def _run_epoch(self, epoch: int, stage1_best: dict | None) -> None:
        self.data.train_loader.set_epoch(epoch)
        sched = self.cfg.schedule
        set_matcher_epoch(dist.unwrap(self.model), epoch, sched.matcher_change_epoch, sched.iou_order_alpha)
        t0 = time.monotonic()
        losses, events = self._train_epoch(epoch)
        t1 = time.monotonic()
        result = evaluate(self.ema.module if self.ema else self.model, self.data.val_loader,
                         coco_gt=self.data.coco_gt, category_ids=self.data.category_ids, device=self.device,
                         num_top_queries=self.cfg.eval.num_top_queries,
                         on_batch=lambda i: [h.on_eval_batch(self, epoch, i) for h in self.hooks])
        self.epoch = epoch
        stats = result.stats
        decision = self.tracker.update(epoch, stats[0], self.stage, self.cfg.schedule.stage2_restart)
        events["nonfinite_steps"] = int(losses.pop("nonfinite_steps"))
        record = EpochRecord(epoch=epoch, stage=int(self.stage), ap=stats[0], coco_stats=stats,
                             per_class=result.per_class,
                             loss=losses.pop("loss"), lr=losses.pop("lr"), images_per_s=losses.pop("images_per_s"),
                             data_wait=losses.pop("data_wait"), losses=losses,
                             epoch_time_s=t1 - t0, eval_time_s=time.monotonic() - t1,
                             restarted_from_stg1=decision.restart_from_stg1, extra=events)
        if decision.restart_from_stg1:
            # the state saved for this epoch must already be the one the next epoch starts from
            self.load_weights(stage1_best, ema_decay=self.cfg.schedule.ema_restart_decay)
        for hook in self.hooks:
            hook.after_epoch(self, record, decision)
