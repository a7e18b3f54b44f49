"""engine layer: how long the training loop waits for its loader, and how many images it trains on per second.

`LoaderTimer.iterate(loader)` yields the loader's batches and adds up the wall time spent inside the loader's
`next()` (the step waiting for data) and the images seen. `rates()` turns that into this rank's images per
second and the waiting fraction of the epoch's wall time, as tensors for the cross-rank mean.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch


class LoaderTimer:
    def __init__(self):
        self.started = time.perf_counter()
        self.wait_s = 0.0
        self.images = 0

    def iterate(self, loader: Iterable) -> Iterator:
        batches = iter(loader)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - asked
            self.images += len(batch[0])
            yield batch

    def rates(self, device: torch.device) -> dict[str, torch.Tensor]:
        """{'images_per_s': this rank's images per second, 'data_wait': the fraction of wall time spent
        waiting for the loader}, since the timer was made."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {"images_per_s": torch.tensor(self.images / elapsed, device=device),
                "data_wait": torch.tensor(min(self.wait_s / elapsed, 1.0), device=device)}
