"""models layer: transformers DEIM-family detectors (DEIMv2, D-FINE, RT-DETRv2; `families.py`) built from
`ModelConfig`, their loss, postprocess and export.

What the engine uses (the same for every family):

- `build_model(cfg.model, num_classes)` -> the family's transformers detector (random init, or fine-tuned from
  `cfg.model.pretrained`; see `pretrained.py`)
- `forward_loss(model, pixel_values, targets)` -> (loss, detached loss terms): upstream's DEIMCriterion (see
  `criterion.py`); DDP-safe with `find_unused_parameters=False`
- `set_matcher_epoch(model, epoch, cfg.schedule.matcher_change_epoch)` at each epoch start
- `postprocess(logits, pred_boxes, orig_sizes_wh, num_top_queries)` -> per-image scores/labels/boxes
- `make_final_checkpoint(...)` / `load_final(path)` for the deployable artifact
- `inference.Detector` (images in, pixel boxes out) and `onnx_export.export_onnx` for `deim-ray predict|export`
- `validate_input_size`, `feature_strides`, `count_parameters`; errors are `ModelError`
"""

from deim_ray.models.build import (
    build_model,
    build_model_config,
    build_model_with_report,
    count_parameters,
    feature_strides,
    validate_input_size,
)
from deim_ray.models.errors import ModelError
from deim_ray.models.families import FAMILIES, Family, get_family
from deim_ray.models.export import FINAL_FORMAT, load_final, make_final_checkpoint
from deim_ray.models.loss import forward_loss, set_matcher_epoch, validate_targets
from deim_ray.models.postprocess import postprocess
from deim_ray.models.pretrained import PretrainedReport, load_pretrained
from deim_ray.models.variants import PAPER_PARAMS_M

__all__ = [
    "FAMILIES", "FINAL_FORMAT", "Family", "PAPER_PARAMS_M", "ModelError",
    "PretrainedReport", "build_model", "build_model_config", "build_model_with_report", "count_parameters",
    "feature_strides", "forward_loss", "get_family", "load_final", "load_pretrained", "make_final_checkpoint",
    "postprocess", "set_matcher_epoch", "validate_input_size", "validate_targets",
]
