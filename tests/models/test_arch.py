"""models/deimv2/arch.py: upstream's architecture on transformers' DEIMv2, switched by `config.upstream_arch`."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

from deim_ray.config.schema import ModelConfig
from deim_ray.models import build_model_config
from deim_ray.models.build import build_from_config
from deim_ray.models.deimv2 import UPSTREAM_ARCH_KEY


X = torch.linspace(-3, 3, 13)


def _is_silu(act) -> bool:
    return torch.allclose(act(X), nn.functional.silu(X))


def _heads(model):
    inner = model.model
    return [inner.enc_bbox_head, inner.decoder.pre_bbox_head, *inner.decoder.bbox_embed, *model.bbox_embed,
            *(lqe.reg_conf for lqe in inner.decoder.lqe_layers)]


def test_upstream_arch_silu_heads_no_enc_output_zero_init():
    torch.manual_seed(0)
    model = build_from_config(build_model_config(ModelConfig(variant="tiny"), 3))
    assert all(_is_silu(mlp.act) for mlp in _heads(model))
    assert isinstance(model.model.enc_output, nn.Identity)
    assert not any(k.startswith("model.enc_output.") for k in model.state_dict())
    for mlp in (model.model.enc_bbox_head, model.model.decoder.pre_bbox_head):
        assert not mlp.layers[-1].weight.any() and not mlp.layers[-1].bias.any()
    with torch.no_grad():
        out = model.eval()(pixel_values=torch.rand(1, 3, 160, 160))
    assert torch.isfinite(out.logits).all() and out.pred_boxes.shape == (1, 30, 4)


def test_identity_projection_where_upstream_has_none():
    config = build_model_config(ModelConfig(variant="hgnetv2_s"), 80)
    with torch.device("meta"):
        model = build_from_config(config)
    projections = model.model.conv_encoder.encoder_input_proj
    assert isinstance(projections[0], nn.Identity)  # B0 stage 2 has 256 channels, the encoder width
    assert not isinstance(projections[1], nn.Identity) and not isinstance(projections[2], nn.Identity)


def test_config_without_the_key_builds_transformers_architecture():
    config = build_model_config(ModelConfig(variant="tiny"), 3)
    delattr(config, UPSTREAM_ARCH_KEY)
    model = build_from_config(config)
    assert not isinstance(model.model.enc_output, nn.Identity)
    assert torch.equal(model.model.enc_bbox_head.act(X), X.relu())


def _query_pos_calls(model) -> list[int]:
    calls = []
    model.model.decoder.query_pos_head.layers[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(pixel_values=torch.rand(1, 3, 160, 160))
        model(pixel_values=torch.rand(1, 3, 160, 160))
    return calls


def test_query_position_embedding_once_per_forward_as_upstream():
    """Upstream's DEIMv2 decoder embeds the initial reference points once for all layers (transformers: per layer);
    a config saved before `query_pos` existed keeps the per-layer embedding it was trained with."""
    torch.manual_seed(0)
    config = build_model_config(ModelConfig(variant="tiny"), 3)
    model = build_from_config(config).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the model pickles (and deep-copies, as the EMA does) with its hooks
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert len(_query_pos_calls(loaded)) == 2 and len(_query_pos_calls(copy.deepcopy(model))) == 2
    assert len(_query_pos_calls(model)) == 2  # two forwards, one embedding each
    assert model.model.decoder.query_pos_head.once is None  # nothing kept between forwards
    assert "model.decoder.query_pos_head.layers.0.weight" in model.state_dict()
    getattr(config, UPSTREAM_ARCH_KEY).pop("query_pos")
    per_layer = build_from_config(config).eval()
    assert len(_query_pos_calls(per_layer)) == 2 * config.decoder_layers

