"""Data pipeline speed against upstream DEIMv2's, per schedule phase and for evaluation, on the same images.

One loader process's work up to a training-ready batch (decode, per-sample ops, collate with MixUp/CopyBlend)
for both pipelines, in-process with one intra-op thread (what a DataLoader worker runs with). Rates are
images per second of this process's CPU time (`time.process_time`), so other load on the machine disturbs
them less than wall time would; repeats interleave the two pipelines (A B, B A, ...) so drift hits both.

Schedule: DEIMv2-N's (policy epochs [4, 78, 148], Mosaic p=0.5 with a 50-image cache, MixUp p=0.5 and
CopyBlend p=0.4 in [4, 78), no multi-scale, stop epoch 148), 640x640 output, batches of 8. Phases: epoch 4
(Mosaic), 100 (after Mosaic: ZoomOut/IoUCrop), 150 (stage 2: resize only); then the evaluation loader
(resize, convert, collate) on the same images. Sources are JPEGs (quality 92) of `--source-size` pixels square:
larger than the 640 px training size, they show what decoding costs on users' photos and frames.

Upstream is imported from a checkout (`--upstream DIR`, Intellindust-AI-Lab/DEIMv2); two modules its package
imports but the data pipeline never uses (tensorboard, calflops) are stubbed when missing.

    python bench/pipeline_vs_upstream.py --upstream ../DEIMv2
    python bench/pipeline_vs_upstream.py --upstream ../DEIMv2 --images 160 --repeats 5 --source-size 1920
    python bench/pipeline_vs_upstream.py --upstream ../DEIMv2 --source-size 1920 --phases stage2 eval
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import random
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torchvision.transforms import v2

from deim_ray.config.schema import (AugmentConfig, Config, CopyBlendConfig, DataConfig, ScheduleConfig,
                                    SyntheticConfig)
from deim_ray.data.coco import CocoDetection
from deim_ray.data.collate import BatchCollator
from deim_ray.data.synthetic import generate_shapes
from deim_ray.data.transforms import build_train_transforms, build_val_transforms

BATCH = 8
PHASES = {"mosaic": (4, "train", "stage 1, Mosaic phase"), "after-mosaic": (100, "train", "stage 1, after Mosaic"),
          "stage2": (150, "train", "stage 2"), "eval": (0, "val", "evaluation loader")}
"""name -> (epoch, loader, label); the evaluation loader ignores the epoch."""
POLICY_OPS = ["Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"]


def our_config(root: Path, side: int, count: int) -> Config:
    train, val = generate_shapes(root, SyntheticConfig(num_train=count, num_val=8, image_size=side, max_objects=6))
    augment = AugmentConfig(policy_epoch=(4, 78, 148), mosaic_prob=0.5, mixup_prob=0.5, mixup_epochs=(4, 78),
                            copyblend_prob=0.4, copyblend_epochs=(4, 78),
                            copyblend=CopyBlendConfig(area_threshold=100, num_objects=3), base_size_repeat=None)
    return Config(data=DataConfig(train=train, val=val, image_size=(640, 640), total_batch_size=BATCH),
                  augment=augment, schedule=ScheduleConfig(epochs=160, stop_epoch=148))


def ours(cfg: Config) -> dict:
    """Per loader, a function running one batch of indices at an epoch, as deim_ray's loaders build them."""
    runs = {}
    for loader, build in (("train", build_train_transforms), ("val", build_val_transforms)):
        dataset = CocoDetection(cfg.data.train.img_folder, cfg.data.train.ann_file, build(cfg, scale=False))
        collate = BatchCollator(cfg, train=loader == "train")
        runs[loader] = (lambda d, c: lambda indices, epoch: c([d[(i, epoch)] for i in indices]))(dataset, collate)
    return runs


def import_upstream(root: Path):
    """Upstream's `engine.data`; the modules its package needs only for logging and FLOPs are stubbed if absent."""
    sys.path.insert(0, str(root))
    for package, module, attr, stub in (("tensorboard", "torch.utils.tensorboard", "SummaryWriter", None),
                                        ("calflops", "calflops", "calculate_flops", _flops_not_measured)):
        if importlib.util.find_spec(package) is None:
            sys.modules[module] = types.SimpleNamespace(**{attr: stub})
    with contextlib.redirect_stdout(io.StringIO()):
        import engine  # noqa: F401  (registers upstream's classes)
        from engine import data
    _new_transform_api(data)
    return data


def _flops_not_measured(*args, **kwargs):
    """Stands in for `calflops.calculate_flops`, whose numbers upstream's training only prints."""
    return "not measured", "not measured", None


def _new_transform_api(data) -> None:
    """Upstream's own ops implement torchvision's pre-0.21 hooks (`_transform`, `_get_params`); newer torchvision
    calls `transform` / `make_params`, so point those at upstream's code."""
    for cls in {obj for obj in vars(data).values() if isinstance(obj, type) and issubclass(obj, v2.Transform)}:
        for old, new in (("_transform", "transform"), ("_get_params", "make_params")):
            if old in vars(cls) and new not in vars(cls):
                setattr(cls, new, vars(cls)[old])


