"""EMA (restart decay takes effect), flat-cosine LR at its phase boundaries, regex param groups."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from deim_ray.config.loader import load_config
from deim_ray.config.schema import LRSchedulerConfig, OptimizerConfig, ParamGroupConfig
from deim_ray.engine.ema import ModelEMA
from deim_ray.engine.lr import LRSchedule, flat_cosine_factor
from deim_ray.engine.optim import ParamGroupError, build_optimizer, build_param_groups
from deim_ray.models.build import build_model


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_ema_follows_formula_and_keeps_int_buffers():
    model = _net()
    ema = ModelEMA(model, decay=0.9, warmups=10)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 10))
    assert torch.allclose(ema.module[0].weight, d * before + (1 - d) * model[0].weight)
    assert ema.module[1].num_batches_tracked.item() == 0


def test_restart_decay_takes_effect_on_updates():
    model = _net()
    ema = ModelEMA(model, decay=0.9999, warmups=0)
    state = ema.state_dict()
    ema.load_state_dict(state, decay=0.5)  # what the stage switch does with ema_restart_decay
    before = ema.module[2].weight.clone()
    with torch.no_grad():
        model[2].weight.add_(2.0)
    ema.update(model)
    assert ema.effective_decay() == 0.5
    assert torch.allclose(ema.module[2].weight, 0.5 * before + 0.5 * model[2].weight)


def test_ema_keeps_following_after_states_are_loaded_into_model_and_ema():
    """The fused update keeps references to both sides' tensors: loading states (rollback, stage restart) must
    not leave it updating stale copies, and another model object gets its own pairs."""
    model = _net()
    ema = ModelEMA(model, decay=0.5, warmups=0)
    ema.update(model)
    model.load_state_dict({k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()})
    ema.load_state_dict({**ema.state_dict(), "module": _net().state_dict()})
    before = ema.module[0].weight.clone()
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, 0.5 * before + 0.5 * model[0].weight)
    other = _net()
    with torch.no_grad():
        other[0].weight.fill_(3.0)
    before = ema.module[0].weight.clone()
    ema.update(other)
    assert torch.allclose(ema.module[0].weight, 0.5 * before + 1.5)


def test_ema_state_round_trip_keeps_update_count():
    model = _net()
    ema = ModelEMA(model, decay=0.99, warmups=100)
    for _ in range(3):
        ema.update(model)
    other = ModelEMA(_net(), decay=0.99, warmups=100)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and other.effective_decay() == ema.effective_decay()


CFG = LRSchedulerConfig(type="flatcosine", warmup_iter=10, flat_epoch=4, no_aug_epoch=2, lr_gamma=0.5)


@pytest.mark.parametrize("t,expected", [
    (0, 0.0), (5, 0.25), (10, 1.0),            # quadratic warm-up ends at warmup_iter
    (40, 1.0),                                  # last flat iteration (flat_epoch * I)
    (80, 0.5), (99, 0.5),                       # no-aug tail from (epochs - no_aug_epoch) * I
])
def test_flat_cosine_phases(t, expected):
    assert flat_cosine_factor(t, CFG, epochs=10, iters_per_epoch=10) == pytest.approx(expected)


def test_flat_cosine_is_monotone_in_the_cosine_phase():
    vals = [flat_cosine_factor(t, CFG, 10, 10) for t in range(41, 80)]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and 0.5 < vals[-1] < vals[0] < 1.0
    assert flat_cosine_factor(60, CFG, 10, 10) == pytest.approx(0.75)  # halfway down the cosine


def test_lr_schedule_sets_each_group_from_its_base():
    model = _net()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, params=(ParamGroupConfig(params=r"^0\.", lr=5e-4),)))
    sched = LRSchedule(opt, CFG, epochs=10, iters_per_epoch=10)
    sched.set_iteration(epoch=8, i=0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 5e-4])


def test_param_groups_cover_every_parameter_once():
    model = _net()
    opt = build_optimizer(model, OptimizerConfig(params=(
        ParamGroupConfig(params=r"^1\.", weight_decay=0.0), ParamGroupConfig(params=r"^0\.weight", lr=1e-4))))
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["lr"] == 1e-4


def test_overlapping_param_group_regexes_are_an_error():
    with pytest.raises(ParamGroupError, match="matches optimizer.params"):
        build_optimizer(_net(), OptimizerConfig(params=(ParamGroupConfig(params="weight"),
                                                        ParamGroupConfig(params=r"^0\."))))


@pytest.mark.parametrize("config", ["deimv2_hgnetv2_n_coco.yml", "deimv2_hgnetv2_atto_coco.yml"])
def test_shipped_backbone_groups_hold_only_the_hgnetv2_backbone(config):
    """Upstream's `backbone` group holds HGNetV2 only (all of it: its backbone-norm group selects nothing); the
    encoder's input projection (which transformers keeps under `conv_encoder`) trains at the base LR."""
    cfg = load_config(f"configs/deimv2/{config}")
    model = build_model(dataclasses.replace(cfg.model, backbone_pretrained=None), 80)
    groups = build_param_groups(model, cfg.optimizer)
    backbone = set(groups[0]["names"])  # the empty backbone-norm group is dropped
    assert backbone == {n for n, p in model.named_parameters() if n.startswith("model.conv_encoder.model.")}
    proj = {n for n, _ in model.named_parameters() if "encoder_input_proj" in n}
    assert (len(proj) > 0) == config.startswith("deimv2_hgnetv2_n")
    assert all(g.get("lr", cfg.optimizer.lr) == cfg.optimizer.lr for g in groups[1:] if proj & set(g["names"]))
    assert proj <= {n for g in groups[1:] for n in g["names"]}
