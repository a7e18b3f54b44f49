"""models layer: the weights upstream's constructors draw for a freshly built model, for every family.

transformers initialises every Linear and Conv2d from N(0, initializer_range) (0.01-0.02) with zero biases, and
RT-DETRv2 also draws the batch-norm scales of its encoder and decoder from N(0, 0.02). Upstream (DEIMv2, and
D-FINE / RT-DETRv2 as DEIM trains them) builds plain torch modules and keeps torch's defaults (Kaiming-uniform
weights, uniform biases, unit batch-norm scales), so its random weights are 2-10x larger; with a backbone that
starts from random weights the transformers init trains markedly worse (`bench/train_vs_upstream.py`).

Shared by the families (`deimv2/init.py` adds DEIMv2's SwiGLU FFN and its copied heads):

- `reset_torch_defaults`: every Linear, Conv2d, BatchNorm2d and LayerNorm outside `skip` back to torch's default;
- `fused_attention`: upstream's `nn.MultiheadAttention` has one fused in-projection: q/k/v drawn Xavier-uniform
  for the (3d x d) matrix, zero in-projection and output biases (the output weight keeps torch's default);
- `deformable`: zero offset/attention weights, the circular offset grid; RT-DETRv2's value and output projections
  Xavier with zero biases;
- `heads`: score heads at the prior-probability bias, the last layer of every box MLP and of the LQE zero, query
  position MLP and decoder input projections Xavier, gateways at weight 0 / bias 0, denoising class embedding
  N(0, 1) with a zero padding row, learned queries Xavier.

`init_as_upstream_deim(model)` is the whole of it for D-FINE and RT-DETRv2 (upstream: ShihuaHuang95/DEIM,
`engine/deim/{dfine,rtdetrv2}_decoder.py`): on top of the shared rules, the decoder layers' FFN is Xavier and
the encoder output projection (`enc_output`) Xavier; every decoder layer's score head is its own draw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

_TORCH_DEFAULT = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)


def reset_torch_defaults(model: nn.Module, skip: frozenset[int] = frozenset()) -> None:
    """Every Linear / Conv2d / BatchNorm2d / LayerNorm whose id is not in `skip` back to torch's defaults."""
    for module in model.modules():
        if isinstance(module, _TORCH_DEFAULT) and id(module) not in skip:
            module.reset_parameters()


def xavier(weights: Iterable[torch.Tensor], fan_in: int, fan_out: int) -> None:
    """Xavier-uniform for the matrix the `weights` would form fused (fan_in, fan_out of the fused matrix)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    for w in weights:
        w.uniform_(-bound, bound)


def fused_attention(attn: nn.Module) -> None:
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    xavier([q.weight, k.weight, v.weight], q.in_features, 3 * q.out_features)
    for layer in (q, k, v, o):
        if layer.bias is not None:
            layer.bias.zero_()


def deformable(attn: nn.Module) -> None:
    heads = attn.n_heads
    points = list(getattr(attn, "num_points_list", None) or attn.n_points_list)
    thetas = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True).values).reshape(heads, 1, 2).tile([1, sum(points), 1])
    grid *= torch.cat([torch.arange(1, n + 1) for n in points]).reshape(1, -1, 1)
    attn.sampling_offsets.weight.zero_()
    attn.sampling_offsets.bias.copy_(grid.flatten())
    attn.attention_weights.weight.zero_()
    attn.attention_weights.bias.zero_()
    for proj in (getattr(attn, "value_proj", None), getattr(attn, "output_proj", None)):
        if isinstance(proj, nn.Linear):
            nn.init.xavier_uniform_(proj.weight)
            proj.bias.zero_()


def attention_modules(model: nn.Module, skip: frozenset[int] = frozenset()) -> None:
    """`fused_attention` / `deformable` for every self-attention and deformable attention outside `skip`."""
    for module in model.modules():
        if id(module) in skip:
            continue
        if all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            fused_attention(module)
        elif hasattr(module, "sampling_offsets") and hasattr(module, "attention_weights"):
            deformable(module)


def heads(model: nn.Module) -> None:
    """The decoder and encoder heads as upstream's `_reset_parameters` leaves them (see the module docstring)."""
    inner, config = model.model, model.config
    decoder = inner.decoder
    prior = config.initializer_bias_prior_prob or 1 / (config.num_labels + 1)
    bias = -math.log((1 - prior) / prior)
    for head in (inner.enc_score_head, *decoder.class_embed):
        head.bias.fill_(bias)
    boxes = [inner.enc_bbox_head, getattr(decoder, "pre_bbox_head", None), *decoder.bbox_embed]
    boxes += [lqe.reg_conf for lqe in getattr(decoder, "lqe_layers", None) or ()]
    for mlp in (m for m in boxes if m is not None):
        mlp.layers[-1].weight.zero_()
        mlp.layers[-1].bias.zero_()
    for layer in decoder.query_pos_head.layers[:2]:  # RT-DETRv2's 3-layer `as_reg` head keeps the third's default
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


@torch.no_grad()
def init_as_upstream_deim(model: nn.Module) -> None:
    """Re-initialise a D-FINE or RT-DETRv2 model (in place) the way DEIM's constructors initialise upstream's."""
    reset_torch_defaults(model)
    attention_modules(model)
    heads(model)
    for layer in model.model.decoder.layers:
        for linear in (m for m in layer.mlp.modules() if isinstance(m, nn.Linear)):
            nn.init.xavier_uniform_(linear.weight)
    nn.init.xavier_uniform_(model.model.enc_output[0].weight)
