"""driver layer: the search-space file of `deim-ray tune`, parsed and checked before anything starts.

A space file maps dotted config keys to one distribution each:

    optimizer.lr:        {loguniform: [1.0e-4, 1.0e-2]}
    schedule.stop_epoch: {choice: [3, 4]}
    augment.mixup_prob:  {uniform: [0.2, 0.6]}
    train.seed:          {randint: [0, 100]}      # upper bound excluded
    data.image_size:     {grid: [[320, 320], [416, 416]]}

Unknown distributions, keys that are not config keys and malformed bounds are `SpaceError`s (one line each).
A sampled point is applied to the base config with `override_config`, so every trial's config goes through
the same typed build and validation as `deim-ray train`. This module is pure (no Ray); tune.py builds the
Tune objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deim_ray.config.errors import ConfigError
from deim_ray.config.loader import override_config
from deim_ray.config.schema import Config
from deim_ray.config.validate import validate
from deim_ray.config.yaml_tree import read_yaml_mapping


class SpaceError(ConfigError):
    """A search-space file problem, in one line: which key, what is wrong, how to fix it."""


RANGE_DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint")
LIST_DISTRIBUTIONS = ("choice", "grid")
DISTRIBUTIONS = RANGE_DISTRIBUTIONS + LIST_DISTRIBUTIONS
_RANGE_ARITY = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2}
ENUMERABLE = 10_000
"""Dimensions with more values than this are treated like continuous ones (never listed)."""
MAX_TRIALS = 256
"""More trials than this in one search is a mistake on any cluster (each is a full two-stage run)."""
_FLOAT_ONLY = ("uniform", "loguniform", "quniform")
"""These sample floats, so the key must hold a number (an int key would reject 0.37 at load time)."""


@dataclass(frozen=True)
class Dimension:
    """One searched key: `key` (dotted config key), `dist` (a name from DISTRIBUTIONS) and its `args`."""

    key: str
    dist: str
    args: tuple[Any, ...]

    def probe_values(self) -> tuple[Any, ...]:
        """Values every trial could receive at the edges: checked against the config before the search starts."""
        if self.dist in LIST_DISTRIBUTIONS:
            return self.args
        if self.dist == "randint":
            return (self.args[0], self.args[1] - 1)
        return self.args[:2]

    def describe(self) -> str:
        return f"{self.dist}({', '.join(json.dumps(a) for a in self.args)})"

    def size(self) -> float:
        """How many different values the dimension gives (math.inf for uniform and loguniform)."""
        if self.dist in LIST_DISTRIBUTIONS:
            return len({json.dumps(plain(a)) for a in self.args})
        if self.dist == "randint":
            return self.args[1] - self.args[0]
        if self.dist == "quniform":
            low, high, step = self.args
            return round(high / step) - round(low / step) + 1
        return math.inf

    def values(self) -> list[Any] | None:
        """Its different values in order, when there are at most ENUMERABLE of them (else None)."""
        if self.size() > ENUMERABLE:
            return None
        if self.dist in LIST_DISTRIBUTIONS:
            return list({json.dumps(plain(a)): plain(a) for a in self.args}.values())
        if self.dist == "randint":
            return list(range(self.args[0], self.args[1]))
        low, high, step = self.args
        return [round(k * step, 6) for k in range(round(low / step), round(high / step) + 1)]


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(d.key for d in self.dimensions)

    @property
    def size(self) -> float:
        """Distinct points of the space (math.inf when a dimension is continuous)."""
        return math.prod(d.size() for d in self.dimensions)

    @property
    def grid_size(self) -> int:
        """Trials per sample: the product of the grid dimensions' lengths (Tune repeats the grid per sample)."""
        return math.prod(len(d.args) for d in self.dimensions if d.dist == "grid")


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file (YAML mapping of dotted key -> {distribution: args})."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file not found: {path}; pass --space SPACE.yml")
    try:  # the config's safe YAML reader: bounded depth and alias expansion, UTF-8 only
        raw = read_yaml_mapping(path)
    except ConfigError as err:
        raise SpaceError(f"search space: {err}") from None
    return parse_space(raw, where=str(path))


def parse_space(raw: Any, where: str = "search space") -> SearchSpace:
    """Check a space given as plain data; returns its dimensions in file order."""
    if not isinstance(raw, Mapping) or not raw:
        raise SpaceError(f"{where} must map dotted config keys to distributions, e.g. "
                         "`optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}`")
    return SearchSpace(tuple(_dimension(str(key), spec, where) for key, spec in raw.items()))


def _dimension(key: str, spec: Any, where: str) -> Dimension:
    leaf = config_key_type(key, where)
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise SpaceError(f"{where}: `{key}` must be one distribution like `{{choice: [...]}}`, got {spec!r}")
    ((dist, args),) = spec.items()
    if dist not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: `{key}` uses unknown distribution `{dist}`{_suggest(str(dist), DISTRIBUTIONS)}; "
                         f"use one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{where}: `{key}: {dist}` needs a non-empty list, got {args!r}")
    if dist in RANGE_DISTRIBUTIONS:
        _check_range(key, dist, args, leaf, where)
    dim = Dimension(key=key, dist=str(dist), args=tuple(args))
    if dist == "grid" and dim.size() < len(args):
        raise SpaceError(f"{where}: `{key}: grid` repeats a value ({args}); each grid value is one trial, so list "
                         "each once")
    return dim


