"""models layer: an exported ONNX model run with ONNX Runtime on the CPU, with `inference.Detector`'s interface.

Everything needed comes from the model's own metadata (`onnx_export.onnx_metadata`): the preprocessing it was
trained with, the class table, and whether its batch is fixed. ONNX Runtime is the `[export]` extra
(`pip install 'deim-ray[export]'`), not a dependency: `onnxruntime` and `onnxruntime-gpu` install the same module
and a deployment machine picks its own build.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from deim_ray.models.errors import ModelError
from deim_ray.models.inference import Preprocess
from deim_ray.models.onnx_export import INPUTS, OUTPUTS


def _session(path: str | os.PathLike):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("running an ONNX model needs ONNX Runtime: pip install 'deim-ray[export]' "
                         "(or onnxruntime / onnxruntime-gpu)") from None
    if not os.path.isfile(path):
        raise ModelError(f"ONNX model {path} does not exist; check the path")
    try:
        return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(f"{path} is not a loadable ONNX model ({first}); export it again") from None


class OnnxDetector:
    """An ONNX model of `deim-ray export`: `detect(images)` as `Detector.detect`, boxes in original pixels."""

    def __init__(self, path: str | os.PathLike):
        self.session = _session(path)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "preprocess" not in meta or "category_ids" not in meta:
            raise ModelError(f"{path} has no deim_ray metadata (preprocess, category_ids); export it with "
                             "`deim-ray export`")
        self.preprocess = Preprocess.from_description(json.loads(meta["preprocess"]))
        self.category_ids: list[int] = [int(c) for c in json.loads(meta["category_ids"])]
        self.class_names: list[str] = [str(n) for n in json.loads(meta["class_names"])]
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None  # None: exported with --dynamic-batch

    def detect(self, images: list[Image.Image], score_threshold: float = 0.0) -> list[dict[str, torch.Tensor]]:
        """Detections per image, best first, scores >= `score_threshold`; boxes xyxy in pixels."""
        step = self.fixed_batch or len(images)
        out = []
        for start in range(0, len(images), step):
            out += self._run(images[start:start + step], score_threshold)
        return out

    def _run(self, images: list[Image.Image], score_threshold: float) -> list[dict[str, torch.Tensor]]:
        batch = np.stack([self.preprocess(im).numpy() for im in images])
        sizes = np.array([im.size for im in images], dtype=np.int64)
        labels, boxes, scores = self.session.run(list(OUTPUTS), dict(zip(INPUTS, (batch, sizes))))
        out = []
        for lab, box, sc in zip(labels, boxes, scores):
            keep = sc >= score_threshold
            out.append({"labels": torch.from_numpy(lab[keep]), "boxes": torch.from_numpy(box[keep]),
                        "scores": torch.from_numpy(sc[keep])})
        return out