def upstream(data, cfg: Config) -> dict:
    """Per loader, upstream's dataset, Compose and BatchImageCollateFunction: train with configs/base/deimv2.yml's
    ops and the N settings, val with configs/base/dataloader.yml's (Resize, ConvertPILImage)."""
    return {"train": _upstream_train(data, cfg), "val": _upstream_val(data, cfg)}


def _upstream_train(data, cfg: Config):
    ops = [
        {"type": "Mosaic", "output_size": 320, "rotation_range": 10, "translation_range": [0.1, 0.1],
         "scaling_range": [0.5, 1.5], "probability": 1.0, "fill_value": 0, "use_cache": True,
         "max_cached_images": 50, "random_pop": True},
        {"type": "RandomPhotometricDistort", "p": 0.5}, {"type": "RandomZoomOut", "fill": 0},
        {"type": "RandomIoUCrop", "p": 0.8}, {"type": "SanitizeBoundingBoxes", "min_size": 1},
        {"type": "RandomHorizontalFlip"}, {"type": "Resize", "size": [640, 640]},
        {"type": "SanitizeBoundingBoxes", "min_size": 1},
        {"type": "ConvertPILImage", "dtype": "float32", "scale": True},
        {"type": "ConvertBoxes", "fmt": "cxcywh", "normalize": True}]
    with contextlib.redirect_stdout(io.StringIO()):  # upstream prints every op it builds
        transforms = data.Compose(ops, policy={"name": "stop_epoch", "epoch": [4, 78, 148], "ops": POLICY_OPS},
                                  mosaic_prob=0.5)
        dataset = data.CocoDetection(cfg.data.train.img_folder, cfg.data.train.ann_file, transforms)
        collate = data.BatchImageCollateFunction(
            stop_epoch=148, base_size_repeat=None, mixup_prob=0.5, mixup_epochs=[4, 78], copyblend_prob=0.4,
            copyblend_epochs=[4, 78], area_threshold=100, num_objects=3, with_expand=True, expand_ratios=[0.1, 0.25])

    def run(indices, epoch):
        dataset.set_epoch(epoch)
        collate.set_epoch(epoch)
        with contextlib.redirect_stdout(io.StringIO()):
            return collate([dataset[i] for i in indices])
    return run


def _upstream_val(data, cfg: Config):
    ops = [{"type": "Resize", "size": [640, 640]}, {"type": "ConvertPILImage", "dtype": "float32", "scale": True}]
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = data.CocoDetection(cfg.data.train.img_folder, cfg.data.train.ann_file, data.Compose(ops))
        collate = data.BatchImageCollateFunction()
    return lambda indices, epoch: collate([dataset[i] for i in indices])


def rate(run, epoch: int, count: int) -> float:
    """Images per CPU second over `count` images (whole batches), after one warm-up batch."""
    run(list(range(BATCH)), epoch)
    started = time.process_time()
    done = 0
    for start in range(0, count - BATCH + 1, BATCH):
        run(list(range(start, start + BATCH)), epoch)
        done += BATCH
    return done / (time.process_time() - started)


def spread(values: list[float]) -> str:
    return f"{min(values):7.1f} {statistics.median(values):7.1f} {max(values):7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", type=Path, required=True, help="a checkout of Intellindust-AI-Lab/DEIMv2")
    parser.add_argument("--images", type=int, default=200, help="images per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per phase")
    parser.add_argument("--source-size", type=int, default=640,
                        help="side of the synthetic JPEG sources, e.g. 640, 800, 1280, 1920")
    parser.add_argument("--root", type=Path, default=None, help="dataset folder (default: a temporary one)")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES),
                        help="phases to measure (a long run on large sources can be split)")
    args = parser.parse_args()
    if not (args.upstream / "engine" / "data" / "dataloader.py").is_file():
        parser.error(f"{args.upstream} is not a DEIMv2 checkout (no engine/data/dataloader.py)")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_config(args.root or Path(tmp) / "shapes", args.source_size, args.images)
        pipelines = {"deim_ray": ours(cfg), "upstream": upstream(import_upstream(args.upstream), cfg)}
        print(f"one process, 1 thread, {args.source_size}px JPEG sources -> 640x640, batches of {BATCH}, "
              f"{args.images} images per measurement, {args.repeats} interleaved repeats; "
              f"images per CPU-second (min median max)")
        print(f"{'phase':<24} {'deim_ray':>23} {'upstream':>23} {'ratio':>23}")
        for epoch, loader, what in (PHASES[name] for name in args.phases):
            rates = {name: [] for name in pipelines}
            for r in range(args.repeats):
                order = list(pipelines) if r % 2 == 0 else list(reversed(pipelines))
                for name in order:
                    torch.manual_seed(r)
                    random.seed(r)
                    rates[name].append(rate(pipelines[name][loader], epoch, args.images))
            ratios = [a / b for a, b in zip(rates["deim_ray"], rates["upstream"])]
            print(f"{what:<24} {spread(rates['deim_ray']):>23} {spread(rates['upstream']):>23} "
                  f"{min(ratios):7.2f} {statistics.median(ratios):7.2f} {max(ratios):7.2f}", flush=True)


if __name__ == "__main__":
    main()
