"""Fixtures for the models layer tests: a small real DEIMv2 model and a batch for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deim_ray.config.schema import ModelConfig
from deim_ray.models import build_model


@pytest.fixture(autouse=True)
def _one_thread():
    # the test machine's cores are shared; one thread keeps timings predictable
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(variant="tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return build_model(tiny_cfg, num_classes=3)


def make_targets(*counts: int, num_classes: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One target per image with `count` random valid boxes (normalised cxcywh) and labels."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in counts:
        centre = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        size = 0.05 + 0.3 * torch.rand(n, 2, generator=g)
        targets.append({"boxes": torch.cat([centre, size], dim=1),
                        "class_labels": torch.randint(0, num_classes, (n,), generator=g)})
    return targets


def matched_box_error(a, b) -> float:
    """Largest box difference after pairing each detection of `a` with one of `b` of the same label and score;
    `a` and `b` are (labels [K], boxes [K,4], scores [K]) arrays.

    Detections with equal scores (tied queries) may come in another order from two runtimes or batch sizes, so
    positions in the top-k are not comparable; every detection must find its partner."""
    (ol, ob, os_), (tl, tb, ts) = a, b
    used, worst = set(), 0.0
    for i in range(len(ol)):
        candidates = [j for j in range(len(tl)) if j not in used and tl[j] == ol[i] and abs(ts[j] - os_[i]) < 1e-5]
        assert candidates, f"detection {i} (label {ol[i]}, score {os_[i]:.6f}) has no counterpart"
        j = min(candidates, key=lambda j: np.abs(tb[j] - ob[i]).max())
        used.add(j)
        worst = max(worst, float(np.abs(tb[j] - ob[i]).max()))
    return worst
