"""What deim_ray and Ray Train add to training: per-epoch train time under deim_ray (one Ray Train worker)
against a bare PyTorch loop of the same model, loss, optimizer and loader, plus the fixed
costs of a two-stage run.

Repeats interleave the two (bare, deim_ray, deim_ray, bare, ...). The bare loop runs in a fresh process of its
own, as each Ray Train worker does: run in this process it would share it with the Ray driver this script becomes
after the first deim_ray run, whose threads compete for the GIL. Like deim_ray, it evaluates after each epoch
(untimed). The train part of an epoch is compared
(deim_ray's `epoch_time_s` from metrics.jsonl, the bare loop's own clock); evaluation is excluded from both.
Fixed costs come from the manifest's transition times (one-second resolution): start (call to stage 1
running), stage-1 and stage-2 worker groups (stage wall time minus its epochs' train and eval time), the
switch (stage 1 done to stage 2 running) and the end (done to return).

    python bench/launcher_overhead.py                   # configs/demo/tiny.yml, 2 repeats
    python bench/launcher_overhead.py -c configs/demo/shapes.yml --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deim_ray.config.loader import load_config
from deim_ray.config.schema import Config
from deim_ray.data.synthetic import synthetic_splits
from deim_ray.engine.data import build_data
from deim_ray.engine.ema import ModelEMA
from deim_ray.engine.loop import evaluate
from deim_ray.engine.lr import LRSchedule
from deim_ray.engine.optim import build_optimizer
from deim_ray.models.build import build_model
from deim_ray.models.loss import forward_loss


def _config(path: str, root: Path) -> Config:
    cfg = load_config(path, [])
    if cfg.data.synthetic is None:
        return cfg
    train, val = synthetic_splits(root)
    return load_config(path, [f"data.train.img_folder={train.img_folder}", f"data.train.ann_file={train.ann_file}",
                              f"data.val.img_folder={val.img_folder}", f"data.val.ann_file={val.ann_file}"])


def bare_epochs(cfg: Config) -> list[float]:
    """Train-part seconds of each epoch of a plain loop doing the recipe's per-step work: the LR of the
    iteration, forward, loss, backward, clip, step, EMA update (as upstream's own loop does)."""
    torch.set_num_threads(1)  # a Ray Train worker with one CPU runs with one thread
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg, 0, 1)
    model = build_model(cfg.model, data.num_classes)
    optimizer = build_optimizer(model, cfg.optimizer)
    lr_schedule = LRSchedule(optimizer, cfg.lr_scheduler, cfg.schedule.epochs, len(data.train_loader))
    ema = ModelEMA(model, cfg.ema.decay, cfg.ema.warmups, cfg.ema.start) if cfg.ema.enabled else None
    model.train()
    times = []
    for epoch in range(cfg.schedule.epochs):
        data.train_loader.set_epoch(epoch)
        started = time.monotonic()
        for i, (images, targets) in enumerate(data.train_loader):
            lr_schedule.set_iteration(epoch, i)
            loss, _ = forward_loss(model, images, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_max_norm)
            optimizer.step()
            if ema is not None:
                ema.update(model)
        times.append(time.monotonic() - started)
        # untimed, as deim_ray's: the first steps after an evaluation are slower (1-s epochs showed ~0.08 s)
        evaluate(ema.module if ema is not None else model, data.val_loader, coco_gt=data.coco_gt,
                 category_ids=data.category_ids, device=torch.device("cpu"), num_top_queries=cfg.eval.num_top_queries)
    return times


def bare_in_fresh_process(config: str, root: Path) -> list[float]:
    """`bare_epochs` in a new Python process (no Ray in it)."""
    out = subprocess.run([sys.executable, __file__, "-c", config, "--bare-only", str(root)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _when(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()


def deim_ray_run(cfg: Config, storage: Path, name: str) -> tuple[list[float], dict[str, float]]:
    """Train-part seconds per epoch of a real two-stage run with one Ray Train worker, and its fixed costs."""
    from deim_ray.driver.run import RunRequest, run_training

    called = time.time()
    run_training(RunRequest(cfg=cfg, storage_uri=str(storage), name=name, workers=1))
    returned = time.time()
    run_dir = storage / name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    at = {t["state"]: _when(t["time"]) for t in json.loads((run_dir / "manifest.json").read_text())["transitions"]}
    spent = {s: sum(r["epoch_time_s"] + r["eval_time_s"] for r in rows if r["stage"] == s) for s in (1, 2)}
    fixed = {"start": at["STAGE1_RUNNING"] - called,
             "stage-1 worker group": at["STAGE1_DONE"] - at["STAGE1_RUNNING"] - spent[1],
             "switch": at["STAGE2_RUNNING"] - at["STAGE1_DONE"],
             "stage-2 worker group": at["DONE"] - at["STAGE2_RUNNING"] - spent[2],
             "end": returned - at["DONE"]}
    return [r["epoch_time_s"] for r in rows], fixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/demo/tiny.yml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bare-only", type=Path, help=argparse.SUPPRESS)  # the bare loop's own process
    args = parser.parse_args()
    if args.bare_only:
        print(json.dumps(bare_epochs(_config(args.config, args.bare_only))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args.config, Path(tmp) / "data")
        stop = cfg.schedule.stop_epoch
        bare, ours, fixed = [], [], []
        for r in range(args.repeats):
            for kind in (("bare", "deim_ray") if r % 2 == 0 else ("deim_ray", "bare")):
                if kind == "bare":
                    bare.append(bare_in_fresh_process(args.config, Path(tmp) / "data"))
                else:
                    epochs, costs = deim_ray_run(cfg, Path(tmp) / "runs", f"overhead-{r}")
                    ours.append(epochs)
                    fixed.append(costs)
        print(f"{args.config}: {cfg.schedule.epochs} epochs ({stop} in stage 1), {args.repeats} interleaved repeats, "
              f"one Ray Train worker vs a bare loop in a process of its own")
        for stage, epochs in ((1, range(1, stop)), (2, range(stop + 1, cfg.schedule.epochs))):  # first of each warms up
            ratios = [b[e] / o[e] for b, o in zip(bare, ours) for e in epochs]
            if ratios:
                totals = sum(b[e] for b in bare for e in epochs) / sum(o[e] for o in ours for e in epochs)
                print(f"stage {stage} train time per epoch, bare/deim_ray: median {statistics.median(ratios):.2f} "
                      f"(min {min(ratios):.2f}, max {max(ratios):.2f}; bare median "
                      f"{statistics.median(b[e] for b in bare for e in epochs):.2f}s, deim_ray median "
                      f"{statistics.median(o[e] for o in ours for e in epochs):.2f}s); all its epochs together "
                      f"{totals:.3f}")
        for key in fixed[0]:
            print(f"fixed cost {key:<22} median {statistics.median(c[key] for c in fixed):6.1f}s")


if __name__ == "__main__":
    main()
