"""Training side by side with upstream DEIMv2's own `train.py`: best AP and per-epoch box losses per seed.

One description (`SETUP`) makes both configs: DEIMv2-Atto from a random backbone on the project's synthetic
shapes (the same image files and annotations for both sides; category ids rewritten 0-based so upstream's
`remap_mscoco_category: False` needs no spare classes), the Atto COCO recipe scaled to a short run
(Mosaic p 0.3, photometric / ZoomOut / IoUCrop, flip, sanitize min size 12, no MixUp/CopyBlend, flat-cosine LR,
EMA, the stage-2 restart from best_stg1), fp32 on CPU, one process with one thread, no loader workers.

Upstream: `train.py` of a checkout (`--upstream DIR`, Intellindust-AI-Lab/DEIMv2), run with a YAML that includes
its `configs/deimv2/deimv2_hgnetv2_atto_coco.yml` and overrides the run size. Its data ops implement torchvision's
pre-0.21 hooks, adapted here as in `pipeline_vs_upstream.py`; `calflops` (only for its FLOPs print) is stubbed.
deim_ray: `deim-ray train --workers 1` with a YAML that includes `configs/deimv2/deimv2_hgnetv2_atto_coco.yml`.
`ema_restart_decay` equals the EMA decay, because upstream's restart decay never takes effect (README).

Runs are interleaved by seed (upstream 0, deim_ray 0, upstream 1, ...); each run's result is kept as JSON under
`--work`, so an interrupted or repeated call only runs what is missing (`--sides ours` re-measures deim_ray).

    OMP_NUM_THREADS=1 python bench/train_vs_upstream.py --upstream ../DEIMv2 --work /tmp/tvu
    python bench/train_vs_upstream.py --upstream ../DEIMv2 --work /tmp/tvu --sides ours --tag fix1
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from deim_ray.config.schema import SyntheticConfig
from deim_ray.data.synthetic import generate_shapes

REPO = Path(__file__).resolve().parents[1]
SETUP = {
    "train_images": 192, "val_images": 48, "side": 192, "max_objects": 4, "batch": 8, "val_batch": 16,
    "epochs": 15, "stop_epoch": 11, "policy_epoch": [2, 7, 11], "flat_epoch": 7, "matcher_change_epoch": 9,
    "warmup_iter": 50, "lr_gamma": 0.5, "ema_decay": 0.99, "ema_warmups": 50, "mosaic_prob": 0.3,
    "mosaic_output": 96, "sanitize_min_size": 12,
}
SIDES = ("upstream", "ours")


def make_data(root: Path) -> dict[str, dict[str, str]]:
    """The shapes dataset under `root/shapes`, with 0-based category ids in `root/ann`."""
    train, val = generate_shapes(root / "shapes", SyntheticConfig(
        num_train=SETUP["train_images"], num_val=SETUP["val_images"], image_size=SETUP["side"],
        max_objects=SETUP["max_objects"], num_classes=3, seed=0))
    splits = {}
    for name, split in (("train", train), ("val", val)):
        doc = json.loads(Path(split.ann_file).read_text())
        index = {c["id"]: k for k, c in enumerate(sorted(doc["categories"], key=lambda c: c["id"]))}
        for category in doc["categories"]:
            category["id"] = index[category["id"]]
        for annotation in doc["annotations"]:
            annotation["category_id"] = index[annotation["category_id"]]
        ann = root / "ann" / f"{name}.json"
        ann.parent.mkdir(exist_ok=True)
        ann.write_text(json.dumps(doc))
        splits[name] = {"img_folder": split.img_folder, "ann_file": str(ann)}
    return splits


def upstream_config(upstream: Path, data: dict, out: Path) -> dict:
    side, s = [SETUP["side"]] * 2, SETUP
    sanitize = {"type": "SanitizeBoundingBoxes", "min_size": s["sanitize_min_size"]}
    ops = [{"type": "Mosaic", "output_size": s["mosaic_output"], "rotation_range": 10,
            "translation_range": [0.1, 0.1], "scaling_range": [0.5, 1.5], "probability": 1.0, "fill_value": 0,
            "use_cache": True, "max_cached_images": 50, "random_pop": True},
           {"type": "RandomPhotometricDistort", "p": 0.5}, {"type": "RandomZoomOut", "fill": 0},
           {"type": "RandomIoUCrop", "p": 0.8}, sanitize, {"type": "RandomHorizontalFlip"},
           {"type": "Resize", "size": side}, sanitize, {"type": "ConvertPILImage", "dtype": "float32", "scale": True},
           {"type": "ConvertBoxes", "fmt": "cxcywh", "normalize": True}]
    return {
        "__include__": [str(upstream / "configs/deimv2/deimv2_hgnetv2_atto_coco.yml")],
        "output_dir": str(out), "num_classes": 3, "remap_mscoco_category": False, "eval_spatial_size": side,
        "print_freq": 10_000, "checkpoint_freq": 10_000, "use_amp": False,
        "HGNetv2": {"pretrained": False},
        "epoches": s["epochs"], "warmup_iter": s["warmup_iter"], "flat_epoch": s["flat_epoch"],
        "no_aug_epoch": s["epochs"] - s["stop_epoch"], "lr_gamma": s["lr_gamma"],
        "ema": {"type": "ModelEMA", "decay": s["ema_decay"], "warmups": s["ema_warmups"], "start": 0},
        "DEIMCriterion": {"matcher": {"matcher_change_epoch": s["matcher_change_epoch"]}},
        "train_dataloader": {
            "total_batch_size": s["batch"], "num_workers": 0,
            "dataset": {**data["train"], "transforms": {"ops": ops, "mosaic_prob": s["mosaic_prob"], "policy": {
                "name": "stop_epoch", "epoch": s["policy_epoch"],
                "ops": ["Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"]}}},
            "collate_fn": {"stop_epoch": s["stop_epoch"], "ema_restart_decay": s["ema_decay"],
                           "base_size": SETUP["side"], "base_size_repeat": None}},
        "val_dataloader": {
            "total_batch_size": s["val_batch"], "num_workers": 0,
            "dataset": {**data["val"], "transforms": {"ops": [
                {"type": "Resize", "size": side}, {"type": "ConvertPILImage", "dtype": "float32", "scale": True}]}}},
    }


def our_config(data: dict) -> dict:
    s = SETUP
    return {
        "__include__": [str(REPO / "configs/deimv2/deimv2_hgnetv2_atto_coco.yml")],
        "model": {"backbone_pretrained": None},
        "data": {"train": data["train"], "val": data["val"], "image_size": [s["side"]] * 2,
                 "total_batch_size": s["batch"], "val_batch_size": s["val_batch"], "num_workers": 0},
        "augment": {"policy_epoch": s["policy_epoch"], "mosaic_prob": s["mosaic_prob"],
                    "mosaic": {"output_size": s["mosaic_output"]}, "sanitize_min_size": s["sanitize_min_size"]},
        "schedule": {"epochs": s["epochs"], "stop_epoch": s["stop_epoch"],
                     "no_aug_epochs": s["epochs"] - s["stop_epoch"],
                     "matcher_change_epoch": s["matcher_change_epoch"], "ema_restart_decay": s["ema_decay"],
                     "stage2_restart": True},
        "lr_scheduler": {"warmup_iter": s["warmup_iter"], "flat_epoch": s["flat_epoch"],
                         "no_aug_epoch": s["epochs"] - s["stop_epoch"], "lr_gamma": s["lr_gamma"]},
        "ema": {"decay": s["ema_decay"], "warmups": s["ema_warmups"], "start": 0},
        "train": {"print_freq": 10_000, "trackers": []},
        "eval": {"num_top_queries": 300},
    }


def run_upstream(upstream: Path, data: dict, seed: int, out: Path) -> list[dict]:
    config = out / "upstream.yml"
    config.write_text(yaml.safe_dump(upstream_config(upstream, data, out)))
    cmd = [sys.executable, __file__, "--upstream", str(upstream), "--run-upstream", "--",
           str(upstream / "train.py"), "-c", str(config), "--seed", str(seed), "-d", "cpu"]
    _run(cmd, out / "upstream.log")
    return [{"epoch": e["epoch"], "ap": e["test_coco_eval_bbox"][0], "bbox": e["train_loss_bbox"],
             "giou": e["train_loss_giou"], "lr": e["train_lr"]}
            for e in map(json.loads, (out / "log.txt").read_text().splitlines())]


def run_ours(data: dict, seed: int, out: Path) -> list[dict]:
    config = out / "deim_ray.yml"
    config.write_text(yaml.safe_dump(our_config(data)))
    cmd = [sys.executable, "-m", "deim_ray", "train", "-c", str(config), "-u", f"train.seed={seed}",
           "--storage", str(out / "runs"), "--name", "run", "--workers", "1", "--restart"]
    _run(cmd, out / "deim_ray.log")
    return [{"epoch": e["epoch"], "ap": e["ap"], "bbox": e["losses"]["loss_bbox"],
             "giou": e["losses"]["loss_giou"], "lr": e["lr"]}
            for e in map(json.loads, (out / "runs" / "run" / "metrics.jsonl").read_text().splitlines())]


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    if done.returncode != 0:
        sys.exit(f"{cmd[1:4]} failed ({done.returncode}); see {log}")


def upstream_main(upstream: Path, argv: list[str]) -> None:
    """Run upstream's train.py in this process with its data ops adapted to this torchvision."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline_vs_upstream import import_upstream
    import_upstream(upstream)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


