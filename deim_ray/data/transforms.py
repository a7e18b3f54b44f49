"""data layer: the per-sample train and val pipelines (torchvision.transforms.v2 ops plus Mosaic).

Train, stage 1 (ops in order; each gated by `gates.epoch_plan` for the sample's epoch):
  Mosaic | RandomPhotometricDistort | RandomZoomOut | RandomIoUCrop | SanitizeBoundingBoxes |
  RandomHorizontalFlip | Resize(data.image_size) | SanitizeBoundingBoxes | to tensor | to float [0,1] |
  Normalize (opt.) | boxes to normalized cxcywh.
  In the Mosaic phase each sample draws Mosaic with `mosaic_prob`; a Mosaic sample skips ZoomOut/IoUCrop.
Train, stage 2: the same list with every policy op off (upstream's stage 2), i.e. SanitizeBoundingBoxes |
  RandomHorizontalFlip | Resize | ... with the released configs.
Val: Resize | SanitizeBoundingBoxes | to tensor | to float | Normalize (opt.) | normalized cxcywh.
Train sanitizing drops boxes with a side under `augment.sanitize_min_size` pixels (upstream: 12/10/8 for
Atto/Femto/Pico, 1 otherwise); val keeps every box of at least 1 pixel.

With `scale=False` a pipeline stops at the uint8 tensor (no float, no Normalize): the loaders use it, and the
batch collator converts the whole batch at once (one float pass per batch instead of a float copy per sample
plus a float stack). Everything before the tensor works on uint8 PIL images.

The probabilities of ZoomOut, IoUCrop and Flip are drawn here (the tv ops run with p=1), so `target["ops"]`
records exactly the augmentations a sample received; tests and `show-augment` read it.

Decode size. `plan(epoch, num_boxes)` draws a sample's ops before its image is decoded and says how large
the decoded image must at least be for every later resize to still shrink it: the Mosaic tile size for a
Mosaic sample (its tile is resized to shorter side `mosaic.output_size`); `data.image_size` divided by
IoUCrop's smallest crop scale (0.3) when IoUCrop runs (the crop, drawn later, may keep only that fraction of
each side); `data.image_size` otherwise (ZoomOut only adds border, so it never enlarges). The dataset then
decodes a larger JPEG at reduced scale (`CocoDetection.load_item(i, at_least)`); the draws are the same, in
the same order, as when the ops are drawn after decoding.

Per-box fields (`labels`, `area`, `iscrowd`, `ann_id`) stay aligned with the boxes through every op:
SanitizeBoundingBoxes filters all of them, and `area` is recomputed from the boxes after each op (the box
area in the current image's pixels). Upstream kept the annotation's area unchanged, so it drifted from the
boxes and fell out of step when boxes were removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from deim_ray.config.schedule import Stage
from deim_ray.config.schema import Config
from deim_ray.data import gates
from deim_ray.data.coco import PER_BOX_FIELDS
from deim_ray.data.color import PhotometricDistort
from deim_ray.data.errors import DataError
from deim_ray.data.iou_crop import IoUCrop
from deim_ray.data.mosaic import Mosaic
from deim_ray.data.resize import Resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Step = tuple[str, Callable[..., tuple[Any, dict]]]
"""(name, fn(image, target, dataset) -> (image, target))."""


@dataclass(frozen=True)
class SamplePlan:
    """One sample's ops, drawn before its image is decoded, and the size that decode must keep."""

    steps: list[Step]
    decode_size: tuple[int, int]
    """(width, height) the decoded image must at least have (see "Decode size" above)."""


def per_box_fields(sample: tuple[Any, dict]) -> tuple[torch.Tensor, ...]:
    """`labels_getter` for SanitizeBoundingBoxes: every per-box field is filtered with the boxes."""
    return tuple(sample[1][k] for k in PER_BOX_FIELDS)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    b = boxes.as_subclass(torch.Tensor)
    return ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).to(torch.float32)


def _tv(op: Callable) -> Callable:
    return lambda image, target, dataset: op(image, target)


def _to_tensor(image: Image.Image, target: dict, dataset) -> tuple[torch.Tensor, dict]:
    return F.pil_to_tensor(image), target


def _to_float(image: torch.Tensor, target: dict, dataset) -> tuple[torch.Tensor, dict]:
    return F.to_dtype(image, torch.float32, scale=True), target


def _normalized_cxcywh(image: torch.Tensor, target: dict, dataset) -> tuple[torch.Tensor, dict]:
    """Boxes to a plain float32 [N, 4] tensor of cxcywh divided by (w, h, w, h) of the final image."""
    h, w = image.shape[-2:]
    b = target["boxes"].as_subclass(torch.Tensor)
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    target = dict(target, boxes=(cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)).reshape(-1, 4))
    return image, target


def _sanitize(min_size: float) -> Callable:
    return _tv(v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=per_box_fields))


def _finish_steps(cfg: Config, scale: bool, min_size: float = 1) -> list[Step]:
    """Resize to data.image_size, drop boxes the resize made too small, to a uint8 tensor, (when `scale`) to
    float [0,1] and normalize, box format."""
    h, w = cfg.data.image_size
    steps: list[Step] = [("Resize", _tv(Resize((h, w)))), ("SanitizeBoundingBoxes", _sanitize(min_size)),
                         ("ToTensor", _to_tensor)]
    if scale:
        steps.append(("ToFloat", _to_float))
    if scale and cfg.data.normalize:
        normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        steps.append(("Normalize", lambda image, target, dataset: (normalize(image), target)))
    steps.append(("NormalizeBoxes", _normalized_cxcywh))
    return steps


