"""engine layer: distributed COCO bbox evaluation with faster-coco-eval.

Each rank evaluates its own shard of the val set (no padded duplicates). Detections are gathered to every
rank, de-duplicated by image id (keep first), and scored once against the raw annotation file over ALL val
images, so the 12 COCO stats equal a single-process evaluation whatever the worker count. Upstream merged
per-image arrays without de-duplicating them, which corrupted AP whenever the val set did not divide evenly.

The same evaluation gives the per-class numbers (`per_class`): faster-coco-eval's own per-category precision
(`eval["precision"][:, :, k, area all, 100 detections]`), so the mean AP over the classes with ground truth
is the COCO AP. `confusion_matrix` counts which class each confident detection was given for which true box.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster

from deim_ray.engine import dist

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                   "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
"""The 12 numbers `evaluate` returns (COCOeval's `stats`), in order; a metrics line's `coco_stats`."""


class DetectionCollector:
    """Accumulates one rank's detections as COCO result dicts (xywh, original category ids)."""

    def __init__(self, category_ids: list[int]):
        self.category_ids = list(category_ids)
        self.by_image: dict[int, list[dict]] = {}

    def add(self, image_ids: Iterable[int], results: list[dict]) -> None:
        for image_id, res in zip(image_ids, results):
            boxes = res["boxes"].detach().float().cpu().numpy()
            scores = res["scores"].detach().float().cpu().numpy()
            labels = res["labels"].detach().cpu().numpy()
            dets = []
            for (x0, y0, x1, y1), s, c in zip(boxes, scores, labels):
                dets.append({"image_id": int(image_id), "category_id": self.category_ids[int(c)],
                             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(s)})
            self.by_image.setdefault(int(image_id), dets)


def merge_detections(per_rank: list[dict[int, list[dict]]]) -> list[dict]:
    """Flatten ranks' {image_id: dets}; an image seen on several ranks counts once (first rank wins)."""
    merged: dict[int, list[dict]] = {}
    for shard in per_rank:
        for image_id, dets in shard.items():
            merged.setdefault(image_id, dets)
    return [d for image_id in sorted(merged) for d in merged[image_id]]


@dataclass(frozen=True)
class CocoResult:
    """One COCO bbox evaluation: the 12 stats (`COCO_STAT_NAMES`), the per-class rows and, for curves, the
    precision at IoU 0.5 of each class over the 101 recall thresholds (-1 where a class has no ground truth)."""

    stats: list[float]
    per_class: list[dict] = field(default_factory=list)
    """{name, category_id, ap, ap50, instances, images} per category of the annotation file (ap -1: no boxes)."""
    pr50: list[list[float]] = field(default_factory=list)

    @property
    def ap(self) -> float:
        return self.stats[0]


def coco_evaluation(coco_gt: COCO, detections: list[dict]) -> CocoResult:
    """The 12 COCO bbox stats and the per-class rows over every image of `coco_gt` (-1 where there is no
    ground truth)."""
    if not detections:
        empty = 0.0 if coco_gt.getAnnIds() else -1.0
        return CocoResult([empty] * 12, _per_class(coco_gt, None), [])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *a, **k: None)
        ev.params.imgIds = sorted(coco_gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(x) for x in np.asarray(ev.stats, dtype=float)[:12]]
    precision = np.asarray(ev.eval["precision"])  # [IoU 0.5:0.95, recall 0:1, category, area, max dets]
    pr50 = [[float(v) for v in precision[0, :, k, 0, -1]] for k in range(precision.shape[2])]
    return CocoResult(stats, _per_class(coco_gt, precision), pr50)


def _per_class(coco_gt: COCO, precision: np.ndarray | None) -> list[dict]:
    """One row per category (ascending id, as COCOeval orders `catIds`): AP over IoU 0.5:0.95 and AP50 from
    the precision of area "all" at 100 detections, the number of non-crowd boxes and of images holding one."""
    rows = []
    for k, cat_id in enumerate(sorted(coco_gt.getCatIds())):
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[cat_id], iscrowd=False))
        ap, ap50 = -1.0, -1.0  # COCO's "no ground truth"
        if anns:
            ap, ap50 = ((_mean_valid(precision[:, :, k, 0, -1]), _mean_valid(precision[0, :, k, 0, -1]))
                        if precision is not None else (0.0, 0.0))
        rows.append({"name": str(coco_gt.loadCats([cat_id])[0].get("name", cat_id)), "category_id": int(cat_id),
                     "ap": ap, "ap50": ap50, "instances": len(anns), "images": len({a["image_id"] for a in anns})})
    return rows


def _mean_valid(values: np.ndarray) -> float:
    """COCOeval's summary: the mean of the entries that are not -1 (-1 when there are none)."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def coco_stats(coco_gt: COCO, detections: list[dict]) -> list[float]:
    """The 12 COCO bbox stats over every image of `coco_gt` (-1 where there is no ground truth)."""
    return coco_evaluation(coco_gt, detections).stats


def confusion_matrix(coco_gt: COCO, detections: list[dict], iou_threshold: float = 0.5,
                     score_threshold: float = 0.25) -> np.ndarray:
    """Counts [C+1, C+1]: row = true class, column = predicted class (category ids ascending), the last row and
    column "background". Per image, detections scoring at least `score_threshold` claim, best first, the
    unclaimed non-crowd true box they overlap most with IoU >= `iou_threshold`, whatever its class; a detection
    that claims none counts in the background row, a true box nobody claims in the background column."""
    from torchvision.ops import box_iou

    index = {c: i for i, c in enumerate(sorted(coco_gt.getCatIds()))}
    counts = np.zeros((len(index) + 1, len(index) + 1), dtype=np.int64)
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        if d["score"] >= score_threshold and d["category_id"] in index:
            by_image.setdefault(d["image_id"], []).append(d)
    for image_id in coco_gt.getImgIds():
        truth = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id], iscrowd=False))
        dets = sorted(by_image.get(image_id, []), key=lambda d: -d["score"])
        iou = box_iou(_xyxy([d["bbox"] for d in dets]), _xyxy([a["bbox"] for a in truth]))
        claimed = np.zeros(len(truth), dtype=bool)
        for i, d in enumerate(dets):
            overlap = torch.where(torch.from_numpy(claimed), -1.0, iou[i]) if len(truth) else iou[i]
            j = int(overlap.argmax()) if len(truth) else -1
            true_class = len(index)
            if j >= 0 and overlap[j] >= iou_threshold:
                claimed[j], true_class = True, index[truth[j]["category_id"]]
            counts[true_class, index[d["category_id"]]] += 1
        for a in (a for a, c in zip(truth, claimed) if not c):
            counts[index[a["category_id"]], len(index)] += 1
    return counts


def _xyxy(xywh: list[list[float]]) -> torch.Tensor:
    boxes = torch.tensor(xywh, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def evaluate_distributed(collector: DetectionCollector, coco_gt: COCO) -> CocoResult:
    """Collective: gather every rank's detections, score on rank 0, share the result with every rank."""
    shards = dist.all_gather_objects(collector.by_image)
    result = coco_evaluation(coco_gt, merge_detections(shards)) if dist.is_main() else None
    return dist.broadcast_object(result)
