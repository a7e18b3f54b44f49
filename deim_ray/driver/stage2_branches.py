"""driver layer: what the stage-2 branches of `--stage2-branches K` are (pure: no Ray, no storage).

Every branch starts from the same verified best_stg1, so a branch may only change what stage 2 uses
(STAGE2_KEYS). The config's `stage2_search` section maps such keys to one distribution each, with the vocabulary
of a Tune space file (`tune_space.py`); without it, `default_space` varies the EMA restart decay, the stage-2
length and the tail LR around the config's own values.

    b0        the config's own settings (so K = 1 is a plain stage 2)
    b1..bK-1  points drawn from the space, seeded by train.seed: `grid` values are taken in turn, the other
              distributions are sampled; a point that repeats an earlier branch is drawn again (after
              _DRAWS tries, the first unused point of the space is taken), so no two branches are the same

K is bounded (`check_branch_count`, before anything starts): at most MAX_BRANCHES, and at most the number of
distinct settings the space and the config's own give.

`branch_config` applies a branch's settings with every stage-1 value pinned (a longer stage 2 only moves
`schedule.epochs` and `lr_scheduler.no_aug_epoch`), and checks that nothing else changed. `plan_resources` shares
the cluster among the branches.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deim_ray.config.errors import ConfigError
from deim_ray.config.loader import config_to_dict, diff_configs, override_config
from deim_ray.config.schema import Config
from deim_ray.config.validate import validate
from deim_ray.driver.tune_space import Dimension, SearchSpace, SpaceError, parse_space, plain

STAGE2_KEYS = {
    "schedule.ema_restart_decay": "EMA decay from the switch on",
    "schedule.no_aug_epochs": "number of stage-2 epochs",
    "schedule.stage2_restart": "restart from best_stg1 after an epoch that is not a new best",
    "data.image_size": "stage-2 training and evaluation size",
    "lr_scheduler.tail_lr_factor": "stage-2 LR as a fraction of the base LR",
}
"""The keys a branch may change, and what each means for stage 2."""

STAGE2_LENGTH = "schedule.no_aug_epochs"
_MOVED_BY_LENGTH = ("schedule.epochs", "lr_scheduler.no_aug_epoch")
_PINNED = ("schedule.epochs", "schedule.stop_epoch", "lr_scheduler.no_aug_epoch", "lr_scheduler.flat_epoch",
           "augment.policy_epoch", "augment.mixup_epochs", "augment.copyblend_epochs",
           "schedule.matcher_change_epoch")
"""Schedule values a branch keeps from the base config (an override of the schedule would re-derive them)."""
_DRAWS = 50
"""Random draws per branch before the first unused point of the space is taken instead."""
MAX_BRANCHES = 16
"""More branches than this is a mistake on any cluster (each is a full stage 2 from best_stg1)."""


def branch_names(k: int) -> list[str]:
    return [f"b{i}" for i in range(k)]


def _choices(*values: float) -> dict[str, list]:
    return {"choice": sorted({round(v, 6) for v in values})}


def default_space(cfg: Config) -> dict[str, Any]:
    """The space used when the config has no `stage2_search`: the EMA restart decay with half and twice its
    distance to 1, the stage-2 length halved and 1.5 times, and (flatcosine) the tail LR halved and doubled."""
    decay = cfg.schedule.ema_restart_decay
    length = cfg.schedule.epochs - cfg.schedule.stop_epoch
    space = {"schedule.ema_restart_decay": _choices(max(0.0, 1 - 2 * (1 - decay)), decay, 1 - (1 - decay) / 2),
             STAGE2_LENGTH: {"choice": sorted({max(1, (length + 1) // 2), length, length + length // 2})}}
    tail = cfg.lr_scheduler.tail_lr_factor or cfg.lr_scheduler.lr_gamma
    if cfg.lr_scheduler.type == "flatcosine" and tail > 0:
        space["lr_scheduler.tail_lr_factor"] = _choices(tail / 2, tail, min(1.0, 2 * tail))
    return space


def branch_config(base: Config, params: Mapping[str, Any]) -> Config:
    """`base` with a branch's stage-2 `params` applied; SpaceError if that would change anything stage 1 used."""
    tree = config_to_dict(base)
    overrides: dict[str, Any] = {key: _lookup(tree, key) for key in _PINNED}
    for key, value in params.items():
        overrides[key] = value
        if key == STAGE2_LENGTH:
            overrides |= {"schedule.epochs": base.schedule.stop_epoch + value, "lr_scheduler.no_aug_epoch": value}
    try:
        cfg = override_config(base, overrides)
    except ConfigError as e:
        raise SpaceError(f"stage2_search: {_describe(params)} gives an invalid config: {e}") from None
    moved = sorted(set(diff_configs(base, cfg)) - set(STAGE2_KEYS) - set(_MOVED_BY_LENGTH))
    if moved:
        raise SpaceError(f"stage2_search: {_describe(params)} would also change {', '.join(moved)}, which stage 1 "
                         "used; a branch may only change stage-2 keys")
    return cfg


