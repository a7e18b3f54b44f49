"""models layer: upstream DEIMv2 state-dict names -> transformers `Deimv2ForObjectDetection` names.

Upstream (Intellindust-AI-Lab/DEIMv2) names a tensor by its module path in `DEIM(backbone, encoder, decoder)`;
transformers by its path in `Deimv2ForObjectDetection`. `rename(key)` rewrites one name with ordered regular
expression rules (first a prefix rule per part of the model, then renames inside that part). Tensors upstream
stores fused are split by `split_fused`: the `nn.MultiheadAttention` `in_proj` of the AIFI and decoder
self-attention (q, k, v), the ViT `qkv` projection (q, k, v; DINOv3's key-bias mask multiplied in), and the decoder's
SwiGLU `w12` (gate, up).

`IGNORED` lists upstream tensors with no counterpart by design: anchors and the valid mask (recomputed from the
input size), the ViT RoPE `periods` (a function of the config) and the key-bias
mask (folded into the split).
"""

from __future__ import annotations

import re

import torch

IGNORED = re.compile(r"(^decoder\.(anchors|valid_mask)$|rope_embed\.periods$|qkv\.bias_mask$)")

_HGNET = "model.conv_encoder.model."
_DINO = "model.conv_encoder.backbone."
_STA = "model.conv_encoder.spatial_tuning_adapter."

# Prefix rules: (pattern, replacement), the first that matches wins. `{lite}` / `{hybrid}` rules apply to one
# encoder type only (see `rename`).
_PREFIX: list[tuple[str, str]] = [
    (r"^backbone\.stem\.", _HGNET + "embedder."),
    (r"^backbone\.stages\.", _HGNET + "encoder.stages."),
    (r"^backbone\.dinov3\.(?:_model\.)?blocks\.", _DINO + "model.layer."),
    (r"^backbone\.dinov3\.(?:_model\.)?patch_embed\.proj\.", _DINO + "embeddings.patch_embeddings."),
    (r"^backbone\.dinov3\.(?:_model\.)?storage_tokens$", _DINO + "embeddings.register_tokens"),
    (r"^backbone\.dinov3\.(?:_model\.)?(cls_token|mask_token)$", _DINO + r"embeddings.\1"),
    (r"^backbone\.dinov3\.(?:_model\.)?norm\.", _DINO + "norm."),
    (r"^backbone\.sta\.stem\.0\.", _STA + "stem_conv.conv."),
    (r"^backbone\.sta\.stem\.1\.", _STA + "stem_conv.norm."),
    # STA: conv2 is Sequential(conv, bn); conv3/conv4 are Sequential(activation, conv, bn)
    (r"^backbone\.sta\.(conv[234])\.(\d)\.",
     lambda m: f"{_STA}{m[1]}.{'conv' if int(m[2]) == (0 if m[1] == 'conv2' else 1) else 'norm'}."),
    (r"^backbone\.convs\.(\d+)\.", r"model.conv_encoder.fusion_proj.\1.conv."),
    (r"^backbone\.norms\.(\d+)\.", r"model.conv_encoder.fusion_proj.\1.norm."),
    (r"^encoder\.encoder\.(\d+)\.layers\.", r"model.encoder.aifi.\1.layers."),
    (r"^encoder\.down_sample([12])\.1\.", r"model.encoder.down_conv\1.conv."),
    (r"^encoder\.down_sample([12])\.2\.", r"model.encoder.down_conv\1.norm."),
    (r"^encoder\.bi_fusion\.cv\.", "model.encoder.bi_fusion_conv."),
    (r"^encoder\.", "model.encoder."),
    (r"^decoder\.input_proj\.", "model.decoder_input_proj."),
    (r"^decoder\.decoder\.layers\.", "model.decoder.layers."),
    (r"^decoder\.decoder\.(lqe_layers|up|reg_scale)\b", r"model.decoder.\1"),
    (r"^decoder\.(up|reg_scale)$", r"model.decoder.\1"),
    (r"^decoder\.dec_score_head\.", "model.decoder.class_embed."),
    (r"^decoder\.dec_bbox_head\.", "model.decoder.bbox_embed."),
    (r"^decoder\.(pre_bbox_head|query_pos_head)\.", r"model.decoder.\1."),
    (r"^decoder\.(enc_score_head|enc_bbox_head|denoising_class_embed)\.", r"model.\1."),
]

