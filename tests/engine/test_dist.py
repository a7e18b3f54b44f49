"""Rank-level behaviour upstream has: the loss's box count averaged over ranks, and SyncBatchNorm (train.sync_bn),
which torch runs on CUDA only, so CPU/gloo runs skip it with one log line."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from deim_ray.config.schema import ModelConfig
from deim_ray.engine import dist
from deim_ray.models import build_model
from deim_ray.models.build import build_model_config
from deim_ray.models.loss import DeimLoss

FIXTURE = Path(__file__).parents[1] / "models" / "fixtures" / "upstream_loss.pt"


def test_to_sync_batchnorm_keeps_every_tensor_and_name():
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="tiny"), 3)
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    state = model.state_dict()
    params = {id(p) for p in model.parameters()}
    converted = dist.to_sync_batchnorm(model)
    assert batch_norms > 0
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == batch_norms
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    after = converted.state_dict()
    assert list(after) == list(state)  # checkpoints, EMA and resume see the same names
    assert all(after[k].data_ptr() == state[k].data_ptr() for k in state)  # the same tensors, not copies
    assert {id(p) for p in converted.parameters()} == params  # an optimizer built before still steps them
    assert dist.to_sync_batchnorm(converted) is converted  # converting twice changes nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_terms(case: dict, targets: list) -> dict[str, float]:
    config = build_model_config(ModelConfig(variant=case["variant"], num_denoising=0), case["num_classes"])
    rec = dict(case["outputs"])
    classes, coords = rec.pop("outputs_class"), rec.pop("outputs_coord")
    with torch.no_grad():
        _, terms, _ = DeimLoss()(None, targets, "cpu", None, config, classes, coords, **rec)
    return {k: float(v) for k, v in terms.items()}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    case = next(c for c in torch.load(FIXTURE, weights_only=True) if c["variant"] == "atto" and c["epoch"] == 0
                and c["num_denoising"] == 0)
    targets = case["targets"]
    if rank == 1:  # keep only image 1's box: 1 box here against rank 0's 4
        empty = {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.int64)}
        targets = [empty, targets[1], empty]
    alone = _loss_terms(case, targets)  # no process group yet: normalised by this rank's own count
    lines = _Lines()
    logging.getLogger("deim_ray.engine").addHandler(lines)
    logging.getLogger("deim_ray.engine").setLevel(logging.INFO)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    together = _loss_terms(case, targets)
    torch.manual_seed(0)
    wrapped = dist.wrap_ddp(build_model(ModelConfig(variant="tiny"), 3), torch.device("cpu"), sync_bn=True)
    sync = sum(isinstance(m, nn.SyncBatchNorm) for m in wrapped.modules())
    torch.save({"boxes": sum(len(t["boxes"]) for t in targets), "alone": alone, "together": together,
                "sync_bn_layers": sync, "log": lines.lines}, f"{out}/rank{rank}.pt")
    tdist.destroy_process_group()


def test_two_gloo_ranks_average_num_boxes_and_skip_sync_bn(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    mean = sum(r["boxes"] for r in results) / 2
    assert [r["boxes"] for r in results] == [4, 1]
    for r in results:
        # Atto's terms (MAL, L1, GIoU over every output) all divide by num_boxes: own count alone, the mean together
        assert set(r["together"]) == set(r["alone"]) and len(r["alone"]) == 15
        for key, value in r["alone"].items():
            assert r["together"][key] == pytest.approx(value * r["boxes"] / mean, rel=1e-5), key
        assert r["sync_bn_layers"] == 0
    skipped = [line for line in results[0]["log"] if "sync_bn" in line]
    assert len(skipped) == 1 and "needs CUDA" in skipped[0]
    assert not any("sync_bn" in line for line in results[1]["log"])  # one line per run, from rank 0
