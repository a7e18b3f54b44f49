"""models layer: upstream DEIMv2's weight initialisation for a freshly built transformers DEIMv2 model.

The rules every family shares are in `models/upstream_init.py` (torch's defaults for every Linear / Conv2d /
norm, fused self-attention, deformable attention, the heads). DEIMv2 adds:

- the SwiGLU FFN (upstream's fused `w12`): gate/up Xavier-uniform for the fused (2h x d) matrix, `down` Xavier,
  zero biases;
- the query position MLP's last layer Xavier too (the shared rule draws its first two so);
- one initial score head (and bbox head) copied to every decoder layer (upstream deep-copies one module);
- ViT backbones (DINOv3 sizes) keep transformers' init, which follows the ViT's own recipe.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Deimv2ForObjectDetection

from deim_ray.models import upstream_init


@torch.no_grad()
def init_as_upstream(model: Deimv2ForObjectDetection) -> None:
    """Re-initialise `model` (in place) the way upstream's constructors initialise its modules."""
    inner = model.model
    vit = getattr(inner.conv_encoder, "backbone", None)
    skip = frozenset(id(m) for m in vit.modules()) if vit is not None else frozenset()
    upstream_init.reset_torch_defaults(model, skip)
    upstream_init.attention_modules(model, skip)
    for module in model.modules():
        if id(module) not in skip and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            _fused_swiglu(module)
    upstream_init.heads(model)
    nn.init.xavier_uniform_(model.model.decoder.query_pos_head.layers[-1].weight)  # DEIMv2 also draws the last
    _copy_first(model.model.decoder.class_embed)
    _copy_first(model.model.decoder.bbox_embed)


def _fused_swiglu(ffn: nn.Module) -> None:
    gate, up, down = ffn.gate_proj, ffn.up_proj, ffn.down_proj
    upstream_init.xavier([gate.weight, up.weight], gate.in_features, 2 * gate.out_features)
    upstream_init.xavier([down.weight], down.in_features, down.out_features)
    for layer in (gate, up, down):
        if layer.bias is not None:
            layer.bias.zero_()


def _copy_first(heads: nn.ModuleList) -> None:
    """Every head starts from the first one's weights, as upstream deep-copies one initial head per layer."""
    first = heads[0].state_dict()
    for head in heads[1:]:
        if head is not heads[0] and all(first[k].shape == v.shape for k, v in head.state_dict().items()):
            head.load_state_dict(first)
