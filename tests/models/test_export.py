"""The final artifact: weights-only loadable, strict, and rebuilds a model with identical outputs."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch

from deim_ray.models import FINAL_FORMAT, ModelError, load_final, make_final_checkpoint

NAMES = ["cat", "dog", "bird"]
IDS = [1, 2, 5]


def _final(model, cfg, **overrides):
    kwargs = dict(ema_state_dict=model.state_dict(), model_cfg=cfg, num_classes=3, category_ids=IDS,
                  class_names=NAMES, image_size=(160, 192), extra_meta={"normalize": False, "ap": 0.5})
    kwargs.update(overrides)
    return make_final_checkpoint(**kwargs)


def test_round_trip_gives_identical_logits(tmp_path, tiny_model, tiny_cfg):
    # perturb away from the init so equality proves the weights (not the init) were restored
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(_final(tiny_model, tiny_cfg), tmp_path / "final.pth")

    loaded, meta = load_final(tmp_path / "final.pth")
    x = torch.rand(2, 3, 160, 192)
    with torch.no_grad():
        expected, got = tiny_model.eval()(pixel_values=x), loaded(pixel_values=x)
    assert not loaded.training
    assert torch.equal(expected.logits, got.logits) and torch.equal(expected.pred_boxes, got.pred_boxes)
    assert meta["format"] == FINAL_FORMAT and "model" not in meta
    assert (meta["num_classes"], meta["category_ids"], meta["class_names"]) == (3, IDS, NAMES)
    assert meta["image_size"] == [160, 192] and meta["meta"] == {"normalize": False, "ap": 0.5}
    assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "bird"}
    assert json.loads(meta["model_config"])["variant"] == "tiny"


def test_file_holds_only_weights_only_types_and_loads_from_bytes(tiny_model, tiny_cfg):
    buf = io.BytesIO()
    torch.save(_final(tiny_model, tiny_cfg), buf)
    raw = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # would raise on any pickled object
    assert set(raw["model"]) == set(tiny_model.state_dict())
    model, meta = load_final(buf.getvalue())
    assert meta["class_names"] == NAMES and not model.training


def test_weights_of_another_config_are_refused(tiny_model, tiny_cfg):
    with pytest.raises(ModelError, match=r"EMA weights do not fit the model config \(0 missing, 0 unexpected, "
                                         r"\d+ with another shape, e.g. model.denoising_class_embed.weight\)"):
        _final(tiny_model, tiny_cfg, num_classes=4, category_ids=[*IDS, 7], class_names=[*NAMES, "fish"])
    with pytest.raises(ModelError, match=r"\(\d+ missing, 0 unexpected, \d+ with another shape"):
        _final(tiny_model, dataclasses.replace(tiny_cfg, extra={"d_model": 64}))
    partial = dict(tiny_model.state_dict())
    partial.pop("model.enc_score_head.bias")
    with pytest.raises(ModelError, match=r"\(1 missing, 0 unexpected, 0 with another shape"):
        _final(tiny_model, tiny_cfg, ema_state_dict=partial)


def test_metadata_is_validated(tiny_model, tiny_cfg):
    with pytest.raises(ModelError, match="category_ids .* and class_names .* must both have num_classes=3"):
        _final(tiny_model, tiny_cfg, class_names=["cat"])
    with pytest.raises(ModelError, match="extra_meta must hold JSON values only"):
        _final(tiny_model, tiny_cfg, extra_meta={"when": object()})
    with pytest.raises(ModelError, match="not a multiple of 32"):
        _final(tiny_model, tiny_cfg, image_size=(100, 100))


def test_load_final_rejects_other_files(tmp_path, tiny_model):
    torch.save({"model": tiny_model.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="is not a deim_ray final checkpoint"):
        load_final(tmp_path / "other.pth")
    with pytest.raises(ModelError, match="does not exist"):
        load_final(tmp_path / "nope.pth")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelError, match="cannot be loaded safely"):
        load_final(tmp_path / "cut.pth")
