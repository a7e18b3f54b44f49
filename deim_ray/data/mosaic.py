"""data layer: the Mosaic augmentation (four images in a 2x2 grid, then a random affine).

The current image is resized to shorter side `output_size`. Its three partners come either from a cache
(`use_cache`, DEIMv2): the current image is appended first, a full cache evicts a random entry other than
the newest (or the oldest with `random_pop=False`), and three entries are drawn with replacement; while the
cache holds fewer than four images, partners come from the dataset instead (upstream drew from the cold
cache, so a worker's first Mosaic tiled the same image four times); or, without the cache (DEIM), from
three random dataset items.
Each lies at the top-left corner of its quadrant of a black canvas of twice the largest partner's size;
boxes are offset and concatenated with every per-box field, then `RandomAffine` moves image and boxes
together. The cache lives in each loader worker (with persistent workers it survives across epochs).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from deim_ray.config.schema import MosaicConfig
from deim_ray.data.coco import PER_BOX_FIELDS

Sample = tuple[Image.Image, dict[str, Any]]


class Mosaic:
    """Called as `mosaic(image, target, dataset)`; `dataset.load_item(i, at_least)` supplies partners without
    the cache, decoded no larger than their tile needs."""

    def __init__(self, cfg: MosaicConfig):
        self.cfg = cfg
        self.resize = v2.Resize(cfg.output_size)
        self.affine = v2.RandomAffine(degrees=cfg.rotation_range, translate=cfg.translation_range,
                                      scale=cfg.scaling_range, fill=0)
        self.cache: list[Sample] = []

    def __call__(self, image: Image.Image, target: dict[str, Any], dataset) -> Sample:
        current = self.resize(image, target)
        partners = self._from_cache(current, dataset) if self.cfg.use_cache else self._from_dataset(dataset)
        image, target = _paste([current, *partners])
        return self.affine(image, target)

    def _from_cache(self, current: Sample, dataset) -> list[Sample]:
        self.cache.append(current)
        if len(self.cache) > self.cfg.max_cached_images:
            victim = int(torch.randint(len(self.cache) - 1, ())) if self.cfg.random_pop else 0
            self.cache.pop(victim)
        if len(self.cache) < min(4, self.cfg.max_cached_images):
            return self._from_dataset(dataset)  # a cold cache would repeat the current image
        picks = torch.randint(len(self.cache), (3,)).tolist()
        return [self.cache[i] for i in picks]

    def _from_dataset(self, dataset) -> list[Sample]:
        picks = torch.randint(len(dataset), (3,)).tolist()
        side = self.cfg.output_size  # a partner is shrunk to this shorter side: no need to decode more
        return [self.resize(*dataset.load_item(i, (side, side))) for i in picks]


def _paste(tiles: list[Sample]) -> Sample:
    """Four (image, target) tiles into one 2x2 canvas; the first tile's image-level fields are kept."""
    max_w = max(im.width for im, _ in tiles)
    max_h = max(im.height for im, _ in tiles)
    canvas = Image.new("RGB", (2 * max_w, 2 * max_h))
    boxes, fields = [], {k: [] for k in PER_BOX_FIELDS}
    for (im, t), (dx, dy) in zip(tiles, ((0, 0), (max_w, 0), (0, max_h), (max_w, max_h))):
        canvas.paste(im, (dx, dy))
        boxes.append(t["boxes"].as_subclass(torch.Tensor) + torch.tensor([dx, dy, dx, dy], dtype=torch.float32))
        for k in PER_BOX_FIELDS:
            fields[k].append(t[k])
    target = dict(tiles[0][1])
    target.update({k: torch.cat(v) for k, v in fields.items()})
    target["boxes"] = tv_tensors.BoundingBoxes(torch.cat(boxes), format="XYXY",
                                               canvas_size=(canvas.height, canvas.width))
    return canvas, target
