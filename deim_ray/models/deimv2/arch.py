"""models layer: upstream DEIMv2's architecture on top of transformers' `Deimv2ForObjectDetection`.

transformers' DEIMv2 differs from upstream's `DEIMTransformer` in three places that change the computation:

- its MLP heads (`enc_bbox_head`, `pre_bbox_head`, `bbox_embed`) and the LQE's `reg_conf` use ReLU, where
  upstream builds them with `mlp_act` (heads; `silu` in every DEIMv2 config) and the decoder `activation`
  (LQE; `silu`);
- it runs the encoder memory through an `enc_output` Linear + LayerNorm before the score and box heads;
  upstream's DEIMv2 decoder has no such layer (the memory goes to the heads directly);
- upstream's HybridEncoder projects a backbone level only when its channel count differs from the encoder
  width (`nn.Identity` otherwise: HGNetV2-S's 256-channel stride-8 level); transformers always projects.

- transformers' ViT backbone always layer-normalises its last feature map; upstream's distilled ViT-Tiny
  (DINOv3-S/M, `apply_layernorm: False`) returns it raw.

It also zero-initialises the last layer of `enc_bbox_head` and `pre_bbox_head` as upstream does (transformers
only zeroes the decoder `bbox_embed`).

The config attribute `upstream_arch` (a dict, saved with the config, e.g. `{"mlp_act": "silu"}`) asks for these
changes; `apply_upstream_arch` applies them to a freshly built model (`models.build.build_from_config` calls it). A config without it (a transformers checkpoint)
builds transformers' architecture unchanged, so older `final.pth` files still load.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Deimv2ForObjectDetection
from transformers.activations import ACT2CLS

UPSTREAM_ARCH_KEY = "upstream_arch"


def apply_upstream_arch(model: nn.Module) -> None:
    """Give a freshly built DEIMv2 model upstream's architecture (in place) when `config.upstream_arch` is set."""
    arch = getattr(model.config, UPSTREAM_ARCH_KEY, None)
    if arch and isinstance(model, Deimv2ForObjectDetection):
        _apply_upstream(model, arch)


def _apply_upstream(model: Deimv2ForObjectDetection, arch: dict) -> None:
    inner = model.model
    head_act = arch.get("mlp_act", "silu")
    lqe_act = arch.get("lqe_act", model.config.decoder_activation_function)
    heads = [inner.enc_bbox_head, inner.decoder.pre_bbox_head, *inner.decoder.bbox_embed, *model.bbox_embed]
    for mlp in heads:
        mlp.act = ACT2CLS[head_act]()
    for lqe in inner.decoder.lqe_layers:
        lqe.reg_conf.act = ACT2CLS[lqe_act]()
    inner.enc_output = nn.Identity()
    _identity_projections(model)
    backbone = getattr(inner.conv_encoder, "backbone", None)
    if backbone is not None and not getattr(backbone.config, "apply_layernorm", True):
        backbone.norm = nn.Identity()
    with torch.no_grad():
        for mlp in (inner.enc_bbox_head, inner.decoder.pre_bbox_head):
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()


def _identity_projections(model: Deimv2ForObjectDetection) -> None:
    config = model.config
    encoder = model.model.conv_encoder
    if config.encoder_type == "lite" or not hasattr(encoder, "encoder_input_proj"):
        return  # the lite encoder and the DINOv3 fusion own their projections
    for i, channels in enumerate(encoder.intermediate_channel_sizes):
        if channels == config.encoder_hidden_dim:
            encoder.encoder_input_proj[i] = nn.Identity()
