"""`__include__` resolution and `-u` overrides on plain trees (config/yaml_tree.py)."""

from __future__ import annotations

import os

import pytest

from deim_ray.config.errors import ConfigError
from deim_ray.config.yaml_tree import apply_overrides, parse_override, resolve_file

from .conftest import one_line


def test_later_include_wins_and_own_keys_win_over_includes(write):
    write("b.yml", "x: b\ny: b\nz: b\n")
    write("c.yml", "y: c\nz: c\n")
    a = write("a.yml", "__include__: [b.yml, c.yml]\nz: a\n")
    tree, _ = resolve_file(a)
    assert tree == {"x": "b", "y": "c", "z": "a"}


def test_dicts_merge_recursively_lists_and_null_replace(write):
    write("b.yml", "s: {p: 1, q: 1, deep: {u: 1, v: 1}}\nl: [1, 2, 3]\nn: {k: 1}\n")
    a = write("a.yml", "__include__: [b.yml]\ns: {q: 2, deep: {v: 2}}\nl: [9]\nn: ~\n")
    tree, _ = resolve_file(a)
    assert tree == {"s": {"p": 1, "q": 2, "deep": {"u": 1, "v": 2}}, "l": [9], "n": None}


def test_includes_resolve_depth_first_in_order(write):
    write("d.yml", "k: d\nfrom_d: 1\nm: d\n")
    write("b.yml", "__include__: [d.yml]\nm: b\n")
    write("c.yml", "k: c\n")
    a = write("a.yml", "__include__: [b.yml, c.yml]\n")
    tree, origins = resolve_file(a)
    assert tree == {"k": "c", "from_d": 1, "m": "b"}
    assert origins[("k",)].endswith("c.yml") and origins[("from_d",)].endswith("d.yml")


def test_diamond_includes_are_not_a_cycle(write):
    write("d.yml", "k: d\n")
    write("b.yml", "__include__: [d.yml]\n")
    write("c.yml", "__include__: [d.yml]\n")
    tree, _ = resolve_file(write("a.yml", "__include__: [b.yml, c.yml]\n"))
    assert tree == {"k": "d"}


def test_include_paths_are_relative_to_the_including_file(write, tmp_path, monkeypatch):
    write("configs/base/common.yml", "k: base\n")
    write("configs/sub/inner.yml", "__include__: [../base/common.yml]\n")
    top = write("configs/top.yml", "__include__: sub/inner.yml\nown: 1\n")  # a single string is accepted
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tree, _ = resolve_file(os.path.relpath(top, elsewhere))
    assert tree == {"k": "base", "own": 1}


def test_include_expands_home(write, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write("home/shared.yml", "k: home\n")
    tree, _ = resolve_file(write("a.yml", "__include__: ['~/shared.yml']\n"))
    assert tree == {"k": "home"}


def test_each_resolution_starts_from_a_fresh_tree(write):
    write("b.yml", "s: {p: 1}\n")
    first, _ = resolve_file(write("a.yml", "__include__: [b.yml]\ns: {q: 1}\n"))
    first["s"]["leak"] = True
    second, _ = resolve_file(write("c.yml", "__include__: [b.yml]\n"))
    assert second == {"s": {"p": 1}}


def test_anchor_aliases_are_not_shared_after_merge(write):
    write("b.yml", "size: &s [1, 2]\nother: *s\n")
    tree, _ = resolve_file(write("a.yml", "__include__: [b.yml]\n"))
    tree["size"].append(3)
    assert tree["other"] == [1, 2]


def test_missing_include_names_file_and_entry(write):
    a = write("dir/a.yml", "__include__: [../nope.yml]\n")
    with pytest.raises(ConfigError) as err:
        resolve_file(a)
    message = str(err.value)
    assert "'../nope.yml'" in message and "a.yml" in message and "nope.yml" in message and one_line(message)


def test_include_cycle_is_an_error(write):
    write("b.yml", "__include__: [a.yml]\n")
    a = write("a.yml", "__include__: [b.yml]\n")
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.yml -> .*b\.yml -> .*a\.yml") as err:
        resolve_file(a)
    assert one_line(str(err.value))


def test_self_include_is_a_cycle(write):
    with pytest.raises(ConfigError, match="include cycle"):
        resolve_file(write("a.yml", "__include__: [a.yml]\n"))


def test_malformed_yaml_reports_file_and_line(write):
    bad = write("bad.yml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError) as err:
        resolve_file(bad)
    message = str(err.value)
    assert "bad.yml" in message and "line 3" in message and one_line(message)


def test_malformed_included_yaml_names_the_included_file(write):
    write("inc.yml", "a:\n  - 1\n b: 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*inc\.yml line \d"):
        resolve_file(write("a.yml", "__include__: [inc.yml]\n"))


def test_top_level_must_be_a_mapping(write):
    with pytest.raises(ConfigError, match="mapping of keys at the top level, got list"):
        resolve_file(write("a.yml", "- 1\n- 2\n"))


def test_empty_file_is_an_empty_mapping(write):
    assert resolve_file(write("a.yml", "# nothing\n")) == ({}, {})


def test_include_must_be_a_list_of_paths(write):
    with pytest.raises(ConfigError, match="must be a list of file paths"):
        resolve_file(write("a.yml", "__include__: {a: 1}\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yml") as err:
        resolve_file(tmp_path / "missing.yml")
    assert one_line(str(err.value))


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("train.use_amp=True", ("train", "use_amp"), True),
        ("data.total_batch_size=16", ("data", "total_batch_size"), 16),
        ("augment.mixup_epochs=[4,20]", ("augment", "mixup_epochs"), [4, 20]),
        ("schedule.matcher_change_epoch=~", ("schedule", "matcher_change_epoch"), None),
        ("optimizer.lr=2e-3", ("optimizer", "lr"), 0.002),
        ("optimizer.lr=0.0005", ("optimizer", "lr"), 0.0005),
        ("model.variant=n", ("model", "variant"), "n"),
        ("data.train.img_folder=/x/a=b", ("data", "train", "img_folder"), "/x/a=b"),
        ("model.extra={d_model: 96}", ("model", "extra"), {"d_model": 96}),
    ],
)
def test_override_values_are_parsed_as_yaml(text, path, value):
    assert parse_override(text) == (path, value)
    assert type(parse_override(text)[1]) is type(value)


@pytest.mark.parametrize("text", ["novalue", "=5", "a..b=1", "a.=1", ".a=1", "a b=1", "__include__=[x.yml]"])
def test_bad_override_strings(text):
    with pytest.raises(ConfigError, match="bad override") as err:
        parse_override(text)
    assert one_line(str(err.value))


def test_bad_override_value():
    with pytest.raises(ConfigError, match=r"malformed YAML in override 'a=\[1,'"):
        parse_override("a=[1,")


def test_overrides_deep_merge_over_the_resolved_tree():
    tree = {"data": {"train": {"img_folder": "a", "ann_file": "b"}}, "l": [1, 2]}
    origins = {}
    apply_overrides(tree, origins, ["data.train.img_folder=c", "l=[3]", "data.new.x=1"])
    assert tree == {"data": {"train": {"img_folder": "c", "ann_file": "b"}, "new": {"x": 1}}, "l": [3]}
    assert origins[("data", "train", "img_folder")] == "-u data.train.img_folder=c"
