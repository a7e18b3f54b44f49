"""driver layer: `deim-ray eval` and the per-class report of a run.

`evaluate_model` scores a model — a run's final artifact, a `final.pth`, or an exported `.onnx` run with ONNX
Runtime — on a dataset's val split, on this machine (no Ray): the images go through the preprocessing the model
was trained with (`inference.Preprocess`, from the artifact's metadata), all of the model's top detections are
kept as in training's evaluation, and faster-coco-eval scores them with `engine.evaluator.coco_evaluation`, so
the run's own val set gives back the run's final AP. The per-class table printed here is also the one the end
of `train` prints for the resolved artifact, read from its epoch's `metrics.jsonl` line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from deim_ray.config.schema import SplitConfig, StorageConfig
from deim_ray.data.errors import DataError
from deim_ray.engine.evaluator import (COCO_STAT_NAMES, CocoResult, DetectionCollector, coco_evaluation, confusion_matrix,
                                      merge_detections)

ONNX_SUFFIX = ".onnx"
PR_PLOT, CONFUSION_PLOT = "pr_curves.png", "confusion_matrix.png"
CONFUSION_IOU, CONFUSION_SCORE = 0.5, 0.25
"""The confusion matrix counts detections scoring at least 0.25 that overlap a true box with IoU >= 0.5."""


def val_split_of(data_dir: str | os.PathLike) -> SplitConfig:
    """The val split of the dataset folder `--data DIR` names, in any layout `train --data` reads (COCO, YOLO,
    Pascal VOC: `data.layouts.detect_layout`)."""
    from deim_ray.data.layouts import detect_layout

    return detect_layout(os.fspath(data_dir)).val


def val_split_of_config(config: str, updates: list[str]) -> SplitConfig:
    """`-c CONFIG [-u ...]`: the config's data.val (a synthetic set is generated first, as training does)."""
    from deim_ray.config.loader import load_config
    from deim_ray.data.synthetic import ensure_dataset

    return ensure_dataset(load_config(config, updates).data).val


@dataclass
class EvalReport:
    """What `deim-ray eval` found: the evaluation and what was evaluated."""

    model: str
    split: SplitConfig
    images: int
    preprocess: dict
    result: CocoResult
    confusion: list[list[int]]
    """[C+1, C+1] counts, true class x predicted class, the last of each "background" (`confusion_matrix`)."""

    def confusion_labels(self) -> list[str]:
        return [r["name"] for r in self.result.per_class] + ["background"]

    def to_json(self) -> dict:
        return {"model": self.model, "data": {"img_folder": self.split.img_folder, "ann_file": self.split.ann_file},
                "images": self.images, "preprocess": self.preprocess,
                "stats": dict(zip(COCO_STAT_NAMES, self.result.stats)), "per_class": self.result.per_class,
                "confusion_matrix": {"iou": CONFUSION_IOU, "score": CONFUSION_SCORE, "rows": "true class",
                                     "columns": "predicted class", "labels": self.confusion_labels(),
                                     "counts": self.confusion}}


def open_detector(model: str, *, device: str | None = None,
                  image_size: tuple[int, int] | None = None, storage_cfg: StorageConfig | None = None):
    """A Detector (PyTorch, for a run or a final.pth) or an OnnxDetector (for a .onnx file)."""
    if model.lower().endswith(ONNX_SUFFIX):
        from deim_ray.models.onnx_runtime import OnnxDetector

        detector = OnnxDetector(model)
        if image_size and list(image_size) != [detector.preprocess.height, detector.preprocess.width]:
            raise DataError(f"{model} was exported for {detector.preprocess.height}x{detector.preprocess.width} "
                            "images; an ONNX model's size is fixed, leave out --image-size")
        return detector
    import torch

    from deim_ray.driver.use import final_artifact
    from deim_ray.models.inference import Detector

    with final_artifact(model, storage_cfg) as final:  # a fetched artifact is deleted once loaded
        return Detector.from_final(final, device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                                   image_size=image_size)


