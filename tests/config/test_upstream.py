"""Import of upstream DEIMv2 configs (config/upstream.py, upstream_model.py) on fixtures under fixtures/upstream."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from deim_ray.config import ConfigError, diff_configs, load_config, validate
from deim_ray.config.schema import ParamGroupConfig
from deim_ray.config.upstream import convert_upstream, is_upstream_config, write_converted

from .conftest import one_line

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
N = FIXTURES / "deimv2" / "deimv2_hgnetv2_n_coco.yml"
ATTO = FIXTURES / "deimv2" / "deimv2_hgnetv2_atto_coco.yml"
S = FIXTURES / "deimv2" / "deimv2_dinov3_s_coco.yml"
# What every fixture reports: settings deim_ray has no key for.
COMMON_NOTES = {
    "num_classes", "remap_mscoco_category", "output_dir", "checkpoint_freq", "find_unused_parameters",
}


def noted(unhonoured: list[str]) -> set[str]:
    return {line.split("=", 1)[0] for line in unhonoured}


def test_n_converts_to_upstream_schedule():
    cfg = load_config(N)
    s, a, lr = cfg.schedule, cfg.augment, cfg.lr_scheduler
    assert (s.epochs, s.stop_epoch, s.matcher_change_epoch, s.ema_restart_decay) == (160, 148, 136, 0.9999)
    assert (a.policy_epoch, a.mosaic_prob, a.mixup_prob, a.mixup_epochs) == ((4, 78, 148), 0.5, 0.5, (4, 78))
    assert (a.copyblend_prob, a.copyblend_epochs, a.base_size_repeat) == (0.4, (4, 78), None)
    assert (a.copyblend.area_threshold, a.copyblend.num_objects, a.copyblend.expand_ratios) == (100, 3, (0.1, 0.25))
    # flat_epoch 7800 with lr_gamma 1.0 is a constant LR after warm-up: same curve, expressed within the run
    assert (lr.type, lr.warmup_iter, lr.flat_epoch, lr.no_aug_epoch, lr.lr_gamma) == ("flatcosine", 2000, 148, 12, 1.0)
    validate(cfg, workers=8)


def test_n_converts_model_optimizer_and_runtime():
    cfg = load_config(N)
    assert cfg.model.variant == "n" and cfg.model.extra == {} and cfg.model.num_queries is None
    assert cfg.model.focal_loss_gamma == 1.5 and cfg.eval.num_top_queries == 300
    o = cfg.optimizer
    assert (o.type, o.lr, o.betas, o.weight_decay) == ("AdamW", 0.0008, (0.9, 0.999), 0.0001)
    assert o.params == (
        ParamGroupConfig(r"conv_encoder\.model\.", 0.0004, None),
        ParamGroupConfig(r"(?!)", 0.0004, 0.0),
        ParamGroupConfig(r"^(?!.*conv_encoder\.model\.)(?!.*encoder\.down_conv\d\.norm\.weight)(?=.*(?:norm|bn|bias))",
                         None, 0.0),
    )
    d = cfg.data
    assert (d.total_batch_size, d.val_batch_size, d.num_workers) == (32, 64, 4)
    assert (d.image_size, d.normalize) == ((640, 640), False)
    assert d.train.img_folder == "/data/COCO2017/train2017/" and d.val.ann_file.endswith("instances_val2017.json")
    # base/optimizer.yml (included after runtime.yml) turns AMP and EMA on; GradScaler means float16
    t = cfg.train
    assert (t.use_amp, t.amp_dtype, t.clip_max_norm, t.print_freq) == (True, "float16", 0.1, 500)
    assert t.sync_bn is True
    assert (cfg.ema.enabled, cfg.ema.decay, cfg.ema.warmups, cfg.ema.start) == (True, 0.9999, 1000, 0)


def test_n_reports_exactly_what_it_cannot_honour():
    _, unhonoured = convert_upstream(N)
    assert noted(unhonoured) == COMMON_NOTES
    assert all(one_line(line) and ": " in line for line in unhonoured)
    # HGNetv2.pretrained + local_model_dir: the file upstream loads (Atto/Femto/Pico use B0's too)
    assert load_config(N).model.backbone_pretrained == "./weight/hgnetv2/PPHGNetV2_B0_stage1.pth"
    assert load_config(ATTO).model.backbone_pretrained == "./weight/hgnetv2/PPHGNetV2_B0_stage1.pth"


def test_converted_n_matches_the_shipped_n_config():
    converted, shipped = load_config(N), load_config(REPO / "configs/deimv2/deimv2_hgnetv2_n_coco.yml")
    assert set(diff_configs(converted, shipped)) == {
        "data.train.img_folder", "data.train.ann_file", "data.val.img_folder", "data.val.ann_file",
        "augment.base_size",  # base_size 640 == image_size[0], our default
    }


def test_atto_lite_variant_and_disabled_batch_augmentation():
    cfg = load_config(ATTO)
    assert cfg.model.variant == "atto" and cfg.model.extra == {} and cfg.eval.num_top_queries == 300
    assert cfg.augment.sanitize_min_size == 12
    assert (cfg.schedule.epochs, cfg.schedule.stop_epoch, cfg.augment.policy_epoch) == (500, 468, (4, 250, 400))
    # upstream disables MixUp/CopyBlend with prob 0 and an empty range [40000, 15000]
    assert (cfg.augment.mixup_prob, cfg.augment.mixup_epochs) == (0.0, (0, 0))
    assert (cfg.augment.copyblend_prob, cfg.augment.copyblend_epochs) == (0.0, (0, 0))
    assert (cfg.data.image_size, cfg.augment.mosaic.output_size, cfg.augment.mosaic_prob) == ((320, 320), 160, 0.3)
    assert cfg.optimizer.params[2].params == (r"^(?!.*conv_encoder\.model\.)(?!.*encoder\.down_conv\d\.norm\.)"
                                              r"(?=.*(?:norm|bn))")
    validate(cfg, workers=8)
    _, unhonoured = convert_upstream(ATTO)
    assert noted(unhonoured) == COMMON_NOTES | {
        "val_dataloader.num_workers",
    }


def test_dinov3_s_variant_normalisation_and_multi_scale():
    cfg = load_config(S)
    assert cfg.model.variant == "s" and cfg.data.normalize is True and cfg.model.extra == {}
    assert (cfg.augment.base_size, cfg.augment.base_size_repeat, cfg.augment.copyblend_epochs) == (640, 20, (4, 120))
    assert (cfg.lr_scheduler.flat_epoch, cfg.lr_scheduler.lr_gamma, cfg.schedule.matcher_change_epoch) == (64, 0.5, 100)
    assert [g.params for g in cfg.optimizer.params] == [
        r"conv_encoder\.backbone\.(?!.*(?:norm|bn|bias))",
        r"conv_encoder\.backbone\..*(?:norm|bn|bias)",
        r"^(?!.*conv_encoder\.(?:backbone|fusion_proj)\.)(?!.*spatial_tuning_adapter\..*norm\.weight)"
        r"(?=.*(?:norm|bn|bias))",
    ]
    assert [g.lr for g in cfg.optimizer.params] == [0.000025, 0.000025, None]
    validate(cfg, workers=8)
    _, unhonoured = convert_upstream(S)
    assert noted(unhonoured) == COMMON_NOTES
    assert cfg.model.backbone_pretrained == "./ckpts/vitt_distill.pt"  # DINOv3STAs.weights_path


def test_upstream_overrides_use_upstream_names_and_ours_apply_after(caplog):
    cfg = load_config(N, ["epoches=150", "train_dataloader.collate_fn.stop_epoch=138",
                          "schedule.matcher_change_epoch=100", "lr_scheduler.no_aug_epoch=12", "data.num_workers=2"])
    assert (cfg.schedule.epochs, cfg.schedule.stop_epoch, cfg.schedule.matcher_change_epoch) == (150, 138, 100)
    assert cfg.data.num_workers == 2


def test_architecture_changes_become_model_fields_or_extra():
    cfg = load_config(N, ["DEIMTransformer.num_queries=100", "DEIMTransformer.num_layers=4",
                          "DEIMTransformer.hidden_dim=96", "HybridEncoder.nhead=4",
                          "DEIMCriterion.weight_dict.loss_giou=3", "DEIMCriterion.matcher.alpha=0.5"])
    assert (cfg.model.num_queries, cfg.model.decoder_layers, cfg.model.num_denoising) == (100, 4, None)
    assert cfg.model.extra == {"d_model": 96, "encoder_attention_heads": 4, "weight_loss_giou": 3, "matcher_alpha": 0.5}


def test_unknown_and_unsupported_keys_are_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="deim_ray.config.loader"):
        load_config(N, ["DEIMTransformer.foo=1", "HybridEncoder.csp_type=csp1", "HGNetv2.use_lab=False",
                        "optimizer.params=[{params: '^(?=.*head).*$', lr: 0.1, momentum: 0.9}]"])
    text = caplog.text
    assert "DEIMTransformer.foo=1: not recognised by deim_ray" in text
    assert "HybridEncoder.csp_type='csp1': differs from the variant ('csp2')" in text
    assert "HGNetv2.use_lab=False: deim_ray always uses True" in text
    assert "optimizer.params[0].params='^(?=.*head).*$': regex over upstream module names kept as is" in text
    assert "optimizer.params[0].momentum=0.9: per-group setting not supported" in text


def test_wrong_type_in_upstream_key_names_the_upstream_key():
    with pytest.raises(ConfigError) as err:
        load_config(N, ["epoches=ten"])
    message = str(err.value)
    assert "`schedule.epochs` must be an integer, got 'ten'" in message and ", upstream key `epoches`" in message
    assert "-u epoches=ten" in message and one_line(message)


def test_wrong_type_names_the_upstream_file(write):
    path = write("mine.yml", f"__include__: ['{N}']\nepoches: many\n")
    with pytest.raises(ConfigError, match=r"got 'many' \(in .*mine\.yml, upstream key `epoches`\)$"):
        load_config(path)


def test_per_epoch_lr_scheduler_becomes_constant_and_is_reported(write):
    path = write("plain.yml", f"__include__: ['{N}']\nlrsheduler: ~\n")
    cfg = load_config(path)
    assert (cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_iter) == ("constant", 500)
    _, unhonoured = convert_upstream(path)
    assert {"lr_scheduler", "lr_warmup_scheduler"} <= noted(unhonoured)


def test_flat_phase_into_no_aug_phase_is_reported(write):
    path = write("flat.yml", f"__include__: ['{N}']\nflat_epoch: 150\nlr_gamma: 0.5\n")
    cfg = load_config(path)
    assert (cfg.lr_scheduler.flat_epoch, cfg.lr_scheduler.lr_gamma) == (148, 0.5)
    assert "flat_epoch" in noted(convert_upstream(path)[1])


def test_unsupported_backbone_is_an_error():
    with pytest.raises(ConfigError, match=r"`HGNetv2.name: B6` matches no DEIMv2 variant; known: Atto \(atto\)"):
        load_config(N, ["HGNetv2.name=B6"])


def test_unsupported_model_is_an_error():
    with pytest.raises(ConfigError, match="upstream model 'DFINE' is not supported"):
        load_config(N, ["model=DFINE"])


def test_mixing_formats_is_an_error(write):
    path = write("mixed.yml", f"__include__: ['{N}']\nschedule: {{epochs: 10}}\n")
    with pytest.raises(ConfigError, match="mixes deim_ray sections \\(schedule\\) with upstream DEIM keys") as err:
        load_config(path)
    assert one_line(str(err.value))


def test_upstream_key_in_our_format_file_is_named_with_our_key(write):
    with pytest.raises(ConfigError, match=r"upstream DEIM keys \(print_freq \(deim_ray: train.print_freq\)\)"):
        load_config(write("ours.yml", "model: {variant: n}\nprint_freq: 5\n"))


def test_detection():
    assert is_upstream_config({"epoches": 10})
    assert is_upstream_config({"model": "DEIM"})
    assert is_upstream_config({"__include__": ["../dataset/coco_detection.yml", "../base/deimv2.yml"]})
    assert is_upstream_config({"__include__": "../runtime.yml"})
    ours = {"__include__": ["../base/runtime.yml", "../base/deimv2.yml"], "model": {"variant": "n"}}
    assert not is_upstream_config(ours)
    assert not is_upstream_config({"schedule": {"epoches": 10}, "optimizer": {"lr": 0.1}, "ema": {"decay": 0.9}})


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yml")), ids=lambda p: p.name)
def test_shipped_configs_are_not_taken_for_upstream(path):
    from deim_ray.config.yaml_tree import resolve_file

    assert not is_upstream_config(resolve_file(path)[0])


def test_convert_refuses_our_format():
    with pytest.raises(ConfigError, match="already in deim_ray's format"):
        convert_upstream(REPO / "configs/demo/tiny.yml")


def test_write_converted_round_trips(tmp_path):
    out = tmp_path / "n.yml"
    unhonoured = write_converted(N, out)
    text = out.read_text()
    assert text.startswith(f"# converted from upstream DEIM-family config") and "# not honoured (review these):" in text
    assert all(f"#   {line}" in text for line in unhonoured)
    assert noted(unhonoured) == COMMON_NOTES
    assert load_config(out) == dataclasses.replace(load_config(N), source=str(out))
