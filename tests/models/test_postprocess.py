"""postprocess against a hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from deim_ray.models import ModelError, postprocess


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_topk_over_queries_and_classes_hand_computed():
    # 1 image, 3 queries, 2 classes; probabilities chosen so that query 1 yields both classes
    probs = [[0.10, 0.60],
             [0.90, 0.70],
             [0.20, 0.05]]
    logits = torch.tensor([[[_logit(p) for p in row] for row in probs]])
    boxes = torch.tensor([[[0.50, 0.50, 0.20, 0.40],    # query 0
                           [0.25, 0.75, 0.50, 0.50],    # query 1
                           [0.10, 0.10, 0.10, 0.10]]])  # query 2
    sizes = torch.tensor([[200, 100]])  # (w, h)
    (res,) = postprocess(logits, boxes, sizes, num_top_queries=3)
    assert res["scores"].tolist() == pytest.approx([0.90, 0.70, 0.60], abs=1e-6)
    assert res["labels"].tolist() == [0, 1, 1]
    # query 1: cx .25 cy .75 w .5 h .5 -> xyxy (0, .5, .5, 1) -> x * 200, y * 100
    # query 0: xyxy (.4, .3, .6, .7) -> (80, 30, 120, 70)
    expected = torch.tensor([[0.0, 50.0, 100.0, 100.0], [0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]])
    assert torch.allclose(res["boxes"], expected, atol=1e-4)
    assert res["labels"].dtype == torch.int64


def test_each_image_uses_its_own_size_and_k_is_capped():
    logits = torch.zeros(2, 2, 1)
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0]] * 2] * 2)
    results = postprocess(logits, boxes, torch.tensor([[10, 20], [30, 40]]), num_top_queries=300)
    assert [len(r["scores"]) for r in results] == [2, 2]  # Q*C = 2 < 300
    assert results[0]["boxes"][0].tolist() == [0.0, 0.0, 10.0, 20.0]
    assert results[1]["boxes"][0].tolist() == [0.0, 0.0, 30.0, 40.0]


def test_bad_shapes_are_rejected():
    with pytest.raises(ModelError, match=r"orig_sizes must be \[B,2\]"):
        postprocess(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.tensor([[1, 1]]), 10)
    with pytest.raises(ModelError, match="expects logits"):
        postprocess(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4), torch.tensor([[1, 1]] * 2), 10)