def evaluate_model(model: str, split: SplitConfig, *, batch_size: int = 8, device: str | None = None,
                   image_size: tuple[int, int] | None = None, storage_cfg: StorageConfig | None = None
                   ) -> EvalReport:
    """COCO stats and per-class AP of `model` on the val split `split` (see the module docstring)."""
    from deim_ray.data.coco import CocoDetection

    dataset = CocoDetection.from_split(split)
    detector = open_detector(model, device=device, image_size=image_size, storage_cfg=storage_cfg)
    _check_classes(dataset.categories.ids, detector.category_ids, split.ann_file)
    detections = detect_all(detector, dataset, batch_size)
    confusion = confusion_matrix(dataset.coco_gt, detections, CONFUSION_IOU, CONFUSION_SCORE)
    return EvalReport(model=model, split=split, images=len(dataset), preprocess=detector.preprocess.describe(),
                      result=coco_evaluation(dataset.coco_gt, detections), confusion=confusion.tolist())


def _check_classes(data_ids: list[int], model_ids: list[int], ann_file: str) -> None:
    unknown = sorted(set(data_ids) - set(model_ids))
    if unknown:
        raise DataError(f"{ann_file} has categories the model was not trained on (ids {unknown[:5]}; the model "
                        f"knows {model_ids[:10]}); evaluate on a dataset with the model's categories")


def detect_all(detector, dataset, batch_size: int = 8) -> list[dict]:
    """COCO result dicts of every image of `dataset` (all top detections, as training's evaluation keeps),
    for the categories the dataset annotates (a model class it does not annotate cannot be scored)."""
    collector = DetectionCollector(detector.category_ids)
    for start in range(0, len(dataset), batch_size):
        items = [dataset.load_item(i) for i in range(start, min(start + batch_size, len(dataset)))]
        collector.add([int(t["image_id"]) for _, t in items], detector.detect([im for im, _ in items]))
    known = set(dataset.categories.ids)
    return [d for d in merge_detections([collector.by_image]) if d["category_id"] in known]


def format_report(report: EvalReport) -> str:
    """The console text of `deim-ray eval`: what was evaluated, the 12 COCO stats, the per-class table."""
    size = report.preprocess["size_hw"]
    stats = [f"{name} {value:.4f}" for name, value in zip(COCO_STAT_NAMES, report.result.stats)]
    head = f"{report.model} on {report.split.img_folder} ({report.images} images, {size[0]}x{size[1]} input)"
    return "\n".join([head, "  ".join(stats[:6]), "  ".join(stats[6:]), "", per_class_table(report.result.per_class)])


def per_class_table(rows: list[dict]) -> str:
    """One line per class: name, AP, AP50, instances and images (where known); '-' for a class without boxes."""
    width = max([5, *(len(r["name"]) for r in rows)])
    has_images = all("images" in r for r in rows)
    lines = [f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'instances':>9}" + ("  images" if has_images else "")]
    for r in rows:
        ap, ap50 = (f"{v:6.3f}" if v >= 0 else f"{'-':>6}" for v in (r["ap"], r["ap50"]))
        lines.append(f"{r['name']:<{width}}  {ap}  {ap50}  {r['instances']:>9}"
                     + (f"  {r['images']:>6}" if has_images else ""))
    return "\n".join(lines)


def write_json(report: EvalReport, path: str | os.PathLike) -> Path:
    """`-o results.json`: the report's JSON (written through a temporary file, so never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=1))
    os.replace(tmp, path)
    return path


def write_plots(report: EvalReport, folder: str | os.PathLike) -> list[Path]:
    """`--plots DIR`: DIR/pr_curves.png (per-class precision-recall at IoU 0.5) and DIR/confusion_matrix.png."""
    from deim_ray.driver.plots import render_confusion_matrix, render_pr_curves

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{report.model} on {report.split.img_folder}"
    (out / PR_PLOT).write_bytes(render_pr_curves(report.result.per_class, report.result.pr50, title=title))
    (out / CONFUSION_PLOT).write_bytes(render_confusion_matrix(
        report.confusion, report.confusion_labels(),
        f"{title}\nscore >= {CONFUSION_SCORE}, IoU >= {CONFUSION_IOU}"))
    return [out / PR_PLOT, out / CONFUSION_PLOT]


def resolved_per_class(store, manifest) -> list[dict]:
    """The per-class rows of a finished run's final artifact: its epoch's metrics.jsonl line (a run with stage-2
    branches holds the winning branch's lines); empty when that line has none (runs older than per_class)."""
    final = manifest.final or {}
    rows = [r for r in store.read_metrics() if (r["epoch"], r["stage"]) == (final.get("epoch"), final.get("stage"))]
    return rows[-1].get("per_class", []) if rows else []
