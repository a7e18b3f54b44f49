"""Per-sample pipelines on the generated dataset: per-box alignment after every op, Mosaic tiles and cache,
the policy phases per sample, and clean stage-2 / val output."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from deim_ray.config.schema import MosaicConfig
from deim_ray.data.coco import PER_BOX_FIELDS, CocoDetection
from deim_ray.data.errors import DataError
from deim_ray.data.mosaic import Mosaic
from deim_ray.data.transforms import IMAGENET_MEAN, build_train_transforms, build_val_transforms
from tests.data.helpers import make_cfg


@pytest.fixture(scope="module")
def raw(shapes):
    return CocoDetection(shapes[0].img_folder, shapes[0].ann_file)


def _label_of(ds: CocoDetection) -> dict[int, int]:
    return {int(a): int(lab) for r in ds.records for a, lab in zip(r.ann_ids, r.labels)}


def _check_aligned(name: str, image, target: dict, label_of: dict[int, int]) -> None:
    n = len(target["boxes"])
    assert all(len(target[k]) == n for k in PER_BOX_FIELDS), name
    assert [label_of[a] for a in target["ann_id"].tolist()] == target["labels"].tolist(), name
    assert target["iscrowd"].sum() == 0
    boxes = target["boxes"]
    if isinstance(boxes, tv_tensors.BoundingBoxes):
        h, w = (image.height, image.width) if hasattr(image, "height") else image.shape[-2:]
        assert boxes.canvas_size == (h, w), name
        assert torch.allclose(target["area"], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])), name
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all(), name
    else:  # final normalized cxcywh
        assert boxes.dtype == torch.float32 and ((boxes >= 0) & (boxes <= 1)).all(), name


@pytest.mark.parametrize("use_cache", [True, False])
def test_per_box_fields_stay_aligned_after_every_op(shapes, raw, use_cache):
    torch.manual_seed(0)
    cfg = make_cfg(shapes, augment={"mosaic": MosaicConfig(output_size=48, use_cache=use_cache, max_cached_images=6)})
    tf = build_train_transforms(cfg)
    label_of = _label_of(raw)
    seen_ops, dropped = set(), 0
    for i in range(60):
        epoch = (2, 3, 5, 6, 0, 10)[i % 6]  # mosaic phase twice, no-mosaic phase twice, before-policy, stage 2
        trace = []
        image, target = tf(*raw.load_item(i % len(raw)), epoch=epoch, dataset=raw, trace=trace)
        for name, im, t in trace:
            _check_aligned(name, im, t, label_of)
            seen_ops.add(name)
        dropped += len(raw.records[i % len(raw)].labels) - len(target["labels"])
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert {"Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop", "RandomHorizontalFlip",
            "SanitizeBoundingBoxes", "Resize"} <= seen_ops
    assert dropped != 0, "crops should have removed some boxes (and their fields) somewhere"


def test_mosaic_pastes_four_tiles_and_caps_its_cache(raw):
    torch.manual_seed(1)
    mosaic = Mosaic(MosaicConfig(output_size=48, max_cached_images=5, random_pop=True, rotation_range=0,
                                 translation_range=(0, 0), scaling_range=(1, 1)))
    image_of = {int(a): r.image_id for r in raw.records for a in r.ann_ids}
    sources = set()
    for i in range(12):
        image, target = raw.load_item(i)
        out, t = mosaic(image, target, raw)
        assert out.size == (96, 96)  # four 48x48 tiles (96 px images resized to shorter side 48)
        assert len(mosaic.cache) == min(i + 1, 5)
        assert int(mosaic.cache[-1][1]["image_id"]) == raw.records[i].image_id  # the newest is never evicted
        assert torch.equal(t["image_id"], target["image_id"])
        own = int(target["image_id"])
        assert {image_of[a] for a in t["ann_id"][:len(target["labels"])].tolist()} <= {own}
        tiles = {image_of[a] for a in t["ann_id"].tolist()}
        assert len(tiles) > 1, "even a cold cache must not tile one image four times"
        sources |= tiles
    assert len(sources) > 5, "partners should come from several cached images"


def test_mosaic_cache_without_random_pop_keeps_the_newest_in_order(raw):
    mosaic = Mosaic(MosaicConfig(output_size=48, max_cached_images=3, random_pop=False))
    for i in range(7):
        mosaic(*raw.load_item(i), raw)
    assert [int(t["image_id"]) for _, t in mosaic.cache] == [r.image_id for r in raw.records[4:7]]


def test_mosaic_without_cache_draws_dataset_items(raw):
    torch.manual_seed(2)
    mosaic = Mosaic(MosaicConfig(output_size=48, use_cache=False))
    image_of = {int(a): r.image_id for r in raw.records for a in r.ann_ids}
    _, t = mosaic(*raw.load_item(0), raw)
    assert mosaic.cache == [] and len({image_of[a] for a in t["ann_id"].tolist()}) > 1


@pytest.mark.parametrize("epoch, expect_some, never", [
    (1, set(), {"Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"}),  # before e0=2
    (2, {"Mosaic", "RandomZoomOut", "RandomIoUCrop"}, set()),  # first mosaic-phase epoch
    (4, {"Mosaic", "RandomZoomOut", "RandomIoUCrop"}, set()),  # last mosaic-phase epoch
    (5, {"RandomZoomOut", "RandomIoUCrop"}, {"Mosaic"}),  # first no-mosaic epoch (e1=5)
    (7, {"RandomZoomOut", "RandomIoUCrop"}, {"Mosaic"}),  # last no-mosaic epoch
    (8, set(), {"Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"}),  # e2=8
])
def test_policy_phase_per_sample(shapes, raw, epoch, expect_some, never):
    torch.manual_seed(epoch)
    tf = build_train_transforms(make_cfg(shapes))
    records = [tf(*raw.load_item(i), epoch=epoch, dataset=raw)[1]["ops"] for i in range(24)]
    seen = set().union(*records)
    assert expect_some <= seen and not (never & seen)
    for ops in records:
        if "Mosaic" in ops:  # a Mosaic sample skips ZoomOut and IoUCrop
            assert "RandomZoomOut" not in ops and "RandomIoUCrop" not in ops
        assert ("RandomPhotometricDistort" in ops) == (2 <= epoch < 8)
    assert "RandomHorizontalFlip" in seen


def test_stage_two_without_flip_and_val_are_a_plain_resize(shapes, raw):
    cfg = make_cfg(shapes, augment={"mixup_epochs": (2, 12), "flip_p": 0.0})  # stage 2 keeps only the flip
    image, target = raw.load_item(3)
    ref = v2.Resize([64, 64])(image)
    expected = v2.functional.to_dtype(v2.functional.pil_to_tensor(ref), torch.float32, scale=True)
    w, h = image.size
    raw_boxes = target["boxes"].as_subclass(torch.Tensor)
    cxcywh = torch.stack([(raw_boxes[:, 0] + raw_boxes[:, 2]) / 2 / w, (raw_boxes[:, 1] + raw_boxes[:, 3]) / 2 / h,
                          (raw_boxes[:, 2] - raw_boxes[:, 0]) / w, (raw_boxes[:, 3] - raw_boxes[:, 1]) / h], 1)
    for tf, epoch in ((build_train_transforms(cfg), 10), (build_train_transforms(cfg), 11), (build_val_transforms(cfg), None)):
        out, t = tf(*raw.load_item(3), epoch=epoch, dataset=raw)
        assert torch.equal(out, expected) and t["ops"] == ()
        assert torch.allclose(t["boxes"], cxcywh, atol=1e-6) and torch.equal(t["labels"], target["labels"])


@pytest.mark.parametrize("min_size, kept", [(1, 3), (5, 2), (9, 1), (30, 0)])
def test_train_sanitize_min_size_drops_small_boxes_val_keeps_them(shapes, raw, min_size, kept):
    """augment.sanitize_min_size is upstream's SanitizeBoundingBoxes min_size (12/10/8 for Atto/Femto/Pico)."""
    image, target = raw.load_item(0)
    boxes = torch.tensor([[2.0, 2, 42, 42], [50, 50, 62, 62], [70, 10, 76, 40]])  # sides 40, 12, 6 px (96 px image)
    target = dict(target, boxes=tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(96, 96)),
                  labels=torch.tensor([0, 1, 2]), area=torch.zeros(3), iscrowd=torch.zeros(3, dtype=torch.int64),
                  ann_id=torch.tensor([7, 8, 9]))
    # sanitized before the resize (40, 12, 6 px) and after it (26.7, 8, 4 px at 64 px), as upstream
    cfg = make_cfg(shapes, augment={"flip_p": 0.0, "sanitize_min_size": min_size})
    _, train = build_train_transforms(cfg)(image, dict(target), epoch=10, dataset=raw)
    _, val = build_val_transforms(cfg)(image, dict(target))
    assert len(train["labels"]) == kept and train["ann_id"].tolist() == [7, 8, 9][:kept]
    assert len(val["labels"]) == 3


def test_normalize_option_applies_imagenet_statistics(shapes, raw):
    plain = build_val_transforms(make_cfg(shapes))(*raw.load_item(0))[0]
    normed = build_val_transforms(make_cfg(shapes, data={"normalize": True}))(*raw.load_item(0))[0]
    assert torch.allclose(normed[0], (plain[0] - IMAGENET_MEAN[0]) / 0.229, atol=1e-5)


def test_train_transforms_need_the_epoch(shapes, raw):
    with pytest.raises(DataError, match=r"\(index, epoch\)"):
        build_train_transforms(make_cfg(shapes))(*raw.load_item(0), epoch=None, dataset=raw)


def test_iou_crop_is_skipped_for_an_image_without_boxes(shapes, raw):
    tf = build_train_transforms(make_cfg(shapes, augment={"iou_crop_p": 1.0, "mosaic_prob": 0.0}))
    image, target = raw.load_item(0)
    empty = dict(target, **{k: target[k][:0] for k in PER_BOX_FIELDS},
                 boxes=tv_tensors.wrap(target["boxes"][:0], like=target["boxes"]))
    _, t = tf(image, empty, epoch=5, dataset=raw)
    assert "RandomIoUCrop" not in t["ops"] and t["boxes"].shape == (0, 4)