def _run(steps: list[Step], image, target: dict, dataset, trace: list | None) -> tuple[torch.Tensor, dict]:
    for name, fn in steps:
        image, target = fn(image, target, dataset)
        if isinstance(target["boxes"], tv_tensors.BoundingBoxes):
            target["area"] = box_area(target["boxes"])
        if trace is not None:
            trace.append((name, image, dict(target)))
    return image, target


class TrainTransforms:
    """The stage-aware train pipeline; called as `(image, target, epoch=..., dataset=...)` per sample.

    Pass a list as `trace` to receive `(op name, image, target)` after every op (tests, debugging).
    `scale=False` ends with a uint8 tensor for `BatchCollator` to scale per batch.
    """

    def __init__(self, cfg: Config, scale: bool = True):
        self.cfg = cfg
        a = cfg.augment
        gates.check(cfg)
        self.mosaic = Mosaic(a.mosaic)
        self.iou_crop = IoUCrop()
        self.augment_steps: dict[str, Callable] = {
            gates.MOSAIC: self.mosaic,
            gates.PHOTOMETRIC: _tv(PhotometricDistort(p=a.photometric_p)),
            gates.ZOOM_OUT: _tv(v2.RandomZoomOut(fill=0, side_range=a.zoom_out_side_range, p=1.0)),
            gates.IOU_CROP: _tv(self.iou_crop),
            gates.FLIP: _tv(v2.RandomHorizontalFlip(p=1.0)),
        }
        self.sanitize = _sanitize(a.sanitize_min_size)
        self.finish = _finish_steps(cfg, scale, a.sanitize_min_size)

    def select(self, epoch: int, num_boxes: int) -> list[Step]:
        """The ops one sample runs at `epoch` (random draws happen here)."""
        plan = gates.epoch_plan(self.cfg, epoch)
        a, pol = self.cfg.augment, plan.policy
        mosaic = pol.mosaic_prob > 0 and _draw(pol.mosaic_prob)
        chosen = [gates.MOSAIC] if mosaic else []
        if pol.allows(gates.PHOTOMETRIC):
            chosen.append(gates.PHOTOMETRIC)
        if not mosaic and pol.allows(gates.ZOOM_OUT) and _draw(a.zoom_out_p):
            chosen.append(gates.ZOOM_OUT)
        if not mosaic and pol.allows(gates.IOU_CROP) and num_boxes > 0 and _draw(a.iou_crop_p):
            chosen.append(gates.IOU_CROP)  # tv's IoU crop needs a box to aim at
        steps = [(name, self._recorded(name)) for name in chosen]
        steps.append(("SanitizeBoundingBoxes", self.sanitize))
        if pol.allows(gates.FLIP) and _draw(a.flip_p):
            steps.append((gates.FLIP, self._recorded(gates.FLIP)))
        return steps + list(self.finish)

    def plan(self, epoch: int | None, num_boxes: int) -> SamplePlan:
        """The ops one sample runs at `epoch` and the decode size they need (random draws happen here)."""
        _need_epoch(epoch)
        steps = self.select(epoch, num_boxes)
        return SamplePlan(steps, self.decode_size([name for name, _ in steps]))

    def decode_size(self, names: list[str]) -> tuple[int, int]:
        """(width, height) an image running the ops `names` must be decoded at, at least."""
        if gates.MOSAIC in names:
            side = self.mosaic.cfg.output_size
            return side, side
        h, w = self.cfg.data.image_size
        if gates.IOU_CROP in names:
            return math.ceil(w / self.iou_crop.min_scale), math.ceil(h / self.iou_crop.min_scale)
        return w, h

    def _recorded(self, name: str) -> Callable:
        op = self.augment_steps[name]

        def run(image, target, dataset):
            image, target = op(image, target, dataset)
            return image, dict(target, ops=target["ops"] + (name,))
        return run

    def __call__(self, image: Image.Image, target: dict, *, epoch: int | None, dataset=None,
                 trace: list | None = None, plan: SamplePlan | None = None) -> tuple[torch.Tensor, dict]:
        """Run `plan`'s ops (drawn by `plan()` before decoding), or draw them now."""
        _need_epoch(epoch)
        steps = plan.steps if plan is not None else self.select(epoch, len(target["boxes"]))
        return _run(steps, image, target, dataset, trace)


class ValTransforms:
    """Resize + scale (+ Normalize) with boxes as normalized cxcywh; the epoch is ignored. `scale=False`
    ends with a uint8 tensor for `BatchCollator` to scale per batch."""

    def __init__(self, cfg: Config, scale: bool = True):
        self.finish = _finish_steps(cfg, scale)
        h, w = cfg.data.image_size
        self.size = (w, h)

    def plan(self, epoch: int | None, num_boxes: int) -> SamplePlan:
        return SamplePlan(self.finish, self.size)

    def __call__(self, image: Image.Image, target: dict, *, epoch: int | None = None, dataset=None,
                 trace: list | None = None, plan: SamplePlan | None = None) -> tuple[torch.Tensor, dict]:
        return _run(self.finish, image, target, dataset, trace)


def _need_epoch(epoch: int | None) -> None:
    if epoch is None:
        raise DataError("train transforms need the epoch; index the dataset with (index, epoch), "
                        "as build_train_loader does")


def _draw(p: float) -> bool:
    return p > 0 and bool(torch.rand(()) < p)


def build_train_transforms(cfg: Config, scale: bool = True) -> TrainTransforms:
    return TrainTransforms(cfg, scale)


def build_val_transforms(cfg: Config, scale: bool = True) -> ValTransforms:
    return ValTransforms(cfg, scale)
