"""Synthetic shapes dataset: determinism, idempotence, concurrent generation, sparse ids and the class map."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from pathlib import Path

import pytest

from deim_ray.config.schema import DataConfig, SplitConfig
from deim_ray.data.coco import CocoDetection
from deim_ray.data.errors import DataError
from deim_ray.data.synthetic import MARKER, ensure_dataset, generate_shapes, synthetic_splits
from tests.data.helpers import SHAPES

SMALL = dataclasses.replace(SHAPES, num_train=6, num_val=3, image_size=64)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    generate_shapes(tmp_path / "a", SMALL)
    generate_shapes(tmp_path / "b", SMALL)
    generate_shapes(tmp_path / "c", dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert len(a) == 6 + 3 + 2 + 1  # images, two annotation files, the marker
    assert a["annotations/train.json"] != c["annotations/train.json"]


def test_layout_and_category_ids_are_sparse_not_zero_based(shapes):
    train, val = shapes
    assert Path(train.img_folder).name == "train" and Path(val.ann_file).name == "val.json"
    doc = json.loads(Path(train.ann_file).read_text())
    ids = sorted(c["id"] for c in doc["categories"])
    assert ids == [1, 3, 5]
    used = {a["category_id"] for a in doc["annotations"]}
    assert used <= set(ids) and len(used) > 1
    per_image = {}
    for a in doc["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert max(per_image.values()) > 1, "images should hold several objects"


def test_class_index_round_trip_and_labels_match_annotations(shapes):
    train, _ = shapes
    ds = CocoDetection(train.img_folder, train.ann_file)
    cats = ds.categories
    assert cats.num_classes == 3 and cats.ids == (1, 3, 5)
    assert [cats.to_index(i) for i in cats.ids] == [0, 1, 2]
    assert [cats.to_id(k) for k in range(3)] == [1, 3, 5]
    raw = {a["id"]: a["category_id"] for a in json.loads(Path(train.ann_file).read_text())["annotations"]}
    checked = 0
    for i in range(len(ds)):
        _, target = ds.load_item(i)
        for ann_id, label in zip(target["ann_id"].tolist(), target["labels"].tolist()):
            assert cats.to_id(label) == raw[ann_id]
            checked += 1
    assert checked == len(raw)


def test_second_call_is_a_no_op(tmp_path):
    generate_shapes(tmp_path, SMALL)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert generate_shapes(tmp_path, SMALL) == synthetic_splits(tmp_path)
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}


def _generate(root: str) -> str:
    return generate_shapes(root, SMALL)[0].ann_file


def test_concurrent_callers_produce_one_complete_dataset(tmp_path):
    reference = tmp_path / "reference"
    generate_shapes(reference, SMALL)
    shared = tmp_path / "shared"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_generate, [str(shared)] * 3)
    assert len(set(results)) == 1
    assert _files(shared) == _files(reference)


def test_interrupted_generation_is_redone(tmp_path):
    generate_shapes(tmp_path, SMALL)
    (tmp_path / MARKER).unlink()
    (tmp_path / "train" / "000000.jpg").write_bytes(b"partial")
    generate_shapes(tmp_path, SMALL)
    fresh = tmp_path.parent / "fresh"
    generate_shapes(fresh, SMALL)
    assert _files(tmp_path) == _files(fresh)


def test_existing_dataset_with_other_settings_is_an_error(tmp_path):
    generate_shapes(tmp_path, SMALL)
    with pytest.raises(DataError, match="other settings"):
        generate_shapes(tmp_path, dataclasses.replace(SMALL, num_train=7))


def test_ensure_dataset_generates_at_the_configured_layout(tmp_path):
    train, val = synthetic_splits(tmp_path / "shapes")
    data = DataConfig(train=train, val=val, synthetic=SMALL)
    assert ensure_dataset(data) is data
    assert (tmp_path / "shapes" / MARKER).exists()
    assert ensure_dataset(DataConfig(train=SplitConfig("x", "y"))).synthetic is None  # nothing to generate


def test_ensure_dataset_rejects_paths_off_the_layout(tmp_path):
    train, val = synthetic_splits(tmp_path)
    data = DataConfig(train=train, val=SplitConfig(str(tmp_path / "elsewhere"), val.ann_file), synthetic=SMALL)
    with pytest.raises(DataError, match="generated layout"):
        ensure_dataset(data)
    assert not (tmp_path / MARKER).exists()


def test_another_first_class_draws_other_shapes_and_keeps_old_datasets_valid(tmp_path):
    """A second set to fine-tune on: other classes (other shapes and colours); a set generated before the setting
    existed (first_class 0) keeps its fingerprint, so it is not refused as "made with other settings"."""
    second = dataclasses.replace(SHAPES, first_class=3)
    generate_shapes(tmp_path / "b", second)
    names = [c["name"] for c in json.loads((tmp_path / "b" / "annotations" / "train.json").read_text())["categories"]]
    assert names == ["diamond-3", "cross-4", "hexagon-5"]
    generate_shapes(tmp_path / "a", SHAPES)
    assert "first_class" not in (tmp_path / "a" / MARKER).read_text()
    assert '"first_class": 3' in (tmp_path / "b" / MARKER).read_text()