# Renames inside a part, applied (all that match, in order) after the prefix rule.
_INNER: dict[str, list[tuple[str, str]]] = {
    _HGNET: [(r"\.conv\.weight$", ".convolution.weight"), (r"\.bn\.", ".normalization.")],
    _DINO: [(r"\.attn\.proj\.", ".attention.o_proj."), (r"\.mlp\.fc1\.", ".mlp.up_proj."),
            (r"\.mlp\.fc2\.", ".mlp.down_proj."), (r"\.mlp\.w1\.", ".mlp.gate_proj."),
            (r"\.mlp\.w2\.", ".mlp.up_proj."), (r"\.mlp\.w3\.", ".mlp.down_proj."),
            (r"\.ls([12])\.gamma$", r".layer_scale\1.lambda1")],
    "model.encoder.aifi.": [(r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
                            (r"\.linear([12])\.", lambda m: f".mlp.layers.{int(m.group(1)) - 1}."),
                            (r"\.norm1\.", ".self_attn_layer_norm."), (r"\.norm2\.", ".final_layer_norm.")],
    "model.encoder.": [(r"(downsample_convs\.\d+)\.0\.cv([12])\.", r"\1.conv\2."), (r"\.cv1\.", ".conv1."), (r"\.cv4\.", ".conv2."), (r"\.cv2\.0\.", ".csp_rep1."),
                       (r"\.cv3\.0\.", ".csp_rep2."), (r"\.cv2\.1\.", ".csp_rep1.conv2."),
                       (r"\.cv3\.1\.", ".csp_rep2.conv2.")],
    "model.decoder.layers.": [(r"\.self_attn\.out_proj\.", ".self_attn.o_proj."), (r"\.cross_attn\.", ".encoder_attn."),
                              (r"\.norm1\.scale$", ".self_attn_layer_norm.weight"),
                              (r"\.norm2\.scale$", ".encoder_attn_layer_norm.weight"),
                              (r"\.norm3\.scale$", ".final_layer_norm.weight"),
                              (r"\.gateway\.norm\.scale$", ".gateway.norm.weight"),
                              (r"\.swish_ffn\.w3\.", ".mlp.down_proj.")],
}


def rename(key: str, *, hybrid: bool) -> str | None:
    """The transformers name of upstream tensor `key`, or None when no rule covers it. `hybrid`: the model
    uses the HybridEncoder, whose `encoder.input_proj` transformers keeps in the conv encoder."""
    if hybrid and key.startswith("encoder.input_proj."):
        return "model.conv_encoder.encoder_input_proj." + key[len("encoder.input_proj."):]
    for pattern, replacement in _PREFIX:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return _inner(new)
    return None


def _inner(name: str) -> str:
    for part, rules in _INNER.items():
        if name.startswith(part):
            for pattern, replacement in rules:
                name = re.sub(pattern, replacement, name)
            return name
    return name


_FUSED: list[tuple[str, str, tuple[str, ...]]] = [
    (r"^encoder\.encoder\.(\d+)\.layers\.0\.self_attn\.in_proj_(weight|bias)$",
     r"model.encoder.aifi.\1.layers.0.self_attn.{}_proj.\2", ("q", "k", "v")),
    (r"^decoder\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$",
     r"model.decoder.layers.\1.self_attn.{}_proj.\2", ("q", "k", "v")),
    (r"^backbone\.dinov3\.(?:_model\.)?blocks\.(\d+)\.attn\.qkv\.(weight|bias)$",
     _DINO + r"model.layer.\1.attention.{}_proj.\2", ("q", "k", "v")),
    (r"^decoder\.decoder\.layers\.(\d+)\.swish_ffn\.w12\.(weight|bias)$",
     r"model.decoder.layers.\1.mlp.{}_proj.\2", ("gate", "up")),
]


def split_fused(key: str, tensor: torch.Tensor, bias_mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor] | None:
    """The transformers tensors of fused upstream tensor `key` (chunks along dim 0), or None if it is not fused.
    `bias_mask`: upstream's ViT `qkv.bias_mask`, multiplied into a qkv bias as upstream's forward does."""
    for pattern, template, parts in _FUSED:
        m = re.match(pattern, key)
        if m is None:
            continue
        if bias_mask is not None and key.endswith("qkv.bias"):
            tensor = tensor * bias_mask
        name = m.expand(template)
        return {name.format(part): chunk.clone() for part, chunk in zip(parts, tensor.chunk(len(parts), dim=0))}
    return None
