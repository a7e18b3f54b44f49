"""engine layer: the datasets and loaders one worker trains and evaluates with.

Generates the synthetic dataset first when the config asks for it (seeded, so every node generates the same
files), then builds the stage-aware train loader (the epoch travels with each sample index, so stage 1 and
stage 2 use one loader) and the val loader sharded without duplicates. Samples leave the per-sample pipelines
as uint8 and the collator scales each batch once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deim_ray.config.schema import Config
from deim_ray.data.coco import CocoDetection
from deim_ray.data.errors import DataError
from deim_ray.data.loader import build_train_loader, build_val_loader
from deim_ray.data.synthetic import ensure_dataset
from deim_ray.data.transforms import build_train_transforms, build_val_transforms


@dataclass
class DataBundle:
    train_loader: Any
    val_loader: Any
    coco_gt: Any
    category_ids: list[int]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def build_data(cfg: Config, rank: int, world_size: int) -> DataBundle:
    data = ensure_dataset(cfg.data)
    train_set = CocoDetection.from_split(data.train, build_train_transforms(cfg, scale=False))
    val_set = CocoDetection.from_split(data.val, build_val_transforms(cfg, scale=False))
    if train_set.categories.ids != val_set.categories.ids:
        raise DataError(f"train and val annotation files list different categories "
                        f"({data.train.ann_file} vs {data.val.ann_file}); use one category list")
    return DataBundle(
        train_loader=build_train_loader(cfg, train_set, rank, world_size, cfg.train.seed),
        val_loader=build_val_loader(cfg, val_set, rank, world_size),
        coco_gt=val_set.coco_gt,
        category_ids=list(val_set.categories.ids),
        class_names=list(val_set.categories.names),
    )
