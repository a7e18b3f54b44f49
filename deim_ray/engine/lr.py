"""engine layer: per-iteration learning-rate schedules.

`flatcosine` is DEIM's schedule: quadratic warm-up for `warmup_iter` iterations, flat at the base LR until
`flat_epoch`, cosine down to `lr_gamma * base` until `epochs - no_aug_epoch`, then flat at the minimum (or at
`tail_lr_factor * base` when set: the stage-2 LR without moving the stage-1 curve). It is a
pure function of the global iteration t = epoch * iters_per_epoch + i (iters per epoch counted per rank), so a
resumed run continues on exactly the same curve with no scheduler state to save.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from deim_ray.config.schema import LRSchedulerConfig


def flat_cosine_factor(t: int, cfg: LRSchedulerConfig, epochs: int, iters_per_epoch: int) -> float:
    """LR multiplier of each group's base LR at global iteration `t` (0-based)."""
    w = cfg.warmup_iter
    if w > 0 and t <= w:
        return (t / w) ** 2
    if cfg.type == "constant":
        return 1.0
    total = epochs * iters_per_epoch
    flat = cfg.flat_epoch * iters_per_epoch
    tail = cfg.no_aug_epoch * iters_per_epoch
    gamma = cfg.lr_gamma
    if t <= flat:
        return 1.0
    if t >= total - tail:
        return gamma if cfg.tail_lr_factor is None else cfg.tail_lr_factor
    span = max(total - flat - tail, 1)
    return gamma + (1.0 - gamma) * 0.5 * (1.0 + math.cos(math.pi * (t - flat) / span))


class LRSchedule:
    """Sets every param group's lr to `base_lr * factor(t)`; the base LRs are the groups' `initial_lr`."""

    def __init__(self, optimizer: Optimizer, cfg: LRSchedulerConfig, epochs: int, iters_per_epoch: int):
        self.optimizer = optimizer
        self.cfg = cfg
        self.epochs = epochs
        self.iters_per_epoch = iters_per_epoch
        self.scale = 1.0
        """Extra multiplier (lowered by a non-finite rollback with `train.nan_lr_factor`; not saved)."""
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def set_iteration(self, epoch: int, i: int) -> float:
        t = epoch * self.iters_per_epoch + i
        factor = flat_cosine_factor(t, self.cfg, self.epochs, self.iters_per_epoch) * self.scale
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]
