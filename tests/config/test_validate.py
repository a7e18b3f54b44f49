"""Cross-field validation, each rule at its boundary: valid at the edge, invalid one past it (config/validate.py)."""

from __future__ import annotations

from typing import Any

import pytest

from deim_ray.config import ConfigError, config_from_dict, validate
from deim_ray.config.validate import POLICY_OPS
from deim_ray.config.variants import FAMILY_VARIANTS

from .conftest import one_line

# A consistent schedule: stage 1 = [0, 6), stage 2 = [6, 10).
BASE: dict[str, Any] = {
    "model": {"variant": "tiny"},
    "data": {
        "train": {"img_folder": "t", "ann_file": "t.json"},
        "val": {"img_folder": "v", "ann_file": "v.json"},
        "image_size": [64, 64],
        "total_batch_size": 8,
        "val_batch_size": 8,
    },
    "schedule": {"epochs": 10, "stop_epoch": 6, "matcher_change_epoch": 5},
    "augment": {"policy_epoch": [1, 3, 6], "mixup_epochs": [1, 3], "copyblend_epochs": [1, 6]},
    "lr_scheduler": {"type": "flatcosine", "flat_epoch": 3, "no_aug_epoch": 4},
}


def make(**changes: Any):
    """BASE with `section__key=value` changes."""
    tree = {section: dict(values) for section, values in BASE.items()}
    for name, value in changes.items():
        section, key = name.split("__")
        tree.setdefault(section, {})[key] = value
    return config_from_dict(tree)


def ok(workers: int | None = None, **changes: Any) -> None:
    validate(make(**changes), workers=workers)


def bad(match: str, workers: int | None = None, **changes: Any) -> str:
    with pytest.raises(ConfigError, match=match) as err:
        validate(make(**changes), workers=workers)
    assert one_line(str(err.value))
    return str(err.value)


def stage(stop: int, epochs: int = 10) -> dict[str, Any]:
    """Changes that move stop_epoch while keeping every other rule satisfied."""
    return {"schedule__epochs": epochs, "schedule__stop_epoch": stop, "schedule__matcher_change_epoch": None,
            "augment__policy_epoch": [0, 0, max(stop, 0)], "augment__mixup_epochs": [0, 0],
            "augment__copyblend_epochs": [0, 0], "lr_scheduler__flat_epoch": 0,
            "lr_scheduler__no_aug_epoch": epochs - stop}


def test_base_is_valid():
    ok()


def test_stop_epoch_below_epochs():
    ok(**stage(9))
    bad(r"`schedule.stop_epoch` \(10\) must satisfy 1 <= stop_epoch < `schedule.epochs` \(10\)", **stage(10))


def test_stop_epoch_at_least_one():
    ok(**stage(1))
    bad("`schedule.stop_epoch` \\(0\\)", **stage(0))


def test_epochs_at_least_two():
    ok(**stage(1, epochs=2))
    bad("`schedule.epochs` must be at least 2", **stage(1, epochs=1))


def test_policy_epoch_ends_by_stop_epoch():
    ok(augment__policy_epoch=[1, 3, 6])
    message = bad(r"`augment.policy_epoch` ends at 7, after `schedule.stop_epoch` \(6\)",
                  augment__policy_epoch=[1, 3, 7])
    assert "<= 6" in message


def test_policy_epoch_scalar_form():
    ok(augment__policy_epoch=6)
    bad("`augment.policy_epoch` ends at 7", augment__policy_epoch=7)


def test_policy_epoch_ascending():
    ok(augment__policy_epoch=[3, 3, 3])
    bad("must be ascending non-negative epochs, got \\[4, 3, 6\\]", augment__policy_epoch=[4, 3, 6])
    bad("must be ascending non-negative", augment__policy_epoch=[-1, 3, 6])


def test_policy_epoch_length():
    bad("one epoch E or three epochs", augment__policy_epoch=[1, 6])


