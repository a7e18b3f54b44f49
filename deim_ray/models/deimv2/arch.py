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
  (DINOv3-S/M, `apply_layernorm: False`) returns it raw;
- transformers' decoder recomputes the query position embedding in every layer from that layer's reference
  points (as D-FINE does); upstream's DEIMv2 decoder computes it once, from the initial reference points, and
  every layer uses that one (`upstream_arch["query_pos"] == "once"`; configs saved before this key keep the
  per-layer embedding they were trained with).

- upstream's HGNetV2-X freezes its stem (`freeze_at: 0`, `freeze_stem_only`; `upstream_arch["freeze_stem"]`), and
  its distilled ViT-Tiny (DINOv3-S/M) has no layer scale, mask token or register tokens: transformers' are kept
  at identity and not trained.

- transformers' denoising queries keep a negative width/height where noise crossed two corners; upstream takes
  its absolute value (`denoising.py`; installed for every DEIMv2 model once one such model is built).

It also initialises the weights as upstream's constructors do (`init.py`; transformers draws every Linear and
Conv2d from N(0, 0.01-0.02), several times smaller than upstream's torch defaults).

The config attribute `upstream_arch` (a dict, saved with the config, e.g. `{"mlp_act": "silu"}`) asks for these
changes; `apply_upstream_arch` applies them to a freshly built model (`models.build.build_from_config` calls it). A config without it (a transformers checkpoint)
builds transformers' architecture unchanged, so older `final.pth` files still load.
"""

from __future__ import annotations

from torch import nn
from transformers import Deimv2ForObjectDetection
from transformers.activations import ACT2CLS
from transformers.models.deimv2.modeling_deimv2 import Deimv2MLP

from deim_ray.models.deimv2 import denoising
from deim_ray.models.deimv2.init import init_as_upstream

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
    if arch.get("query_pos") == "once":
        _query_pos_once(inner.decoder)
    _identity_projections(model)
    backbone = getattr(inner.conv_encoder, "backbone", None)
    if backbone is not None and not getattr(backbone.config, "apply_layernorm", True):
        backbone.norm = nn.Identity()
    if backbone is not None and getattr(backbone.config, "layerscale_value", None) == 1.0:
        _freeze_tiny_vit_extras(backbone)
    if arch.get("freeze_stem"):
        inner.conv_encoder.model.embedder.requires_grad_(False)
    init_as_upstream(model)
    denoising.install()


def _freeze_tiny_vit_extras(backbone: nn.Module) -> None:
    """Upstream's distilled ViT-Tiny (DINOv3-S/M) has no layer scale, mask token or register tokens; transformers'
    ViT always does. Built as identities (layer scale 1.0, no register tokens; the mask token is never used), they
    must also stay so in training: upstream has nothing to train there."""
    for name, p in backbone.named_parameters():
        if name.endswith(("lambda1", "mask_token", "register_tokens")):
            p.requires_grad_(False)


def _identity_projections(model: Deimv2ForObjectDetection) -> None:
    config = model.config
    encoder = model.model.conv_encoder
    if config.encoder_type == "lite" or not hasattr(encoder, "encoder_input_proj"):
        return  # the lite encoder and the DINOv3 fusion own their projections
    for i, channels in enumerate(encoder.intermediate_channel_sizes):
        if channels == config.encoder_hidden_dim:
            encoder.encoder_input_proj[i] = nn.Identity()


class QueryPosOnce(Deimv2MLP):
    """The decoder's query position head, answering every call of one decoder forward with its first result
    (the embedding of the initial reference points), as upstream's decoder uses one embedding for all layers.
    Same parameters and names as `Deimv2MLP`; the decoder's hooks forget the result before and after each forward
    (so no tensor or autograd graph outlives it)."""

    once: torch.Tensor | None = None

    def forward(self, stat_features: torch.Tensor) -> torch.Tensor:
        if self.once is None:
            self.once = super().forward(stat_features)
        return self.once


def _query_pos_once(decoder: nn.Module) -> None:
    decoder.query_pos_head.__class__ = QueryPosOnce
    decoder.register_forward_pre_hook(_forget_query_pos)
    decoder.register_forward_hook(_forget_query_pos)


def _forget_query_pos(decoder: nn.Module, *_) -> None:
    decoder.query_pos_head.once = None
