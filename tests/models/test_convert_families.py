"""Upstream DEIM D-FINE / RT-DETRv2 weights: `deim-ray convert-weights` reproduces upstream's outputs and training loss,
and every tensor of all 22 upstream configs maps onto the model deim_ray builds from that config.

Fixtures under fixtures/upstream come from upstream's own code (ShihuaHuang95/DEIM; `make_family_fixtures.py`, run
by hand): for D-FINE N (320 px) and RT-DETRv2 R18 (256 px), upstream's eval outputs and its `DEIMCriterion` terms
(training mode, denoising off, epoch 0) for seeded weights (`seeded_weights.py`: the weights are regenerated here
from the seed, so the fixtures stay small), and every config's parameter count and state-dict shapes.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch

from deim_ray.cli.main import main
from deim_ray.config.loader import load_config
from deim_ray.models import ModelError, build_model_config, build_model_with_report, load_final
from deim_ray.models.build import build_from_config
from deim_ray.models.convert import load_upstream_state, match_upstream_state
from deim_ray.models.loss import forward_loss
from tests.models.seeded_weights import seeded_batch, seeded_image, seeded_state

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
CONFIGS = Path(__file__).parents[1] / "config" / "fixtures" / "upstream_deim"
MODELS = json.loads(gzip.open(FIXTURES / "family_models.json.gz", "rt").read())
CASES = ["dfine_n", "rtdetrv2_r18"]
# one config per distinct upstream state-dict layout (17 of 22: the D-FINE baselines N/S/M and the X variants
# share theirs with another config; `test_upstream_families.py` loads every config)
LAYOUTS = sorted({json.dumps(m["shapes"], sort_keys=True): rel for rel, m in sorted(MODELS.items(), reverse=True)
                  }.values())
DENOISING_EMBED = "decoder.denoising_class_embed.weight"


def _upstream_state(fixture: dict) -> dict[str, torch.Tensor]:
    return seeded_state(MODELS[fixture["config"]]["shapes"], fixture["seed"], fixture["fixed"])


def _aligned_max_diff(got, fixture) -> float:
    """Max abs difference of (boxes, sigmoid scores) per query, queries matched one to one (the two
    implementations may order queries whose encoder scores tie differently)."""
    a = torch.cat([fixture["pred_boxes"][0], fixture["pred_scores"][0]], -1)
    b = torch.cat([got.pred_boxes[0], got.logits.sigmoid()[0]], -1)
    nearest = torch.cdist(a, b).argmin(1)
    assert len(set(nearest.tolist())) == len(nearest), "queries do not match one to one"
    return (a - b[nearest]).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_converted_weights_reproduce_upstream_outputs(tmp_path, capsys, case):
    fixture = torch.load(FIXTURES / f"{case}_outputs.pt", weights_only=True)
    sd = _upstream_state(fixture)
    ckpt = tmp_path / "best_stg2.pth"
    torch.save({"model": sd, "ema": {"module": sd, "updates": 10}, "last_epoch": 3}, ckpt)
    out = tmp_path / "final.pth"
    assert main(["convert-weights", str(ckpt), "-c", str(CONFIGS / fixture["config"]), "-o", str(out)]) == 0
    assert "(ema weights)" in capsys.readouterr().out

    model, meta = load_final(out)
    assert meta["family"] == case.split("_")[0] and meta["num_classes"] == 80
    with torch.no_grad():
        got = model(pixel_values=seeded_image(fixture["size"], fixture["seed"]).float() / 255)
    assert _aligned_max_diff(got, fixture) <= 1e-3


@pytest.mark.parametrize("case", CASES)
def test_converted_model_reproduces_upstream_training_loss(case):
    """Denoising off on both sides (upstream `num_denoising: 0`): the model has no denoising embedding."""
    fixture = torch.load(FIXTURES / f"{case}_loss.pt", weights_only=True)
    cfg = load_config(CONFIGS / fixture["config"])
    model = build_from_config(build_model_config(dataclasses.replace(cfg.model, num_denoising=0), 80))
    sd = _upstream_state(fixture)
    del sd[DENOISING_EMBED]
    load_upstream_state(model, sd, fixture["config"], "ema")
    images, targets = seeded_batch(fixture["size"], fixture["seed"])
    with torch.no_grad():
        total, terms = forward_loss(model.train(), images, targets)
    theirs = fixture["upstream_terms"]
    assert set(terms) == set(theirs)
    assert abs(float(total) - sum(theirs.values())) <= 1e-3 * sum(theirs.values())
    for key, value in theirs.items():
        assert float(terms[key]) == pytest.approx(value, rel=1e-3, abs=1e-5), key


@pytest.mark.parametrize("rel", LAYOUTS)
def test_every_upstream_tensor_maps_onto_the_model_built_from_its_config(rel):
    config = build_model_config(load_config(CONFIGS / rel).model, 80)
    with torch.device("meta"):
        model = build_from_config(config)
    sd = {k: torch.empty(s, device="meta") for k, s in MODELS[rel]["shapes"].items()}
    converted, kept, dropped = match_upstream_state(sd, model.state_dict(), config, rel)  # raises on any misfit
    assert len(converted) == len(model.state_dict()) and not kept
    assert sorted(dropped) == ["decoder.anchors", "decoder.valid_mask"]
    assert sum(p.numel() for p in model.parameters()) == MODELS[rel]["parameters"]


def test_checkpoint_of_another_family_is_refused_with_names(tmp_path, capsys):
    fixture = torch.load(FIXTURES / "dfine_n_outputs.pt", weights_only=True)
    ckpt = tmp_path / "dfine_n.pth"
    torch.save({"model": _upstream_state(fixture)}, ckpt)
    out = tmp_path / "final.pth"
    config = CONFIGS / "deim_rtdetrv2/deim_r18vd_120e_coco.yml"
    assert main(["convert-weights", str(ckpt), "-c", str(config), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deim-ray: error: ")
    assert "312 upstream tensors with no deim_ray counterpart: backbone.stages." in err
    assert not out.exists()


def test_unmapped_and_missing_tensors_are_named():
    rel = "deim_rtdetrv2/deim_r18vd_120e_coco.yml"
    sd = {k: torch.empty(s, device="meta") for k, s in MODELS[rel]["shapes"].items()}
    sd["decoder.extra_head.weight"] = torch.empty(3, device="meta")
    del sd["decoder.dec_score_head.2.bias"]
    config = build_model_config(load_config(CONFIGS / rel).model, 80)
    with torch.device("meta"):
        target = build_from_config(config).state_dict()
    with pytest.raises(ModelError, match=r"1 upstream tensors with no deim_ray counterpart: decoder\.extra_head\.weight"
                       r".*model tensors the checkpoint does not provide: model\.decoder\.class_embed\.2\.bias"):
        match_upstream_state(sd, target, config, "r18.pth")


def test_pretrained_from_upstream_checkpoint_resizes_class_heads(tmp_path):
    fixture = torch.load(FIXTURES / "dfine_n_outputs.pt", weights_only=True)
    sd = _upstream_state(fixture)
    ckpt = tmp_path / "dfine_n.pth"
    torch.save({"ema": {"module": sd}}, ckpt)
    cfg = dataclasses.replace(load_config(CONFIGS / fixture["config"]).model, pretrained=str(ckpt),
                              backbone_pretrained=None)
    model, report = build_model_with_report(cfg, num_classes=3)
    assert "model.enc_score_head.weight" in report.shape_mismatch and "class_embed.0.weight" in report.shape_mismatch
    assert not report.unused and len(report.reinitialised) == len(report.shape_mismatch)
    stem = "model.backbone.model.embedder.stem1.convolution.weight"
    assert torch.equal(model.state_dict()[stem], sd["backbone.stem.stem1.conv.weight"])