def _lookup(tree: dict, dotted: str) -> Any:
    node = tree
    for segment in dotted.split("."):
        node = node[segment]
    return node


def _describe(params: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}` = {json.dumps(v)}" for k, v in params.items()) or "the config's own settings"


def stage2_space(cfg: Config) -> SearchSpace:
    """The config's `stage2_search` (or `default_space`), checked: stage-2 keys only, and each dimension's edge
    values give a valid branch config. SpaceError (one line) otherwise."""
    raw = cfg.stage2_search or default_space(cfg)
    space = parse_space(raw, where="stage2_search")
    for dim in space.dimensions:
        if dim.key not in STAGE2_KEYS:
            allowed = "; ".join(f"{k} ({why})" for k, why in STAGE2_KEYS.items())
            raise SpaceError(f"stage2_search: `{dim.key}` is not a stage-2 key (every branch starts from the same "
                             f"best_stg1, so only what stage 2 uses may vary); use: {allowed}")
        for value in dim.probe_values():
            if dim.key == STAGE2_LENGTH and not (isinstance(value, int) and value >= 1):
                raise SpaceError(f"stage2_search: `{STAGE2_LENGTH}` = {json.dumps(value)} from {dim.describe()} "
                                 "is not a number of epochs (an integer >= 1)")
            try:
                validate(branch_config(cfg, {dim.key: value}))
            except SpaceError:
                raise
            except ConfigError as e:
                raise SpaceError(f"stage2_search: `{dim.key}` = {json.dumps(value)} from {dim.describe()} gives an "
                                 f"invalid config: {e}") from None
    return space


def _draw(dim: Dimension, rng: random.Random, index: int) -> Any:
    args = dim.args
    if dim.dist == "grid":
        return plain(args[index % len(args)])
    if dim.dist == "choice":
        return plain(rng.choice(args))
    if dim.dist == "randint":
        return rng.randrange(args[0], args[1])
    if dim.dist == "loguniform":
        return round(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))), 6)
    value = rng.uniform(args[0], args[1])
    return round(round(value / args[2]) * args[2], 6) if dim.dist == "quniform" else round(value, 6)


def _effective(cfg: Config, key: str) -> Any:
    """What stage 2 runs with for `key` (the stage-2 length in epochs; the tail LR factor lr_gamma stands for)."""
    if key == STAGE2_LENGTH:
        return cfg.schedule.epochs - cfg.schedule.stop_epoch
    if key == "lr_scheduler.tail_lr_factor":
        return cfg.lr_scheduler.tail_lr_factor if cfg.lr_scheduler.tail_lr_factor is not None else \
            cfg.lr_scheduler.lr_gamma
    return plain(_lookup(config_to_dict(cfg), key))


def _settings(cfg: Config) -> tuple:
    return tuple(json.dumps(_effective(cfg, key)) for key in STAGE2_KEYS)


def sample_branches(cfg: Config, k: int) -> list[dict[str, Any]]:
    """The settings of branches b0..b{k-1}: {} for b0, then draws from `stage2_space(cfg)` (module docstring),
    each holding only the keys whose value differs from the config's own; no two alike."""
    space = stage2_space(cfg)
    rng = random.Random(cfg.train.seed)
    seen = {_settings(cfg)}
    points: list[dict[str, Any]] = [{}]
    for index in range(k - 1):
        drawn = (_point(cfg, {dim.key: _draw(dim, rng, index) for dim in space.dimensions}) for _ in range(_DRAWS))
        point = next((p for p in drawn if _settings(branch_config(cfg, p)) not in seen), None)
        if point is None:
            point = _first_unused(cfg, space, seen)
        seen.add(_settings(branch_config(cfg, point)))
        points.append(point)
    return points


def _point(cfg: Config, drawn: Mapping[str, Any]) -> dict[str, Any]:
    """A drawn point as a branch's settings: only the keys whose value differs from the config's own."""
    return {key: value for key, value in drawn.items() if value != _effective(cfg, key)}


def _first_unused(cfg: Config, space: SearchSpace, seen: set[tuple]) -> dict[str, Any]:
    """The first point of the space (in file order) that no branch has; SpaceError when there is none."""
    values = [dim.values() for dim in space.dimensions]
    if all(v is not None for v in values):
        for combo in itertools.product(*values):
            point = _point(cfg, dict(zip(space.keys, combo)))
            if _settings(branch_config(cfg, point)) not in seen:
                return point
    raise SpaceError(f"stage2_search: found no branch settings unlike the {len(seen)} already drawn; lower "
                     "--stage2-branches or widen stage2_search")


def branch_ceiling(cfg: Config) -> int:
    """How many distinct branches the config allows: the space's points, plus the config's own settings when
    they are not among them, and never more than MAX_BRANCHES."""
    space = stage2_space(cfg)
    own_inside = all(d.values() is None or json.dumps(_effective(cfg, d.key)) in map(json.dumps, d.values())
                     for d in space.dimensions)
    return int(min(MAX_BRANCHES, space.size + (0 if own_inside else 1)))


def check_branch_count(cfg: Config, k: int) -> None:
    """SpaceError (one line) when `--stage2-branches k` asks for more branches than `branch_ceiling`."""
    if k > MAX_BRANCHES:
        raise SpaceError(f"--stage2-branches {k} is more than {MAX_BRANCHES}; each branch is a full stage 2, so use "
                         f"at most {MAX_BRANCHES}")
    ceiling = branch_ceiling(cfg) if k > 1 else 1
    if k > ceiling:
        raise SpaceError(f"--stage2-branches {k}: stage2_search allows only {ceiling} distinct branches (the "
                         f"config's own settings included), so branches would repeat; use at most {ceiling} or "
                         "widen stage2_search")


@dataclass(frozen=True)
class BranchResources:
    """What each branch's Ray Train run gets, and how many branches run at once."""

    workers: int
    cpus_per_worker: float
    parallel: int


def plan_resources(cfg: Config, k: int, *, workers: int, gpu: bool, cpus_per_worker: float,
                   cluster: Mapping[str, float]) -> BranchResources:
    """On GPUs (one per worker) each branch keeps `workers` workers, so the per-GPU batch (and memory) stays as
    configured, and as many branches run at once as the cluster's GPUs allow; the rest wait for a free slot. On
    CPUs the K branches share the stage's workers, `workers // K` each (at least 1, and a count the batch sizes
    divide by), and all run at once, each worker's CPU share lowered when the cluster is smaller than
    K x workers x cpus-per-worker."""
    if gpu:
        return BranchResources(workers, cpus_per_worker, max(1, min(k, int(cluster.get("GPU", 0) // workers))))
    per_branch = max(1, workers // k)
    while per_branch > 1 and (cfg.data.total_batch_size % per_branch or cfg.data.val_batch_size % per_branch):
        per_branch -= 1
    # rounded down to Ray's resource granularity: 3 x 0.6667 CPU would not fit 2 CPUs, and the third branch's
    # workers would wait (and time out) until another branch ends
    share = math.floor(min(cpus_per_worker, cluster.get("CPU", 0.0) / (k * per_branch)) * 1e4) / 1e4
    return BranchResources(per_branch, share if share > 0 else cpus_per_worker, k)
