"""Fine-tuning from other weights: transformers folders and .pth files, matched by name and shape (offline)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deim_ray.config.schema import ModelConfig
from deim_ray.models import ModelError, build_model, build_model_with_report

HEADS = ("class_embed.0.weight", "model.enc_score_head.weight", "model.denoising_class_embed.weight")
BACKBONE_CONV = "model.conv_encoder.model.embedder.stem1.convolution.weight"


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(1)
    return build_model(ModelConfig(variant="tiny"), num_classes=80)


def _backbone_keys(state):
    return [k for k in state if k.startswith("model.conv_encoder.")]


def test_local_transformers_folder_with_other_class_count(tmp_path, source_model):
    source_model.save_pretrained(tmp_path / "src")
    torch.manual_seed(2)
    model, report = build_model_with_report(ModelConfig(variant="tiny", pretrained=str(tmp_path / "src")), 3)

    src, got = source_model.state_dict(), model.state_dict()
    torch.manual_seed(2)
    fresh = build_model(ModelConfig(variant="tiny"), 3).state_dict()
    assert not torch.equal(fresh[BACKBONE_CONV], src[BACKBONE_CONV])  # so equality below means "loaded"
    assert _backbone_keys(got) and all(torch.equal(got[k], src[k]) for k in _backbone_keys(got))
    assert set(HEADS) <= set(report.shape_mismatch) and set(HEADS) <= set(report.reinitialised)
    assert BACKBONE_CONV in report.loaded
    # the re-initialised class heads carry the project's class prior, not the source's 80-way weights
    assert got["class_embed.0.bias"].shape == (3,)
    assert float(got["class_embed.0.bias"][0]) == pytest.approx(-math.log(0.99 / 0.01))
    assert "re-initialised" in report.summary() and "\n" not in report.summary()


def test_train_state_pth_prefers_ema_weights(tmp_path, source_model):
    raw = source_model.state_dict()
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in raw.items()}
    torch.save({"format": "deim_ray.train_state/1", "model": raw, "ema": {"module": ema, "updates": 7},
                "last_epoch": 3}, tmp_path / "last.pth")
    model = build_model(ModelConfig(variant="tiny", pretrained=str(tmp_path / "last.pth")), 80)
    assert torch.equal(model.state_dict()[BACKBONE_CONV], ema[BACKBONE_CONV])
    assert torch.equal(model.state_dict()["class_embed.0.weight"], ema["class_embed.0.weight"])  # same classes


def test_ddp_prefixed_plain_state_dict(tmp_path, source_model):
    torch.save({f"module.{k}": v for k, v in source_model.state_dict().items()}, tmp_path / "ddp.pth")
    model, report = build_model_with_report(ModelConfig(variant="tiny", pretrained=str(tmp_path / "ddp.pth")), 80)
    assert report.reinitialised == () and report.unused == ()
    assert torch.equal(model.state_dict()[BACKBONE_CONV], source_model.state_dict()[BACKBONE_CONV])


def test_upstream_checkpoint_of_another_size_is_an_error_not_a_silent_scratch_run(tmp_path):
    # upstream names are converted (test_convert.py); here no tensor has the tiny model's shape
    upstream = {"backbone.stem.stem1.conv.weight": torch.zeros(24, 3, 3, 3),
                "decoder.dec_score_head.0.weight": torch.zeros(80, 256)}
    torch.save({"ema": {"module": upstream, "updates": 1}, "last_epoch": 10}, tmp_path / "best_stg2.pth")
    with pytest.raises(ModelError, match="no tensor of .* matches the model by name and shape; .*same size"):
        build_model(ModelConfig(variant="tiny", pretrained=str(tmp_path / "best_stg2.pth")), 3)


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="is not an existing file or folder, nor a hub id"):
        build_model(ModelConfig(variant="tiny", pretrained=str(tmp_path / "missing.pth")), 3)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match=r"not a transformers DEIMv2 checkpoint \(config model_type 'bert'\)"):
        build_model(ModelConfig(variant="tiny", pretrained=str(tmp_path / "bert")), 3)
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="cannot load .*junk.pth with weights_only=True"):
        build_model(ModelConfig(variant="tiny", pretrained=str(tmp_path / "junk.pth")), 3)