def measure(args, data: dict) -> dict:
    """Run every missing (side, seed), interleaved; returns {side: {seed: result}}."""
    results: dict = {side: {} for side in args.sides}
    for seed in args.seeds:
        for side in args.sides:
            out = args.work / f"{side}-{args.tag if side == 'ours' else 'ref'}-seed{seed}"
            done = out / "result.json"
            if not done.exists():
                out.mkdir(parents=True, exist_ok=True)
                print(f"running {side} seed {seed} -> {out}", flush=True)
                started = time.monotonic()
                epochs = (run_upstream(args.upstream, data, seed, out) if side == "upstream"
                          else run_ours(data, seed, out))
                done.write_text(json.dumps({"wall_s": time.monotonic() - started, "epochs": epochs}))
            results[side][seed] = json.loads(done.read_text())
    return results


def report(results: dict) -> None:
    print(f"setup: {json.dumps(SETUP)}")
    best = {}
    for side, runs in results.items():
        best[side] = [max(e["ap"] for e in r["epochs"]) for r in runs.values()]
        walls = " ".join(f"{r['wall_s']:.0f}s" for r in runs.values())
        spread = f" ± {statistics.stdev(best[side]):.3f}" if len(best[side]) > 1 else ""
        print(f"{side:<9} best AP per seed {' '.join(f'{v:.3f}' for v in best[side])}   "
              f"mean {statistics.mean(best[side]):.3f}{spread}   wall {walls}")
    if len(best) == 2:
        print(f"difference (deim_ray - upstream) of the means: "
              f"{statistics.mean(best['ours']) - statistics.mean(best['upstream']):+.3f}")
    print("per epoch, each seed (AP / bbox / GIoU):")
    for side, runs in results.items():
        for seed, r in runs.items():
            cells = " ".join(f"{e['ap']:.3f}/{e['bbox']:.2f}/{e['giou']:.2f}" for e in r["epochs"])
            print(f"  {side:<9} seed {seed}: {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--upstream", type=Path, required=True, help="a checkout of Intellindust-AI-Lab/DEIMv2")
    parser.add_argument("--work", type=Path, default=Path("train_vs_upstream"), help="data, runs and results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--tag", default="main", help="names deim_ray's results (re-measure after a change)")
    parser.add_argument("--run-upstream", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.run_upstream:
        return upstream_main(args.upstream.resolve(), rest[1:] if rest[:1] == ["--"] else rest)
    if not (args.upstream / "train.py").is_file():
        parser.error(f"{args.upstream} is not a DEIMv2 checkout (no train.py)")
    args.upstream, args.work = args.upstream.resolve(), args.work.resolve()
    report(measure(args, make_data(args.work)))


if __name__ == "__main__":
    main()
