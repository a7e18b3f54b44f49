"""models layer: upstream DEIM (ShihuaHuang95/DEIM) D-FINE and RT-DETRv2 state-dict names -> transformers names.

Upstream names a tensor by its module path in `DEIM(backbone, encoder, decoder)`, transformers by its path in
`DFineForObjectDetection` / `RTDetrV2ForObjectDetection`. Both families share upstream's hybrid encoder and the
decoder's head layout; they differ in the backbone (HGNetv2 vs PResNet), the CSP blocks of the encoder (D-FINE's
RepNCSPELAN4 vs RT-DETRv2's CSPRepLayer, which keeps transformers' names) and a few decoder-layer names.

`FamilyKeys.rename(key)` rewrites one name: the first prefix rule that matches, then every inner rule of the part
it landed in, in order. The fused `nn.MultiheadAttention` `in_proj` tensors are split by `keys.split_fused` (the
same names as DEIMv2's). `IGNORED` lists upstream tensors with no counterpart by design: the decoder's anchors and
valid mask, which transformers recomputes from the input size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IGNORED = re.compile(r"^decoder\.(anchors|valid_mask)$")

Rule = tuple[str, str]
_BACKBONE = "model.backbone.model."

# Encoder and decoder rules both families share (upstream's D-FINE and RT-DETRv2 decoders descend from one code).
_SHARED_PREFIX: list[Rule] = [
    (r"^encoder\.input_proj\.(\d+)\.conv\.", r"model.encoder_input_proj.\1.0."),
    (r"^encoder\.input_proj\.(\d+)\.norm\.", r"model.encoder_input_proj.\1.1."),
    (r"^encoder\.encoder\.(\d+)\.layers\.", r"model.encoder.aifi.\1.layers."),
    (r"^encoder\.", "model.encoder."),
    (r"^decoder\.input_proj\.(\d+)\.conv\.", r"model.decoder_input_proj.\1.0."),
    (r"^decoder\.input_proj\.(\d+)\.norm\.", r"model.decoder_input_proj.\1.1."),
    (r"^decoder\.decoder\.layers\.", "model.decoder.layers."),
    (r"^decoder\.(?:decoder\.)?(lqe_layers\.|up$|reg_scale$)", r"model.decoder.\1"),
    (r"^decoder\.enc_output\.proj\.", "model.enc_output.0."),
    (r"^decoder\.enc_output\.norm\.", "model.enc_output.1."),
    (r"^decoder\.dec_score_head\.", "model.decoder.class_embed."),
    (r"^decoder\.dec_bbox_head\.", "model.decoder.bbox_embed."),
    (r"^decoder\.(pre_bbox_head|query_pos_head)\.", r"model.decoder.\1."),
    (r"^decoder\.(enc_score_head|enc_bbox_head|denoising_class_embed)\.", r"model.\1."),
]
_ATTENTION: list[Rule] = [(r"\.self_attn\.out_proj\.", ".self_attn.o_proj."), (r"\.norm1\.", ".self_attn_layer_norm.")]


def _ffn(first: str, second: str) -> list[Rule]:
    return [(r"\.linear1\.", f".mlp.{first}."), (r"\.linear2\.", f".mlp.{second}.")]


@dataclass(frozen=True)
class FamilyKeys:
    """One family's name rules: prefix rules (first match wins), then inner rules per model part."""

    prefix: tuple[Rule, ...]
    inner: tuple[tuple[str, tuple[Rule, ...]], ...]

    def rename(self, key: str) -> str | None:
        """The transformers name of upstream tensor `key`, or None when no rule covers it."""
        for pattern, replacement in self.prefix:
            name, count = re.subn(pattern, replacement, key)
            if count:
                return self._inner(name)
        return None

    def _inner(self, name: str) -> str:
        for part, rules in self.inner:
            if name.startswith(part):
                for pattern, replacement in rules:
                    name = re.sub(pattern, replacement, name)
                return name
        return name


def _family(backbone_prefix: list[Rule], backbone_inner: list[Rule], encoder_inner: list[Rule], ffn: list[Rule],
            decoder_inner: list[Rule]) -> FamilyKeys:
    return FamilyKeys(
        prefix=tuple(backbone_prefix + _SHARED_PREFIX),
        inner=((_BACKBONE, tuple(backbone_inner)),
               ("model.encoder.aifi.", tuple(_ATTENTION + ffn + [(r"\.norm2\.", ".final_layer_norm.")])),
               ("model.encoder.", tuple(encoder_inner)),
               ("model.decoder.layers.", tuple(_ATTENTION + ffn + decoder_inner))),
    )


DFINE_KEYS = _family(
    backbone_prefix=[(r"^backbone\.stem\.", _BACKBONE + "embedder."),
                     (r"^backbone\.stages\.", _BACKBONE + "encoder.stages.")],
    backbone_inner=[(r"\.conv\.weight$", ".convolution.weight"), (r"\.bn\.", ".normalization.")],
    # RepNCSPELAN4: cv1, cv2 = (CSP, conv), cv3 = (CSP, conv), cv4; SCDown: (cv1, cv2)
    encoder_inner=[(r"(downsample_convs\.\d+)\.0\.cv([12])\.", r"\1.conv\2."), (r"\.cv1\.", ".conv1."),
                   (r"\.cv2\.0\.", ".csp_rep1."), (r"\.cv2\.1\.", ".conv2."), (r"\.cv3\.0\.", ".csp_rep2."),
                   (r"\.cv3\.1\.", ".conv3."), (r"\.cv4\.", ".conv4.")],
    ffn=_ffn("layers.0", "layers.1"),
    decoder_inner=[(r"\.cross_attn\.", ".encoder_attn."), (r"\.norm3\.", ".final_layer_norm.")],
)
"""D-FINE: `HGNetv2` backbone (as DEIMv2's), RepNCSPELAN4 encoder blocks, gateway decoder layers."""

RTDETRV2_KEYS = _family(
    backbone_prefix=[(r"^backbone\.conv1\.conv1_(\d)\.", lambda m: f"{_BACKBONE}embedder.embedder.{int(m[1]) - 1}."),
                     (r"^backbone\.res_layers\.(\d+)\.blocks\.", _BACKBONE + r"encoder.stages.\1.layers.")],
    # ResNet-vd: a stride-2 shortcut is (avg-pool, conv); branch2a/b/c are the block's convolutions in order
    backbone_inner=[(r"\.short\.conv\.(conv|norm)\.", r".shortcut.1.\1."), (r"\.short\.", ".shortcut."),
                    (r"\.branch2([abc])\.", lambda m: f".layer.{'abc'.index(m[1])}."),
                    (r"\.conv\.weight$", ".convolution.weight"), (r"\.norm\.", ".normalization.")],
    encoder_inner=[],
    ffn=_ffn("fc1", "fc2"),
    decoder_inner=[(r"\.cross_attn\.num_points_scale$", ".encoder_attn.n_points_scale"),
                   (r"\.cross_attn\.", ".encoder_attn."), (r"\.norm2\.", ".encoder_attn_layer_norm."),
                   (r"\.norm3\.", ".final_layer_norm.")],
)
"""RT-DETRv2: `PResNet` (ResNet-vd) backbone, CSPRepLayer encoder blocks, deformable-attention decoder layers."""

FAMILY_KEYS = {"dfine": DFINE_KEYS, "rtdetrv2": RTDETRV2_KEYS}
