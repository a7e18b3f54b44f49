"""Non-finite losses: a step with a NaN/Inf loss or gradient on any rank is skipped on every rank, counted in the
epoch record, and too many in one epoch roll the stage back to its last good state (at most
`train.nan_retries` times, then a one-line error). NaNs are injected deterministically through `Hook.on_loss`."""

from __future__ import annotations

import math
import multiprocessing as mp
import socket

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from deim_ray.config.loader import load_config
from deim_ray.config.schedule import Stage
from deim_ray.engine.hooks import Hook
from deim_ray.engine.loop import NonFiniteLossError, _optimizer_step
from deim_ray.engine.trainer import StageStart, Trainer
from tests.driver.conftest import TINY, data_overrides

ITERS = 8
"""tiny.yml: 32 train images / batch 4 in one process."""


class InjectNaN(Hook):
    """Replaces the loss with NaN at the given (epoch, iteration)s, the first `passes` times each is reached."""

    def __init__(self, points, passes: int = 1):
        self.left = {p: passes for p in points}
        self.records = []

    def on_loss(self, trainer, epoch, iteration, loss):
        if self.left.get((epoch, iteration), 0) > 0:
            self.left[(epoch, iteration)] -= 1
            return loss * float("nan")
        return loss

    def after_epoch(self, trainer, record, decision):
        self.records.append(record.to_json())


def _finite(trainer: Trainer) -> bool:
    modules = [trainer.model] + ([trainer.ema.module] if trainer.ema else [])
    return all(torch.isfinite(t).all() for m in modules for t in m.state_dict().values() if t.is_floating_point())


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("nan_data") / "shapes"
    return lambda *extra: load_config(TINY, [*data_overrides(root), "train.nan_tolerance=2", *extra])


@pytest.mark.slow
def test_skipped_steps_are_counted_and_a_rollback_reruns_the_epoch(cfg):
    # epoch 0: one NaN step (under the tolerance of 2) is skipped; epoch 1: two NaN steps roll the stage back to
    # the state after epoch 0 and the epoch runs again, clean
    inject = InjectNaN([(0, 3), (1, 2), (1, 5)])
    trainer = Trainer(cfg("train.nan_lr_factor=0.5"), "sha", hooks=[inject])
    trainer.run_stage(StageStart(Stage.ONE))
    first, second = inject.records
    assert (first["nonfinite_steps"], first["nonfinite_rollbacks"]) == (1, 0)
    rolled = (second["nonfinite_steps"], second["nonfinite_rollbacks"], second["nonfinite_steps_rolled_back"])
    assert rolled == (0, 1, 2)
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"])
    assert trainer.ema.updates == (ITERS - 1) + ITERS  # the skipped step never reached the EMA; the rollback
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}  # undid epoch 1's try
    assert steps == {(ITERS - 1) + ITERS}
    assert _finite(trainer) and trainer.rollbacks == 1
    # the lowered LR is part of the checkpoint: a stage resumed from it (a worker lost later) keeps it
    state = trainer.state_dict()
    assert state["remedies"] == {"lr_scale": 0.5, "amp_off": False}
    resumed = Trainer(cfg("train.nan_lr_factor=0.5"), "sha")
    resumed.load_state(state)
    assert resumed.lr_schedule.scale == 0.5


@pytest.mark.slow
def test_rollbacks_are_bounded_then_the_stage_fails_in_one_line(cfg):
    inject = InjectNaN([(0, 0), (0, 1)], passes=3)
    trainer = Trainer(cfg("train.nan_retries=2", "train.nan_lr_factor=0.5"), "sha", hooks=[inject])
    with pytest.raises(NonFiniteLossError) as err:
        trainer.run_stage(StageStart(Stage.ONE))
    message = str(err.value)
    assert "\n" not in message and "epoch 0" in message and "2 rollback(s)" in message
    assert trainer.lr_schedule.scale == 0.25 and _finite(trainer)


def _step_worker(rank: int, port: int, queue) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(2, 3)).sum()
    if rank == 1:
        loss = loss * float("inf")  # only rank 1 overflows
    stepped = _optimizer_step(model, optimizer, loss, None, clip_max_norm=0.1)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    clean = model(torch.ones(2, 3)).sum()
    stepped_clean = _optimizer_step(model, optimizer, clean, None, clip_max_norm=0.1)
    queue.put((rank, stepped, unchanged, stepped_clean))
    tdist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_step_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert got == [(0, False, True, True), (1, False, True, True)]


def test_under_a_grad_scaler_an_overflowing_gradient_is_the_scalers_to_skip():
    """fp16's GradScaler overflows while it calibrates: not a non-finite step, but no NaN reaches the weights."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled gradient overflows float32
    before = [p.detach().clone() for p in model.parameters()]
    assert _optimizer_step(model, optimizer, model(torch.full((2, 3), 1e10)).sum(), scaler, clip_max_norm=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0**127
    nan_loss = model(torch.ones(2, 3)).sum() * float("nan")
    assert not _optimizer_step(model, optimizer, nan_loss, scaler, clip_max_norm=0.1)
