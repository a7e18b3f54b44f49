"""Every paper size builds from code and has the paper's parameter count (80 classes) within 5%."""

from __future__ import annotations

import pytest
import torch

from deim_ray.config.schema import ModelConfig
from deim_ray.config.variants import FAMILY_VARIANTS
from deim_ray.models import FAMILIES, PAPER_PARAMS_M, build_model, count_parameters


@pytest.fixture(scope="module")
def param_counts() -> dict[str, int]:
    """Build each paper size once (random init, no forward): the big DINOv3 sizes take ~1 s each."""
    counts = {}
    for name in PAPER_PARAMS_M:
        model = build_model(ModelConfig(variant=name), num_classes=80)
        counts[name] = count_parameters(model)
        del model
    return counts


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M))
def test_param_count_matches_paper(param_counts, name):
    got = param_counts[name] / 1e6
    assert abs(got / PAPER_PARAMS_M[name] - 1) <= 0.05, f"{name}: {got:.3f}M vs paper {PAPER_PARAMS_M[name]}M"


def test_sizes_grow_monotonically(param_counts):
    ordered = [param_counts[n] for n in ("atto", "femto", "pico", "n", "s", "m", "l", "x")]
    assert ordered == sorted(ordered)


def test_every_variant_is_listed_and_tiny_is_small():
    assert set(FAMILY_VARIANTS["deimv2"]) == {"tiny", *PAPER_PARAMS_M, "hgnetv2_s", "hgnetv2_m", "hgnetv2_l",
                                              "hgnetv2_x"}
    assert count_parameters(build_model(ModelConfig(variant="tiny"), num_classes=80)) < 400_000


def test_count_parameters_counts_tied_heads_once(tiny_model):
    # the decoder's class heads are the same tensors as the top-level ones
    assert tiny_model.class_embed[0].weight.data_ptr() == tiny_model.model.decoder.class_embed[0].weight.data_ptr()
    state_total = sum(v.numel() for k, v in tiny_model.state_dict().items() if v.is_floating_point())
    assert count_parameters(tiny_model) < state_total


def test_small_sizes_use_upstream_losses():
    """Atto/Femto/Pico: MAL + boxes only (FGL/DDF weights 0), no union of matches; larger sizes keep them."""
    for name in ("atto", "femto", "pico"):
        cfg = build_model(ModelConfig(variant=name), 2).config
        assert (cfg.weight_loss_fgl, cfg.weight_loss_ddf, cfg.use_dense_one_to_one) == (0.0, 0.0, False)
    cfg = build_model(ModelConfig(variant="n"), 2).config
    assert cfg.weight_loss_fgl > 0 and cfg.weight_loss_ddf > 0 and cfg.use_dense_one_to_one


def test_dinov3_variant_forward_small_image():
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="s", num_queries=20), num_classes=2).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.rand(1, 3, 64, 64))
    assert out.logits.shape == (1, 20, 2) and out.pred_boxes.shape == (1, 20, 4)


def test_the_registry_builds_exactly_the_sizes_the_config_layer_accepts():
    """One list: `model.family` / `model.variant` validate against `config.variants`, and the models layer builds
    its families from that same table, so what `validate` accepts is what `build_model` can build."""
    assert set(FAMILIES) == set(FAMILY_VARIANTS)
    for name, family in FAMILIES.items():
        assert tuple(family.variants) == FAMILY_VARIANTS[name]
