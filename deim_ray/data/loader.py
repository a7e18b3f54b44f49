"""data layer: the train and val DataLoaders of one worker (rank).

Train: `EpochBatchSampler` shuffles the whole dataset with `seed + epoch` (the same permutation on every
rank), keeps `floor(N / total_batch_size)` global batches (drop_last, so every rank runs the same number of
iterations) and deals rank r its share. It yields `(index, epoch)` keys: the epoch travels with every sample
into the loader workers, so workers can stay alive across epochs (`persistent_workers=True`) and still
apply the right stage and augmentation phase. Call `loader.set_epoch(epoch)` before each epoch;
`len(loader)` is the per-rank iteration count.

Val: rank r gets indices r, r + world_size, ... (no padded duplicates; ranks may differ by one image), in
batches of `val_batch_size / world_size`, so a distributed evaluation sees each image exactly once.
"""

from __future__ import annotations

import os

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from deim_ray.config.schema import Config
from deim_ray.data.collate import BatchCollator
from deim_ray.data.errors import DataError


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Distributed, seeded, per-epoch shuffled batches of `(index, epoch)` keys for one rank."""

    def __init__(self, dataset_len: int, batch_size: int, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        if len(self) == 0:
            raise DataError(f"the training set has {dataset_len} images, fewer than one global batch of "
                            f"{batch_size * world_size}; lower data.total_batch_size or add images")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.dataset_len // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_len, generator=g)[: len(self) * self.batch_size * self.world_size]
        mine = order[self.rank::self.world_size].tolist()
        for b in range(len(self)):
            yield [(i, self.epoch) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]


class TrainLoader(DataLoader):
    """A DataLoader whose batch sampler knows the epoch; see `build_train_loader`."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def per_rank_batch(total: int, world_size: int, what: str) -> int:
    if total < world_size or total % world_size:
        raise DataError(f"data.{what} = {total} does not divide over {world_size} workers; use a multiple of "
                        f"{world_size}")
    return total // world_size


def _worker_kwargs(cfg: Config) -> dict:
    """`data.num_workers` loader processes, at most one per core this process may use: more only queue for the
    same cores (and torch warns about them on every loader it builds)."""
    workers = min(cfg.data.num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count() or 1)
    return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available()}


def build_train_loader(cfg: Config, dataset, rank: int, world_size: int, seed: int) -> TrainLoader:
    """The train loader of `rank`: per-rank batch total_batch_size / world_size, stage-aware collate."""
    batch = per_rank_batch(cfg.data.total_batch_size, world_size, "total_batch_size")
    sampler = EpochBatchSampler(len(dataset), batch, rank, world_size, seed)
    generator = torch.Generator().manual_seed(seed * 1000 + rank)  # distinct, reproducible worker seeds
    return TrainLoader(dataset, batch_sampler=sampler, collate_fn=BatchCollator(cfg, train=True),
                       generator=generator, **_worker_kwargs(cfg))


def val_shard(dataset_len: int, rank: int, world_size: int) -> list[int]:
    """Indices rank r evaluates: r, r + world_size, ... (every index on exactly one rank)."""
    return list(range(rank, dataset_len, world_size))


def build_val_loader(cfg: Config, dataset, rank: int, world_size: int) -> DataLoader:
    """The val loader of `rank`: its shard, in order, batches of max(1, val_batch_size / world_size)."""
    batch = max(1, cfg.data.val_batch_size // world_size)
    return DataLoader(dataset, batch_size=batch, sampler=val_shard(len(dataset), rank, world_size), shuffle=False,
                      drop_last=False, collate_fn=BatchCollator(cfg, train=False), **_worker_kwargs(cfg))
