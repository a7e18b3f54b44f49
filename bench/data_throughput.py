"""Data pipeline throughput: images per second in ONE loader worker, deim_ray's stage-aware pipeline
(per-sample ops + batch collation with MixUp/CopyBlend/multi-scale) next to a plain torchvision v2 baseline
(decode + Resize + flip + to float tensor + stack) on the same synthetic images.

A loader worker runs single-threaded, so this runs in-process with one intra-op thread; multiply by
`data.num_workers` for a rank's ceiling (on enough cores).

    python bench/data_throughput.py                 # 800 px sources, 200 images per measurement
    python bench/data_throughput.py --images 400 --side 512 --root /tmp/shapes640
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from deim_ray.config.schema import AugmentConfig, Config, DataConfig, ScheduleConfig, SyntheticConfig
from deim_ray.data.coco import CocoDetection
from deim_ray.data.collate import BatchCollator
from deim_ray.data.synthetic import generate_shapes
from deim_ray.data.transforms import build_train_transforms

BATCH = 8


def _config(root: Path, side: int, count: int) -> Config:
    train, val = generate_shapes(root, SyntheticConfig(num_train=count, num_val=8, image_size=side, max_objects=6))
    augment = AugmentConfig(policy_epoch=(4, 78, 148), mixup_epochs=(4, 78), copyblend_epochs=(4, 78),
                            base_size_repeat=20)
    return Config(data=DataConfig(train=train, val=val, image_size=(640, 640)), augment=augment,
                  schedule=ScheduleConfig(epochs=160, stop_epoch=148))


def _rate(run_batch, count: int) -> float:
    run_batch(list(range(BATCH)))  # warm-up: caches, first-call overheads
    started = time.perf_counter()
    for start in range(0, count - BATCH + 1, BATCH):
        run_batch(list(range(start, start + BATCH)))
    return (count // BATCH * BATCH) / (time.perf_counter() - started)


def deim_rate(cfg: Config, epoch: int, count: int) -> float:
    dataset = CocoDetection(cfg.data.train.img_folder, cfg.data.train.ann_file, build_train_transforms(cfg))
    collate = BatchCollator(cfg, train=True)
    return _rate(lambda idx: collate([dataset[(i, epoch)] for i in idx]), count)


def baseline_rate(cfg: Config, count: int) -> float:
    dataset = CocoDetection(cfg.data.train.img_folder, cfg.data.train.ann_file)
    pipeline = v2.Compose([v2.Resize(list(cfg.data.image_size)), v2.RandomHorizontalFlip(), v2.ToImage(),
                           v2.ToDtype(torch.float32, scale=True)])

    def run_batch(idx):
        samples = []
        for i in idx:
            with Image.open(dataset.records[i].path) as im:
                samples.append(pipeline(im.convert("RGB")))
        return torch.stack(samples)

    return _rate(run_batch, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images per measurement")
    parser.add_argument("--side", type=int, default=800, help="side of the synthetic source images")
    parser.add_argument("--root", type=Path, default=None, help="dataset folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args.root or Path(tmp) / "shapes", args.side, args.images)
        rates = {epoch: deim_rate(cfg, epoch, args.images) for epoch in (4, 100, 150)}
        base = max(baseline_rate(cfg, args.images) for _ in range(2))  # best of two: the machine may be shared
        print(f"one loader worker, {args.side}px sources -> 640x640, batches of {BATCH}, {args.images} images")
        print(f"{'pipeline':<58} {'img/s':>8} {'vs baseline':>12}")
        print(f"{'torchvision v2 baseline (Resize + flip + to float)':<58} {base:>8.1f} {1.0:>11.2f}x")
        for epoch, what in ((4, "stage 1, Mosaic phase (+MixUp/CopyBlend, multi-scale)"),
                            (100, "stage 1, no-Mosaic phase (ZoomOut/IoUCrop, multi-scale)"),
                            (150, "stage 2 (clean resize)")):
            print(f"{what:<58} {rates[epoch]:>8.1f} {rates[epoch] / base:>11.2f}x")


if __name__ == "__main__":
    main()
