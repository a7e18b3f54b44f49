"""models layer: upstream DEIMv2's weight initialisation for a freshly built transformers DEIMv2 model.

transformers initialises every Linear and Conv2d from N(0, initializer_range) (0.01 in the decoder and
encoder, 0.02 in HGNetV2) with zero biases. Upstream builds plain torch modules and keeps torch's defaults
(Kaiming-uniform weights, uniform biases), so its random weights are 2-10x larger: with a backbone that starts
from random weights the transformers init trains markedly worse (the side-by-side run in
`bench/train_vs_upstream.py`). `init_as_upstream` redraws the weights as upstream's constructors do:

- every Linear / Conv2d outside a ViT backbone: torch's default `reset_parameters()`;
- self-attention (upstream's `nn.MultiheadAttention`, one fused in-projection): q/k/v drawn Xavier-uniform for
  the fused (3d x d) matrix, zero in-projection and output biases;
- the SwiGLU FFN (upstream's fused `w12`): gate/up Xavier-uniform for the fused (2h x d) matrix, `down` Xavier,
  zero biases;
- deformable attention: zero offset/attention weights, the circular offset grid (as transformers);
- heads: score heads at the prior-probability bias, one initial score head (and bbox head) copied to every
  decoder layer (upstream deep-copies one module), last layer of every box MLP and of the LQE zero, query
  position MLP and decoder input projections Xavier, denoising class embedding N(0, 1) with a zero padding row,
  gateways at weight 0 / bias 0.

ViT backbones (DINOv3 sizes) keep transformers' init, which follows the ViT's own recipe.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Deimv2ForObjectDetection


@torch.no_grad()
def init_as_upstream(model: Deimv2ForObjectDetection) -> None:
    """Re-initialise `model` (in place) the way upstream's constructors initialise its modules."""
    inner = model.model
    vit = getattr(inner.conv_encoder, "backbone", None)
    skip = {id(m) for m in vit.modules()} if vit is not None else set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and id(module) not in skip:
            module.reset_parameters()
    for module in model.modules():
        if id(module) in skip:
            continue
        if all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            _fused_attention(module)
        elif all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            _fused_swiglu(module)
        elif hasattr(module, "sampling_offsets") and hasattr(module, "attention_weights"):
            _deformable(module)
    _decoder(model)


def _xavier(weights: list[torch.Tensor], fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    for w in weights:
        w.uniform_(-bound, bound)


def _fused_attention(attn: nn.Module) -> None:
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    _xavier([q.weight, k.weight, v.weight], q.in_features, 3 * q.out_features)
    for layer in (q, k, v, o):
        if layer.bias is not None:
            layer.bias.zero_()


def _fused_swiglu(ffn: nn.Module) -> None:
    gate, up, down = ffn.gate_proj, ffn.up_proj, ffn.down_proj
    _xavier([gate.weight, up.weight], gate.in_features, 2 * gate.out_features)
    _xavier([down.weight], down.in_features, down.out_features)
    for layer in (gate, up, down):
        if layer.bias is not None:
            layer.bias.zero_()


def _deformable(attn: nn.Module) -> None:
    heads, points = attn.n_heads, list(attn.num_points_list)
    thetas = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True).values).reshape(heads, 1, 2).tile([1, sum(points), 1])
    grid *= torch.cat([torch.arange(1, n + 1) for n in points]).reshape(1, -1, 1)
    attn.sampling_offsets.weight.zero_()
    attn.sampling_offsets.bias.copy_(grid.flatten())
    attn.attention_weights.weight.zero_()
    attn.attention_weights.bias.zero_()


def _decoder(model: Deimv2ForObjectDetection) -> None:
    inner, config = model.model, model.config
    decoder = inner.decoder
    prior = config.initializer_bias_prior_prob or 1 / (config.num_labels + 1)
    bias = -math.log((1 - prior) / prior)
    for head in (inner.enc_score_head, *decoder.class_embed):
        head.bias.fill_(bias)
    _copy_first(decoder.class_embed)
    _copy_first(decoder.bbox_embed)
    for mlp in (inner.enc_bbox_head, decoder.pre_bbox_head, *decoder.bbox_embed):
        mlp.layers[-1].weight.zero_()
        mlp.layers[-1].bias.zero_()
    for lqe in decoder.lqe_layers:
        lqe.reg_conf.layers[-1].weight.zero_()
        lqe.reg_conf.layers[-1].bias.zero_()
    for layer in decoder.query_pos_head.layers:
        nn.init.xavier_uniform_(layer.weight)
    for proj in inner.decoder_input_proj:
        if isinstance(proj, nn.Sequential):
            nn.init.xavier_uniform_(proj[0].weight)
    for gate in (m for m in decoder.modules() if type(m).__name__.endswith("Gate")):
        gate.gate.weight.zero_()
        gate.gate.bias.zero_()
    embed = getattr(inner, "denoising_class_embed", None)
    if embed is not None:
        embed.reset_parameters()
    query = getattr(inner, "weight_embedding", None)
    if query is not None:
        nn.init.xavier_uniform_(query.weight)


def _copy_first(heads: nn.ModuleList) -> None:
    """Every head starts from the first one's weights, as upstream deep-copies one initial head per layer."""
    first = heads[0].state_dict()
    for head in heads[1:]:
        if head is not heads[0] and all(first[k].shape == v.shape for k, v in head.state_dict().items()):
            head.load_state_dict(first)