@pytest.mark.parametrize("name", ["mixup_epochs", "copyblend_epochs"])
def test_batch_augmentation_ranges_end_in_stage_one(name):
    ok(**{f"augment__{name}": [1, 6]})
    bad(f"`augment.{name}` ends at 7, after `schedule.stop_epoch` \\(6\\); set its end <= 6",
        **{f"augment__{name}": [1, 7]})
    ok(**{f"augment__{name}": [2, 2]})
    bad(f"`augment.{name}` must be \\[start, end\\] with 0 <= start <= end, got \\[3, 2\\]",
        **{f"augment__{name}": [3, 2]})


def test_matcher_change_before_stop_epoch():
    ok(schedule__matcher_change_epoch=5)
    ok(schedule__matcher_change_epoch=None)
    bad(r"`schedule.matcher_change_epoch` \(6\) must be in \[0, stop_epoch=6\)", schedule__matcher_change_epoch=6)


def test_no_aug_epoch_matches_stage_two_for_flatcosine():
    ok(lr_scheduler__no_aug_epoch=4)
    for wrong in (3, 5):
        bad(r"`lr_scheduler.no_aug_epoch` \(%d\) must equal `schedule.epochs` - `schedule.stop_epoch` \(10 - 6 = 4\)"
            % wrong, lr_scheduler__no_aug_epoch=wrong)
    ok(lr_scheduler__type="constant", lr_scheduler__no_aug_epoch=0)


def test_flat_epoch_within_stage_one():
    ok(lr_scheduler__flat_epoch=6)
    bad(r"`lr_scheduler.flat_epoch` \(7\) must be <= epochs - no_aug_epoch \(6\)", lr_scheduler__flat_epoch=7)


def test_lr_scheduler_type_and_gamma():
    bad("`lr_scheduler.type` must be one of flatcosine, constant", lr_scheduler__type="cosine")
    ok(lr_scheduler__lr_gamma=0.0)
    ok(lr_scheduler__lr_gamma=1.0)
    bad("`lr_scheduler.lr_gamma` .* got 1.01", lr_scheduler__lr_gamma=1.01)
    bad("must not be negative", lr_scheduler__warmup_iter=-1)


@pytest.mark.parametrize("size", [[32, 32], [64, 96], [640, 640]])
def test_image_size_multiples_of_32(size):
    ok(data__image_size=size)


@pytest.mark.parametrize("size", [[64, 80], [80, 64], [0, 64], [-32, 64]])
def test_image_size_not_multiple_of_32(size):
    bad(r"`data.image_size` must be two positive multiples of 32", data__image_size=size)


def test_multi_scale_base_size():
    ok(augment__base_size_repeat=3, augment__base_size=640)
    ok(augment__base_size_repeat=3)  # centre defaults to data.image_size[0]
    bad("`augment.base_size` .* multiple of 32, got 650", augment__base_size_repeat=3, augment__base_size=650)
    ok(augment__base_size=650)  # unused without base_size_repeat
    bad("`augment.base_size_repeat` must be >= 1", augment__base_size_repeat=0)


@pytest.mark.parametrize(
    "name", ["mosaic_prob", "photometric_p", "zoom_out_p", "iou_crop_p", "flip_p", "mixup_prob", "copyblend_prob"]
)
def test_probabilities_in_unit_interval(name):
    ok(**{f"augment__{name}": 0.0})
    ok(**{f"augment__{name}": 1.0})
    bad(f"`augment.{name}` is a probability: use a value in \\[0, 1\\], got 1.01", **{f"augment__{name}": 1.01})
    bad(f"`augment.{name}` is a probability", **{f"augment__{name}": -0.01})


def test_decays_in_unit_interval():
    ok(ema__decay=1.0)
    bad("`ema.decay` must be in \\[0, 1\\]", ema__decay=1.5)
    bad("`schedule.ema_restart_decay` must be in \\[0, 1\\]", schedule__ema_restart_decay=-0.1)


