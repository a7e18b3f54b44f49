"""data layer: every epoch gate of the two-stage schedule, as pure functions of (config, epoch).

The train transforms, the batch collator and `deim-ray info` all read the schedule from here, so the phase
table printed for a config is exactly what the pipeline does. Epochs are 0-based; a range (a, b) means
a <= epoch < b.

- Stage (`config.schedule.stage_of`): 1 while epoch < stop_epoch, else 2. Stage 2 runs no policy op, MixUp,
  CopyBlend or multi-scale, whatever the other gates say; ops not listed in policy_ops (the horizontal flip in
  every released config) keep running, as upstream, whose stage 2 only turns its policy ops off.
- Policy ops (`augment.policy_ops`, by op name) with policy_epoch = (e0, e1, e2): off before e0; in [e0, e1)
  each sample takes Mosaic with probability mosaic_prob and then skips RandomZoomOut/RandomIoUCrop, or skips
  Mosaic and takes them; in [e1, e2) no Mosaic, the other policy ops run; off from e2. A single epoch (E,)
  means the same as (0, E, E): policy ops (with the Mosaic draw) while epoch < E. Ops not listed in
  policy_ops always run in stage 1.
- MixUp: per batch with mixup_prob in mixup_epochs. CopyBlend: per batch with copyblend_prob in
  copyblend_epochs, only when MixUp was not applied to that batch.
- Multi-scale: per batch, a size drawn from `scale_list(base_size, base_size_repeat)` while
  epoch < stop_epoch; off when base_size_repeat is None.
"""

from __future__ import annotations

from dataclasses import dataclass

from deim_ray.config.schedule import Stage, stage_of
from deim_ray.config.schema import AugmentConfig, Config
from deim_ray.data.errors import DataError

MOSAIC = "Mosaic"
ZOOM_OUT = "RandomZoomOut"
IOU_CROP = "RandomIoUCrop"
PHOTOMETRIC = "RandomPhotometricDistort"
FLIP = "RandomHorizontalFlip"
KNOWN_OPS = (MOSAIC, PHOTOMETRIC, ZOOM_OUT, IOU_CROP, FLIP)
"""Sample-level augmentations, in pipeline order; any of them may be listed in `augment.policy_ops`."""


@dataclass(frozen=True)
class PolicyPhase:
    """Which policy-gated ops may run in one epoch."""

    name: str
    """'before' (epoch < e0), 'mosaic' ([e0, e1)), 'no-mosaic' ([e1, e2)) or 'after' (epoch >= e2)."""
    allowed: frozenset[str]
    """Policy ops allowed this epoch."""
    gated: frozenset[str]
    """All policy ops (the rest always run in stage 1)."""
    mosaic_prob: float
    """Chance that a sample takes Mosaic (0 when Mosaic may not run)."""

    def allows(self, op: str) -> bool:
        return op not in self.gated or op in self.allowed


def policy_bounds(augment: AugmentConfig) -> tuple[int, int, int]:
    """(e0, e1, e2) of `augment.policy_epoch`; a single epoch E is (0, E, E)."""
    pe = tuple(int(e) for e in augment.policy_epoch)
    if len(pe) == 1:
        return 0, pe[0], pe[0]
    if len(pe) == 3 and pe[0] <= pe[1] <= pe[2]:
        return pe[0], pe[1], pe[2]
    raise DataError(f"augment.policy_epoch must be [E] or ascending [e0, e1, e2], got {list(pe)}")


def policy_phase(augment: AugmentConfig, epoch: int) -> PolicyPhase:
    """The policy phase of `epoch` in stage 1 (`epoch_plan` turns every policy op off in stage 2)."""
    unknown = set(augment.policy_ops) - set(KNOWN_OPS)
    if unknown:
        raise DataError(f"augment.policy_ops has unknown op(s) {sorted(unknown)}; choose from {list(KNOWN_OPS)}")
    e0, e1, e2 = policy_bounds(augment)
    gated = frozenset(augment.policy_ops)
    if epoch < e0:
        name, allowed = "before", frozenset()
    elif epoch < e1:
        name, allowed = "mosaic", gated
    elif epoch < e2:
        name, allowed = "no-mosaic", gated - {MOSAIC}
    else:
        name, allowed = "after", frozenset()
    takes_mosaic = MOSAIC not in gated or MOSAIC in allowed
    return PolicyPhase(name, allowed, gated, min(max(augment.mosaic_prob, 0.0), 1.0) if takes_mosaic else 0.0)


def mixup_active(augment: AugmentConfig, epoch: int) -> bool:
    a, b = augment.mixup_epochs
    return augment.mixup_prob > 0 and a <= epoch < b


def copyblend_active(augment: AugmentConfig, epoch: int) -> bool:
    a, b = augment.copyblend_epochs
    return augment.copyblend_prob > 0 and a <= epoch < b


def multiscale_active(augment: AugmentConfig, epoch: int, stop_epoch: int) -> bool:
    return augment.base_size_repeat is not None and epoch < stop_epoch


