"""config layer: strict conversion between a plain tree and the frozen `Config` dataclasses.

`build_config` walks the dataclass fields of `schema.py`: lists become tuples, sections become their
dataclasses, and an unknown key or a wrong type is a `ConfigError` naming the key path, the file that
set it and the fix. `config_to_dict` is the inverse (JSON-safe: tuples become lists).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from deim_ray.config.errors import ConfigError
from deim_ray.config.schema import Config, ScheduleConfig

KeyPath = tuple[str, ...]
WhereFn = Callable[[KeyPath], str]

# Upstream spellings accepted inside our sections: section class -> {alias: field}.
ALIASES: dict[type, dict[str, str]] = {ScheduleConfig: {"epoches": "epochs"}}

# Fields the loader sets itself; a YAML file cannot.
_LOADER_FIELDS = {Config: {"source"}}

# Extra hints for unknown keys that are really upstream key names.
UPSTREAM_HINTS = {
    "epoches": "schedule.epochs",
    "lrsheduler": "lr_scheduler.type",
    "warmup_iter": "lr_scheduler.warmup_iter",
    "flat_epoch": "lr_scheduler.flat_epoch",
    "no_aug_epoch": "lr_scheduler.no_aug_epoch",
    "lr_gamma": "lr_scheduler.lr_gamma",
    "stop_epoch": "schedule.stop_epoch",
    "use_amp": "train.use_amp",
    "use_ema": "ema.enabled",
    "clip_max_norm": "train.clip_max_norm",
    "eval_spatial_size": "data.image_size",
    "print_freq": "train.print_freq",
    "total_batch_size": "data.total_batch_size",
}


def build_config(tree: Mapping[str, Any], where: WhereFn, source: str = "") -> Config:
    """Convert a resolved tree in deim_ray's format into a `Config` (strict: unknown keys and bad types fail)."""
    config = _build_section(Config, tree, (), where)
    return dataclasses.replace(config, source=source)


def config_to_dict(obj: Any) -> Any:
    """A `Config` (or any part of it) as plain JSON-safe data: dataclasses become dicts, tuples lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(key): config_to_dict(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(value) for value in obj]
    return obj


def dotted(path: KeyPath) -> str:
    return ".".join(path) if path else "<top level>"


def _build_section(cls: type, data: Any, path: KeyPath, where: WhereFn) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"`{dotted(path)}` must be a mapping of keys, got {data!r} (in {where(path)})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in _LOADER_FIELDS.get(cls, ())]
    aliases = ALIASES.get(cls, {})
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = (*path, str(key))
        if not isinstance(key, str):
            raise ConfigError(f"key {key!r} under `{dotted(path)}` must be a string (in {where(key_path)})")
        name = aliases.get(key, key)
        if name not in names:
            raise ConfigError(_unknown_key_message(key_path, names, where))
        if name in kwargs:
            spellings = " and ".join(f"`{k}`" for k in data if aliases.get(k, k) == name)
            raise ConfigError(f"`{dotted(path)}` sets both {spellings} (in {where(key_path)}); keep only `{name}`")
        kwargs[name] = _convert(hints[name], value, key_path, where)
    return cls(**kwargs)


def _unknown_key_message(path: KeyPath, names: list[str], where: WhereFn) -> str:
    key = path[-1]
    message = f"unknown key `{dotted(path)}` in {where(path)}"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if len(path) == 1 and key in UPSTREAM_HINTS:
        return f"{message}: upstream DEIM's `{key}` is `{UPSTREAM_HINTS[key]}` in deim_ray"
    if close:
        return f"{message} — did you mean `{close[0]}`?"
    section = dotted(path[:-1]) if len(path) > 1 else "the top level"
    return f"{message}; valid keys in {section}: {', '.join(names)}"


def _convert(tp: Any, value: Any, path: KeyPath, where: WhereFn) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(inner, value, path, where)
    if dataclasses.is_dataclass(tp):
        return _build_section(tp, value, path, where)
    if origin is tuple:
        return _convert_tuple(args, value, path, where)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            _type_error(path, "a mapping with string keys", value, where)
        return copy.deepcopy(dict(value))
    if tp is Any:
        return copy.deepcopy(value)
    return _convert_scalar(tp, value, path, where)


def _convert_tuple(args: tuple[Any, ...], value: Any, path: KeyPath, where: WhereFn) -> tuple[Any, ...]:
    if len(args) == 2 and args[1] is Ellipsis:
        # A scalar stands for a one-element list (upstream writes `policy.epoch: 72`).
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return tuple(_convert(args[0], item, (*path, str(i)), where) for i, item in enumerate(items))
    if not isinstance(value, (list, tuple)) or len(value) != len(args):
        _type_error(path, f"a list of {len(args)} {_describe(args[0], plural=True)}", value, where)
    return tuple(_convert(arg, item, (*path, str(i)), where) for i, (arg, item) in enumerate(zip(args, value)))


def _convert_scalar(tp: Any, value: Any, path: KeyPath, where: WhereFn) -> Any:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    if tp is str and isinstance(value, str):
        return value
    _type_error(path, _describe(tp), value, where)


def _describe(tp: Any, plural: bool = False) -> str:
    names = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings")}
    singular, many = names.get(tp, (f"a {getattr(tp, '__name__', tp)}", f"{getattr(tp, '__name__', tp)} values"))
    return many if plural else singular


def _type_error(path: KeyPath, expected: str, value: Any, where: WhereFn) -> typing.NoReturn:
    # The element index of a list is not a key users typed: report the list's own key.
    key_path = path
    while key_path and key_path[-1].isdigit():
        key_path = key_path[:-1]
    item = f" (item {path[len(key_path)]})" if len(path) > len(key_path) else ""
    raise ConfigError(f"`{dotted(key_path)}`{item} must be {expected}, got {value!r} (in {where(key_path)})")
