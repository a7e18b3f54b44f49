"""Iteration counts fitted to the dataset (`config.fit`): upstream's numbers on COCO, a schedule that fits on a
small dataset, explicit keys kept, and the warnings `info` prints for warm-ups and EMA horizons that outlast
their stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from deim_ray.config import load_config, validate
from deim_ray.config.fit import (FITTED_KEYS, HORIZON_FRACTION, MIN_STEPS, fit_to_data, fitted_batch, horizon,
                                 schedule_warnings, steps_per_epoch)
from deim_ray.config.shipped import MODEL_CONFIGS, model_config

COCO_TRAIN_IMAGES = 117_266  # train2017 images with annotations (what upstream's loader keeps)


def _value(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("model", sorted(MODEL_CONFIGS))
def test_upstreams_coco_configs_keep_their_numbers(model):
    """On COCO the caps lie far above upstream's values: fitting changes nothing, for any worker count."""
    cfg = load_config(model_config(model), ["schedule.fit_to_data=true"])
    for workers in (1, 8):
        fitted = fit_to_data(cfg, COCO_TRAIN_IMAGES, workers)
        assert fitted.config == cfg and fitted.notes == [], (model, workers, fitted.notes)


def test_a_small_dataset_gets_a_schedule_it_can_finish():
    """The case users hit: DEIMv2-N's COCO numbers (batch 32, warm-up 2000, EMA 0.9999 / 1000) on 200 images,
    15 epochs. Every count must fit inside the run, and the EMA must move away from its random start."""
    cfg = load_config(model_config("deimv2-n"), ["schedule.fit_to_data=true", "schedule.epochs=15"])
    fitted = fit_to_data(cfg, 200, workers=2).config
    validate(fitted, workers=2)
    steps = steps_per_epoch(200, fitted.data.total_batch_size)
    assert fitted.data.total_batch_size == 8 and steps == 25 >= MIN_STEPS
    stage1, total = fitted.schedule.stop_epoch * steps, fitted.schedule.epochs * steps
    assert fitted.lr_scheduler.warmup_iter == stage1 // 10 < stage1
    for decay in (fitted.ema.decay, fitted.schedule.ema_restart_decay):
        assert horizon(decay) <= total / HORIZON_FRACTION + 1e-6
        # the weight the random start keeps after the whole run: decay ** total
        assert decay ** total < 0.06
    assert cfg.ema.decay ** total > 0.96  # unfitted, the EMA would still be its random start
    assert fitted.ema.warmups <= total // HORIZON_FRACTION
    assert schedule_warnings(fitted, 200) == []
    assert len(schedule_warnings(cfg, 200)) >= 3  # the unfitted config warns about each count


def test_explicit_keys_are_kept_and_said_so():
    cfg = load_config(model_config("deimv2-n"), ["schedule.fit_to_data=true", "schedule.epochs=15",
                                                 "lr_scheduler.warmup_iter=500"])
    fitted = fit_to_data(cfg, 200, workers=2, keep={"lr_scheduler.warmup_iter", "data.total_batch_size"})
    assert fitted.config.lr_scheduler.warmup_iter == 500 and fitted.config.data.total_batch_size == 32
    kept = [n for n in fitted.notes if "given explicitly" in n]
    assert len(kept) == 2 and all(any(k in n for n in kept) for k in ("warmup_iter", "total_batch_size"))
    assert fitted.config.ema.decay < cfg.ema.decay  # the keys not given are still fitted


def test_fitting_is_off_unless_the_config_asks_for_it():
    cfg = load_config(model_config("deimv2-n"), ["schedule.epochs=15"])
    assert not cfg.schedule.fit_to_data and fit_to_data(cfg, 200, workers=2).config == cfg


def test_every_note_names_a_fitted_key():
    cfg = load_config(model_config("deimv2-atto"), ["schedule.fit_to_data=true", "schedule.epochs=6"])
    notes = fit_to_data(cfg, 144, workers=2).notes
    assert notes and all(n.split(" = ")[0] in FITTED_KEYS for n in notes)


@pytest.mark.parametrize("images, configured, workers, expected", [
    (117_266, 32, 8, 32),   # enough steps: unchanged
    (200, 32, 2, 8),        # 8 -> 25 steps; 16 would give 12
    (192, 128, 2, 8),       # the demo's size and batch
    (40, 32, 4, 4),         # too small for MIN_STEPS: one image per worker
    (1000, 24, 3, 24),
    (300, 24, 3, 12),       # powers of two times the worker count: 3, 6, 12 (25 steps)
])
def test_fitted_batch(images, configured, workers, expected):
    batch = fitted_batch(images, configured, workers)
    assert batch == expected and batch % workers == 0 and batch <= configured


def test_the_custom_template_fits_to_its_data():
    template = Path(__file__).resolve().parents[2] / "configs" / "deimv2" / "deimv2_hgnetv2_n_custom.yml"
    assert load_config(template).schedule.fit_to_data
