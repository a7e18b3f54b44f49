"""The D-FINE and RT-DETRv2 families: upstream's sizes, heads and DEIM criterion on transformers' models."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from deim_ray.config.schema import ModelConfig
from deim_ray.models import ModelError, build_model, count_parameters, forward_loss, load_final, \
    make_final_checkpoint, set_matcher_epoch
from deim_ray.models.build import build_from_config
from deim_ray.models.family_loss import DeimCriterionLoss
from deim_ray.models.heads import SiluPredictionHead
from tests.models.conftest import make_targets

FAMILIES = ("dfine", "rtdetrv2")


def _tiny(family: str, **changes) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(family=family, variant="tiny", **changes), num_classes=3)


def _terms(model: nn.Module) -> set[str]:
    """The loss terms of one training step, without their output suffixes. The weights are perturbed first: at
    initialisation every layer predicts the same (zero) box distributions, which upstream gives no DDF term."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()
    _, terms = forward_loss(model, torch.rand(2, 3, 128, 128), make_targets(3, 0))
    return {re.sub(r"_(aux_\d+|enc_\d+|dn_\d+|dn_pre|pre)$", "", k) for k in terms}


def test_dfine_trains_with_mal_boxes_and_local_terms():
    assert _terms(_tiny("dfine")) == {"loss_mal", "loss_bbox", "loss_giou", "loss_fgl", "loss_ddf"}


def test_rtdetrv2_trains_with_mal_and_box_terms_only():
    assert _terms(_tiny("rtdetrv2")) == {"loss_mal", "loss_bbox", "loss_giou"}


def test_plain_baseline_loss_is_vfl():
    assert _terms(_tiny("rtdetrv2", losses=("vfl", "boxes"))) == {"loss_vfl", "loss_bbox", "loss_giou"}


@pytest.mark.parametrize("losses,match", [(("mal", "vfl", "boxes"), "exactly one of mal and vfl"),
                                          (("mal", "boxes", "local"), "predicts no box distributions"),
                                          (("mal", "focal"), "unknown term 'focal'")])
def test_bad_loss_terms_are_refused(losses, match):
    with pytest.raises(ModelError, match=match):
        _tiny("rtdetrv2", losses=losses)


def test_losses_key_is_refused_for_deimv2():
    with pytest.raises(ModelError, match="model.losses applies to the D-FINE and RT-DETRv2 families"):
        build_model(ModelConfig(variant="tiny", losses=("vfl", "boxes")), 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_matcher_switch_changes_the_matching_and_back(family):
    model = _tiny(family)
    assert set_matcher_epoch(model, 3, 2) and model.loss_function.iou_order_alpha == 4.0
    assert isinstance(model.loss_function, DeimCriterionLoss)
    assert not set_matcher_epoch(model, 1, 2) and model.loss_function.iou_order_alpha is None


def test_deim_heads_use_silu_and_rtdetrv2_the_as_reg_query_head():
    model = _tiny("rtdetrv2")
    query = model.model.decoder.query_pos_head
    assert [layer.out_features for layer in query.layers] == [32, 32, 32]  # upstream as_reg: 4 -> d -> d -> d
    assert isinstance(query, SiluPredictionHead) and isinstance(model.bbox_embed[0], SiluPredictionHead)
    plain = _tiny("rtdetrv2", extra={"mlp_act": "relu", "query_pos_method": "default"})
    assert [layer.out_features for layer in plain.model.decoder.query_pos_head.layers] == [64, 32]
    assert not isinstance(plain.bbox_embed[0], SiluPredictionHead)
    dfine = _tiny("dfine")
    assert isinstance(dfine.model.decoder.pre_bbox_head.act, nn.SiLU)
    assert not isinstance(dfine.model.decoder.lqe_layers[0].reg_conf.act, nn.SiLU)  # upstream LQE keeps ReLU


def test_unknown_head_option_value_is_refused():
    with pytest.raises(ModelError, match="model.extra.mlp_act must be one of relu, silu"):
        _tiny("dfine", extra={"mlp_act": "gelu"})
    with pytest.raises(ModelError, match="unknown DFineConfig key 'query_pos_method'"):
        _tiny("dfine", extra={"query_pos_method": "as_reg"})
    with pytest.raises(ModelError, match="model.extra.freeze_stages must be one of 0, 1, 2, 3, 4, got 7"):
        _tiny("rtdetrv2", extra={"freeze_stages": 7})


def test_unknown_variant_names_the_family_sizes():
    with pytest.raises(ModelError, match="unknown RT-DETRv2 variant 'n'; choose one of: tiny, r18, r34"):
        build_model(ModelConfig(family="rtdetrv2", variant="n"), 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_final_round_trip_keeps_family_heads_and_outputs(tmp_path, family):
    model = _tiny(family, extra={"mlp_act": "relu"} if family == "dfine" else {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = ModelConfig(family=family, variant="tiny", extra={"mlp_act": "relu"} if family == "dfine" else {})
    ckpt = make_final_checkpoint(model.state_dict(), cfg, 3, [1, 2, 5], ["a", "b", "c"], (128, 128), {})
    torch.save(ckpt, tmp_path / "final.pth")
    loaded, meta = load_final(tmp_path / "final.pth")
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        expected, got = model.eval()(pixel_values=x), loaded(pixel_values=x)
    assert meta["family"] == family and type(loaded) is type(model)
    assert torch.equal(expected.logits, got.logits) and torch.equal(expected.pred_boxes, got.pred_boxes)


def test_tiny_sizes_stay_small():
    assert count_parameters(_tiny("dfine")) < 2_100_000 and count_parameters(_tiny("rtdetrv2")) < 1_000_000


def test_dfine_lqe_runs_with_the_decoder_activation_as_upstream():
    """Upstream's LQE uses the decoder `activation` (silu under DEIM); a config without `upstream_lqe_act` (a
    D-FINE final.pth written before it existed) keeps transformers' ReLU, which it was trained with."""
    def lqe_act_at_minus_one(model: nn.Module) -> float:
        return float(model.model.decoder.lqe_layers[0].reg_conf.act(torch.tensor(-1.0)))

    deim, plain = _tiny("dfine"), _tiny("dfine", extra={"decoder_activation_function": "relu"})
    assert lqe_act_at_minus_one(deim) == pytest.approx(float(nn.functional.silu(torch.tensor(-1.0))))
    assert lqe_act_at_minus_one(plain) == 0.0
    config = deim.config
    del config.upstream_lqe_act
    assert lqe_act_at_minus_one(build_from_config(config)) == 0.0
