"""data layer: the batch collator (stack, scale, then MixUp or CopyBlend, then multi-scale) and the output contract.

Samples may arrive as uint8 tensors (`build_*_transforms(cfg, scale=False)`, what the loaders use): the
collator stacks them straight into one float batch and scales it to [0,1] (and normalizes it) in place, with
the arithmetic of torchvision's `to_dtype`/`Normalize`, so the batch equals what float samples would give. In a
loader worker the float batch is allocated in shared memory, as `default_collate` does, so handing it to the
training process copies nothing. Batch augmentations then work in place on that batch.

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

import math

import torch
from torch.utils.data import get_worker_info

from deim_ray.config.schema import Config
from deim_ray.data import batch_aug, gates
from deim_ray.data.errors import DataError
from deim_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD


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


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor; in a loader worker its storage is shared memory, so sending the batch copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))  # as default_collate
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def stack_images(images: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    """Float32 [B, 3, H, W] from float samples (stacked as they are) or uint8 samples (scaled to [0,1] and,
    with `normalize`, standardized with the ImageNet statistics, once for the whole batch)."""
    out = _empty((len(images), *images[0].shape), torch.float32)
    if images[0].is_floating_point():
        return torch.stack(images, out=out)
    torch.stack(images, out=out)  # uint8 -> float32 in the copy
    out.mul_(1.0 / 255)  # to_dtype's int -> float scaling
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
        out.sub_(mean).div_(torch.tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1))
    return out


class BatchCollator:
    """`collate_fn` for the train (`train=True`, stage-aware batch augmentation) and val loaders."""

    def __init__(self, cfg: Config, train: bool):
        self.cfg = cfg
        self.train = train
        if train:
            gates.check(cfg)

    def __call__(self, batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
        images = stack_images([image for image, _ in batch], self.cfg.data.normalize)
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
