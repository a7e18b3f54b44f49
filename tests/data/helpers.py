"""Helpers of the data-layer tests: the shared synthetic settings and small configs around them."""

from __future__ import annotations

import dataclasses

from deim_ray.config.schema import (AugmentConfig, Config, CopyBlendConfig, DataConfig, MosaicConfig, ScheduleConfig,
                                    SplitConfig, SyntheticConfig)

SHAPES = SyntheticConfig(num_train=40, num_val=11, image_size=96, num_classes=3, max_objects=4, seed=3)


def make_cfg(splits: tuple[SplitConfig, SplitConfig], *, augment: dict | None = None, schedule: dict | None = None,
             data: dict | None = None) -> Config:
    """A small stage-aware config: epochs 12, stop_epoch 10, policy (2, 5, 8), MixUp [2, 5), CopyBlend [2, 8)."""
    base_augment = AugmentConfig(policy_epoch=(2, 5, 8), mosaic_prob=0.5, mosaic=MosaicConfig(output_size=48),
                                 mixup_prob=0.5, mixup_epochs=(2, 5), copyblend_prob=0.5, copyblend_epochs=(2, 8),
                                 copyblend=CopyBlendConfig(area_threshold=20.0), base_size_repeat=None)
    base_data = DataConfig(train=splits[0], val=splits[1], image_size=(64, 64), total_batch_size=4, val_batch_size=4,
                           num_workers=0)
    return Config(data=dataclasses.replace(base_data, **(data or {})),
                  augment=dataclasses.replace(base_augment, **(augment or {})),
                  schedule=dataclasses.replace(ScheduleConfig(epochs=12, stop_epoch=10), **(schedule or {})))
