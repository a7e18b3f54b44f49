"""Strict typing, error messages, identity helpers and the shipped configs (config/loader.py, typed.py)."""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

import pytest

from deim_ray.config import (
    ConfigError,
    config_from_dict,
    config_sha256,
    config_to_dict,
    diff_configs,
    dump_yaml,
    load_config,
    override_config,
    validate,
)
from deim_ray.config.schema import Config, ParamGroupConfig, SyntheticConfig

from .conftest import one_line

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in glob.glob(str(REPO / "configs" / "**" / "*.yml"), recursive=True)
                 if not Path(p).name.startswith("space"))  # Tune search spaces are not configs
RUNNABLE = [p for p in SHIPPED if "/base/" not in p and "/dataset/" not in p]

MINIMAL = """\
model: {variant: n, extra: {d_model: 96}}
data:
  train: {img_folder: imgs/train, ann_file: ann/train.json}
  val: {img_folder: imgs/val, ann_file: ann/val.json}
  image_size: [320, 480]
augment:
  policy_epoch: [4, 30, 40]
  mixup_epochs: [4, 30]
schedule: {epochs: 50, stop_epoch: 40}
optimizer:
  lr: 2e-3
  params:
    - {params: 'conv_encoder', lr: 1e-3}
"""


def test_lists_become_tuples_and_sections_dataclasses(write):
    cfg = load_config(write("a.yml", MINIMAL))
    assert isinstance(cfg, Config) and cfg.model.variant == "n"
    assert cfg.data.image_size == (320, 480) and cfg.augment.policy_epoch == (4, 30, 40)
    assert cfg.augment.mixup_epochs == (4, 30) and cfg.data.train.ann_file == "ann/train.json"
    assert cfg.optimizer.lr == 0.002 and cfg.optimizer.params == (ParamGroupConfig("conv_encoder", 0.001, None),)
    assert cfg.model.extra == {"d_model": 96} and cfg.schedule.epochs == 50
    assert cfg.source.endswith("a.yml")
    assert cfg.ema == Config().ema  # untouched sections keep the schema defaults


