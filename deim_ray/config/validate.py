"""config layer: cross-field checks that must pass before any worker starts.

Types are already enforced by the loader; this module checks that the values fit together: the two-stage
schedule (every stage-1 augmentation gate ends by `stop_epoch`, the LR phases match it as in upstream
README §3.4: `stop_epoch = epochs - no_aug_epoch`), sizes the model accepts, probabilities, batch
divisibility over workers and the names of variants, optimizers and augmentation ops.

`validate` collects every problem and raises one `ConfigError` whose single line lists them all, each
naming the key(s) and the fix.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from deim_ray.config.errors import ConfigError
from deim_ray.config.schema import DATA_FORMATS, TRACKERS, Config
from deim_ray.config.variants import FAMILY_VARIANTS

OPTIMIZERS = ("AdamW", "SGD")
AMP_DTYPES = ("bfloat16", "float16")
LR_SCHEDULERS = ("flatcosine", "constant")
POLICY_OPS = ("Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop", "RandomHorizontalFlip")
STRIDE = 32
"""Input sides must be multiples of the deepest feature stride."""


def validate(cfg: Config, workers: int | None = None) -> None:
    """Raise `ConfigError` if `cfg` is inconsistent; `workers` (when known) checks batch divisibility."""
    problems = [
        *_check_stages(cfg),
        *_check_policy(cfg),
        *_check_epoch_ranges(cfg),
        *_check_lr_schedule(cfg),
        *_check_sizes(cfg),
        *_check_probabilities(cfg),
        *_check_batches(cfg, workers),
        *_check_names(cfg),
        *_check_data(cfg),
    ]
    if problems:
        where = f" ({cfg.source})" if cfg.source else ""
        raise ConfigError(f"invalid config{where}: " + "; ".join(problems))


def _check_stages(cfg: Config) -> Iterable[str]:
    s = cfg.schedule
    if s.epochs < 2:
        yield f"`schedule.epochs` must be at least 2 (one epoch per stage), got {s.epochs}"
    if not 1 <= s.stop_epoch < s.epochs:
        yield (
            f"`schedule.stop_epoch` ({s.stop_epoch}) must satisfy 1 <= stop_epoch < `schedule.epochs` ({s.epochs}) "
            f"so both stages have epochs; upstream uses stop_epoch = epochs - no_aug_epoch "
            f"({s.epochs - cfg.lr_scheduler.no_aug_epoch})"
        )
    if s.no_aug_epochs < 1:
        yield f"`schedule.no_aug_epochs` (stage-2 length for the schedule rule) must be >= 1, got {s.no_aug_epochs}"
    m = s.matcher_change_epoch
    if m is not None and not 0 <= m < s.stop_epoch:
        yield (
            f"`schedule.matcher_change_epoch` ({m}) must be in [0, stop_epoch={s.stop_epoch}): the matcher switches "
            f"during stage 1 (upstream uses about 90% of stop_epoch, e.g. {int(s.stop_epoch * 0.9)})"
        )


def _check_policy(cfg: Config) -> Iterable[str]:
    epochs = cfg.augment.policy_epoch
    stop = cfg.schedule.stop_epoch
    if len(epochs) not in (1, 3):
        yield f"`augment.policy_epoch` must be one epoch E or three epochs [e0, e1, e2], got {list(epochs)}"
        return
    if any(e < 0 for e in epochs) or list(epochs) != sorted(epochs):
        yield f"`augment.policy_epoch` must be ascending non-negative epochs, got {list(epochs)}"
    if epochs[-1] > stop:
        yield (
            f"`augment.policy_epoch` ends at {epochs[-1]}, after `schedule.stop_epoch` ({stop}); strong augmentation "
            f"belongs to stage 1: set its last value <= {stop} (upstream uses exactly {stop})"
        )


def _check_epoch_ranges(cfg: Config) -> Iterable[str]:
    stop = cfg.schedule.stop_epoch
    for name in ("mixup_epochs", "copyblend_epochs"):
        start, end = getattr(cfg.augment, name)
        if not 0 <= start <= end:
            yield f"`augment.{name}` must be [start, end] with 0 <= start <= end, got [{start}, {end}]"
        elif end > stop:
            yield (
                f"`augment.{name}` ends at {end}, after `schedule.stop_epoch` ({stop}); set its end <= {stop} "
                f"(the range is [start, end), stage 1 only)"
            )


def _check_lr_schedule(cfg: Config) -> Iterable[str]:
    lr, s = cfg.lr_scheduler, cfg.schedule
    if lr.type not in LR_SCHEDULERS:
        yield f"`lr_scheduler.type` must be one of {', '.join(LR_SCHEDULERS)}, got {lr.type!r}"
    if lr.warmup_iter < 0 or lr.flat_epoch < 0 or lr.no_aug_epoch < 0:
        yield "`lr_scheduler.warmup_iter`, `flat_epoch` and `no_aug_epoch` must not be negative"
    if not 0.0 <= lr.lr_gamma <= 1.0:
        yield f"`lr_scheduler.lr_gamma` (minimum LR / base LR) must be in [0, 1], got {lr.lr_gamma}"
    if lr.tail_lr_factor is not None and not (0.0 < lr.tail_lr_factor <= 1.0 and lr.type == "flatcosine"):
        yield (f"`lr_scheduler.tail_lr_factor` (stage-2 LR / base LR) must be in (0, 1] and needs type flatcosine, "
               f"got {lr.tail_lr_factor} with {lr.type}")
    if lr.type != "flatcosine":
        return
    if lr.no_aug_epoch != s.epochs - s.stop_epoch:
        yield (
            f"`lr_scheduler.no_aug_epoch` ({lr.no_aug_epoch}) must equal `schedule.epochs` - `schedule.stop_epoch` "
            f"({s.epochs} - {s.stop_epoch} = {s.epochs - s.stop_epoch}): the LR reaches its minimum when stage 2 starts"
        )
    if lr.flat_epoch > s.epochs - lr.no_aug_epoch:
        yield (
            f"`lr_scheduler.flat_epoch` ({lr.flat_epoch}) must be <= epochs - no_aug_epoch "
            f"({s.epochs - lr.no_aug_epoch}); for a constant LR after warm-up use flat_epoch = "
            f"{s.epochs - lr.no_aug_epoch} with lr_gamma 1.0"
        )


def _check_sizes(cfg: Config) -> Iterable[str]:
    height, width = cfg.data.image_size
    if height <= 0 or width <= 0 or height % STRIDE or width % STRIDE:
        yield f"`data.image_size` must be two positive multiples of {STRIDE}, got [{height}, {width}]"
    a = cfg.augment
    if a.base_size_repeat is not None:
        base = a.base_size if a.base_size is not None else height
        if a.base_size_repeat < 1:
            yield f"`augment.base_size_repeat` must be >= 1 or null (no multi-scale), got {a.base_size_repeat}"
        if base <= 0 or base % STRIDE:
            yield f"`augment.base_size` (multi-scale centre) must be a positive multiple of {STRIDE}, got {base}"
    if cfg.model.num_queries is not None and cfg.model.num_queries < 1:
        yield f"`model.num_queries` must be >= 1, got {cfg.model.num_queries}"
    if cfg.eval.num_top_queries < 1:
        yield f"`eval.num_top_queries` must be >= 1, got {cfg.eval.num_top_queries}"
    if cfg.augment.sanitize_min_size < 0:
        yield f"`augment.sanitize_min_size` must be >= 0 (pixels), got {cfg.augment.sanitize_min_size}"


def _check_probabilities(cfg: Config) -> Iterable[str]:
    a = cfg.augment
    for name in ("mosaic_prob", "photometric_p", "zoom_out_p", "iou_crop_p", "flip_p", "mixup_prob", "copyblend_prob"):
        value = getattr(a, name)
        if not 0.0 <= value <= 1.0:
            yield f"`augment.{name}` is a probability: use a value in [0, 1], got {value}"
    for key, value in (("ema.decay", cfg.ema.decay), ("schedule.ema_restart_decay", cfg.schedule.ema_restart_decay)):
        if not 0.0 <= value <= 1.0:
            yield f"`{key}` must be in [0, 1] (e.g. 0.9999), got {value}"


def _check_batches(cfg: Config, workers: int | None) -> Iterable[str]:
    d = cfg.data
    for key, value in (("total_batch_size", d.total_batch_size), ("val_batch_size", d.val_batch_size)):
        if value < 1:
            yield f"`data.{key}` must be >= 1, got {value}"
        elif workers is not None and value % workers:
            fixed = max(workers, value - value % workers)
            yield (
                f"`data.{key}` ({value}) is the batch over all workers and must divide by --workers ({workers}): "
                f"use e.g. {fixed} or change the number of workers"
            )
    if d.num_workers < 0:
        yield f"`data.num_workers` must be >= 0, got {d.num_workers}"
    if cfg.train.print_freq < 1 or cfg.train.keep_checkpoints < 1:
        yield "`train.print_freq` and `train.keep_checkpoints` must be >= 1"
    if cfg.train.nan_tolerance < 1 or cfg.train.nan_retries < 0 or not 0 < cfg.train.nan_lr_factor <= 1:
        yield "`train.nan_tolerance` must be >= 1, `train.nan_retries` >= 0 and `train.nan_lr_factor` in (0, 1]"


def _check_names(cfg: Config) -> Iterable[str]:
    variants = FAMILY_VARIANTS.get(cfg.model.family, ())
    checks = (
        ("model.family", cfg.model.family, tuple(FAMILY_VARIANTS)),
        *((("model.variant", cfg.model.variant, variants),) if variants else ()),
        ("optimizer.type", cfg.optimizer.type, OPTIMIZERS),
        ("train.amp_dtype", cfg.train.amp_dtype, AMP_DTYPES),
    )
    for key, value, allowed in checks:
        if value not in allowed:
            yield f"`{key}` must be one of {', '.join(allowed)}, got {value!r}{_suggest(value, allowed)}"
    for name in cfg.train.trackers:
        if name not in TRACKERS:
            yield f"unknown tracker {name!r} in `train.trackers`{_suggest(name, TRACKERS)}; known: {', '.join(TRACKERS)}"
    for op in cfg.augment.policy_ops:
        if op not in POLICY_OPS:
            yield f"unknown op {op!r} in `augment.policy_ops`{_suggest(op, POLICY_OPS)}; known: {', '.join(POLICY_OPS)}"
    for i, group in enumerate(cfg.optimizer.params):
        try:
            re.compile(group.params)
        except re.error as err:
            yield f"`optimizer.params[{i}].params` is not a valid regex ({err}): {group.params!r}"


def _check_data(cfg: Config) -> Iterable[str]:
    d = cfg.data
    for split in ("train", "val"):
        paths = getattr(d, split)
        if not paths.img_folder or not paths.ann_file:
            # With data.synthetic these are where the generated set is written.
            yield f"`data.{split}.img_folder` and `data.{split}.ann_file` must both be set"
        if paths.format not in DATA_FORMATS:
            yield (f"`data.{split}.format` must be one of {', '.join(DATA_FORMATS)}, got {paths.format!r}"
                   f"{_suggest(paths.format, DATA_FORMATS)}")
    syn = d.synthetic
    if syn is not None and min(syn.num_train, syn.num_val, syn.num_classes, syn.max_objects, syn.image_size) < 1:
        yield "`data.synthetic` counts and image_size must all be >= 1"


def _suggest(value: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.5)
    return f" — did you mean {close[0]!r}?" if close else ""
