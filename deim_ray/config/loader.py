"""config layer: the one entry point from YAML files to a frozen `Config`, and its identity.

`load_config(path, overrides)` = resolve `__include__` chains, apply `-u` overrides, convert upstream DEIM
files automatically, derive the schedule values a config leaves to the rule (`schedule.derive_schedule`),
then strictly build the dataclasses of `schema.py`. Cross-field checks live in `validate.py` (they need the
worker count).

For upstream-style files, an override into a deim_ray section (`data.*`, `schedule.*`, `model.*`,
`lr_scheduler.*`, ...) applies after conversion; every other override uses upstream key names and applies before
it, so `-u epoches=100` works on upstream files as it does upstream.

Identity helpers: `config_sha256` (canonical JSON without `source`), `dump_yaml` (a resolved file that
loads back to an equal Config) and `diff_configs` (which dotted keys differ).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from deim_ray.config.errors import ConfigError
from deim_ray.config.schedule import derive_schedule, mark_stale
from deim_ray.config.schema import Config
from deim_ray.config.typed import build_config, config_to_dict
from deim_ray.config.upstream import (
    OWN_SECTIONS,
    check_not_mixed,
    convert_upstream_tree,
    is_upstream_config,
    upstream_origin,
)
from deim_ray.config.yaml_tree import (
    Origins,
    apply_overrides,
    deep_merge,
    display_path,
    origin_of,
    parse_override,
    resolve_file,
)

__all__ = [
    "ConfigError",
    "config_from_dict",
    "config_sha256",
    "config_to_dict",
    "diff_configs",
    "dump_yaml",
    "load_config",
    "load_config_explained",
    "override_config",
]

log = logging.getLogger(__name__)


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (deim_ray or upstream DEIM format) with `-u key.sub=value` overrides applied."""
    return load_config_explained(path, overrides)[0]


def load_config_explained(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> tuple[Config, list[str]]:
    """`load_config`, plus one line per schedule value the rule derived: what, from what, and why (a value a
    file set for another schedule is re-derived when a later file or `-u` moves the schedule)."""
    where = display_path(path)
    tree, origins = resolve_file(path)
    if is_upstream_config(tree):
        check_not_mixed(tree, where)
        tree, origins = _convert(tree, origins, overrides, where)
    else:
        apply_overrides(tree, origins, overrides)
    notes = [_explain(note, origins) for note in derive_schedule(tree)]
    return build_config(tree, lambda p: origin_of(origins, p, where), source=os.fspath(path)), notes


def _explain(note: str, origins: Origins) -> str:
    origin = origins.get(tuple(note.split(" ", 1)[0].split(".")), "")
    return f"{note}; {origin}" if origin.startswith("re-derived") else note


def _convert(
    tree: dict[str, Any], origins: Origins, overrides: Sequence[str], where: str
) -> tuple[dict[str, Any], Origins]:
    late = [text for text in overrides if _is_own_override(text)]
    apply_overrides(tree, origins, [text for text in overrides if text not in late])
    conversion = convert_upstream_tree(tree)
    if conversion.unhonoured:
        log.warning("%s is an upstream DEIM config; %d key(s) not honoured: %s",
                    where, len(conversion.unhonoured), " | ".join(conversion.unhonoured))
    converted_origins: Origins = {
        path: upstream_origin(conversion, origins, path, where) for path in conversion.sources
    }
    apply_overrides(conversion.tree, converted_origins, late)
    return conversion.tree, converted_origins


def _is_own_override(text: str) -> bool:
    path, _ = parse_override(text)
    return len(path) > 1 and (path[0] in OWN_SECTIONS or path[0] in ("model", "lr_scheduler"))


def config_from_dict(tree: Mapping[str, Any], source: str = "") -> Config:
    """Build a `Config` from a plain tree in deim_ray's format (e.g. a stored `config.yaml` or Tune's search)."""
    label = source or "<dict>"
    tree = copy.deepcopy(dict(tree))
    derive_schedule(tree)
    return build_config(tree, lambda _path: label, source=source)


def override_config(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A copy of `cfg` with dotted-key values deep-merged over it, e.g. {"optimizer.lr": 1e-3}. Overrides
    that move the schedule (e.g. {"schedule.epochs": 24}) derive its other values again, as `-u` does."""
    tree = config_to_dict(cfg)
    source = tree.pop("source")
    layer: dict[str, Any] = {}
    for key, value in overrides.items():
        nested: Any = value
        for segment in reversed(str(key).split(".")):
            nested = {segment: nested}
        deep_merge(layer, nested)
    mark_stale(tree, layer)
    deep_merge(tree, layer)
    derive_schedule(tree)
    return build_config(tree, lambda _path: "overrides", source=source)


def _canonical(cfg: Config) -> dict[str, Any]:
    tree = config_to_dict(cfg)
    tree.pop("source", None)
    return tree


def config_sha256(cfg: Config) -> str:
    """SHA-256 of the config's canonical JSON (sorted keys, no whitespace), ignoring `source`."""
    text = json.dumps(_canonical(cfg), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dump_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML in deim_ray's format; loading it gives back an equal Config."""
    header = f"# deim_ray config, resolved from {cfg.source}\n" if cfg.source else ""
    return header + yaml.safe_dump(_canonical(cfg), sort_keys=False, default_flow_style=None, width=120)


def diff_configs(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (`source` ignored), sorted."""
    left, right = _flatten(_canonical(a)), _flatten(_canonical(b))
    absent = object()
    return sorted(key for key in left.keys() | right.keys() if left.get(key, absent) != right.get(key, absent))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