def test_config_is_frozen(write):
    cfg = load_config(write("a.yml", MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.schedule.epochs = 3  # type: ignore[misc]


def test_epoches_is_accepted_as_schedule_epochs(write):
    cfg = load_config(write("a.yml", "schedule: {epoches: 72, stop_epoch: 60}\n"))
    assert cfg.schedule.epochs == 72


def test_epochs_and_epoches_together_is_an_error(write):
    with pytest.raises(ConfigError, match="`schedule` sets both `epoches` and `epochs` .*keep only `epochs`"):
        load_config(write("a.yml", "schedule: {epoches: 72, epochs: 60}\n"))


def test_scalar_policy_epoch_is_one_epoch(write):
    assert load_config(write("a.yml", "augment: {policy_epoch: 72}\n")).augment.policy_epoch == (72,)


def test_unknown_key_suggests_the_closest_name(write):
    path = write("configs/x.yml", "schedule:\n  stop_epcoh: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith("unknown key `schedule.stop_epcoh` in ") and "x.yml" in message
    assert message.endswith("did you mean `stop_epoch`?") and one_line(message)


def test_unknown_key_without_a_close_match_lists_valid_keys(write):
    with pytest.raises(ConfigError, match=r"unknown key `ema.zzz` .*valid keys in ema: enabled, decay, warmups, start"):
        load_config(write("a.yml", "ema: {zzz: 1}\n"))


def test_unknown_key_names_the_included_file_that_set_it(write):
    write("base/opt.yml", "optimizer: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key `optimizer.lrr` in .*base/opt.yml .*did you mean `lr`"):
        load_config(write("a.yml", "__include__: [base/opt.yml]\nmodel: {variant: n}\n"))


def test_unknown_key_from_an_override_names_the_override(write):
    with pytest.raises(ConfigError, match=r"unknown key `train.use_ampp` in -u train.use_ampp=true"):
        load_config(write("a.yml", MINIMAL), ["train.use_ampp=true"])


def test_upstream_key_in_our_format_points_to_our_name(write):
    with pytest.raises(ConfigError, match=r"upstream DEIM's `epoches` is `schedule.epochs` in deim_ray"):
        load_config(write("a.yml", MINIMAL), ["epoches=100"])


def test_source_cannot_be_set_from_yaml(write):
    with pytest.raises(ConfigError, match="unknown key `source`"):
        load_config(write("a.yml", "source: other.yml\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("schedule: {epochs: ten}", "`schedule.epochs` must be an integer, got 'ten'"),
        ("schedule: {epochs: true}", "`schedule.epochs` must be an integer, got True"),
        ("schedule: {epochs: 10.5}", "`schedule.epochs` must be an integer, got 10.5"),
        ("optimizer: {lr: fast}", "`optimizer.lr` must be a number, got 'fast'"),
        ("optimizer: {lr: .nan}", "`optimizer.lr` must be a number, got nan"),
        ("train: {use_amp: 1}", "`train.use_amp` must be true or false, got 1"),
        ("model: {variant: 5}", "`model.variant` must be a string, got 5"),
        ("data: {image_size: 640}", "`data.image_size` must be a list of 2 integers, got 640"),
        ("data: {image_size: [640, 640, 3]}", "`data.image_size` must be a list of 2 integers"),
        ("data: {image_size: [640, x]}", "`data.image_size` (item 1) must be an integer, got 'x'"),
        ("data: {train: [a, b]}", "`data.train` must be a mapping of keys"),
        ("model: {extra: [1]}", "`model.extra` must be a mapping with string keys"),
        ("schedule: 5", "`schedule` must be a mapping of keys, got 5"),
        ("optimizer: {params: [{params: x, lr: y}]}", "`optimizer.params.0.lr` must be a number, got 'y'"),
        ("data: {synthetic: {num_train: many}}", "`data.synthetic.num_train` must be an integer"),
    ],
)
def test_wrong_types_name_the_key_and_the_value(write, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write("cfg.yml", text + "\n"))
    assert message in str(err.value) and "cfg.yml" in str(err.value) and one_line(str(err.value))


def test_ints_are_accepted_for_floats_and_null_for_optional_fields(write):
    cfg = load_config(write("a.yml", "optimizer: {lr: 1}\nmodel: {num_queries: ~}\ndata: {synthetic: ~}\n"))
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.num_queries is None and cfg.data.synthetic is None


def test_null_for_a_required_section_is_an_error(write):
    with pytest.raises(ConfigError, match="`ema` must be a mapping of keys, got None"):
        load_config(write("a.yml", "ema: ~\n"))


def test_overrides_apply_after_includes(write):
    write("base.yml", "schedule: {epochs: 10, stop_epoch: 8}\n")
    a = write("a.yml", "__include__: [base.yml]\nschedule: {epochs: 12}\n")
    cfg = load_config(a, ["schedule.stop_epoch=9", "augment.mixup_epochs=[1,2]", "model.pretrained=~"])
    assert (cfg.schedule.epochs, cfg.schedule.stop_epoch, cfg.augment.mixup_epochs) == (12, 9, (1, 2))


def test_no_leakage_between_loads(write):
    a = write("a.yml", MINIMAL + "data: {synthetic: {num_train: 5}}\n")
    b = write("b.yml", "model: {variant: s}\n")
    first = load_config(a, ["model.extra.encoder_hidden_dim=64"])
    first.model.extra["mutated"] = True
    second = load_config(b)
    assert second.model.extra == {} and second.data.synthetic is None and second.optimizer.params == ()
    again = load_config(a)
    assert again.model.extra == {"d_model": 96}
    assert first.data.synthetic == SyntheticConfig(num_train=5)


def test_the_same_include_gives_the_same_values_to_every_includer(write):
    write("base.yml", "model: {extra: {d_model: 64}}\n")
    one = load_config(write("one.yml", "__include__: [base.yml]\nmodel: {extra: {decoder_ffn_dim: 8}}\n"))
    two = load_config(write("two.yml", "__include__: [base.yml]\n"))
    assert one.model.extra == {"d_model": 64, "decoder_ffn_dim": 8} and two.model.extra == {"d_model": 64}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: Path(p).relative_to(REPO).as_posix())
def test_dump_yaml_round_trips(path, tmp_path):
    cfg = load_config(path)
    dumped = tmp_path / "resolved.yml"
    dumped.write_text(dump_yaml(cfg))
    again = load_config(dumped)
    assert again == dataclasses.replace(cfg, source=str(dumped))
    assert config_sha256(again) == config_sha256(cfg)


def test_dump_is_resolved_and_names_its_source(write):
    write("base.yml", "train: {seed: 7}\n")
    text = dump_yaml(load_config(write("a.yml", "__include__: [base.yml]\n")))
    assert text.startswith("# deim_ray config, resolved from") and "__include__" not in text and "seed: 7" in text
    assert "\nsource:" not in text


def test_config_sha256_is_stable_and_sensitive(write):
    a = load_config(write("a.yml", MINIMAL))
    b = load_config(write("elsewhere/b.yml", MINIMAL))
    assert len(config_sha256(a)) == 64 and config_sha256(a) == config_sha256(b)  # source is not part of it
    assert config_sha256(override_config(a, {"optimizer.lr": 0.002})) == config_sha256(a)
    assert config_sha256(override_config(a, {"optimizer.lr": 0.0021})) != config_sha256(a)
    assert config_sha256(override_config(a, {"model.extra.d_model": 97})) != config_sha256(a)
    assert config_sha256(load_config(write("c.yml", MINIMAL), ["optimizer.lr=0.002"])) == config_sha256(a)


def test_config_sha256_matches_for_equal_trees():
    assert config_sha256(Config()) == config_sha256(config_from_dict({}))
    assert config_sha256(Config()) == config_sha256(dataclasses.replace(Config(), source="x.yml"))


def test_diff_configs_lists_dotted_keys(write):
    a = load_config(write("a.yml", MINIMAL))
    b = override_config(a, {"optimizer.lr": 0.1, "data.train.img_folder": "x", "model.extra.new": 1})
    assert diff_configs(a, b) == ["data.train.img_folder", "model.extra.new", "optimizer.lr"]
    assert diff_configs(a, dataclasses.replace(a, source="other.yml")) == []


def test_config_to_dict_is_json_safe(write):
    import json

    tree = config_to_dict(load_config(write("a.yml", MINIMAL)))
    assert tree["data"]["image_size"] == [320, 480] and tree["optimizer"]["params"][0]["params"] == "conv_encoder"
    assert json.loads(json.dumps(tree)) == tree


def test_config_from_dict_round_trips_config_to_dict(write):
    cfg = load_config(write("a.yml", MINIMAL))
    tree = config_to_dict(cfg)
    tree.pop("source")
    assert config_from_dict(tree, source=cfg.source) == cfg


def test_override_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key `optimizer.lrr`"):
        override_config(Config(), {"optimizer.lrr": 1.0})


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: Path(p).relative_to(REPO).as_posix())
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(path)
    workers = 2 if "/demo/" in path else 8
    validate(cfg, workers=workers)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p not in RUNNABLE], ids=lambda p: Path(p).name)
