"""driver layer: `deim-ray info` — the model size and the whole schedule before any GPU hour is spent.

The schedule values the rule derived (`config.schedule`) are listed with what they came from.

The phase table joins three views of each epoch range: what the data pipeline does (from `data.gates`, the
same functions the pipeline runs), which LR phase applies (from the flat-cosine boundaries), and what the EMA
and best rule do (warm-up, the stage-2 restart decay and restart search). When the training images are on this
machine, a short measurement of the loader per phase follows, with the loader workers a training worker needs.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import torch

from deim_ray.config.fit import schedule_warnings
from deim_ray.config.schedule import Stage
from deim_ray.config.schema import Config
from deim_ray.data.errors import DataError
from deim_ray.data.gates import phase_table
from deim_ray.data.synthetic import ensure_dataset, synthetic_splits
from deim_ray.data.throughput import phase_rates, workers_needed
from deim_ray.driver.preflight import check_model, num_classes, preflight
from deim_ray.driver.stage2_branches import stage2_space
from deim_ray.models.backbone_weights import backbone_note
from deim_ray.models.build import build_from_config, build_model_config, count_parameters
from deim_ray.models.families import get_family


def lr_phases(cfg: Config) -> list[tuple[int, int, str]]:
    """Epoch ranges [start, end) of the LR curve (warm-up is in iterations, so it is listed separately)."""
    s, lr = cfg.schedule, cfg.lr_scheduler
    if lr.type == "constant":
        return [(0, s.epochs, "flat")]
    tail_start = s.epochs - lr.no_aug_epoch
    flat_end = min(lr.flat_epoch, tail_start)
    phases = [(0, flat_end, "flat"), (flat_end, tail_start, f"cosine to x{lr.lr_gamma:g}"),
              (tail_start, s.epochs, f"flat x{lr.lr_gamma:g}")]
    return [p for p in phases if p[0] < p[1]]


def _lr_at(cfg: Config, epoch: int) -> str:
    return next(name for start, end, name in lr_phases(cfg) if start <= epoch < end)


def _ema_at(cfg: Config, stage: Stage) -> str:
    if not cfg.ema.enabled:
        return "EMA off"
    if stage is Stage.TWO:
        rule = "restart from best_stg1 when not improving" if cfg.schedule.stage2_restart else "no restarts"
        return f"EMA decay {cfg.schedule.ema_restart_decay:g}; {rule}"
    return f"EMA decay {cfg.ema.decay:g} (warm-up {cfg.ema.warmups} updates)"


def _split_by_lr(cfg: Config):
    """Data phases cut further at LR phase boundaries."""
    cuts = sorted({b for start, end, _ in lr_phases(cfg) for b in (start, end)})
    for phase in phase_table(cfg):
        inner = [c for c in cuts if phase.start < c < phase.end]
        bounds = [phase.start, *inner, phase.end]
        for start, end in zip(bounds, bounds[1:]):
            yield start, end, phase


def _backbone_weights(cfg: Config) -> str:
    m = cfg.model
    note = backbone_note(m.variant, m.backbone_pretrained, m.pretrained)
    if note:
        return note
    if m.pretrained:
        return f"from model.pretrained {m.pretrained}"
    return m.backbone_pretrained or "random (test size)"


def describe_config(cfg: Config, num_classes: int | None = None, derived: list[str] | None = None) -> str:
    """Model size, schedule values (with how the rule derived each derived one) and the phase table."""
    classes = num_classes or (cfg.data.synthetic.num_classes if cfg.data.synthetic else 80)
    with torch.device("meta"):  # no weights read or initialised
        params = count_parameters(build_from_config(build_model_config(cfg.model, classes)))
    s, lr = cfg.schedule, cfg.lr_scheduler
    lines = [
        f"model: {get_family(cfg.model.family).title}-{cfg.model.variant} ({classes} classes)",
        f"parameters: {params}",
        f"backbone weights: {_backbone_weights(cfg)}",
        f"epochs: {s.epochs}",
        f"stop_epoch: {s.stop_epoch}",
        *(["derived by the schedule rule:", *(f"  {note}" for note in derived)] if derived else []),
        f"image_size: {cfg.data.image_size[0]}x{cfg.data.image_size[1]}   total_batch_size: {cfg.data.total_batch_size}",
        f"lr: {cfg.optimizer.type} {cfg.optimizer.lr:g}, {lr.type}, warm-up {lr.warmup_iter} iterations",
        _stage2_search(cfg),
        "",
        f"{'epochs':<10} {'stage':<6} {'lr':<14} {'ema / best rule':<58} augmentation",
    ]
    for start, end, phase in _split_by_lr(cfg):
        lines.append(f"{start:>3}-{end - 1:<6} {phase.stage:<6} {_lr_at(cfg, start):<14} "
                     f"{_ema_at(cfg, phase.stage):<58} {', '.join(phase.ops)}")
    return "\n".join(lines)


def describe_checked(cfg: Config, derived: list[str], *, workers: int, keep=(), data: bool = True,
                     loader: bool = False, consumed_per_s: float | None = None) -> str:
    """What `info` prints: `train`'s preflight on this config (the data, the weight files, the model on the meta
    device; skipped with `data=False` but for the model), the schedule fitted to the data with a warning for each
    warm-up or EMA horizon longer than its stage, then `describe_config` and optionally `describe_loader`."""
    with tempfile.TemporaryDirectory() as tmp:
        local = _with_local_data(cfg, Path(tmp))
        if not data:
            check_model(local, num_classes(local, []), files=False)
            return describe_config(local, derived=derived) + _loader(local, loader, consumed_per_s)
        checked = preflight(local, on_cluster=False, workers=workers, keep=keep)
        fitted, train = checked.cfg, checked.train_images
        lines = [f"data: {s.split} {s.images} images, {s.annotations} boxes" for s in checked.summaries]
        if checked.fit_notes:
            lines += [f"fitted to the {train} train images (schedule.fit_to_data):",
                      *(f"  {note}" for note in checked.fit_notes)]
        lines += [f"warning: {w}" for w in schedule_warnings(fitted, train)]
        text = describe_config(fitted, num_classes(fitted, checked.summaries), derived)
        return "\n".join([*lines, text]) + _loader(fitted, loader, consumed_per_s)


def _loader(cfg: Config, wanted: bool, consumed_per_s: float | None) -> str:
    return "\n\n" + describe_loader(cfg, consumed_per_s) if wanted else ""


def _with_local_data(cfg: Config, tmp: Path) -> Config:
    """`cfg` itself, or for a synthetic dataset a copy generated under `tmp` (info writes nothing of the run's)."""
    if cfg.data.synthetic is None:
        return cfg
    train, val = synthetic_splits(tmp)
    data_log = logging.getLogger("deim_ray.data")
    level = data_log.level
    data_log.setLevel(logging.WARNING)  # a throw-away copy: its "generating ..." line would only confuse
    try:
        return dataclasses.replace(cfg, data=ensure_dataset(dataclasses.replace(cfg.data, train=train, val=val)))
    finally:
        data_log.setLevel(level)


def _stage2_search(cfg: Config) -> str:
    """What `--stage2-branches K` (K > 1) draws its branches from; SpaceError (one line) as `train` gives it."""
    space = stage2_space(cfg)
    source = "the config's stage2_search" if cfg.stage2_search else "default space"
    dims = ", ".join(f"{d.key} ~ {d.describe()}" for d in space.dimensions)
    return f"stage-2 branches (--stage2-branches K > 1), {source}: {dims}"


def describe_loader(cfg: Config, consumed_per_s: float | None, images: int = 32) -> str:
    """Images/s of one loader process per phase, measured here on `cfg`'s data (local: `describe_checked` made
    a synthetic set's copy already), and the workers a training worker needs."""
    try:
        rates = phase_rates(cfg, images)
    except (DataError, OSError) as e:
        return f"loader: not measured ({e})"
    lines = [f"loader: one worker process, measured here on {images} images per phase (images per CPU-second)"]
    lines += [f"  epochs {r.start:>3}-{r.end - 1:<4} stage {r.stage}  {r.images_per_s:7.1f} img/s" for r in rates]
    slowest = min(r.images_per_s for r in rates)
    n = cfg.data.num_workers
    lines.append(f"  data.num_workers = {n}: about {max(n, 1) * slowest:.0f} img/s per training worker in the slowest "
                 f"phase (each loader worker needs a core of its own)")
    if consumed_per_s is not None:
        lines.append(f"  a training worker consuming {consumed_per_s:g} img/s needs data.num_workers >= "
                     f"{workers_needed(consumed_per_s, rates)}")
    return "\n".join(lines)
