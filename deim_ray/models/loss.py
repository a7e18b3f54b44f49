"""models layer: the training loss as the engine calls it, plus upstream's late matcher switch.

`forward_loss(model, pixel_values, targets)` checks the inputs, runs the model with `DeimLoss` in its
`loss_function` slot (upstream's `DEIMCriterion`, see `criterion.py`: MAL + L1/GIoU boxes + FGL/DDF over the
decoder layers, layer 0 before refinement, the encoder top-k and the denoising groups, `num_boxes` averaged over
ranks), and adds a zero-weight term over every trainable parameter. That term changes no value or gradient, but
puts every parameter in the autograd graph, so `DistributedDataParallel(find_unused_parameters=False)` neither
hangs when one rank's batch has no boxes (the denoising embedding then gets no gradient) nor fails on parameters
the DINOv3 backbone never uses (`mask_token`). Under a process group `forward_loss` is a collective (the box
count all-reduce): call it on every rank.

Matcher switch: upstream DEIM(v2) replaces the Hungarian cost from `matcher_change_epoch` on by
`-(class score x IoU^alpha)` (alpha = `iou_order_alpha`, 4.0 in the released configs). `set_matcher_epoch`
installs `DeimLoss` with `IoUOrderMatcher` from the switch epoch on, with transformers' Hungarian matcher
(upstream's focal/L1/GIoU cost) before it.
"""

from __future__ import annotations

from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, box_iou

from deim_ray.models.criterion import DEIMCriterion, upstream_outputs
from deim_ray.models.errors import ModelError
from deim_ray.models.sizes import feature_strides, validate_input_size

Targets = list[dict[str, torch.Tensor]]


