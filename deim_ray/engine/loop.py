"""engine layer: `train_one_epoch` and `evaluate`, two plain functions with explicit arguments.

Per iteration: LR for the global iteration, forward + loss (under autocast on GPU with AMP), backward (scaled for
fp16), gradient clipping, then the step guard: when the loss or the gradient norm is not finite on any rank
(one all-reduce of a flag, so every rank decides the same; under fp16's GradScaler only the loss counts, since
the scaler skips overflowing gradients itself while it calibrates), the step is skipped everywhere and no NaN
reaches the weights, the optimizer or the EMA; otherwise optimizer step and EMA update. `tolerance` skipped steps in an
epoch end it with `NonFiniteSteps` (the trainer rolls back). Loss sums stay on the device and are reduced
across ranks once per epoch.
The epoch also reports `images_per_s` (all ranks together) and `data_wait` (the rank-averaged fraction of the
epoch's wall time spent waiting for the loader).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from deim_ray.engine import dist
from deim_ray.engine.ema import ModelEMA
from deim_ray.engine.evaluator import CocoResult, DetectionCollector, evaluate_distributed
from deim_ray.engine.lr import LRSchedule
from deim_ray.engine.throughput import LoaderTimer
from deim_ray.models.loss import forward_loss
from deim_ray.models.postprocess import postprocess

log = logging.getLogger("deim_ray.engine")


@dataclass(frozen=True)
class StepSettings:
    device: torch.device
    amp_dtype: torch.dtype | None
    """None runs in float32; otherwise autocast to this dtype (GPU only)."""
    clip_max_norm: float
    print_freq: int


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteSteps(RuntimeError):
    """An epoch reached its tolerance of skipped (non-finite) steps; raised on every rank at the same step."""

    def __init__(self, epoch: int, skipped: int):
        super().__init__(f"epoch {epoch}: {skipped} steps with a non-finite loss or gradient were skipped")
        self.epoch, self.skipped = epoch, skipped


def _autocast(settings: StepSettings):
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=settings.device.type, dtype=settings.amp_dtype)


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


def _optimizer_step(model, optimizer, loss, scaler, clip_max_norm: float) -> bool:
    """Backward, clip and step, unless the loss or the gradients are not finite on some rank; returns whether it
    stepped (the same on every rank)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    # max_norm=inf measures without clipping
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm if clip_max_norm > 0 else math.inf)
    finite = torch.isfinite(loss.detach())
    if scaler is None:  # with fp16's GradScaler an overflowing gradient is the scaler's to skip and back off from
        finite = finite & torch.isfinite(norm)
    if not dist.all_ranks_true(finite):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()  # the unscale found the inf: the scale backs off, as after a skipped scaler.step
        return False
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return True


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, *, epoch: int,
                    lr_schedule: LRSchedule, ema: ModelEMA | None, scaler, settings: StepSettings,
                    on_step: Callable[[int], None] | None = None,
                    on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                    tolerance: int | None = None) -> dict[str, float]:
    """One pass over `loader`; returns rank-averaged mean losses over the steps taken, `lr` (group 0, last
    iteration), `nonfinite_steps`, `images_per_s` and `data_wait`. `on_loss(i, loss)` may replace the loss
    before backward (tests inject NaNs there); NonFiniteSteps once `tolerance` steps were skipped."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    n_iters, skipped = len(loader), 0
    started = time.monotonic()
    lr = optimizer.param_groups[0]["lr"]
    timer = LoaderTimer()
    for i, (images, targets) in enumerate(timer.iterate(loader)):
        lr = lr_schedule.set_iteration(epoch, i)
        images = images.to(settings.device, non_blocking=True)
        targets = _to_device(targets, settings.device)
        with _autocast(settings):
            loss, loss_dict = forward_loss(model, images, targets)
        if on_loss is not None:
            loss = on_loss(i, loss)
        if not _optimizer_step(model, optimizer, loss.float(), scaler, settings.clip_max_norm):
            skipped += 1
            log.warning("epoch %d iter %d: non-finite loss or gradient on some rank; step skipped on every rank "
                        "(%d this epoch)", epoch, i, skipped)
            if tolerance is not None and skipped >= tolerance:
                raise NonFiniteSteps(epoch, skipped)
            continue
        if ema is not None:
            ema.update(model)
        for k, v in {"loss": loss, **loss_dict}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        if dist.is_main() and settings.print_freq and (i % settings.print_freq == 0 or i == n_iters - 1):
            log.info("epoch %d  iter %d/%d  loss %.4f  lr %.2e  %.1fs", epoch, i + 1, n_iters, loss.item(), lr,
                     time.monotonic() - started)
        if on_step is not None:
            on_step(i)
    if skipped == n_iters:
        raise NonFiniteSteps(epoch, skipped)
    means = dist.all_reduce_mean({**{k: v / (n_iters - skipped) for k, v in sums.items()},
                                  **timer.rates(settings.device)})
    means["images_per_s"] *= dist.world_size()
    means["lr"] = lr
    means["nonfinite_steps"] = skipped
    return means


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, coco_gt, category_ids: list[int], device: torch.device,
             num_top_queries: int, on_batch: Callable[[int], None] | None = None) -> CocoResult:
    """Collective: COCO bbox stats and per-class AP of `model` over the whole val set (each rank runs its own
    shard).
    Always in float32, whatever the training AMP setting, as upstream evaluates."""
    model.eval()
    collector = DetectionCollector(category_ids)
    for i, (images, targets) in enumerate(loader):
        out = model(pixel_values=images.to(device, non_blocking=True))
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        results = postprocess(out.logits.float(), out.pred_boxes.float(), orig_sizes, num_top_queries)
        collector.add([int(t["image_id"]) for t in targets], results)
        if on_batch is not None:
            on_batch(i)
    return evaluate_distributed(collector, coco_gt)
