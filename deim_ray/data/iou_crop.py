"""data layer: torchvision's RandomIoUCrop with its crop search vectorized.

torchvision searches crops one trial at a time in Python (up to 40 per IoU option, each with a `box_iou`
call), which took a fifth of the post-Mosaic pipeline's time. `IoUCrop` draws the same random quantities
for all trials of an option at once and takes the first trial that passes every check, in trial order: the
same distribution of crops (trials are independent draws), with one tensor expression per option.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import get_bounding_boxes, query_size


class IoUCrop(v2.RandomIoUCrop):
    """`v2.RandomIoUCrop` (same options, checks and output) with a vectorized `make_params`."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        orig_h, orig_w = query_size(flat_inputs)
        boxes = get_bounding_boxes(flat_inputs)
        xyxy = F.convert_bounding_box_format(boxes.as_subclass(torch.Tensor), boxes.format,
                                             tv_tensors.BoundingBoxFormat.XYXY).reshape(-1, 4)
        while True:
            min_iou = self.options[int(torch.randint(low=0, high=len(self.options), size=(1,)))]
            if min_iou >= 1.0:  # the leave-as-is option
                return {}
            found = self._first_crop(orig_h, orig_w, xyxy, min_iou)
            if found is not None:
                return found

    def _first_crop(self, orig_h: int, orig_w: int, xyxy: torch.Tensor, min_iou: float) -> dict[str, Any] | None:
        draws = torch.rand(self.trials, 4)
        scale = self.min_scale + (self.max_scale - self.min_scale) * draws[:, :2]
        new_w, new_h = (orig_w * scale[:, 0]).long(), (orig_h * scale[:, 1]).long()
        aspect = new_w / new_h
        left, top = ((orig_w - new_w) * draws[:, 2]).long(), ((orig_h - new_h) * draws[:, 3]).long()
        right, bottom = left + new_w, top + new_h
        cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2
        within = ((left[:, None] < cx) & (cx < right[:, None]) & (top[:, None] < cy) & (cy < bottom[:, None]))
        crops = torch.stack([left, top, right, bottom], 1).to(xyxy.dtype)
        best_iou = box_iou(crops, xyxy).masked_fill(~within, -1.0).amax(1) if len(xyxy) else None
        ok = ((aspect >= self.min_aspect_ratio) & (aspect <= self.max_aspect_ratio) & (new_w > 0) & (new_h > 0)
              & within.any(1))
        if best_iou is not None:
            ok &= best_iou >= min_iou
        hits = torch.nonzero(ok).flatten()
        if len(hits) == 0:
            return None
        t = int(hits[0])
        return dict(top=int(top[t]), left=int(left[t]), height=int(new_h[t]), width=int(new_w[t]),
                    is_within_crop_area=within[t])