def scale_list(base_size: int, repeat: int) -> list[int]:
    """Multi-scale sizes: r sizes up from floor(0.75 b/32)*32 in steps of 32, b repeated `repeat` times, then r
    sizes down from floor(1.25 b/32)*32, where r = (b - floor(0.75 b/32)*32) / 32. b=640, repeat=20:
    [480..608] + [640]*20 + [800..672]."""
    if base_size <= 0 or base_size % 32:
        raise DataError(f"multi-scale base size must be a positive multiple of 32, got {base_size}")
    low = (3 * base_size) // 128 * 32
    high = (5 * base_size) // 128 * 32
    steps = (base_size - low) // 32
    return [low + 32 * k for k in range(steps)] + [base_size] * repeat + [high - 32 * k for k in range(steps)]


def multiscale_base(cfg: Config) -> int:
    return cfg.augment.base_size or cfg.data.image_size[0]


def check(cfg: Config) -> None:
    """Raise DataError now for a policy or multi-scale setting the pipeline would reject later in a worker."""
    policy_phase(cfg.augment, 0)
    if cfg.augment.base_size_repeat is not None:
        scale_list(multiscale_base(cfg), cfg.augment.base_size_repeat)


@dataclass(frozen=True)
class EpochPlan:
    """Everything the data pipeline decides from the epoch alone."""

    epoch: int
    stage: Stage
    policy: PolicyPhase
    mixup_prob: float
    """0 when MixUp is off this epoch."""
    copyblend_prob: float
    """0 when CopyBlend is off this epoch (it still runs only on batches MixUp did not take)."""
    scales: tuple[int, ...]
    """Multi-scale sizes to draw from per batch; empty when off."""


def epoch_plan(cfg: Config, epoch: int) -> EpochPlan:
    a, stop = cfg.augment, cfg.schedule.stop_epoch
    if stage_of(epoch, stop) is Stage.TWO:
        return EpochPlan(epoch, Stage.TWO, PolicyPhase("stage2", frozenset(), frozenset(a.policy_ops), 0.0), 0.0,
                         0.0, ())
    scales = tuple(scale_list(multiscale_base(cfg), a.base_size_repeat)) if multiscale_active(a, epoch, stop) else ()
    return EpochPlan(epoch, Stage.ONE, policy_phase(a, epoch), a.mixup_prob if mixup_active(a, epoch) else 0.0,
                     a.copyblend_prob if copyblend_active(a, epoch) else 0.0, scales)


@dataclass(frozen=True)
class Phase:
    """A maximal epoch range [start, end) over which the data pipeline does the same thing."""

    start: int
    end: int
    stage: Stage
    ops: tuple[str, ...]
    """What runs, in order (sample ops, then batch ops), e.g. 'Mosaic p=0.5', 'MixUp p=0.5'."""


def describe(plan: EpochPlan, cfg: Config) -> tuple[str, ...]:
    h, w = cfg.data.image_size
    resize = f"Resize {h}x{w}"
    pol, aug = plan.policy, cfg.augment
    ops = []
    if pol.mosaic_prob > 0:
        ops.append(f"{MOSAIC} p={pol.mosaic_prob:g}")
    for op, p in ((PHOTOMETRIC, None), (ZOOM_OUT, aug.zoom_out_p), (IOU_CROP, aug.iou_crop_p), (FLIP, aug.flip_p)):
        if pol.allows(op) and (p is None or p > 0):
            no_mosaic = " when no Mosaic" if op in (ZOOM_OUT, IOU_CROP) and pol.mosaic_prob > 0 else ""
            ops.append(op + ("" if p is None else f" p={p:g}") + no_mosaic)
    ops.append(resize)
    if plan.mixup_prob > 0:
        ops.append(f"MixUp p={plan.mixup_prob:g}")
    if plan.copyblend_prob > 0:
        ops.append(f"CopyBlend p={plan.copyblend_prob:g}" + (" when no MixUp" if plan.mixup_prob > 0 else ""))
    if plan.scales:
        ops.append(f"MultiScale {min(plan.scales)}-{max(plan.scales)}")
    return tuple(ops)


def _boundaries(cfg: Config) -> list[int]:
    a = cfg.augment
    points = {0, cfg.schedule.epochs, cfg.schedule.stop_epoch, *policy_bounds(a), *a.mixup_epochs,
              *a.copyblend_epochs}
    return sorted(p for p in points if 0 <= p <= cfg.schedule.epochs)


def phase_table(cfg: Config) -> list[Phase]:
    """The whole run as phases [start, end) with what the data pipeline does in each."""
    cuts = _boundaries(cfg)
    phases: list[Phase] = []
    for start, end in zip(cuts, cuts[1:]):
        plan = epoch_plan(cfg, start)
        ops = describe(plan, cfg)
        if phases and phases[-1].ops == ops and phases[-1].stage == plan.stage:
            phases[-1] = Phase(phases[-1].start, end, plan.stage, ops)
        else:
            phases.append(Phase(start, end, plan.stage, ops))
    return phases


def format_phase_table(cfg: Config) -> str:
    """`phase_table` as text lines: 'epochs 4-77  stage 1  Mosaic p=0.5, ...' (end epoch inclusive)."""
    return "\n".join(f"epochs {p.start:>3}-{p.end - 1:<3}  stage {p.stage}  " + ", ".join(p.ops)
                     for p in phase_table(cfg))