def test_batch_sizes_divide_by_workers():
    ok(workers=4, data__total_batch_size=8, data__val_batch_size=12)
    ok(workers=None, data__total_batch_size=7)
    message = bad(r"`data.total_batch_size` \(8\) is the batch over all workers and must divide by --workers \(3\)",
                  workers=3, data__val_batch_size=12)
    assert "use e.g. 6" in message
    bad(r"`data.val_batch_size` \(10\) .* must divide by --workers \(4\)", workers=4, data__val_batch_size=10)
    bad("`data.total_batch_size` must be >= 1", data__total_batch_size=0)


def test_amp_dtype():
    ok(train__amp_dtype="bfloat16")
    ok(train__amp_dtype="float16")
    bad("`train.amp_dtype` must be one of bfloat16, float16, got 'float32'", train__amp_dtype="float32")


def test_policy_ops_names():
    ok(augment__policy_ops=list(POLICY_OPS))
    bad("unknown op 'Mosiac' in `augment.policy_ops` — did you mean 'Mosaic'\\?", augment__policy_ops=["Mosiac"])


@pytest.mark.parametrize("family,variant", [(f, v) for f, vs in FAMILY_VARIANTS.items() for v in vs])
def test_known_variants(family, variant):
    ok(model__family=family, model__variant=variant)


def test_variant_list_is_the_documented_one():
    assert FAMILY_VARIANTS == {"deimv2": ("tiny", "atto", "femto", "pico", "n", "s", "m", "l", "x",
                                          "hgnetv2_s", "hgnetv2_m", "hgnetv2_l", "hgnetv2_x"),
                               "dfine": ("tiny", "n", "s", "m", "l", "x"),
                               "rtdetrv2": ("tiny", "r18", "r34", "r50", "r50m", "r101")}


def test_unknown_family_and_a_variant_of_another_family():
    bad("`model.family` must be one of deimv2, dfine, rtdetrv2, got 'dfin' — did you mean 'dfine'", model__family="dfin")
    bad("`model.variant` must be one of tiny, r18, r34, r50, r50m, r101, got 'n'", model__family="rtdetrv2",
        model__variant="n")


def test_unknown_variant():
    bad("`model.variant` must be one of tiny, .*, got 'nano'", model__variant="nano")
    bad("got 'attto' — did you mean 'atto'\\?", model__variant="attto")


def test_optimizer_type():
    ok(optimizer__type="SGD")
    bad("`optimizer.type` must be one of AdamW, SGD, got 'Adam'", optimizer__type="Adam")


def test_param_group_regex_must_compile():
    ok(optimizer__params=[{"params": "conv_encoder\\.", "lr": 0.1}])
    bad(r"`optimizer.params\[0\].params` is not a valid regex",
        optimizer__params=[{"params": "conv_encoder(", "lr": 0.1}])


def test_data_paths_required():
    bad("`data.train.img_folder` and `data.train.ann_file` must both be set", data__train={"img_folder": "x"})


def test_all_problems_reported_in_one_line():
    message = bad("invalid config", model__variant="nano", optimizer__type="Adam", data__image_size=[65, 64])
    assert "`model.variant`" in message and "`optimizer.type`" in message and "`data.image_size`" in message


def test_split_format_is_coco_yolo_or_voc():
    for fmt in ("coco", "yolo", "voc"):
        ok(data__train={"img_folder": "t", "ann_file": "t.yaml", "format": fmt})
    bad("`data.val.format` must be one of coco, yolo, voc, got 'yolov8' — did you mean 'yolo'",
        data__val={"img_folder": "v", "ann_file": "v.yaml", "format": "yolov8"})


def test_trackers_are_known_names_and_the_older_tensorboard_flag_still_works():
    assert make().train.active_trackers == ("tensorboard",)
    assert make(train__trackers=["mlflow", "wandb"]).train.active_trackers == ("mlflow", "wandb")
    assert make(train__tensorboard=False).train.active_trackers == ()
    both = make(train__tensorboard=False, train__trackers=["tensorboard", "mlflow"])
    assert both.train.active_trackers == ("mlflow",)
    assert make(train__tensorboard=True, train__trackers=["mlflow"]).train.active_trackers == ("tensorboard", "mlflow")
    bad(r"unknown tracker 'mlfow' in `train.trackers` — did you mean 'mlflow'\?", train__trackers=["mlfow"])
