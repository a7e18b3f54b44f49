"""data layer: the batch collator (stack, then MixUp or CopyBlend, then multi-scale) and the output contract.

The epoch comes with the samples (`target["epoch"]`, set by the dataset from the `(index, epoch)` key), so
the collator holds no mutable schedule state and works unchanged in persistent loader workers.

Output of one batch: `images` float32 [B, 3, H, W] and `targets`, one dict per image:
  boxes         float32 [N, 4]  normalized cxcywh
  class_labels  int64 [N]       contiguous class indices (see `CategoryMap`)
  image_id      int64 scalar    the COCO image id
  orig_size     int64 [2]       original (width, height)
  ops           tuple[str]      augmentations the sample received, in order (MixUp/CopyBlend included)
"""

from __future__ import annotations

import torch

from deim_ray.config.schema import Config
from deim_ray.data import batch_aug, gates
from deim_ray.data.errors import DataError


def _output(target: dict) -> dict:
    return {"boxes": target["boxes"].to(torch.float32).reshape(-1, 4),
            "class_labels": target["labels"].to(torch.int64),
            "image_id": target["image_id"].to(torch.int64),
            "orig_size": target["orig_size"].to(torch.int64),
            "ops": tuple(target["ops"])}


def batch_epoch(targets: list[dict]) -> int:
    epochs = {t.get("epoch") for t in targets}
    if len(epochs) != 1 or None in epochs:
        raise DataError(f"a training batch must come from one epoch, got {sorted(map(str, epochs))}; "
                        f"build the loader with build_train_loader")
    return int(epochs.pop())


class BatchCollator:
    """`collate_fn` for the train (`train=True`, stage-aware batch augmentation) and val loaders."""

    def __init__(self, cfg: Config, train: bool):
        self.cfg = cfg
        self.train = train
        if train:
            gates.check(cfg)

    def __call__(self, batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
        images = torch.stack([image for image, _ in batch])
        targets = [target for _, target in batch]
        if self.train:
            images, targets = self.augment(images, targets, gates.epoch_plan(self.cfg, batch_epoch(targets)))
        return images, [_output(t) for t in targets]

    def augment(self, images: torch.Tensor, targets: list[dict], plan: gates.EpochPlan
                ) -> tuple[torch.Tensor, list[dict]]:
        if plan.mixup_prob > 0 and bool(torch.rand(()) < plan.mixup_prob):
            images, targets = batch_aug.mixup(images, targets)
        elif plan.copyblend_prob > 0 and bool(torch.rand(()) < plan.copyblend_prob):
            images, targets = batch_aug.copyblend(images, targets, self.cfg.augment.copyblend)
        if plan.scales:
            images = batch_aug.multiscale(images, plan.scales)
        return images, targets
