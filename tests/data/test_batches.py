"""Every schedule gate asserted on real batches from `build_train_loader`, at the boundary epochs (the
first epoch on, the last epoch on, the first epoch off): policy ops, MixUp (label concatenation), CopyBlend
(only when MixUp is not taken), multi-scale, and stage 2 (fixed size, only the flip, as upstream)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from deim_ray.config.schema import CopyBlendConfig
from deim_ray.data.coco import CocoDetection
from deim_ray.data.loader import build_train_loader
from deim_ray.data.transforms import build_train_transforms, build_val_transforms
from tests.data.helpers import make_cfg

NO_POLICY = {"policy_epoch": (10, 10, 10), "mosaic_prob": 0.0, "flip_p": 0.0}
"""Policy ops never run in stage 1 and no flip: each sample is a plain resize, so batches can be predicted."""


def _batches(cfg, epoch: int, seed: int = 0):
    torch.manual_seed(seed + epoch)
    ds = CocoDetection(cfg.data.train.img_folder, cfg.data.train.ann_file, build_train_transforms(cfg))
    loader = build_train_loader(cfg, ds, rank=0, world_size=1, seed=seed)
    loader.set_epoch(epoch)
    return ds, list(loader)


def _plain(ds: CocoDetection, cfg, image_id: int) -> tuple[torch.Tensor, dict]:
    """The sample as the clean pipeline makes it (what NO_POLICY batches hold before batch augmentation)."""
    return build_val_transforms(cfg)(*ds.load_item(ds.image_ids.index(image_id)))


@pytest.mark.parametrize("epoch, expected", [
    (1, ()),  # before e0 = 2
    (2, ("Mosaic", "RandomPhotometricDistort")),  # first mosaic-phase epoch, mosaic_prob 1
    (4, ("Mosaic", "RandomPhotometricDistort")),  # last mosaic-phase epoch
    (5, ("RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop")),  # first no-mosaic epoch (e1 = 5)
    (7, ("RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop")),  # last no-mosaic epoch
    (8, ()),  # e2 = 8: policy off, still stage 1
])
def test_policy_gate_on_real_batches(shapes, epoch, expected):
    cfg = make_cfg(shapes, augment={"mosaic_prob": 1.0, "zoom_out_p": 1.0, "iou_crop_p": 1.0, "flip_p": 0.0,
                                    "mixup_prob": 0.0, "copyblend_prob": 0.0})
    _, batches = _batches(cfg, epoch)
    assert len(batches) == 10
    assert {t["ops"] for _, targets in batches for t in targets} == {expected}


@pytest.mark.parametrize("epoch, on", [(1, False), (2, True), (4, True), (5, False)])
def test_mixup_gate_concatenates_the_previous_samples_labels(shapes, epoch, on):
    cfg = make_cfg(shapes, augment={**NO_POLICY, "mixup_prob": 1.0, "copyblend_prob": 0.0})
    ds, batches = _batches(cfg, epoch)
    for images, targets in batches:
        own = [_plain(ds, cfg, int(t["image_id"])) for t in targets]
        for i, t in enumerate(targets):
            expected = [own[i][1]] + ([own[i - 1][1]] if on else [])
            assert torch.equal(t["class_labels"], torch.cat([e["labels"] for e in expected]))
            assert torch.allclose(t["boxes"], torch.cat([e["boxes"] for e in expected]))
            assert t["ops"] == (("MixUp",) if on else ())
        plain = torch.stack([o[0] for o in own])
        if on:
            beta = (images - plain.roll(1, 0)) / (plain - plain.roll(1, 0))
            finite = beta[torch.isfinite(beta) & ((plain - plain.roll(1, 0)).abs() > 0.2)]
            assert 0.45 <= finite.median() <= 0.55
        else:
            assert torch.equal(images, plain)


@pytest.mark.parametrize("epoch, op", [(1, None), (2, "MixUp"), (4, "MixUp"), (5, "CopyBlend"), (7, "CopyBlend"),
                                       (8, None)])
def test_copyblend_runs_only_where_mixup_did_not(shapes, epoch, op):
    cfg = make_cfg(shapes, augment={**NO_POLICY, "mixup_prob": 1.0, "copyblend_prob": 1.0,
                                    "copyblend": CopyBlendConfig(area_threshold=20.0, num_objects=3)})
    ds, batches = _batches(cfg, epoch)
    for images, targets in batches:
        assert {t["ops"] for t in targets} == {(op,) if op else ()}
        if op != "CopyBlend":
            continue
        own = [_plain(ds, cfg, int(t["image_id"])) for t in targets]
        pool = Counter(lab for o in own for lab in o[1]["labels"].tolist())
        for (plain_image, plain), t in zip(own, targets):
            n = len(plain["labels"])
            assert torch.equal(t["class_labels"][:n], plain["labels"]) and len(t["class_labels"]) == n + 3
            assert not Counter(t["class_labels"][n:].tolist()) - pool  # pasted objects come from this batch
            assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        assert not torch.equal(images, torch.stack([o[0] for o in own]))


def test_mixup_and_copyblend_never_share_a_batch(shapes):
    cfg = make_cfg(shapes, augment={**NO_POLICY, "mixup_prob": 0.5, "copyblend_prob": 1.0})
    seen = Counter()
    for epoch in (2, 3, 4):
        for _, targets in _batches(cfg, epoch)[1]:
            ops = {op for t in targets for op in t["ops"]}
            assert ops in ({"MixUp"}, {"CopyBlend"})
            seen[ops.pop()] += 1
    assert seen["MixUp"] and seen["CopyBlend"]


@pytest.mark.parametrize("epoch, sizes", [(0, {96, 128, 160}), (9, {96, 128, 160}), (10, {64})])
def test_multiscale_varies_per_batch_until_stop_epoch(shapes, epoch, sizes):
    cfg = make_cfg(shapes, augment={**NO_POLICY, "mixup_prob": 0.0, "copyblend_prob": 0.0, "base_size": 128,
                                    "base_size_repeat": 1})
    shapes_seen = {tuple(images.shape[-2:]) for images, _ in _batches(cfg, epoch)[1]}
    assert {h for h, _ in shapes_seen} == sizes and all(h == w for h, w in shapes_seen)


def test_multiscale_off_without_base_size_repeat(shapes):
    cfg = make_cfg(shapes, augment={**NO_POLICY, "mixup_prob": 0.0, "copyblend_prob": 0.0, "base_size": 128})
    assert {tuple(images.shape) for images, _ in _batches(cfg, 0)[1]} == {(4, 3, 64, 64)}


STAGE2_TRAPS = {"mosaic_prob": 1.0, "mixup_prob": 1.0, "mixup_epochs": (2, 12), "copyblend_prob": 1.0,
                "copyblend_epochs": (0, 12), "base_size": 128, "base_size_repeat": 1}
"""Gates that would fire in stage 2 if the stage did not turn them off."""


@pytest.mark.parametrize("epoch", [10, 11])
def test_stage_two_batches_are_clean_and_fixed_size(shapes, epoch):
    cfg = make_cfg(shapes, augment={**STAGE2_TRAPS, "flip_p": 0.0})
    ds, batches = _batches(cfg, epoch)
    for images, targets in batches:
        assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
        own = [_plain(ds, cfg, int(t["image_id"])) for t in targets]
        assert torch.equal(images, torch.stack([o[0] for o in own]))
        for (_, plain), t in zip(own, targets):
            assert t["ops"] == () and torch.equal(t["class_labels"], plain["labels"])
            assert t["boxes"].dtype == torch.float32 and t["class_labels"].dtype == torch.int64
            assert t["image_id"].dtype == torch.int64 and t["image_id"].dim() == 0
            assert t["orig_size"].tolist() == [96, 96]


def test_stage_two_keeps_the_horizontal_flip(shapes):
    """Upstream's stage 2 turns off only the policy ops; RandomHorizontalFlip keeps running."""
    cfg = make_cfg(shapes, augment={**STAGE2_TRAPS, "flip_p": 1.0})
    ds, batches = _batches(cfg, 10)
    for images, targets in batches:
        own = [_plain(ds, cfg, int(t["image_id"])) for t in targets]
        assert torch.equal(images, torch.stack([o[0].flip(-1) for o in own]))
        for (_, plain), t in zip(own, targets):
            assert t["ops"] == ("RandomHorizontalFlip",)
            mirrored = plain["boxes"] * torch.tensor([-1.0, 1, 1, 1]) + torch.tensor([1.0, 0, 0, 0])
            assert torch.allclose(t["boxes"], mirrored, atol=1e-6)
