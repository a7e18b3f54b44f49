"""build_model_config / build_model: variant, project defaults, overrides, extra, and input-size checks."""

from __future__ import annotations

import dataclasses
import math

import pytest

from deim_ray.config.schema import ModelConfig
from deim_ray.models import (
    ModelError,
    build_model,
    build_model_config,
    feature_strides,
    validate_input_size,
)


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ModelError, match=r"unknown DEIMv2 variant 'q'; choose one of: tiny, atto, .*, hgnetv2_x$"):
        build_model_config(ModelConfig(variant="q"), 3)


def test_project_defaults_applied():
    cfg = build_model_config(ModelConfig(variant="atto", prior_prob=0.02, focal_loss_gamma=1.25), 5)
    assert cfg.num_labels == 5
    assert cfg.initializer_bias_prior_prob == 0.02
    assert cfg.focal_loss_gamma == 1.25
    assert cfg.freeze_backbone_batch_norms is False


def test_class_prior_reaches_score_heads():
    model = build_model(ModelConfig(variant="tiny", prior_prob=0.01), 3)
    expected = -math.log((1 - 0.01) / 0.01)
    assert model.model.enc_score_head.bias.detach().allclose(model.model.enc_score_head.bias.new_full((3,), expected))
    assert float(model.class_embed[-1].bias.detach()[0]) == pytest.approx(expected)


def test_overrides_then_extra():
    base = ModelConfig(variant="n", num_queries=50, decoder_layers=2, num_denoising=0,
                       extra={"decoder_ffn_dim": 256, "backbone_config": {"use_learnable_affine_block": False}})
    cfg = build_model_config(base, 2)
    assert (cfg.num_queries, cfg.decoder_layers, cfg.num_denoising, cfg.decoder_ffn_dim) == (50, 2, 0, 256)
    # the backbone dict is merged, not replaced
    assert cfg.backbone_config.use_learnable_affine_block is False
    assert cfg.backbone_config.stage_num_blocks == [1, 1, 2, 1]
    # extra wins over the named overrides
    cfg = build_model_config(dataclasses.replace(base, extra={"num_queries": 77}), 2)
    assert cfg.num_queries == 77


def test_unknown_extra_key_suggests_the_right_one():
    with pytest.raises(ModelError, match=r"unknown Deimv2Config key 'num_querys'; did you mean 'num_queries'\?"):
        build_model_config(ModelConfig(variant="tiny", extra={"num_querys": 10}), 3)
    with pytest.raises(ModelError, match="must not set num_labels"):
        build_model_config(ModelConfig(variant="tiny", extra={"num_labels": 10}), 3)


def test_bad_numbers_are_one_line_errors():
    with pytest.raises(ModelError, match="num_classes must be >= 1"):
        build_model_config(ModelConfig(variant="tiny"), 0)
    with pytest.raises(ModelError, match=r"model.num_queries must be >= 1, got 0"):
        build_model_config(ModelConfig(variant="tiny", num_queries=0), 3)
    with pytest.raises(ModelError, match=r"invalid model config .*decoder_n_points.*; fix model.extra") as err:
        build_model_config(ModelConfig(variant="tiny", extra={"decoder_n_points": [4, 4, 4]}), 3)
    assert "\n" not in str(err.value)


def test_feature_strides():
    assert feature_strides(build_model_config(ModelConfig(variant="atto"), 2)) == (16, 32)
    assert feature_strides(build_model_config(ModelConfig(variant="n"), 2)) == (16, 32)
    assert feature_strides(build_model_config(ModelConfig(variant="s"), 2)) == (8, 16, 32)


def test_validate_input_size_accepts_valid_sizes():
    validate_input_size(320, 480, 300)
    validate_input_size(160, 160, 100)  # 100 + 25 tokens
    validate_input_size(96, 96, 100, strides=(8, 16, 32))  # 144 + 36 + 9 tokens


def test_validate_input_size_names_the_fix():
    with pytest.raises(ModelError, match=r"300x300 \(HxW\) is not a multiple of 32; use e.g. 288x288"):
        validate_input_size(300, 300, 100)
    with pytest.raises(ModelError, match=r"gives 80 encoder tokens, fewer than num_queries=100; use at least "
                                         r"160x160 or lower model.num_queries"):
        validate_input_size(128, 128, 100)