def forward_loss(model: nn.Module, pixel_values: torch.Tensor, targets: Targets
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one batch and its detached terms (for logging / all-reduce).

    Args:
        model: a model of `build_model` (any family), possibly wrapped in DDP. In `train()` mode the denoising terms
            are included; in `eval()` mode the same call gives a validation loss without them.
        pixel_values: [B, 3, H, W] float images; H and W multiples of 32.
        targets: B dicts with `boxes` (float32 [N, 4], normalised cxcywh in [0, 1]) and `class_labels`
            (int64 [N], < num_classes); N may be 0. Extra keys are ignored.
    """
    core = getattr(model, "module", model)
    config = core.config
    if pixel_values.dim() != 4 or not pixel_values.is_floating_point():
        raise ModelError(f"pixel_values must be a float [B,3,H,W] tensor, got {pixel_values.dtype} "
                         f"{tuple(pixel_values.shape)}")
    validate_input_size(pixel_values.shape[-2], pixel_values.shape[-1], config.num_queries,
                        feature_strides(config))
    validate_targets(targets, config.num_labels, pixel_values.shape[0], pixel_values.device)
    if not isinstance(core.loss_function, DeimLoss):
        core.loss_function = DeimLoss()  # upstream's loss; set_matcher_epoch switches its matcher
    out = model(pixel_values=pixel_values, labels=targets)
    loss = out.loss
    if torch.is_grad_enabled():
        loss = loss + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
    return loss, {k: v.detach() for k, v in out.loss_dict.items()}


def validate_targets(targets: Targets, num_classes: int, batch_size: int, device: torch.device) -> None:
    """Raise ModelError for targets the loss would silently mis-train on or fail deep inside on."""
    if not isinstance(targets, (list, tuple)) or len(targets) != batch_size:
        raise ModelError(f"targets must be a list of {batch_size} dicts (one per image), got {type(targets).__name__}"
                         f" of length {len(targets) if hasattr(targets, '__len__') else '?'}")
    for i, t in enumerate(targets):
        _check_target_layout(i, t, device)
    boxes = torch.cat([t["boxes"] for t in targets])
    labels = torch.cat([t["class_labels"] for t in targets])
    if boxes.numel() == 0:
        return
    checks = torch.stack([
        torch.isfinite(boxes).all() & (boxes >= 0).all() & (boxes <= 1).all(),
        (labels >= 0).all() & (labels < num_classes).all(),
    ]).tolist()  # one device sync for both checks
    if not checks[0]:
        raise ModelError(f"target boxes must be normalised cxcywh in [0, 1], found values in "
                         f"[{boxes.min().item():.3g}, {boxes.max().item():.3g}]; divide pixel boxes by (w, h, w, h)")
    if not checks[1]:
        raise ModelError(f"class_labels must be in [0, {num_classes}), found [{labels.min().item()}, "
                         f"{labels.max().item()}]; raise num_classes or remap the category ids")


def _check_target_layout(i: int, t: Any, device: torch.device) -> None:
    if not isinstance(t, dict) or "boxes" not in t or "class_labels" not in t:
        raise ModelError(f"target {i} must be a dict with 'boxes' and 'class_labels'")
    boxes, labels = t["boxes"], t["class_labels"]
    if boxes.dtype != torch.float32 or boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ModelError(f"target {i}: boxes must be float32 [N,4], got {boxes.dtype} {tuple(boxes.shape)}")
    if labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
        raise ModelError(f"target {i}: class_labels must be int64 [N] with N = number of boxes, got "
                         f"{labels.dtype} {tuple(labels.shape)}; convert with .long()")
    if boxes.device != device or labels.device != device:
        raise ModelError(f"target {i} is on {boxes.device}, images on {device}; move targets to the same device")


def set_matcher_epoch(model: nn.Module, epoch: int, change_epoch: int | None, iou_order_alpha: float = 4.0) -> bool:
    """Install `DeimLoss` with the IoU-order matcher when `change_epoch` is set and `epoch >= change_epoch`, else
    with the Hungarian matcher. Call at the start of every epoch (also after a resume); returns whether the
    switch is on."""
    core = getattr(model, "module", model)
    switched = change_epoch is not None and epoch >= change_epoch
    current = core.loss_function
    alpha = iou_order_alpha if switched else None
    core.loss_function = current.with_matcher(alpha) if isinstance(current, DeimLoss) else DeimLoss(alpha)
    return switched


class DeimLoss:
    """transformers' `loss_function` slot of `Deimv2ForObjectDetection` (same arguments and return value),
    computing upstream's `DEIMCriterion` (`criterion.py`) in float32 outside autocast, as upstream's AMP loop
    does. `iou_order_alpha` set: upstream's late matcher. A class rather than a closure so a model holding it
    still pickles."""

    def __init__(self, iou_order_alpha: float | None = None):
        self.iou_order_alpha = iou_order_alpha

    def with_matcher(self, iou_order_alpha: float | None) -> "DeimLoss":
        """The same loss with the late IoU-order matcher (`iou_order_alpha`) or the Hungarian one (None)."""
        return DeimLoss(iou_order_alpha)

    def __call__(self, logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None, *,
                 enc_topk_logits=None, enc_topk_bboxes=None, denoising_meta_values=None, predicted_corners=None,
                 initial_reference_points=None, **_) -> tuple[torch.Tensor, dict[str, torch.Tensor], None]:
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            outputs = upstream_outputs(outputs_class, outputs_coord, predicted_corners, initial_reference_points,
                                       enc_topk_logits, enc_topk_bboxes, denoising_meta_values)
            criterion = DEIMCriterion(config).to(device)
            if self.iou_order_alpha is not None:
                criterion.matcher = IoUOrderMatcher(self.iou_order_alpha)
            terms = criterion(outputs, labels)
        return sum(terms.values()), terms, None


class IoUOrderMatcher(nn.Module):
    """One-to-one assignment minimising `-(p_class x IoU^alpha)` per image (upstream's late matcher)."""

    def __init__(self, alpha: float = 4.0):
        super().__init__()
        self.alpha = alpha

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], targets: Targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch, queries = outputs["logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        labels = torch.cat([t["class_labels"] for t in targets])
        gt_boxes = box_convert(torch.cat([t["boxes"] for t in targets]).float(), "cxcywh", "xyxy")
        scores = outputs["logits"].flatten(0, 1).float().sigmoid()[:, labels]
        pred = box_convert(outputs["pred_boxes"].flatten(0, 1).float(), "cxcywh", "xyxy")
        cost = -(scores * box_iou(pred, gt_boxes).pow(self.alpha))
        # a NaN pair (degenerate box) is worse than any real pair, whose cost lies in [-1, 0]
        cost = torch.nan_to_num(cost, nan=1.0).view(batch, queries, -1).cpu()
        indices = []
        for i, per_image in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(per_image[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
