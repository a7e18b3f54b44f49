"""models layer: upstream's denoising query boxes for transformers' DEIMv2.

Both implementations noise each ground-truth box by moving its corners (negative queries by 1-2 half-sizes), clip
to the image and convert back to centre format. A corner pushed past the opposite one gives a negative width or
height (about 4 in 10 negative queries); upstream takes its absolute value (`input_query_bbox[input_query_bbox < 0]
*= -1`), transformers keeps it, and its `inverse_sigmoid` clamps it to a zero-size box. `install()` makes
transformers' `get_contrastive_denoising_training_group` take the absolute value as upstream does.
"""

from __future__ import annotations

from transformers.models.deimv2 import modeling_deimv2

_GROUP = modeling_deimv2.get_contrastive_denoising_training_group
_TO_CENTRE = modeling_deimv2.corners_to_center_format


def _to_centre_abs(boxes):
    return _TO_CENTRE(boxes).abs()


def denoising_group_as_upstream(*args, **kwargs):
    """transformers' denoising group with upstream's absolute box sizes (its centre conversion swapped in for the
    call; the group is built in the forward pass of one model at a time)."""
    modeling_deimv2.corners_to_center_format = _to_centre_abs
    try:
        return _GROUP(*args, **kwargs)
    finally:
        modeling_deimv2.corners_to_center_format = _TO_CENTRE


def install() -> None:
    """Use `denoising_group_as_upstream` in every DEIMv2 model's training forward (idempotent)."""
    modeling_deimv2.get_contrastive_denoising_training_group = denoising_group_as_upstream
