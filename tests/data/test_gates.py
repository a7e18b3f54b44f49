"""Schedule gates as pure functions: boundary epochs of every gate, the scale list, and the phase tables of
the two upstream worked examples (DEIMv2-N and DEIMv2-S on COCO)."""

from __future__ import annotations

import dataclasses

import pytest

from deim_ray.config.schema import AugmentConfig, Config, DataConfig, ScheduleConfig
from deim_ray.data import gates
from deim_ray.data.errors import DataError

A = AugmentConfig(policy_epoch=(4, 78, 148), mosaic_prob=0.5, mixup_prob=0.5, mixup_epochs=(4, 78),
                  copyblend_prob=0.4, copyblend_epochs=(4, 78), base_size_repeat=None)
EXAMPLE_A = Config(augment=A, schedule=ScheduleConfig(epochs=160, stop_epoch=148))
EXAMPLE_B = Config(augment=dataclasses.replace(A, policy_epoch=(4, 64, 120), mixup_epochs=(4, 64),
                                               copyblend_prob=0.5, copyblend_epochs=(4, 120), base_size=640,
                                               base_size_repeat=20),
                   schedule=ScheduleConfig(epochs=132, stop_epoch=120))
POLICY = ("Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop")


@pytest.mark.parametrize("epoch, name, allowed, mosaic_prob", [
    (3, "before", set(), 0.0),
    (4, "mosaic", set(POLICY), 0.5),
    (77, "mosaic", set(POLICY), 0.5),
    (78, "no-mosaic", set(POLICY) - {"Mosaic"}, 0.0),
    (147, "no-mosaic", set(POLICY) - {"Mosaic"}, 0.0),
    (148, "after", set(), 0.0),
])
def test_three_phase_policy_boundaries(epoch, name, allowed, mosaic_prob):
    phase = gates.policy_phase(A, epoch)
    assert (phase.name, set(phase.allowed), phase.mosaic_prob) == (name, allowed, mosaic_prob)
    assert phase.allows("RandomHorizontalFlip")  # not a policy op: always runs in stage 1


def test_scalar_policy_epoch_runs_policy_ops_until_it():
    scalar = dataclasses.replace(A, policy_epoch=(50,), mosaic_prob=0.0)
    assert gates.policy_bounds(scalar) == (0, 50, 50)
    on, off = gates.policy_phase(scalar, 49), gates.policy_phase(scalar, 50)
    assert on.allows("RandomZoomOut") and on.allows("RandomIoUCrop") and on.mosaic_prob == 0.0
    assert not off.allows("RandomZoomOut") and not off.allows("RandomPhotometricDistort")


def test_ops_left_out_of_policy_ops_are_not_gated():
    no_mosaic_gate = dataclasses.replace(A, policy_ops=("RandomZoomOut",))
    assert gates.policy_phase(no_mosaic_gate, 0).mosaic_prob == 0.5
    assert not gates.policy_phase(no_mosaic_gate, 0).allows("RandomZoomOut")


def test_bad_policy_settings_are_errors():
    with pytest.raises(DataError, match="policy_epoch"):
        gates.policy_phase(dataclasses.replace(A, policy_epoch=(5, 4, 6)), 0)
    with pytest.raises(DataError, match="unknown op"):
        gates.policy_phase(dataclasses.replace(A, policy_ops=("Mosaik",)), 0)


def test_mixup_and_copyblend_ranges_are_half_open():
    assert [gates.mixup_active(A, e) for e in (3, 4, 77, 78)] == [False, True, True, False]
    assert [gates.copyblend_active(A, e) for e in (3, 4, 77, 78)] == [False, True, True, False]
    assert not gates.mixup_active(dataclasses.replace(A, mixup_prob=0.0), 10)


def test_multiscale_needs_base_size_repeat_and_stops_at_stop_epoch():
    b = EXAMPLE_B.augment
    assert [gates.multiscale_active(b, e, 120) for e in (0, 119, 120)] == [True, True, False]
    assert not gates.multiscale_active(A, 0, 148)


def test_scale_list_matches_the_reference_formula():
    sizes = gates.scale_list(640, 20)
    assert sizes == [480, 512, 544, 576, 608] + [640] * 20 + [800, 768, 736, 704, 672]
    assert gates.scale_list(320, 2) == [224, 256, 288, 320, 320, 384, 352, 320]  # floor(7.5)=7, floor(12.5)=12
    with pytest.raises(DataError, match="multiple of 32"):
        gates.scale_list(100, 1)


def test_epoch_plan_in_stage_two_is_clean_whatever_the_ranges():
    late = dataclasses.replace(EXAMPLE_A, augment=dataclasses.replace(A, mixup_epochs=(4, 200)))
    plan = gates.epoch_plan(late, 148)
    assert (plan.stage, plan.mixup_prob, plan.copyblend_prob, plan.scales, plan.policy.mosaic_prob) == (2, 0, 0, (), 0)
    assert gates.epoch_plan(late, 147).mixup_prob == 0.5


def _table(cfg):
    return [(p.start, p.end, p.stage, p.ops) for p in gates.phase_table(cfg)]


def test_phase_table_of_example_a():
    resize = "Resize 640x640"
    assert _table(EXAMPLE_A) == [
        (0, 4, 1, ("RandomHorizontalFlip p=0.5", resize)),
        (4, 78, 1, ("Mosaic p=0.5", "RandomPhotometricDistort", "RandomZoomOut p=0.5 when no Mosaic",
                    "RandomIoUCrop p=0.8 when no Mosaic", "RandomHorizontalFlip p=0.5", resize, "MixUp p=0.5",
                    "CopyBlend p=0.4 when no MixUp")),
        (78, 148, 1, ("RandomPhotometricDistort", "RandomZoomOut p=0.5", "RandomIoUCrop p=0.8",
                      "RandomHorizontalFlip p=0.5", resize)),
        (148, 160, 2, ("RandomHorizontalFlip p=0.5", resize)),  # upstream's stage 2 keeps the flip
    ]


def test_phase_table_of_example_b():
    table = _table(EXAMPLE_B)
    assert [(s, e, st) for s, e, st, _ in table] == [(0, 4, 1), (4, 64, 1), (64, 120, 1), (120, 132, 2)]
    assert all("MultiScale 480-800" in ops for _, _, stage, ops in table if stage == 1)
    assert "CopyBlend p=0.5" in table[2][3] and not any(op.startswith("MixUp") for op in table[2][3])
    text = gates.format_phase_table(EXAMPLE_B)
    assert text.splitlines()[3].startswith("epochs 120-131  stage 2  RandomHorizontalFlip p=0.5, Resize 640x640")


def test_phase_table_without_stage_two():
    cfg = Config(data=DataConfig(image_size=(320, 480)), augment=A, schedule=ScheduleConfig(epochs=50, stop_epoch=50))
    assert _table(cfg)[-1][:3] == (4, 50, 1) and "Resize 320x480" in _table(cfg)[-1][3]


def test_check_rejects_settings_before_any_worker_starts():
    gates.check(EXAMPLE_B)
    with pytest.raises(DataError, match="multiple of 32"):
        gates.check(dataclasses.replace(EXAMPLE_B, augment=dataclasses.replace(EXAMPLE_B.augment, base_size=600)))
