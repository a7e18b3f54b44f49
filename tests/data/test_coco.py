"""CocoDetection on hand-written COCO files: box clean-up, skipped corrupt images, evaluation GT, and errors."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deim_ray.data.coco import CategoryMap, CocoDetection
from deim_ray.data.errors import DataError

CATEGORIES = [{"id": 17, "name": "dog"}, {"id": 4, "name": "cat"}, {"id": 90, "name": "bird"}]


def _image_bytes(w: int, h: int, fmt: str) -> bytes:
    rng = np.random.default_rng(w * h)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _write(root: Path, images: list[dict], annotations: list[dict], categories=CATEGORIES) -> tuple[Path, Path]:
    folder = root / "img"
    folder.mkdir(parents=True, exist_ok=True)
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return folder, ann


@pytest.fixture
def messy(tmp_path) -> tuple[Path, Path]:
    """Non-square JPEG/PNG images, a crowd box, boxes off the image, a degenerate box, an image without boxes,
    and unusable files (truncated, empty, missing, not an image) next to a JPEG with bytes after its end."""
    folder = tmp_path / "img"
    folder.mkdir()
    good = _image_bytes(50, 30, "JPEG")
    (folder / "a.jpg").write_bytes(good)
    (folder / "b.png").write_bytes(_image_bytes(40, 60, "PNG"))
    (folder / "empty_ok.jpg").write_bytes(good)
    (folder / "trailing.jpg").write_bytes(good + b"\x00" * 16)
    whole = _image_bytes(64, 64, "JPEG")
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # header intact, data cut
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"not an image at all")
    names = ["a.jpg", "b.png", "empty_ok.jpg", "trailing.jpg", "truncated.jpg", "zero.jpg", "text.jpg", "gone.jpg"]
    images = [{"id": 100 + i, "file_name": n, "width": 0, "height": 0} for i, n in enumerate(names)]
    for im, (w, h) in zip(images, [(50, 30), (40, 60), (50, 30), (50, 30)]):
        im.update(width=w, height=h)
    anns = [
        {"id": 1, "image_id": 100, "category_id": 17, "bbox": [5, 5, 10, 10], "area": 80.0, "iscrowd": 0},
        {"id": 2, "image_id": 100, "category_id": 4, "bbox": [40, 20, 30, 30], "area": 100.0, "iscrowd": 0},
        {"id": 3, "image_id": 100, "category_id": 90, "bbox": [0, 0, 20, 20], "area": 400.0, "iscrowd": 1},
        {"id": 4, "image_id": 100, "category_id": 17, "bbox": [60, 5, 10, 10], "area": 100.0, "iscrowd": 0},
        {"id": 5, "image_id": 101, "category_id": 90, "bbox": [-5, 10, 20, 0.0], "area": 0.0, "iscrowd": 0},
        {"id": 6, "image_id": 101, "category_id": 90, "bbox": [-5, 10, 20, 30], "area": 450.0, "iscrowd": 0},
        {"id": 7, "image_id": 103, "category_id": 4, "bbox": [1, 2, 3, 4], "area": 12.0, "iscrowd": 0},
        {"id": 8, "image_id": 104, "category_id": 4, "bbox": [1, 2, 3, 4], "area": 12.0, "iscrowd": 0},
    ]
    return _write(tmp_path, images, anns)


def test_category_map_sorts_ids_and_round_trips():
    cats = CategoryMap.from_coco(CATEGORIES, "x.json")
    assert cats.ids == (4, 17, 90) and cats.names == ("cat", "dog", "bird") and cats.num_classes == 3
    assert [cats.to_id(cats.to_index(i)) for i in (90, 4, 17)] == [90, 4, 17]
    with pytest.raises(DataError, match="category id 5"):
        cats.to_index(5)
    with pytest.raises(DataError, match="class index 3"):
        cats.to_id(3)


def test_loading_cleans_boxes_keeps_empty_images_and_skips_bad_files(messy, caplog):
    folder, ann = messy
    with caplog.at_level("WARNING", logger="deim_ray.data"):
        ds = CocoDetection(folder, ann)
    assert ds.image_ids == [100, 101, 102, 103]
    assert {k: sorted(v) for k, v in ds.report.skipped_images.items()} == {
        "missing": ["gone.jpg"], "truncated": ["truncated.jpg"], "unreadable": ["text.jpg", "zero.jpg"]}
    assert (ds.report.crowd, ds.report.degenerate) == (1, 2)  # ann 3; anns 4 (off image) and 5 (zero height)
    assert "skipped 4 image file(s)" in caplog.text

    image, t = ds.load_item(0)
    assert image.size == (50, 30) and t["orig_size"].tolist() == [50, 30] and int(t["image_id"]) == 100
    assert t["boxes"].canvas_size == (30, 50)
    assert t["boxes"].tolist() == [[5, 5, 15, 15], [40, 20, 50, 30]]  # second box clamped to the image
    assert t["labels"].tolist() == [1, 0] and t["ann_id"].tolist() == [1, 2]  # dog=17 -> 1, cat=4 -> 0
    assert t["area"].tolist() == [100.0, 100.0] and t["iscrowd"].tolist() == [0, 0]
    assert ds.load_item(1)[1]["boxes"].tolist() == [[0, 10, 15, 40]]
    empty = ds.load_item(2)[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64


def test_coco_gt_covers_served_images_with_crowd_annotations(messy):
    ds = CocoDetection(*messy)
    gt = ds.coco_gt
    assert sorted(gt.getImgIds()) == [100, 101, 102, 103]
    assert sorted(gt.getAnnIds()) == [1, 2, 3, 4, 5, 6, 7]  # crowd kept; ann 8 is on a skipped image
    assert gt.anns[3]["iscrowd"] == 1 and gt.anns[2]["bbox"] == [40, 20, 30, 30]  # raw, unclamped
    assert sorted(gt.getCatIds()) == [4, 17, 90]


def test_index_with_epoch_reaches_the_transforms_and_the_dataset_pickles(messy):
    seen = []

    def record(image, target, *, epoch, dataset):
        seen.append((epoch, dataset))
        return image, target

    ds = CocoDetection(*messy, transforms=record)
    _, target = ds[(1, 7)]
    assert seen == [(7, ds)] and target["epoch"] == 7
    _, target = ds[0]
    assert seen[-1][0] is None and target["epoch"] is None
    assert ds.coco_gt is not None
    clone = pickle.loads(pickle.dumps(CocoDetection(*messy)))
    assert clone.image_ids == ds.image_ids and sorted(clone.coco_gt.getImgIds()) == ds.image_ids


def test_file_corrupted_after_loading_names_the_file(messy):
    folder, ann = messy
    ds = CocoDetection(folder, ann)
    (folder / "a.jpg").write_bytes(b"\xff\xd8garbage\xff\xd9")
    with pytest.raises(DataError, match="a.jpg could not be decoded"):
        ds.load_item(0)


def _good_image(root: Path) -> dict:
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "img" / "x.jpg").write_bytes(_image_bytes(20, 20, "JPEG"))
    return {"id": 1, "file_name": "x.jpg", "width": 20, "height": 20}


ERROR_CASES = {
    "unknown category": ([{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 5, 5]}], CATEGORIES,
                         "category_id 5, which is not in `categories`"),
    "unknown image": ([{"id": 1, "image_id": 9, "category_id": 4, "bbox": [0, 0, 5, 5]}], CATEGORIES,
                      "refers to image_id 9"),
    "bad bbox": ([{"id": 1, "image_id": 1, "category_id": 4, "bbox": [0, 0]}], CATEGORIES, "4-number `bbox`"),
    "duplicate category": ([], CATEGORIES + [{"id": 4, "name": "again"}], "repeats a category id"),
    "no categories": ([], [], "lists no categories"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_annotations_raise_one_line_errors(tmp_path, case):
    anns, cats, message = ERROR_CASES[case]
    folder, ann = _write(tmp_path, [_good_image(tmp_path)], anns, cats)
    with pytest.raises(DataError, match=message) as err:
        CocoDetection(folder, ann)
    assert "\n" not in str(err.value) and str(ann) in str(err.value)


def test_missing_inputs_and_unusable_files_raise(tmp_path):
    folder, ann = _write(tmp_path, [_good_image(tmp_path)], [])
    with pytest.raises(DataError, match="image folder .* does not exist"):
        CocoDetection(tmp_path / "nope", ann)
    with pytest.raises(DataError, match="annotation file .*nope.json does not exist"):
        CocoDetection(folder, tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DataError, match="broken.json is not valid JSON"):
        CocoDetection(folder, tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="not COCO detection format"):
        CocoDetection(folder, tmp_path / "list.json")
    _, bad_image = _write(tmp_path / "b", [{"id": "1", "file_name": "x.jpg"}], [])
    with pytest.raises(DataError, match="image without an integer `id`"):
        CocoDetection(folder, bad_image)
    _, no_images = _write(tmp_path / "n", [], [])
    with pytest.raises(DataError, match="lists no images"):
        CocoDetection(folder, no_images)
    (folder / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no usable image"):
        CocoDetection(folder, ann)
