"""LoaderTimer: the waiting fraction and images per second the epoch record reports."""

from __future__ import annotations

import time

import torch

from deim_ray.engine.throughput import LoaderTimer


def _slow_batches(n: int, delay_s: float):
    for _ in range(n):
        time.sleep(delay_s)
        yield torch.zeros(4, 3, 2, 2), [{}] * 4


def test_a_slow_loader_shows_as_waiting():
    timer = LoaderTimer()
    assert sum(1 for _ in timer.iterate(_slow_batches(5, 0.05))) == 5
    rates = timer.rates(torch.device("cpu"))
    assert timer.images == 20 and rates["data_wait"] > 0.8
    assert 0 < rates["images_per_s"] <= 20 / 0.25 + 1e-6


def test_a_fast_loader_with_slow_steps_shows_no_waiting():
    timer = LoaderTimer()
    for _ in timer.iterate([(torch.zeros(2, 3, 2, 2), [{}] * 2)] * 4):
        time.sleep(0.05)  # the training step
    rates = timer.rates(torch.device("cpu"))
    assert timer.images == 8 and rates["data_wait"] < 0.2