def check_trial_count(space: SearchSpace, samples: int) -> None:
    """A search trains `samples` x grid points trials: at most MAX_TRIALS, and never the same point twice when
    the space is finite (an all-grid space repeated per sample, more samples than points)."""
    trials = samples * space.grid_size
    if trials > MAX_TRIALS:
        raise SpaceError(f"--samples {samples} x {space.grid_size} grid point(s) = {trials} trials, more than the "
                         f"{MAX_TRIALS} one search may run; lower --samples or shorten the grids")
    if trials > space.size:
        raise SpaceError(f"--samples {samples} x {space.grid_size} grid point(s) = {trials} trials, but the space has "
                         f"only {space.size:g} distinct point(s), so trials would repeat; use --samples "
                         f"{max(1, int(space.size) // space.grid_size)} or widen the space")


def _check_range(key: str, dist: str, args: list, leaf: Any, where: str) -> None:
    arity = _RANGE_ARITY[dist]
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    if len(args) != arity or not numeric:
        shape = "[low, high, step]" if arity == 3 else "[low, high]"
        raise SpaceError(f"{where}: `{key}: {dist}` takes {shape} as numbers, got {args}")
    low, high = args[0], args[1]
    if not low < high:
        raise SpaceError(f"{where}: `{key}: {dist}` needs low < high, got [{low}, {high}]")
    if dist == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: `{key}: loguniform` needs low > 0, got {low}; use uniform for ranges that "
                         "include 0")
    if dist == "quniform" and args[2] <= 0:
        raise SpaceError(f"{where}: `{key}: quniform` needs a step > 0, got {args[2]}")
    if dist == "randint" and not all(isinstance(a, int) for a in args):
        raise SpaceError(f"{where}: `{key}: randint` takes integer bounds [low, high), got {args}")
    if leaf is not None and dist in _FLOAT_ONLY and leaf is not float:
        raise SpaceError(f"{where}: `{key}` holds {_type_name(leaf)}, but `{dist}` samples floats; "
                         "use randint or choice for it")
    if leaf is not None and dist == "randint" and leaf not in (int, float):
        raise SpaceError(f"{where}: `{key}` holds {_type_name(leaf)}, but `randint` samples integers")


def check_space_against_config(space: SearchSpace, base: Config, workers: int) -> None:
    """Apply each dimension's edge values alone to the base config and validate: a value no trial could use
    is a SpaceError now rather than a failed trial later (combinations are still checked per trial)."""
    for dim in space.dimensions:
        for value in dim.probe_values():
            try:
                validate(override_config(base, {dim.key: value}), workers=workers)
            except ConfigError as e:
                raise SpaceError(f"`{dim.key}` = {json.dumps(value)} from {dim.describe()} gives an invalid "
                                 f"config: {e}") from None


def config_key_type(key: str, where: str = "search space") -> Any:
    """The type of the config value at dotted `key` (None for a key inside a free-form mapping such as
    `model.extra`); SpaceError when `key` names no value of `Config`."""
    tp: Any = Config
    segments = key.split(".")
    for i, segment in enumerate(segments):
        section = _dataclass_of(tp)
        if section is None:
            if _is_mapping(tp):
                return None
            raise SpaceError(f"{where}: `{key}` is not a config key: `{'.'.join(segments[:i])}` is a value, "
                             "not a section")
        names = [f.name for f in dataclasses.fields(section) if f.name != "source"]
        if segment not in names:
            prefix = ".".join(segments[:i])
            full = [f"{prefix}.{n}" if prefix else n for n in names]
            raise SpaceError(f"{where}: `{key}` is not a config key{_suggest('.'.join(segments[: i + 1]), full)}; "
                             f"keys of {prefix or 'the top level'}: {', '.join(names)}")
        tp = typing.get_type_hints(section)[segment]
    if _dataclass_of(tp) is not None:
        raise SpaceError(f"{where}: `{key}` is a config section; search one of its keys, e.g. "
                         f"`{key}.{dataclasses.fields(_dataclass_of(tp))[0].name}`")
    return _strip_optional(tp)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def _dataclass_of(tp: Any) -> type | None:
    tp = _strip_optional(tp)
    return tp if dataclasses.is_dataclass(tp) and isinstance(tp, type) else None


def _is_mapping(tp: Any) -> bool:
    tp = _strip_optional(tp)
    return tp is dict or typing.get_origin(tp) is dict


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, f"a {tp}")


def _suggest(value: str, allowed) -> str:
    close = difflib.get_close_matches(value, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def plain(value: Any) -> Any:
    """A sampled value as plain Python (Tune samples numpy scalars), recursively for lists and tuples."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value

