"""models layer: turn model outputs into per-image detections (upstream `PostProcessor`, focal-loss mode).

Scores are per class (sigmoid, no background class), so one query may yield several detections with different
labels: the top-k runs over the flattened queries x classes. Boxes go from normalised cxcywh to absolute xyxy
in each image's original pixel frame, which undoes the (possibly non-uniform) training resize.
"""

from __future__ import annotations

import torch

from deim_ray.models.errors import ModelError


def postprocess(logits: torch.Tensor, pred_boxes: torch.Tensor, orig_sizes: torch.Tensor,
                num_top_queries: int) -> list[dict[str, torch.Tensor]]:
    """Detections per image, best first.

    Args:
        logits: [B, Q, C] class logits (`model(...).logits`).
        pred_boxes: [B, Q, 4] normalised cxcywh boxes (`model(...).pred_boxes`).
        orig_sizes: [B, 2] original image sizes in (width, height) order (upstream `orig_size`).
        num_top_queries: detections kept per image (capped at Q*C).

    Returns:
        One dict per image: `scores` [K] float, `labels` [K] int64 class indices, `boxes` [K, 4] absolute xyxy.
    """
    if logits.dim() != 3 or pred_boxes.shape != (*logits.shape[:2], 4):
        raise ModelError(f"postprocess expects logits [B,Q,C] and pred_boxes [B,Q,4], got {tuple(logits.shape)} "
                         f"and {tuple(pred_boxes.shape)}; pass model outputs unchanged")
    if orig_sizes.shape != (logits.shape[0], 2):
        raise ModelError(f"orig_sizes must be [B,2] (width, height) per image, got {tuple(orig_sizes.shape)}")
    scores, labels, boxes = topk_detections(logits, pred_boxes, orig_sizes, num_top_queries)
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


def topk_detections(logits: torch.Tensor, pred_boxes: torch.Tensor, orig_sizes: torch.Tensor,
                    num_top_queries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`postprocess` as batched tensors (scores [B,K], labels [B,K], boxes [B,K,4]); traceable for ONNX export."""
    num_classes = logits.shape[-1]
    k = min(num_top_queries, logits.shape[1] * num_classes)
    scores, flat_idx = torch.topk(logits.sigmoid().flatten(1), k, dim=1)
    labels = flat_idx % num_classes
    query = flat_idx // num_classes
    boxes = _cxcywh_to_xyxy(pred_boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4)))
    scale = orig_sizes.to(boxes.dtype).repeat(1, 2).unsqueeze(1)  # (w, h, w, h) per image
    return scores, labels, boxes * scale


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
