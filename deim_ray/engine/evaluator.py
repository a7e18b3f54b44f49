"""engine layer: distributed COCO bbox evaluation with faster-coco-eval.

Each rank evaluates its own shard of the val set (no padded duplicates). Detections are gathered to every
rank, de-duplicated by image id (keep first), and scored once against the raw annotation file over ALL val
images, so the 12 COCO stats equal a single-process evaluation whatever the worker count. Upstream merged
per-image arrays without de-duplicating them, which corrupted AP whenever the val set did not divide evenly.
"""

from __future__ import annotations

import contextlib
import io
from typing import Iterable

import numpy as np
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


def coco_stats(coco_gt: COCO, detections: list[dict]) -> list[float]:
    """The 12 COCO bbox stats over every image of `coco_gt` (-1 where there is no ground truth)."""
    image_ids = sorted(coco_gt.getImgIds())
    if not detections:
        return [0.0 if coco_gt.getAnnIds() else -1.0] * 6 + [0.0 if coco_gt.getAnnIds() else -1.0] * 6
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *a, **k: None)
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=float)[:12]
    return [float(x) for x in stats]


def evaluate_distributed(collector: DetectionCollector, coco_gt: COCO) -> list[float]:
    """Collective: gather every rank's detections, score on rank 0, share the stats with every rank."""
    shards = dist.all_gather_objects(collector.by_image)
    stats = coco_stats(coco_gt, merge_detections(shards)) if dist.is_main() else None
    return dist.broadcast_object(stats)
