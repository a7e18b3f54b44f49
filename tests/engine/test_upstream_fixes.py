"""Upstream bugs deim_ray fixes, one test each (the EMA restart decay and the distributed AP merge have
their own tests in test_ema_lr_optim.py and test_evaluator.py)."""

import dataclasses
import logging

import pytest
import torch

from deim_ray.cli.main import build_parser
from deim_ray.config.loader import load_config
from deim_ray.config.schema import TrainConfig
from deim_ray.engine import dist
from deim_ray.engine.hooks import Hook
from deim_ray.config.schedule import Stage
from deim_ray.engine.trainer import StageStart, Trainer, _amp_dtype
from tests.driver.conftest import TINY, data_overrides

TINY = "configs/demo/tiny.yml"


def test_device_is_the_local_rank_not_the_global_rank(monkeypatch):
    # a GPU is outside our control here: pretend one exists and check which ordinal is chosen on node 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.local_device() == torch.device("cuda", 1)


def test_amp_follows_the_yaml_and_no_cli_flag_overrides_it():
    assert TrainConfig().amp_dtype == "float16"  # upstream's --use-amp: float16 with a GradScaler
    cfg = load_config(TINY)
    fp16 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp_dtype="float16"))
    assert _amp_dtype(fp16, torch.device("cuda", 0)) == torch.float16
    bf16 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp_dtype="bfloat16"))
    assert _amp_dtype(bf16, torch.device("cuda", 0)) == torch.bfloat16
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, use_amp=False))
    assert _amp_dtype(off, torch.device("cuda", 0)) is None
    assert _amp_dtype(cfg, torch.device("cpu")) is None
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert not any("amp" in opt for a in train._actions for opt in a.option_strings)


class _Decisions(Hook):
    def __init__(self):
        self.seen = []

    def after_epoch(self, trainer, record, decision):
        self.seen.append((record.epoch, record.ap, decision.save))


@pytest.mark.slow
def test_resume_keeps_the_historical_best(tmp_path):
    torch.set_num_threads(1)
    root = tmp_path / "d"
    cfg = load_config(TINY, [f"data.train.img_folder={root}/train", f"data.train.ann_file={root}/annotations/train.json",
                             f"data.val.img_folder={root}/val", f"data.val.ann_file={root}/annotations/val.json"])
    first = Trainer(cfg, "sha")
    state = first.state_dict()
    # a run that already reached AP 0.9 at epoch 0 and is resumed after it
    state["last_epoch"] = 0
    state["best"] = {"top1": 0.9, "local_epoch": 0, "local_ap": 0.9, "stage_best": {"1": {"epoch": 0, "ap": 0.9}}}
    seen = _Decisions()
    resumed = Trainer(cfg, "sha", hooks=[seen])
    resumed.run_stage(StageStart(Stage.ONE, resume=state))
    assert [e for e, _, _ in seen.seen] == [1]          # continues after the resumed epoch
    (_, ap, save), = seen.seen
    assert ap < 0.9 and save is None                      # upstream would have re-seeded the best from this AP
    assert resumed.tracker.top1 == 0.9


def test_random_backbone_note_is_logged_once_per_run_at_its_fresh_start(tmp_path, caplog):
    """Stage 2 (and a resume) start from trained weights: only the fresh stage-1 start says the backbone is random."""
    cfg = load_config(TINY, [*data_overrides(tmp_path / "shapes"), "model.variant=atto", "model.num_queries=30",
                             "model.decoder_layers=2"])
    note = "backbone starts from random weights"
    with caplog.at_level(logging.INFO, logger="deim_ray.engine"):
        first = Trainer(cfg, "sha")  # each stage run builds its own Trainer, as the driver's workers do
        first._begin(StageStart(Stage.ONE))
        assert sum(note in r.getMessage() for r in caplog.records) == 1
        caplog.clear()
        Trainer(cfg, "sha")._begin(StageStart(Stage.TWO, stage1_best=first.state_dict()))
        Trainer(cfg, "sha")._begin(StageStart(Stage.ONE, resume=first.state_dict()))
    assert not any(note in r.getMessage() for r in caplog.records)
