"""config layer: YAML files to one plain, merged tree.

Implements the DEIM include/override semantics on plain dicts, before any typing:

- `__include__` is a list of paths (a single string is accepted too); `~` is expanded and a relative
  path resolves against the directory of the file that contains the include. Includes load depth-first
  in list order; later ones override earlier ones and the file's own keys override all its includes.
  Only `.yml`/`.yaml` files are included (another file's lines would end up quoted in error messages).
- Merging is recursive for dict over dict; anything else (lists, scalars, null) replaces the old value.
- `-u a.b.c=value` splits on the first `=`, parses the value as YAML and deep-merges `{a: {b: {c: value}}}`
  over the resolved tree; all overrides together are one layer over the files.
- A layer (a file over its includes, or the overrides over the files) that moves the schedule
  (`schedule.epochs`, ...) marks the derived schedule values of earlier layers `auto`
  (`schedule.mark_stale`), so they are derived again for the new schedule.

Every call builds fresh dicts (upstream's loader shares a mutable default accumulator between loads).
YAML is parsed safely: plain data types only, nesting at most `MAX_DEPTH` deep, and at most `MAX_NODES`
values once anchors/aliases are expanded (a "billion laughs" file is refused before it is built); a file
that is not UTF-8 is refused too. Each is a one-line ConfigError.
Alongside the tree we keep `origins`: for each key path, the file (or `-u` string) that last set it,
so later errors can name the right file.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from deim_ray.config.errors import ConfigError
from deim_ray.config.schedule import DRIVERS, mark_stale

KeyPath = tuple[str, ...]
Origins = dict[KeyPath, str]

INCLUDE_KEY = "__include__"
CONFIG_SUFFIXES = (".yml", ".yaml")
"""What an included file's name ends in: only config files are read as configs."""
MAX_DEPTH = 64
"""Deepest nesting of mappings/lists a config may have (real configs stay under 10)."""
MAX_NODES = 100_000
"""Most values (keys, scalars, mappings, lists) a config may hold with every alias expanded."""
_KEY_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `2e-3` as a float.

    PyYAML follows YAML 1.1, where an exponent without a dot is a string; DEIM users write
    learning rates that way, and a string `lr` would only fail later with a confusing type error.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as users should read it in messages: relative to the working directory when inside it."""
    absolute = os.path.abspath(os.fspath(path))
    relative = os.path.relpath(absolute, os.getcwd())
    return absolute if relative.startswith("..") else relative


def parse_yaml_text(text: str, where: str) -> Any:
    """Parse YAML text within the depth and size bounds; any problem is a ConfigError naming `where`."""
    try:
        _check_depth(text, where)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_expanded_size(node, where)
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"malformed YAML in {where}{line}: {problem}; fix the syntax at that line") from None


def _check_depth(text: str, where: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH from the event stream (composing such a file would recurse)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1
                raise ConfigError(f"{where} nests mappings/lists more than {MAX_DEPTH} deep (line {line}); "
                                  "a config is a few levels of keys")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_expanded_size(root: yaml.Node, where: str) -> None:
    """Refuse a document whose aliases expand to more than MAX_NODES values (counted per node, memoised), or
    that contains itself through an alias."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if sizes.get(id(node)) == 0:
            raise ConfigError(f"{where} contains itself through a YAML alias (line {node.start_mark.line + 1}); "
                              "remove the alias")
        if id(node) not in sizes:
            sizes[id(node)] = 0  # in progress
            children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                        else node.value if isinstance(node, yaml.SequenceNode) else [])
            sizes[id(node)] = 1 + sum(size(child) for child in children)
        return sizes[id(node)]

    if size(root) > MAX_NODES:
        raise ConfigError(f"{where} expands to more than {MAX_NODES} values through YAML anchors/aliases; "
                          "refusing it (write the values out, or use fewer aliases)")


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read one YAML file whose top level must be a mapping (an empty file is an empty mapping)."""
    where = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {where}; check the path (working dir: {os.getcwd()})") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {where} is a directory; pass a .yml file") from None
    data = parse_yaml_text(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of keys at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `update` into `base` in place: dict over dict recurses, anything else replaces; returns `base`."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            # Copy so YAML anchors or a caller's objects are never shared with the tree.
            base[key] = copy.deepcopy(value)
    return base


def key_paths(tree: Mapping[str, Any], prefix: KeyPath = ()) -> Iterable[KeyPath]:
    """Every key path in a nested mapping, parents before children."""
    for key, value in tree.items():
        path = (*prefix, str(key))
        yield path
        if isinstance(value, Mapping):
            yield from key_paths(value, path)


def resolve_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Origins]:
    """Load `path` with its `__include__` chain resolved; returns (tree, origins)."""
    return _resolve(Path(os.path.expanduser(os.fspath(path))), ())


def _resolve(path: Path, stack: tuple[str, ...]) -> tuple[dict[str, Any], Origins]:
    real = os.path.realpath(path)
    if real in stack:
        chain = " -> ".join(display_path(p) for p in (*stack[stack.index(real):], real))
        raise ConfigError(f"include cycle: {chain}; remove one of these __include__ entries")
    own = read_yaml_mapping(path)
    includes = _include_list(own.pop(INCLUDE_KEY, None), path)
    tree: dict[str, Any] = {}
    origins: Origins = {}
    for include in includes:
        sub_tree, sub_origins = _resolve(include, (*stack, real))
        deep_merge(tree, sub_tree)
        origins.update(sub_origins)
    where = display_path(path)
    _mark_stale(tree, origins, own, where)
    deep_merge(tree, own)
    origins.update({key_path: where for key_path in key_paths(own)})
    return tree, origins


def _mark_stale(tree: dict[str, Any], origins: Origins, layer: Mapping[str, Any], label: str) -> None:
    for key in mark_stale(tree, layer):
        path = tuple(key.split("."))
        origins[path] = f"re-derived: {label} moves the schedule (was set in {origin_of(origins, path, '?')})"


def _include_list(value: Any, path: Path) -> list[Path]:
    where = display_path(path)
    if value is None:
        return []
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"{INCLUDE_KEY} in {where} must be a list of file paths, got {value!r}")
    resolved = []
    for entry in entries:
        target = Path(os.path.expanduser(entry))
        if not target.is_absolute():
            target = path.parent / target
        if target.suffix.lower() not in CONFIG_SUFFIXES:
            # a file that is not a config (a key file, /etc/shadow) would be parsed and its lines quoted back
            raise ConfigError(f"{INCLUDE_KEY} entry {entry!r} in {where} is not a YAML config (its name must end in "
                              f"{' or '.join(CONFIG_SUFFIXES)}); include only config files")
        if not target.is_file():
            raise ConfigError(
                f"{INCLUDE_KEY} entry {entry!r} in {where} not found (looked for {display_path(target)}); "
                f"relative include paths start from the directory of {where}"
            )
        resolved.append(target)
    return resolved


def parse_override(text: str) -> tuple[KeyPath, Any]:
    """Parse one `-u key.sub=value` string into (key path, typed value)."""
    key, sep, raw_value = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"bad override {text!r}: expected key=value, e.g. -u optimizer.lr=0.001")
    path = tuple(key.split("."))
    if not all(_KEY_SEGMENT.match(segment) for segment in path) or INCLUDE_KEY in path:
        raise ConfigError(f"bad override {text!r}: the key must be dotted names like schedule.stop_epoch")
    return path, parse_yaml_text(raw_value, f"override {text!r}")


def apply_overrides(tree: dict[str, Any], origins: Origins, overrides: Sequence[str]) -> None:
    """Deep-merge each `-u` override over `tree` (in place), recording its origin."""
    parsed = [(text, *parse_override(text)) for text in overrides]
    layer: dict[str, Any] = {}
    for _text, path, value in parsed:
        deep_merge(layer, _nest(path, value))
    if parsed:  # name the overrides that move the schedule, not every override
        movers = [text for text, path, _ in parsed if path in DRIVERS] or [text for text, _, _ in parsed]
        _mark_stale(tree, origins, layer, " ".join(f"-u {text}" for text in movers))
    for text, path, value in parsed:
        deep_merge(tree, _nest(path, value))
        label = f"-u {text}"
        origins.update({path[:i]: label for i in range(1, len(path) + 1)})
        if isinstance(value, Mapping):
            origins.update({(*path, *sub): label for sub in key_paths(value)})


def _nest(path: KeyPath, value: Any) -> dict[str, Any]:
    nested: Any = value
    for segment in reversed(path):
        nested = {segment: nested}
    return nested


def origin_of(origins: Mapping[KeyPath, str], path: KeyPath, default: str) -> str:
    """The origin recorded for `path` or its nearest recorded ancestor."""
    for cut in range(len(path), 0, -1):
        if path[:cut] in origins:
            return origins[path[:cut]]
    return default
