"""Reduced-scale JPEG decoding: the reduction libjpeg is asked for, boxes and EXIF orientation under it, the
bounded pixel difference against full-size decoding, and the sample plans that choose the decode size."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from deim_ray.data import gates
from deim_ray.data.coco import CocoDetection
from deim_ray.data.synthetic import generate_shapes
from deim_ray.data.transforms import build_train_transforms, build_val_transforms
from tests.data.helpers import SHAPES, make_cfg

TARGET = (64, 64)
"""make_cfg's data.image_size (width, height)."""


@pytest.fixture(scope="module", params=[128, 200, 520])
def large(request, tmp_path_factory):
    """Shapes JPEGs of `side` pixels: exactly twice the target, between two reductions, and eight times it."""
    cfg = dataclasses.replace(SHAPES, num_train=4, num_val=1, image_size=request.param)
    return generate_shapes(tmp_path_factory.mktemp(f"large{request.param}"), cfg)


def _reduction(side: int, target: int) -> int:
    return next(r for r in (8, 4, 2, 1) if side // target >= r)


def test_reduced_decode_keeps_the_target_size_and_divides_the_boxes(large):
    ds = CocoDetection(large[0].img_folder, large[0].ann_file)
    side = ds.records[0].width
    for i in range(len(ds)):
        full_image, full = ds.load_item(i)
        image, target = ds.load_item(i, TARGET)
        r = _reduction(side, TARGET[0])
        assert image.size == (math.ceil(side / r),) * 2 and min(image.size) >= TARGET[0]
        assert target["boxes"].canvas_size == (image.height, image.width)
        assert torch.allclose(target["boxes"] * r, full["boxes"])
        assert torch.allclose(target["area"] * r * r, full["area"])
        assert target["orig_size"].tolist() == full["orig_size"].tolist() == [side, side]


def test_reduced_decode_changes_the_final_image_by_a_few_levels(large):
    """Evaluation / stage-2 output (resize to 64x64) from the reduced decode against a full-size decode."""
    cfg = make_cfg(large)
    ds = CocoDetection(large[0].img_folder, large[0].ann_file, build_val_transforms(cfg, scale=False))
    full_pipeline = build_val_transforms(cfg, scale=False)
    assert ds.load_item(0, ds.transforms.plan(None, 0).decode_size)[0].width < ds.records[0].width
    diffs = []
    for i in range(len(ds)):
        image, target = ds[i]
        expected, expected_target = full_pipeline(*ds.load_item(i))
        assert image.shape == expected.shape == (3, *TARGET)
        assert torch.allclose(target["boxes"], expected_target["boxes"], atol=1e-6)
        diffs.append((image.to(torch.int16) - expected.to(torch.int16)).abs())
    diff = torch.stack(diffs).float()
    # measured here: mean 3.7 levels (max 74, at shape edges) for 128 px sources, where the 1/2 decode is the
    # final image and libjpeg's sharper DCT scaling replaces the bilinear shrink; less where a resize follows
    assert diff.mean() < 4.5 and diff.max() <= 96


def _rotated_set(tmp_path) -> CocoDetection:
    upright = Image.new("RGB", (120, 300), "black")
    upright.paste((255, 255, 255), (20, 200, 80, 260))  # the object, as a viewer shows the image
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "a.jpg", exif=exif, quality=95)
    (tmp_path / "a.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 200, 60, 60]}]}))
    return CocoDetection(tmp_path, tmp_path / "a.json")


def test_reduction_is_chosen_on_the_upright_sides_and_keeps_exif_orientation(tmp_path):
    ds = _rotated_set(tmp_path)
    # upright 120 x 300 allows 1/2 for (60, 75) wide x high; the stored 300 x 120 would allow none
    image, target = ds.load_item(0, (60, 75))
    assert image.size == (60, 150)
    x0, y0, x1, y1 = (int(v) for v in target["boxes"][0].tolist())
    assert (x0, y0, x1, y1) == (10, 100, 40, 130)
    pixels = np.asarray(image)
    assert pixels[y0 + 2:y1 - 2, x0 + 2:x1 - 2].mean() > 200 and pixels.mean() < 60


def test_plans_ask_for_the_size_their_resize_needs(shapes):
    cfg = make_cfg(shapes)
    tf = build_train_transforms(cfg)
    sizes = {}
    torch.manual_seed(0)
    for epoch in (2, 6, 10):
        for _ in range(60):
            plan = tf.plan(epoch, num_boxes=2)
            names = [name for name, _ in plan.steps]
            kind = gates.MOSAIC if gates.MOSAIC in names else gates.IOU_CROP if gates.IOU_CROP in names else "other"
            sizes.setdefault(kind, set()).add(plan.decode_size)
    crop = math.ceil(64 / 0.3)
    assert sizes == {gates.MOSAIC: {(48, 48)}, gates.IOU_CROP: {(crop, crop)}, "other": {TARGET}}
    assert build_val_transforms(cfg).plan(None, 0).decode_size == TARGET


@pytest.mark.parametrize("epoch", [2, 6, 10])
def test_drawing_ops_before_decoding_draws_the_same_ops(shapes, epoch):
    """dataset[(i, epoch)] (ops drawn, then a reduced decode) against the ops drawn after a full decode."""
    cfg = make_cfg(shapes)
    ds = CocoDetection(shapes[0].img_folder, shapes[0].ann_file, build_train_transforms(cfg, scale=False))
    direct = build_train_transforms(cfg, scale=False)
    for i in range(12):
        torch.manual_seed(i)
        image, target = ds[(i, epoch)]
        torch.manual_seed(i)
        expected, expected_target = direct(*ds.load_item(i), epoch=epoch, dataset=ds)
        assert target["ops"] == expected_target["ops"]
        if gates.MOSAIC not in target["ops"]:  # 96 px sources: only Mosaic tiles (48 px) decode reduced
            assert torch.equal(image, expected) and torch.equal(target["boxes"], expected_target["boxes"])
