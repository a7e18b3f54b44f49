"""Loaders: the distributed epoch batch sampler, val sharding without duplicates, and the epoch reaching
persistent loader workers through the `(index, epoch)` keys."""

from __future__ import annotations

import pytest

from deim_ray.data.coco import CocoDetection
from deim_ray.data.errors import DataError
from deim_ray.data.loader import EpochBatchSampler, build_train_loader, build_val_loader
from deim_ray.data.transforms import build_train_transforms, build_val_transforms
from tests.data.helpers import make_cfg


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_deals_equal_disjoint_batches_with_the_epoch(world_size):
    per_rank = 6 // world_size
    samplers = [EpochBatchSampler(40, per_rank, r, world_size, seed=5) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(3)
    batches = [list(s) for s in samplers]
    assert {len(b) for b in batches} == {40 // 6} and all(len(s) == 40 // 6 for s in samplers)
    keys = [k for rank in batches for batch in rank for k in batch]
    assert all(len(batch) == per_rank for rank in batches for batch in rank)
    assert {epoch for _, epoch in keys} == {3}
    indices = [i for i, _ in keys]
    assert len(indices) == len(set(indices)) == 36


def test_sampler_shuffles_per_epoch_and_per_seed_reproducibly():
    def order(seed, epoch):
        s = EpochBatchSampler(40, 4, 0, 1, seed)
        s.set_epoch(epoch)
        return [i for b in s for i, _ in b]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)


def test_train_loader_batch_per_rank_and_length(shapes):
    cfg = make_cfg(shapes, data={"total_batch_size": 6})
    ds = CocoDetection(shapes[0].img_folder, shapes[0].ann_file, build_train_transforms(cfg))
    loader = build_train_loader(cfg, ds, rank=1, world_size=3, seed=0)
    loader.set_epoch(10)  # stage 2: cheap clean batches
    batches = list(loader)
    assert len(loader) == len(batches) == 40 // 6
    assert all(images.shape[0] == 2 for images, _ in batches)
    with pytest.raises(DataError, match="does not divide over 4 workers"):
        build_train_loader(cfg, ds, rank=0, world_size=4, seed=0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_train_loader(make_cfg(shapes, data={"total_batch_size": 48}), ds, rank=0, world_size=1, seed=0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_shards_cover_every_image_exactly_once(shapes, world_size):
    cfg = make_cfg(shapes, data={"val_batch_size": 6})
    ds = CocoDetection(shapes[1].img_folder, shapes[1].ann_file, build_val_transforms(cfg))
    assert len(ds) == 11
    per_rank = []
    for rank in range(world_size):
        ids = []
        for images, targets in build_val_loader(cfg, ds, rank, world_size):
            assert images.shape[0] <= max(1, 6 // world_size)
            ids += [int(t["image_id"]) for t in targets]
            assert all(t["orig_size"].tolist() == [96, 96] for t in targets)
        per_rank.append(ids)
    everything = [i for ids in per_rank for i in ids]
    assert sorted(everything) == sorted(ds.image_ids)
    assert [len(ids) for ids in per_rank] == [len(range(r, 11, world_size)) for r in range(world_size)]


def test_epoch_reaches_persistent_workers(shapes):
    cfg = make_cfg(shapes, data={"num_workers": 2}, augment={"mosaic_prob": 1.0, "mixup_prob": 0.0,
                                                            "copyblend_prob": 0.0})
    ds = CocoDetection(shapes[0].img_folder, shapes[0].ann_file, build_train_transforms(cfg))
    loader = build_train_loader(cfg, ds, rank=0, world_size=1, seed=0)
    assert loader.persistent_workers and loader.num_workers == 2
    seen, pids = {}, set()
    for epoch in (1, 2, 10, 2):
        loader.set_epoch(epoch)
        ops = [t["ops"] for _, targets in loader for t in targets]
        pids.add(tuple(sorted(w.pid for w in loader._iterator._workers)))
        seen.setdefault(epoch, []).append(ops)
    assert len(pids) == 1, "workers must survive across epochs"
    assert all("Mosaic" not in o for o in seen[1][0])  # before policy_epoch[0]
    assert all(o[0] == "Mosaic" for run in seen[2] for o in run)  # mosaic phase, mosaic_prob 1
    assert all(set(o) <= {"RandomHorizontalFlip"} for o in seen[10][0])  # stage 2: only the flip
