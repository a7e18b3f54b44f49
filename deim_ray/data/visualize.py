"""data layer: `render_augment_grid`, a PNG of augmented training images with their boxes for one epoch.

It runs the real train pipeline and collator (so Mosaic, MixUp, CopyBlend and multi-scale show as they
would in training) on n images drawn with a seed derived from `train.seed` and the epoch, and writes each
image with its boxes, class names and the list of augmentations it received (`deim-ray show-augment`).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from deim_ray.config.schema import Config
from deim_ray.data import gates
from deim_ray.data.coco import CocoDetection
from deim_ray.data.collate import BatchCollator
from deim_ray.data.synthetic import PALETTE, ensure_dataset
from deim_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_train_transforms
from deim_ray.outputs import output_file

TILE = 256
CAPTION = 28
HEADER = 22


def _augmented_batch(cfg: Config, dataset: CocoDetection, epoch: int, n: int) -> tuple[torch.Tensor, list[dict]]:
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed * 1000 + epoch)
        picks = torch.randperm(len(dataset))[:n].tolist()
        return BatchCollator(cfg, train=True)([dataset[(i, epoch)] for i in picks])


def _to_pil(image: torch.Tensor, normalized: bool) -> Image.Image:
    if normalized:
        image = image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels).resize((TILE, TILE), Image.BILINEAR)


def _tile(image: Image.Image, target: dict, names: tuple[str, ...], size: int) -> Image.Image:
    """The image with its boxes and class names, plus a caption: input size and the augmentations taken."""
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    tile.paste(image, (0, 0))
    draw = ImageDraw.Draw(tile)
    for (cx, cy, w, h), label in zip(target["boxes"].tolist(), target["class_labels"].tolist()):
        colour = PALETTE[(label + 2) % len(PALETTE)]
        x0, y0, x1, y1 = ((cx - w / 2) * TILE, (cy - h / 2) * TILE, (cx + w / 2) * TILE, (cy + h / 2) * TILE)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        draw.text((x0 + 2, y0 + 1), names[label], fill=colour)
    ops = ", ".join(op.replace("Random", "") for op in target["ops"]) or "no augmentation"
    for row, line in enumerate(textwrap.wrap(f"{size}px: {ops}", 44)[:2]):
        draw.text((3, TILE + 2 + 13 * row), line, fill="black")
    return tile


def render_augment_grid(cfg: Config, epoch: int, out_png: str | Path, n: int = 8) -> Path:
    """Write a grid of `n` augmented training images (one batch, as the loader makes it) for `epoch`."""
    data = ensure_dataset(cfg.data)
    dataset = CocoDetection.from_split(data.train, build_train_transforms(cfg))
    images, targets = _augmented_batch(cfg, dataset, epoch, n)
    cols = min(4, len(targets))
    rows = math.ceil(len(targets) / cols)
    grid = Image.new("RGB", (cols * TILE, HEADER + rows * (TILE + CAPTION)), "white")
    plan = gates.epoch_plan(cfg, epoch)
    ImageDraw.Draw(grid).text((4, 5), f"epoch {epoch}  stage {plan.stage}  policy phase: {plan.policy.name}",
                              fill="black")
    for k, (image, target) in enumerate(zip(images, targets)):
        tile = _tile(_to_pil(image, cfg.data.normalize), target, dataset.categories.names, image.shape[-1])
        grid.paste(tile, ((k % cols) * TILE, HEADER + (k // cols) * (TILE + CAPTION)))
    with output_file(out_png) as partial:
        grid.save(partial)
    return Path(out_png)
