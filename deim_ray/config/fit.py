"""config layer: iteration counts fitted to the dataset (`schedule.fit_to_data`).

Upstream sizes its warm-ups and EMA in iterations for COCO (118k images): a 2000-iteration LR warm-up is half a
COCO epoch, an EMA decay of 0.9999 averages over about 10 000 updates (its horizon, 1 / (1 - decay)). On a
200-image dataset the same numbers outlast the whole run and the EMA (the weights that are evaluated and
deployed) stays near its random start. With `schedule.fit_to_data: true` (what `deim-ray train --data` and the
custom template use) the configured values are upper bounds, and each is lowered to what the dataset's
length allows:

| value | rule (I = optimizer steps per epoch = floor(train images / total batch)) |
|---|---|
| `data.total_batch_size` | the configured batch if it leaves at least MIN_STEPS steps per epoch, else the largest power-of-two multiple of the worker count that does (at least one image per worker) |
| `lr_scheduler.warmup_iter` | at most a tenth of stage 1 (`stop_epoch * I // 10`) |
| `ema.decay`, `schedule.ema_restart_decay` | horizon 1 / (1 - decay) at most a third of the run (`epochs * I // 3`, at least 10) |
| `ema.warmups` | at most that horizon |

Learning rates are kept when the batch shrinks: AdamW's steps do not scale with the batch the way SGD's do, and
the demo trains at batch 8 with Atto's COCO learning rates. On COCO the caps are far above upstream's values,
so upstream's COCO configs keep their numbers. A key given explicitly (`-u`, `--batch`) is kept as given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from deim_ray.config.schema import Config

MIN_STEPS = 16
"""Optimizer steps per epoch the fitted batch keeps at least (when the dataset has that many batches)."""
WARMUP_FRACTION = 10
"""The LR warm-up takes at most 1/WARMUP_FRACTION of stage 1."""
HORIZON_FRACTION = 3
"""The EMA horizon is at most 1/HORIZON_FRACTION of the run: the random start weighs exp(-3) = 5% at the end."""
MIN_HORIZON = 10

BATCH = "data.total_batch_size"
WARMUP = "lr_scheduler.warmup_iter"
EMA_DECAY = "ema.decay"
EMA_WARMUPS = "ema.warmups"
RESTART_DECAY = "schedule.ema_restart_decay"
FITTED_KEYS = (BATCH, WARMUP, EMA_DECAY, EMA_WARMUPS, RESTART_DECAY)
"""Every value `fit_to_data` may lower, as dotted keys."""


def steps_per_epoch(train_images: int, total_batch_size: int) -> int:
    """Optimizer steps per epoch: the train loader keeps floor(N / batch) global batches (drop_last)."""
    return train_images // total_batch_size


def horizon(decay: float) -> float:
    """Updates an EMA of this decay averages over (1 / (1 - decay)); infinite for decay 1."""
    return float("inf") if decay >= 1 else 1.0 / (1.0 - decay)


def fitted_batch(train_images: int, configured: int, workers: int) -> int:
    """The configured batch when it leaves MIN_STEPS steps per epoch, else the largest power-of-two multiple of
    `workers` (at most the configured batch) that does, else `workers`."""
    if steps_per_epoch(train_images, configured) >= MIN_STEPS:
        return configured
    batch = workers
    while batch * 2 <= configured and steps_per_epoch(train_images, batch * 2) >= MIN_STEPS:
        batch *= 2
    return batch


@dataclasses.dataclass(frozen=True)
class Fitted:
    config: Config
    notes: list[str]
    """One line per value the rule lowered (or kept because it was given), with why."""
    changes: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    """Dotted key -> (configured, fitted) for each value the rule lowered."""

    def summary(self) -> str:
        """The changes in one line, e.g. `data.total_batch_size 128 -> 8, lr_scheduler.warmup_iter 4000 -> 20`."""
        return ", ".join(f"{key} {old:g} -> {new:g}" for key, (old, new) in self.changes.items())


def fit_to_data(cfg: Config, train_images: int, workers: int, keep: Collection[str] = ()) -> Fitted:
    """`cfg` with its iteration counts fitted to `train_images` (see the module docstring); unchanged when
    `schedule.fit_to_data` is off. Keys in `keep` (given explicitly) are left as they are."""
    if not cfg.schedule.fit_to_data or train_images < 1:
        return Fitted(cfg, [])
    notes: list[str] = []
    values: dict[str, float] = {}
    changes: dict[str, tuple[float, float]] = {}

    def lower(key: str, configured, cap, why: str) -> None:
        if cap >= configured:
            return
        if key in keep:
            notes.append(f"{key} = {configured:g} (given explicitly; fitted to the data it would be {cap:g}: {why})")
        else:
            values[key] = cap
            changes[key] = (configured, cap)
            notes.append(f"{key} = {cap:g} (fitted to the data, configured {configured:g}: {why})")

    batch = cfg.data.total_batch_size
    lower(BATCH, batch, fitted_batch(train_images, batch, workers),
          f"{train_images} train images give {steps_per_epoch(train_images, batch)} steps per epoch at "
          f"batch {batch}; at least {MIN_STEPS} kept")
    batch = int(values.get(BATCH, batch))
    steps = max(1, steps_per_epoch(train_images, batch))
    stage1, total = cfg.schedule.stop_epoch * steps, cfg.schedule.epochs * steps
    lower(WARMUP, cfg.lr_scheduler.warmup_iter, max(1, stage1 // WARMUP_FRACTION),
          f"a tenth of stage 1's {stage1} steps")
    cap = max(MIN_HORIZON, total // HORIZON_FRACTION)
    max_decay = round(1.0 - 1.0 / cap, 6)
    why = f"horizon at most a third of the run's {total} steps"
    lower(EMA_DECAY, cfg.ema.decay, max_decay, why)
    lower(RESTART_DECAY, cfg.schedule.ema_restart_decay, max_decay, why)
    lower(EMA_WARMUPS, cfg.ema.warmups, cap, why)
    return Fitted(_replace(cfg, values), notes, changes)


def _replace(cfg: Config, values: dict[str, float]) -> Config:
    for key, value in values.items():
        section, name = key.split(".")
        typed = int(value) if isinstance(getattr(getattr(cfg, section), name), int) else float(value)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: typed})})
    return cfg


def schedule_warnings(cfg: Config, train_images: int) -> list[str]:
    """Warm-ups or EMA horizons longer than the stage they belong to (the run would end inside them)."""
    steps = max(1, steps_per_epoch(train_images, cfg.data.total_batch_size))
    stage1 = cfg.schedule.stop_epoch * steps
    stage2 = (cfg.schedule.epochs - cfg.schedule.stop_epoch) * steps
    checks = [(WARMUP, cfg.lr_scheduler.warmup_iter, stage1, "stage 1"),
              (EMA_WARMUPS, cfg.ema.warmups, stage1, "stage 1")]
    if cfg.ema.enabled:
        checks += [(f"{EMA_DECAY} horizon", horizon(cfg.ema.decay), stage1, "stage 1"),
                   (f"{RESTART_DECAY} horizon", horizon(cfg.schedule.ema_restart_decay), stage2, "stage 2")]
    return [f"{key} is {value:g} steps, longer than {stage} ({length} steps at {steps} per epoch); "
            "set schedule.fit_to_data: true or lower it"
            for key, value, length, stage in checks if value > length]
