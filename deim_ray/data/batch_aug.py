"""data layer: batch-level augmentations run by the collator: MixUp, CopyBlend and multi-scale resizing.

They act on a stacked float batch [B, 3, H, W] and on targets whose `boxes` are normalized cxcywh, so boxes
need no change when the batch is resized. MixUp and CopyBlend work IN PLACE on the batch (the collator owns
it), with no full-batch temporary. Randomness comes from torch's RNG (seeded per loader worker).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from deim_ray.config.schema import CopyBlendConfig

Targets = list[dict]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _append(target: dict, boxes: torch.Tensor, labels: torch.Tensor, op: str) -> dict:
    return dict(target, boxes=torch.cat([target["boxes"], boxes.reshape(-1, 4)]),
                labels=torch.cat([target["labels"], labels.reshape(-1)]), ops=target["ops"] + (op,))


def mixup(images: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, Targets]:
    """In place: blend each image with the previous one in the batch (cyclic), beta ~ U(0.45, 0.55); each
    target gets the previous sample's boxes and labels appended. A batch of one is returned unchanged."""
    if len(targets) < 2:
        return images, targets
    beta = _uniform(0.45, 0.55)
    last = images[-1].clone()  # image 0 blends with the last image, which is overwritten first
    for i in range(len(images) - 1, 0, -1):  # backwards, so each image blends with its unmodified predecessor
        images[i].mul_(beta).add_(images[i - 1], alpha=1.0 - beta)
    images[0].mul_(beta).add_(last, alpha=1.0 - beta)
    previous = targets[-1:] + targets[:-1]
    return images, [_append(t, p["boxes"], p["labels"], "MixUp") for t, p in zip(targets, previous)]


def _pixel_box(box: torch.Tensor, w: int, h: int) -> tuple[int, int, int, int]:
    """Normalized cxcywh -> integer pixel x0, y0, x1, y1 covering the box, inside the image."""
    cx, cy, bw, bh = box.tolist()
    eps = 1e-4  # float noise must not grow a box that lies on pixel edges by a whole pixel
    x0, x1 = max(0, math.floor((cx - bw / 2) * w + eps)), min(w, math.ceil((cx + bw / 2) * w - eps))
    y0, y1 = max(0, math.floor((cy - bh / 2) * h + eps)), min(h, math.ceil((cy + bh / 2) * h - eps))
    return x0, y0, x1, y1


def _object_pool(targets: Targets, w: int, h: int, area_threshold: float) -> list[tuple[int, int]]:
    """(image, box) pairs whose pixel area reaches the threshold."""
    pool = []
    for i, t in enumerate(targets):
        areas = t["boxes"][:, 2] * t["boxes"][:, 3] * (w * h)
        pool += [(i, int(j)) for j in torch.nonzero(areas >= area_threshold).flatten()]
    return pool


def _cut(src: torch.Tensor, box: tuple[int, int, int, int], cfg: CopyBlendConfig
         ) -> tuple[int, int, torch.Tensor, torch.Tensor] | None:
    """Draw where one object (plus a random margin when `with_expand`) goes in an image of src's size; returns
    (x, y, a copy of the patch, the object's new normalized cxcywh box without the margin)."""
    _, h, w = src.shape
    x0, y0, x1, y1 = box
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    ratio = _uniform(*cfg.expand_ratios) if cfg.with_expand else 0.0
    ex, ey = int((x1 - x0) * ratio), int((y1 - y0) * ratio)
    sx0, sy0, sx1, sy1 = max(0, x0 - ex), max(0, y0 - ey), min(w, x1 + ex), min(h, y1 + ey)
    pw, ph = sx1 - sx0, sy1 - sy0
    px, py = int(torch.randint(w - pw + 1, ())), int(torch.randint(h - ph + 1, ()))
    nx0, ny0 = px + (x0 - sx0), py + (y0 - sy0)
    bw, bh = x1 - x0, y1 - y0
    new_box = torch.tensor([(nx0 + bw / 2) / w, (ny0 + bh / 2) / h, bw / w, bh / h], dtype=torch.float32)
    return px, py, src[:, sy0:sy1, sx0:sx1].clone(), new_box


def copyblend(images: torch.Tensor, targets: Targets, cfg: CopyBlendConfig) -> tuple[torch.Tensor, Targets]:
    """In place: paste up to `num_objects` objects (area >= area_threshold, drawn from the whole batch) into
    every image, blended dest*beta + src*(1-beta); their boxes and labels are appended. No object: unchanged.
    Every patch is copied out before any image changes, so sources are the images as they came in."""
    _, _, h, w = images.shape
    pool = _object_pool(targets, w, h, cfg.area_threshold)
    if not pool or cfg.num_objects < 1:
        return images, targets
    beta = _uniform(0.45, 0.55)
    pastes, result = [], []
    for dest, target in enumerate(targets):
        boxes, labels = [], []
        for p in torch.randperm(len(pool))[:cfg.num_objects].tolist():
            src, j = pool[p]
            cut = _cut(images[src], _pixel_box(targets[src]["boxes"][j], w, h), cfg)
            if cut is not None:
                pastes.append((dest, *cut[:3]))
                boxes.append(cut[3])
                labels.append(targets[src]["labels"][j])
        if boxes:
            target = _append(target, torch.stack(boxes), torch.stack(labels), "CopyBlend")
        result.append(target)
    for dest, x, y, patch in pastes:
        images[dest, :, y:y + patch.shape[1], x:x + patch.shape[2]].mul_(beta).add_(patch, alpha=1.0 - beta)
    return images, result


def multiscale(images: torch.Tensor, scales: tuple[int, ...]) -> torch.Tensor:
    """Resize the whole batch to one size s x s drawn from `scales` (nearest, as upstream)."""
    size = scales[int(torch.randint(len(scales), ()))]
    if images.shape[-2:] == (size, size):
        return images
    return nnf.interpolate(images, size=(size, size))
