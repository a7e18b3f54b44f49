"""The faster pipeline pieces against what they replace: uint8 samples scaled per batch give the float
pipeline's batches, in-place MixUp/CopyBlend blend the incoming images, and the photometric, IoU-crop and
resize kernels match torchvision's draws and pixels."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from deim_ray.config.schema import CopyBlendConfig
from deim_ray.data import batch_aug
from deim_ray.data.coco import CocoDetection
from deim_ray.data.color import PhotometricDistort, rotate_hue
from deim_ray.data.iou_crop import IoUCrop
from deim_ray.data.loader import build_train_loader
from deim_ray.data.resize import resize_bilinear
from deim_ray.data.transforms import build_train_transforms
from tests.data.helpers import make_cfg


def _batches(cfg, epoch: int, scale: bool):
    torch.manual_seed(epoch)
    ds = CocoDetection(cfg.data.train.img_folder, cfg.data.train.ann_file, build_train_transforms(cfg, scale))
    loader = build_train_loader(cfg, ds, rank=0, world_size=1, seed=0)
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("epoch, normalize", [(2, False), (3, True), (6, False), (10, True)])
def test_uint8_samples_give_the_float_pipelines_batches(shapes, epoch, normalize):
    cfg = make_cfg(shapes, data={"normalize": normalize})
    fast, plain = _batches(cfg, epoch, scale=False), _batches(cfg, epoch, scale=True)
    assert len(fast) == len(plain) == 10
    for (images, targets), (ref_images, ref_targets) in zip(fast, plain):
        assert images.dtype == torch.float32 and images.shape == ref_images.shape
        assert torch.allclose(images, ref_images, atol=1e-5)
        if epoch >= 10:  # stage 2: the same arithmetic in the same order, bit for bit
            assert torch.equal(images, ref_images)
        for t, r in zip(targets, ref_targets):
            assert t["ops"] == r["ops"] and torch.equal(t["class_labels"], r["class_labels"])
            assert torch.allclose(t["boxes"], r["boxes"])


def test_mixup_in_place_blends_each_image_with_its_incoming_predecessor():
    images = torch.rand(5, 3, 8, 8)
    before = images.clone()
    targets = [{"boxes": torch.rand(1, 4), "labels": torch.tensor([i]), "ops": ()} for i in range(5)]
    torch.manual_seed(0)
    beta = 0.45 + 0.1 * float(torch.rand(()))
    torch.manual_seed(0)
    out, mixed = batch_aug.mixup(images, targets)
    assert out.data_ptr() == images.data_ptr()
    assert torch.allclose(out, beta * before + (1 - beta) * before.roll(1, dims=0), atol=1e-6)
    assert [t["labels"].tolist() for t in mixed] == [[0, 4], [1, 0], [2, 1], [3, 2], [4, 3]]


def test_copyblend_in_place_pastes_objects_as_they_came_in():
    """Image k is flat `bg[k]` with one object of value `obj[k]` and label k; a pasted object must hold
    beta * (what was under it) + (1 - beta) * obj[label] (possibly under a later paste), never a source value
    that an earlier paste had already blended."""
    bg, obj = (0.2, 0.6, 0.35), (0.9, 0.1, 0.75)
    cfg = CopyBlendConfig(area_threshold=1.0, num_objects=2, with_expand=False)
    for seed in range(8):
        images = torch.stack([torch.full((3, 32, 32), v) for v in bg])
        targets = []
        for k in range(3):
            x, y = 4 + 6 * k, 20 - 6 * k
            images[k, :, y:y + 8, x:x + 8] = obj[k]
            targets.append({"boxes": torch.tensor([[(x + 4) / 32, (y + 4) / 32, 8 / 32, 8 / 32]]),
                            "labels": torch.tensor([k]), "ops": ()})
        before = images.clone()
        torch.manual_seed(seed)
        beta = 0.45 + 0.1 * float(torch.rand(()))
        torch.manual_seed(seed)
        out, result = batch_aug.copyblend(images, targets, cfg)
        for dest, t in enumerate(result):
            assert t["ops"] == ("CopyBlend",) and len(t["labels"]) == 3
            for box, label in zip(t["boxes"][1:], t["labels"][1:].tolist()):
                cx, cy, w, h = (box * 32).tolist()
                region = out[dest, 0, round(cy - h / 2):round(cy + h / 2), round(cx - w / 2):round(cx + w / 2)]
                flat = set(before[dest, 0].unique().tolist())
                pasted = {beta * v + (1 - beta) * o for v in flat for o in obj}  # an earlier paste may lie under
                this = {beta * v + (1 - beta) * obj[label] for v in flat | pasted}
                later = {beta * v + (1 - beta) * o for v in this for o in obj}  # a later one may cover part
                allowed = torch.tensor(sorted(this | later))
                assert (region.reshape(-1, 1) - allowed).abs().min(1).values.max() < 1e-5, (seed, dest)


def test_rotate_hue_is_the_exact_hsv_rotation():
    rgb = np.random.default_rng(0).random((500, 3))
    for factor in (-0.5, -0.05, 0.03, 0.37):
        expected = []
        for r, g, b in rgb:
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            expected.append(colorsys.hsv_to_rgb((h + factor) % 1.0, s, v))
        assert np.allclose(rotate_hue(rgb, factor), expected, atol=1e-9)


def test_photometric_distort_draws_and_looks_like_torchvision(shapes):
    image = CocoDetection(shapes[0].img_folder, shapes[0].ann_file).load_item(0)[0].resize((160, 120))
    ours, reference = PhotometricDistort(p=0.5), v2.RandomPhotometricDistort(p=0.5)
    identical = 0
    for seed in range(24):
        torch.manual_seed(seed)
        a = np.asarray(ours(image), dtype=np.int32)
        after_ours = torch.rand(())
        torch.manual_seed(seed)
        b = np.asarray(reference(image), dtype=np.int32)
        assert torch.rand(()) == after_ours, "the same random draws in the same order"
        assert np.abs(a - b).mean() < 1.5, seed
        identical += int(np.array_equal(a, b))
    assert 0 < identical < 24  # draws without hue or permutation are pixel-identical; the others are close


def test_iou_crop_finds_valid_crops_with_torchvisions_distribution():
    image = tv_tensors.Image(torch.zeros(3, 480, 640, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[30, 40, 150, 160], [300, 200, 420, 300], [500, 380, 630, 470]],
                                     format="XYXY", canvas_size=(480, 640))
    stats = {}
    for name, op in (("ours", IoUCrop()), ("torchvision", v2.RandomIoUCrop())):
        torch.manual_seed(0)
        params = [op.make_params([image, boxes]) for _ in range(200)]
        crops = [p for p in params if p]
        for p in crops if name == "ours" else ():
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            inside = (p["left"] < cx) & (cx < p["left"] + p["width"]) & (p["top"] < cy) & (cy < p["top"] + p["height"])
            assert torch.equal(p["is_within_crop_area"], inside) and inside.any()
            assert 0.5 <= p["width"] / p["height"] <= 2.0
        stats[name] = (1 - len(crops) / len(params), np.mean([p["width"] * p["height"] / (640 * 480) for p in crops]))
    assert abs(stats["ours"][0] - stats["torchvision"][0]) < 0.12, stats
    assert abs(stats["ours"][1] - stats["torchvision"][1]) < 0.06, stats


def test_resize_of_a_mostly_black_canvas_matches_pil():
    rng = np.random.default_rng(1)
    content = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    for size, at in (((400, 300), (10, 200)), ((360, 480), (240, 0)), ((130, 100), (5, 5))):
        canvas = Image.new("RGB", size)
        canvas.paste(content, at)
        ours = np.asarray(resize_bilinear(canvas, 64, 48), dtype=np.int32)
        pil = np.asarray(canvas.resize((64, 48), Image.Resampling.BILINEAR), dtype=np.int32)
        assert np.abs(ours - pil).max() <= 1 and (ours != pil).mean() < 0.01
