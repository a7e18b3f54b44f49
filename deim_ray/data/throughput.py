"""data layer: a short measurement of the train pipeline in one loader process, per schedule phase.

`deim-ray info` uses it to say how many loader workers a training worker needs. A loader worker is one
single-threaded process, so the rate is images per second of this process's CPU time with one intra-op thread:
what one worker makes on a core of its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from deim_ray.config.schema import Config
from deim_ray.data.coco import CocoDetection
from deim_ray.data.collate import BatchCollator
from deim_ray.data.gates import phase_table
from deim_ray.data.transforms import build_train_transforms


@dataclass(frozen=True)
class PhaseRate:
    start: int
    end: int
    stage: int
    images_per_s: float
    """Training-ready images per CPU-second of one loader process."""


def _rate(dataset: CocoDetection, collate: BatchCollator, epoch: int, images: int, batch: int) -> float:
    picks = torch.randint(len(dataset), (images + batch,)).tolist()
    collate([dataset[(i, epoch)] for i in picks[:batch]])  # warm-up (Mosaic cache, first calls)
    started = time.process_time()
    for b in range(batch, len(picks) - batch + 1, batch):
        collate([dataset[(i, epoch)] for i in picks[b:b + batch]])
    return images // batch * batch / max(time.process_time() - started, 1e-9)


def phase_rates(cfg: Config, images: int = 32) -> list[PhaseRate]:
    """Loader-process throughput at the first epoch of every phase of the schedule (`gates.phase_table`)."""
    transforms = build_train_transforms(cfg, scale=False)
    dataset = CocoDetection.from_split(cfg.data.train, transforms)
    collate = BatchCollator(cfg, train=True)
    batch = max(1, min(8, cfg.data.total_batch_size, len(dataset)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [PhaseRate(p.start, p.end, p.stage, _rate(dataset, collate, p.start, max(images, batch), batch))
                for p in phase_table(cfg)]
    finally:
        torch.set_num_threads(threads)


def workers_needed(consumed_per_s: float, rates: list[PhaseRate]) -> int:
    """Loader workers per training worker so that the slowest phase still keeps up with `consumed_per_s`."""
    return max(1, math.ceil(consumed_per_s / min(r.images_per_s for r in rates)))
