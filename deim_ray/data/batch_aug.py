"""data layer: batch-level augmentations run by the collator: MixUp, CopyBlend and multi-scale resizing.

They act on a stacked float batch [B, 3, H, W] and on targets whose `boxes` are normalized cxcywh, so boxes
need no change when the batch is resized. Randomness comes from torch's RNG (seeded per loader worker).
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
    """Blend each image with the previous one in the batch (cyclic), beta ~ U(0.45, 0.55); each target gets
    the previous sample's boxes and labels appended. A batch of one is returned unchanged."""
    if len(targets) < 2:
        return images, targets
    beta = _uniform(0.45, 0.55)
    mixed = beta * images + (1.0 - beta) * images.roll(1, dims=0)
    previous = targets[-1:] + targets[:-1]
    return mixed, [_append(t, p["boxes"], p["labels"], "MixUp") for t, p in zip(targets, previous)]


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


def _paste_one(out: torch.Tensor, src: torch.Tensor, box: tuple[int, int, int, int], beta: float,
               cfg: CopyBlendConfig) -> torch.Tensor | None:
    """Blend one object (plus a random margin when `with_expand`) into `out` at a random place;
    returns the object's new normalized cxcywh box (without the margin)."""
    _, h, w = out.shape
    x0, y0, x1, y1 = box
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    ratio = _uniform(*cfg.expand_ratios) if cfg.with_expand else 0.0
    ex, ey = int((x1 - x0) * ratio), int((y1 - y0) * ratio)
    sx0, sy0, sx1, sy1 = max(0, x0 - ex), max(0, y0 - ey), min(w, x1 + ex), min(h, y1 + ey)
    pw, ph = sx1 - sx0, sy1 - sy0
    px, py = int(torch.randint(w - pw + 1, ())), int(torch.randint(h - ph + 1, ()))
    region = out[:, py:py + ph, px:px + pw]
    region.mul_(beta).add_(src[:, sy0:sy1, sx0:sx1], alpha=1.0 - beta)
    nx0, ny0 = px + (x0 - sx0), py + (y0 - sy0)
    bw, bh = x1 - x0, y1 - y0
    return torch.tensor([(nx0 + bw / 2) / w, (ny0 + bh / 2) / h, bw / w, bh / h], dtype=torch.float32)


def copyblend(images: torch.Tensor, targets: Targets, cfg: CopyBlendConfig) -> tuple[torch.Tensor, Targets]:
    """Paste up to `num_objects` objects (area >= area_threshold, drawn from the whole batch) into every
    image, blended dest*beta + src*(1-beta); their boxes and labels are appended. No object: unchanged."""
    _, _, h, w = images.shape
    pool = _object_pool(targets, w, h, cfg.area_threshold)
    if not pool or cfg.num_objects < 1:
        return images, targets
    beta = _uniform(0.45, 0.55)
    out, result = images.clone(), []
    for dest, target in enumerate(targets):
        boxes, labels = [], []
        for p in torch.randperm(len(pool))[:cfg.num_objects].tolist():
            src, j = pool[p]
            new = _paste_one(out[dest], images[src], _pixel_box(targets[src]["boxes"][j], w, h), beta, cfg)
            if new is not None:
                boxes.append(new)
                labels.append(targets[src]["labels"][j])
        if boxes:
            target = _append(target, torch.stack(boxes), torch.stack(labels), "CopyBlend")
        result.append(target)
    return out, result


def multiscale(images: torch.Tensor, scales: tuple[int, ...]) -> torch.Tensor:
    """Resize the whole batch to one size s x s drawn from `scales` (nearest, as upstream)."""
    size = scales[int(torch.randint(len(scales), ()))]
    if images.shape[-2:] == (size, size):
        return images
    return nnf.interpolate(images, size=(size, size))
