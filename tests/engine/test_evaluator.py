"""Distributed COCO evaluation: an uneven val split over 2 gloo ranks gives exactly the single-process stats;
per-class AP is faster-coco-eval's own per-category evaluation."""

import os
import random
import socket

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from faster_coco_eval import COCO, COCOeval_faster

from deim_ray.engine.evaluator import (DetectionCollector, coco_evaluation, coco_stats, confusion_matrix,
                                      evaluate_distributed, merge_detections)


def _gt(n_images=7, seed=0):
    rng = random.Random(seed)
    images, anns = [], []
    for i in range(n_images):
        images.append({"id": 100 + i, "width": 64, "height": 48, "file_name": f"{i}.png"})
        for _ in range(rng.randint(1, 3)):
            x, y = rng.uniform(0, 40), rng.uniform(0, 30)
            w, h = rng.uniform(6, 20), rng.uniform(6, 16)
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": rng.choice([3, 7]),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}


def _results(gt, seed=1):
    """Noisy detections as the model's postprocess would give them (xyxy, contiguous labels)."""
    rng = random.Random(seed)
    out = {}
    for img in gt["images"]:
        boxes, scores, labels = [], [], []
        for a in (a for a in gt["annotations"] if a["image_id"] == img["id"]):
            x, y, w, h = a["bbox"]
            j = rng.uniform(-3, 3)
            boxes.append([x + j, y + j, x + w + j, y + h - j])
            scores.append(rng.uniform(0.3, 1.0))
            labels.append(0 if a["category_id"] == 3 else 1)
        boxes.append([1, 1, 10, 10]); scores.append(0.2); labels.append(0)  # a false positive
        out[img["id"]] = {"boxes": torch.tensor(boxes), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}
    return out


def _worker(rank, world, port, q):
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gt = _gt()
    res = _results(gt)
    ids = sorted(res)[rank::world]  # uneven shards: 4 and 3 images, no padding
    col = DetectionCollector([3, 7])
    col.add(ids, [res[i] for i in ids])
    q.put((rank, evaluate_distributed(col, COCO(gt)).stats))
    tdist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uneven_split_equals_single_process():
    gt = _gt()
    res = _results(gt)
    col = DetectionCollector([3, 7])
    col.add(sorted(res), [res[i] for i in sorted(res)])
    single = coco_stats(COCO(gt), merge_detections([col.by_image]))
    assert 0.0 < single[0] < 1.0
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert got[0] == got[1] == pytest.approx(single, abs=1e-12)


def test_duplicate_images_across_ranks_count_once():
    gt = _gt()
    res = _results(gt)
    col = DetectionCollector([3, 7])
    col.add(sorted(res), [res[i] for i in sorted(res)])
    padded = dict(col.by_image)
    first = sorted(res)[0]
    dup = {first: padded[first]}  # what a padding sampler would hand a second rank
    assert coco_stats(COCO(gt), merge_detections([padded, dup])) == coco_stats(COCO(gt), merge_detections([padded]))
    assert len(merge_detections([padded, dup])) == len(merge_detections([padded]))


def test_no_detections_gives_zero_ap():
    assert coco_stats(COCO(_gt()), [])[0] == 0.0


def one_category_ap(coco_gt: COCO, detections: list[dict], cat_id: int) -> tuple[float, float]:
    """AP and AP50 of faster-coco-eval evaluating one category alone (params.catIds=[cat_id])."""
    ev = COCOeval_faster(coco_gt, coco_gt.loadRes(detections), "bbox", print_function=lambda *a, **k: None)
    ev.params.imgIds = sorted(coco_gt.getImgIds())
    ev.params.catIds = [cat_id]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def test_per_class_ap_is_the_per_category_evaluation_and_averages_to_coco_ap():
    gt = _gt(n_images=12, seed=3)
    gt["categories"].append({"id": 9, "name": "never seen"})  # a class without ground truth
    res = _results(gt, seed=4)
    col = DetectionCollector([3, 7, 9])
    col.add(sorted(res), [res[i] for i in sorted(res)])
    dets = merge_detections([col.by_image])
    result = coco_evaluation(COCO(gt), dets)
    rows = {r["category_id"]: r for r in result.per_class}
    assert [r["name"] for r in result.per_class] == ["a", "b", "never seen"]
    for cat_id in (3, 7):
        ap, ap50 = one_category_ap(COCO(gt), dets, cat_id)
        assert rows[cat_id]["ap"] == pytest.approx(ap, abs=1e-12)
        assert rows[cat_id]["ap50"] == pytest.approx(ap50, abs=1e-12)
        anns = [a for a in gt["annotations"] if a["category_id"] == cat_id]
        assert rows[cat_id]["instances"] == len(anns) and rows[cat_id]["images"] == len({a["image_id"] for a in anns})
    assert rows[3]["ap"] != rows[7]["ap"]
    assert rows[9] == {"name": "never seen", "category_id": 9, "ap": -1.0, "ap50": -1.0, "instances": 0, "images": 0}
    assert (rows[3]["ap"] + rows[7]["ap"]) / 2 == pytest.approx(result.stats[0], abs=1e-12)
    assert result.stats == coco_stats(COCO(gt), dets)


def test_no_detections_gives_zero_per_class_ap():
    result = coco_evaluation(COCO(_gt()), [])
    assert [(r["ap"], r["ap50"]) for r in result.per_class] == [(0.0, 0.0), (0.0, 0.0)]


def _box(ann_id: int, image_id: int, cat_id: int, xywh: list[float], crowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "bbox": xywh, "area": xywh[2] * xywh[3],
            "iscrowd": crowd}


def test_confusion_matrix_counts_right_wrong_missed_and_spurious_boxes():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
          "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
          "annotations": [_box(1, 1, 3, [0, 0, 20, 20]), _box(2, 1, 7, [50, 50, 20, 20]),
                          _box(3, 2, 7, [10, 10, 30, 30]), _box(4, 2, 3, [60, 60, 9, 9], crowd=1)]}
    det = lambda image, cat, box, score: {"image_id": image, "category_id": cat, "bbox": box, "score": score}
    detections = [det(1, 3, [1, 1, 20, 20], 0.9),      # a as a: right
                  det(1, 3, [0, 0, 20, 20], 0.8),      # the same box again: it is claimed, so spurious
                  det(1, 3, [51, 50, 20, 20], 0.7),    # b called a
                  det(2, 7, [80, 0, 10, 10], 0.6),     # nothing there: spurious b
                  det(2, 7, [10, 10, 30, 30], 0.1),    # right, but under the score threshold: b is missed
                  det(2, 3, [60, 60, 9, 9], 0.9)]      # on a crowd box, which is no true box here
    counts = confusion_matrix(COCO(gt), detections, iou_threshold=0.5, score_threshold=0.25)
    #                     pred a  pred b  missed
    assert counts.tolist() == [[1, 0, 0],     # true a
                               [1, 0, 1],     # true b
                               [2, 1, 0]]     # background
