"""models layer: using a final artifact on images — preprocessing, batched detection, and the deployable module.

The preprocessing is the evaluation pipeline's, step for step: the image as the user sees it (EXIF orientation
applied; grayscale, palette and RGBA made RGB), resized as 8-bit RGB with PIL's bilinear filter (the val loader's
`Resize`) to the artifact's input size, scaled to [0, 1], ImageNet-normalised when the model was trained that way.
So a model scores here exactly what it scored in training. Boxes come back in the original image's pixels.

    detector = Detector.from_final("final.pth", device="cpu")
    for name, dets in zip(names, detector.detect([Image.open(n) for n in names])):
        dets["boxes"], dets["scores"], dets["labels"]       # labels are class indices: detector.category_ids[i]

`Deployable` is the same model with the postprocessing inside (images + original sizes in; labels, pixel boxes,
scores out), the module `deim-ray export` traces to ONNX.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms.v2 import functional as F

from deim_ray.data.resize import resize_bilinear
from deim_ray.models.build import feature_strides, validate_input_size
from deim_ray.models.export import load_final
from deim_ray.models.postprocess import topk_detections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB, upright as its EXIF orientation says (grayscale, palette, RGBA, 16-bit made RGB)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale to 8 bit before RGB
            im = im.point(lambda v: v / 256).convert("L")
        return im.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """Resize to (height, width), scale to [0, 1], optionally ImageNet mean/std — as in evaluation."""

    height: int
    width: int
    normalize: bool

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = resize_bilinear(image.convert("RGB"), self.width, self.height)
        pixels = F.to_dtype(F.pil_to_tensor(resized), torch.float32, scale=True)
        return F.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD) if self.normalize else pixels

    @classmethod
    def from_description(cls, described: dict) -> "Preprocess":
        """The preprocessing `describe()` wrote (an exported model's `preprocess` metadata)."""
        h, w = described["size_hw"]
        return cls(int(h), int(w), described.get("mean") is not None)

    def describe(self) -> dict:
        return {"input": "RGB, float32, NCHW", "size_hw": [self.height, self.width], "scale": "1/255",
                "resize": "PIL bilinear on the 8-bit RGB image (Image.resize((w, h), Image.BILINEAR)), "
                          "aspect ratio not kept",
                "mean": list(IMAGENET_MEAN) if self.normalize else None,
                "std": list(IMAGENET_STD) if self.normalize else None,
                "orig_target_sizes": "int64 [N, 2] = (width, height) of each original image"}


class Deployable(nn.Module):
    """Model + postprocessing: `(images [N,3,H,W], orig_target_sizes [N,2] (w, h)) -> (labels, boxes, scores)`,
    each [N, K]: class indices, xyxy boxes in original pixels, scores (upstream's deploy export)."""

    def __init__(self, model: nn.Module, num_top_queries: int, image_size: tuple[int, int]):
        super().__init__()
        self.model, self.num_top_queries = model.eval(), num_top_queries
        _fix_anchors(model, image_size)

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor):
        out = self.model(pixel_values=images)
        scores, labels, boxes = topk_detections(out.logits, out.pred_boxes, orig_target_sizes, self.num_top_queries)
        return labels, boxes, scores


def _fix_anchors(model: nn.Module, image_size: tuple[int, int]) -> None:
    """Precompute the decoder's anchors for the one input size (as upstream's eval_spatial_size does): the
    per-call anchor generation writes into slices in place, which the ONNX tracer records wrongly."""
    inner = model.model
    h, w = (int(v) for v in image_size)
    inner.config.anchor_image_size = [h, w]
    shapes = tuple((h // s, w // s) for s in feature_strides(inner.config))  # every decoder level
    inner.anchors, inner.valid_mask = inner.generate_anchors(shapes, dtype=torch.float32)


class Detector:
    """A final artifact ready for images: preprocessing, batching, device and the class table."""

    def __init__(self, model: nn.Module, meta: dict, device: str | torch.device = "cpu",
                 image_size: tuple[int, int] | None = None):
        self.meta = meta
        self.device = torch.device(device)
        h, w = image_size or meta["image_size"]  # another size than the training one, when asked for
        validate_input_size(h, w, model.config.num_queries, feature_strides(model.config))
        self.preprocess = Preprocess(h, w, bool(meta.get("meta", {}).get("normalize", False)))
        self.num_top_queries = int(meta.get("meta", {}).get("num_top_queries") or 300)
        self.deployable = Deployable(model, self.num_top_queries, (h, w)).to(self.device)
        self.category_ids: list[int] = list(meta["category_ids"])
        self.class_names: list[str] = list(meta["class_names"])

    @classmethod
    def from_final(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                   image_size: tuple[int, int] | None = None) -> "Detector":
        model, meta = load_final(path)
        return cls(model, meta, device, image_size)

    @torch.no_grad()
    def detect(self, images: list[Image.Image], score_threshold: float = 0.0) -> list[dict[str, torch.Tensor]]:
        """Detections per image (one batch), best first, scores >= `score_threshold`; boxes xyxy in pixels."""
        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        sizes = torch.tensor([im.size for im in images], dtype=torch.int64, device=self.device)
        labels, boxes, scores = self.deployable(batch, sizes)
        out = []
        for lab, box, sc in zip(labels.cpu(), boxes.float().cpu(), scores.float().cpu()):
            keep = sc >= score_threshold
            out.append({"labels": lab[keep], "boxes": box[keep], "scores": sc[keep]})
        return out
