"""models layer: input sizes a detector accepts (feature strides, token count); shared by build, loss and export."""

from __future__ import annotations

from transformers import PreTrainedConfig

from deim_ray.models.errors import ModelError


def feature_strides(config: PreTrainedConfig) -> tuple[int, ...]:
    """Strides of the decoder's feature levels: the first encoder level, doubling per extra level."""
    first = int(config.feat_strides[0])
    return tuple(first * 2**i for i in range(config.num_feature_levels))


def validate_input_size(h: int, w: int, num_queries: int, strides: tuple[int, ...] = (16, 32)) -> None:
    """Raise ModelError unless an h x w image works: both sides multiples of 32 and at least `num_queries`
    encoder tokens over the feature levels (`strides`; (16, 32) for HGNetV2 sizes, (8, 16, 32) for DINOv3)."""
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        fix_h, fix_w = max(32, round(h / 32) * 32), max(32, round(w / 32) * 32)
        raise ModelError(f"image size {h}x{w} (HxW) is not a multiple of 32; use e.g. {fix_h}x{fix_w}")
    tokens = sum((h // s) * (w // s) for s in strides)
    if tokens < num_queries:
        side = 32
        while sum((side // s) ** 2 for s in strides) < num_queries:
            side += 32
        raise ModelError(f"image size {h}x{w} gives {tokens} encoder tokens, fewer than num_queries="
                         f"{num_queries}; use at least {side}x{side} or lower model.num_queries")
