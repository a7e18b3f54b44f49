"""The GPU path, measured: a short two-stage job with `--gpu` (NCCL, AMP) per model size, next to a bare
PyTorch loop of the same model on one GPU.

For each variant (default Atto, N and S at 640 px) it generates synthetic 640 px shapes, runs
`run_training(..., gpu=True)` on all visible GPUs (one Ray Train worker each) for 3 epochs (2 in stage 1
with Mosaic, MixUp and CopyBlend, 1 in stage 2), and prints per stage: images/s per GPU, the data-wait
fraction (both from metrics.jsonl), the stage-switch time (manifest transitions), and the bare loop's
images/s on one GPU under the same autocast. Needs CUDA; `--dry-run` builds and prints the configs only.

Data wait with the variants' own loader workers (`--loader-workers 0` keeps the config's `data.num_workers`) on
sources larger than the training size (`--source-size`, JPEG) shows what reduced-scale decoding saves the GPU;
run the same command at a commit before it for the "before" line.

    python bench/gpu_check.py                         # atto, n, s; 1024 images; all GPUs
    python bench/gpu_check.py --variants n --images 2048 --loader-workers 8
    python bench/gpu_check.py --variants atto,n --loader-workers 0 --source-size 1920   # data wait, default workers
    python bench/gpu_check.py --dry-run               # no GPU needed: checks the arguments and configs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from deim_ray.config.loader import load_config
from deim_ray.config.schema import Config
from deim_ray.data.synthetic import synthetic_splits

CONFIGS = {"atto": "configs/deimv2/deimv2_hgnetv2_atto_coco.yml", "n": "configs/deimv2/deimv2_hgnetv2_n_coco.yml",
           "s": "configs/deimv2/deimv2_dinov3_s_coco.yml"}


def short_config(variant: str, root: Path, images: int, loader_workers: int, batch: int,
                 source_size: int = 640) -> Config:
    """The variant's config at 640 px on synthetic `source_size` px JPEGs: epochs 0-1 stage 1 (Mosaic phase, then
    after it), 2 stage 2. `loader_workers` 0 keeps the config's own `data.num_workers`."""
    train, val = synthetic_splits(root)
    workers = [f"data.num_workers={loader_workers}"] if loader_workers else []
    return load_config(CONFIGS[variant], workers + [
        f"data.train.img_folder={train.img_folder}", f"data.train.ann_file={train.ann_file}",
        f"data.val.img_folder={val.img_folder}", f"data.val.ann_file={val.ann_file}",
        f"data.synthetic.num_train={images}", "data.synthetic.num_val=128", f"data.synthetic.image_size={source_size}",
        "data.synthetic.num_classes=8", "data.synthetic.max_objects=8", "data.image_size=[640,640]",
        f"data.total_batch_size={batch}", f"data.val_batch_size={batch}",
        "schedule.epochs=3", "schedule.stop_epoch=2", "augment.policy_epoch=[0,1,2]",
        "augment.mixup_epochs=[0,1]", "augment.copyblend_epochs=[0,2]", "lr_scheduler.warmup_iter=10",
        "lr_scheduler.flat_epoch=1", "lr_scheduler.no_aug_epoch=1", "eval.num_top_queries=100"])


def bare_images_per_s(cfg: Config, steps: int = 30) -> float:
    """Images/s of forward + loss + backward + step on one GPU, on one real batch repeated (no loader)."""
    from deim_ray.engine.data import build_data
    from deim_ray.engine.optim import build_optimizer
    from deim_ray.engine.trainer import _amp_dtype
    from deim_ray.models.build import build_model
    from deim_ray.models.loss import forward_loss

    device = torch.device("cuda", 0)
    data = build_data(cfg, 0, 1)
    data.train_loader.set_epoch(cfg.schedule.stop_epoch)
    images, targets = next(iter(data.train_loader))
    images = images.to(device)
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    model = build_model(cfg.model, data.num_classes).to(device).train()
    optimizer = build_optimizer(model, cfg.optimizer)
    amp = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    for i in range(steps + 5):
        if i == 5:  # after warm-up (cuDNN autotuning, allocator)
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            loss, _ = forward_loss(model, images, targets)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()
    torch.cuda.synchronize()
    return steps * len(images) / (time.perf_counter() - started)


def run_job(cfg: Config, storage: Path, name: str, gpus: int) -> dict:
    from deim_ray.driver.run import RunRequest, run_training

    started = time.time()
    run_training(RunRequest(cfg=cfg, storage_uri=str(storage), name=name, workers=gpus, gpu=True))
    run_dir = storage / name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = {t["state"]: t["time"] for t in json.loads((run_dir / "manifest.json").read_text())["transitions"]}
    return {"rows": rows, "transitions": times, "wall_s": time.time() - started}


def _seconds_between(times: dict, a: str, b: str) -> float:
    from datetime import datetime

    parse = lambda s: datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    return (parse(times[b]) - parse(times[a])).total_seconds()


def report(variant: str, job: dict, bare: float, gpus: int) -> None:
    rows = job["rows"]
    for stage in (1, 2):
        mine = [r for r in rows if r["stage"] == stage]
        per_gpu = statistics.median(r["images_per_s"] for r in mine) / gpus
        wait = statistics.median(r["data_wait"] for r in mine)
        print(f"{variant:<5} stage {stage}: {per_gpu:8.1f} img/s/GPU  data wait {100 * wait:5.1f}%  "
              f"bare loop {bare:8.1f} img/s  ratio {per_gpu / bare:5.2f}")
    print(f"{variant:<5} stage switch {_seconds_between(job['transitions'], 'STAGE1_DONE', 'STAGE2_RUNNING'):.0f}s, "
          f"whole job {job['wall_s']:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="atto,n,s", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--images", type=int, default=1024, help="synthetic training images")
    parser.add_argument("--batch", type=int, default=32, help="total batch size (over all GPUs)")
    parser.add_argument("--loader-workers", type=int, default=8,
                        help="data.num_workers per GPU; 0 keeps the variant config's own")
    parser.add_argument("--source-size", type=int, default=640, help="side of the synthetic JPEG sources")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--dry-run", action="store_true", help="build and print the configs; run nothing")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in CONFIGS]
    if unknown or not variants:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(CONFIGS)}")
    gpus = args.gpus or torch.cuda.device_count()
    if args.batch % max(gpus, 1):
        parser.error(f"--batch {args.batch} does not divide over {gpus} GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        configs = {v: short_config(v, Path(tmp) / "data", args.images, args.loader_workers, args.batch,
                                   args.source_size) for v in variants}
        for v, cfg in configs.items():
            print(f"{v}: DEIMv2-{cfg.model.variant}, {cfg.data.image_size[0]} px from {args.source_size} px, "
                  f"batch {cfg.data.total_batch_size}, "
                  f"{cfg.data.num_workers} loader workers per GPU, epochs {cfg.schedule.epochs} "
                  f"(stop {cfg.schedule.stop_epoch}), AMP {cfg.train.amp_dtype if cfg.train.use_amp else 'off'}")
        if args.dry_run:
            return 0
        if gpus < 1:
            print("gpu_check: error: no CUDA device visible; use --dry-run to check the configs", file=sys.stderr)
            return 2
        print(f"{gpus} x {torch.cuda.get_device_name(0)}")
        for v, cfg in configs.items():
            job = run_job(cfg, Path(tmp) / "runs", f"gpu-{v}", gpus)
            report(v, job, bare_images_per_s(cfg), gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