def test_shipped_fragments_load(path):
    load_config(path)


def test_demo_config_values():
    cfg = load_config(REPO / "configs/demo/shapes.yml")
    m, d, a, s, lr = cfg.model, cfg.data, cfg.augment, cfg.schedule, cfg.lr_scheduler
    assert (m.variant, m.num_queries, m.decoder_layers, m.num_denoising) == ("atto", 30, 2, 30)
    assert d.synthetic == SyntheticConfig(num_train=192, num_val=48, image_size=160, num_classes=3, max_objects=3)
    assert d.train.img_folder.startswith("data/shapes") and d.image_size == (160, 160)
    assert (d.total_batch_size, d.val_batch_size, d.num_workers) == (8, 16, 0)
    assert (s.epochs, s.stop_epoch, s.ema_restart_decay) == (15, 8, 0.99)
    assert (a.policy_epoch, a.mosaic_prob, a.mixup_epochs, a.copyblend_epochs) == ((1, 5, 8), 0.3, (1, 5), (1, 8))
    assert a.base_size_repeat is None
    assert (cfg.optimizer.type, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("AdamW", 0.002, 1e-4)
    assert cfg.optimizer.params[0].lr == cfg.optimizer.lr / 2
    assert (lr.type, lr.warmup_iter, lr.flat_epoch, lr.no_aug_epoch, lr.lr_gamma) == ("flatcosine", 20, 5, 7, 0.5)
    assert (cfg.ema.decay, cfg.ema.warmups) == (0.99, 30)
    assert cfg.train.active_trackers == ("tensorboard",)
    assert (cfg.train.clip_max_norm, cfg.train.use_amp, cfg.train.print_freq) == (0.1, True, 5)


def test_tiny_config_values():
    cfg = load_config(REPO / "configs/demo/tiny.yml")
    assert cfg.model.variant == "tiny" and cfg.data.image_size == (160, 160)
    assert (cfg.data.synthetic.num_train, cfg.data.synthetic.num_val) == (32, 12)
    assert (cfg.schedule.epochs, cfg.schedule.stop_epoch, cfg.augment.policy_epoch) == (4, 2, (0, 1, 2))
    assert (cfg.augment.mixup_epochs, cfg.augment.copyblend_epochs) == ((0, 1), (0, 2))
    lr = cfg.lr_scheduler
    assert (lr.warmup_iter, lr.flat_epoch, lr.no_aug_epoch) == (5, 1, 2)
    assert (cfg.data.total_batch_size, cfg.data.val_batch_size) == (4, 8)


@pytest.mark.parametrize(
    ("name", "epochs", "stop", "policy", "repeat"),
    [
        ("hgnetv2_atto", 500, 468, (4, 250, 400), None),
        ("hgnetv2_femto", 500, 468, (4, 250, 400), None),
        ("hgnetv2_pico", 500, 468, (4, 250, 400), None),
        ("hgnetv2_n", 160, 148, (4, 78, 148), None),
        ("dinov3_s", 132, 120, (4, 64, 120), 20),
        ("dinov3_m", 102, 90, (4, 49, 90), 6),
        ("dinov3_l", 68, 60, (4, 34, 60), 3),
        ("dinov3_x", 58, 50, (4, 29, 50), 3),
    ],
)
def test_coco_schedules_follow_upstream(name, epochs, stop, policy, repeat):
    cfg = load_config(REPO / f"configs/deimv2/deimv2_{name}_coco.yml")
    assert (cfg.schedule.epochs, cfg.schedule.stop_epoch, cfg.augment.policy_epoch) == (epochs, stop, policy)
    assert cfg.augment.base_size_repeat == repeat and cfg.lr_scheduler.no_aug_epoch == epochs - stop
    assert cfg.model.variant == name.split("_")[1]
    assert cfg.data.normalize == name.startswith("dinov3")
    backbone_lr = cfg.optimizer.params[0].lr
    assert backbone_lr is not None and backbone_lr < cfg.optimizer.lr


def test_custom_template_points_at_data_custom():
    cfg = load_config(REPO / "configs/deimv2/deimv2_hgnetv2_n_custom.yml")
    assert cfg.data.train.ann_file.startswith("./data/custom/") and cfg.data.val.img_folder.startswith("./data/custom/")
    coco = load_config(REPO / "configs/deimv2/deimv2_hgnetv2_n_coco.yml").schedule
    assert cfg.schedule == dataclasses.replace(coco, fit_to_data=True)  # upstream's schedule, fitted to the data
