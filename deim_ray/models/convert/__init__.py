"""models layer: weights from upstream checkpoints: DEIMv2 (Intellindust-AI-Lab/DEIMv2), and D-FINE and RT-DETRv2
trained by DEIM (ShihuaHuang95/DEIM).

- `read_upstream_checkpoint(path)` -> (state dict, "ema" | "model" | "state dict")
- `load_upstream_state(model, sd, source, which)` -> `ConversionReport` (strict; every tensor accounted for)
- `match_upstream_state(sd, target_state, config, source)` -> the same checks on shapes only (meta tensors)
- `to_transformers_names(sd, family)` -> renamed tensors, for non-strict fine-tuning (`model.pretrained`)
- `command.convert_checkpoint(ckpt, upstream_config, out)` -> the `deim-ray convert-weights` command's work
  (imported from its module: it builds models, and `build` imports this package for `model.pretrained`)
"""

from deim_ray.models.convert.upstream import (
    ConversionReport,
    is_upstream_state_dict,
    load_upstream_state,
    match_upstream_state,
    read_upstream_checkpoint,
    to_transformers_names,
)

__all__ = ["ConversionReport", "is_upstream_state_dict", "load_upstream_state", "match_upstream_state",
           "read_upstream_checkpoint",
           "to_transformers_names"]
