"""models layer: a final artifact as an ONNX model with the postprocessing inside (`deim-ray export`).

Inputs `images` (float32 [N,3,H,W], preprocessed as `inference.Preprocess` describes) and `orig_target_sizes`
(int64 [N,2], each original image's (width, height)); outputs `labels` (int64 [N,K] class indices), `boxes`
(float32 [N,K,4] xyxy in original pixels) and `scores` (float32 [N,K]) — upstream's deployment interface. The
model's metadata (`metadata_props`) carries JSON: `class_names`, `category_ids` (label i is COCO category
`category_ids[i]`), `preprocess`, and `source` (the artifact's provenance: epoch, stage, AP).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from deim_ray.models.errors import ModelError
from deim_ray.models.export import load_final
from deim_ray.models.inference import Deployable, Preprocess
from deim_ray.outputs import output_dir

INPUTS = ("images", "orig_target_sizes")
OUTPUTS = ("labels", "boxes", "scores")


def onnx_metadata(meta: dict, preprocess: Preprocess) -> dict[str, str]:
    """The key -> JSON string table stored in the ONNX model's metadata_props."""
    return {"format": "deim_ray.onnx/1", "class_names": json.dumps(meta["class_names"]),
            "category_ids": json.dumps(meta["category_ids"]), "preprocess": json.dumps(preprocess.describe()),
            "outputs": json.dumps({"labels": "class index i -> category_ids[i], class_names[i]",
                                   "boxes": "xyxy in original image pixels", "scores": "sigmoid score"}),
            "source": json.dumps(meta.get("meta", {}))}


def export_onnx(final_path: str | os.PathLike, output: str | os.PathLike, *, opset: int = 17,
                dynamic_batch: bool = False, batch_size: int = 1) -> Path:
    """Write the ONNX model of a final artifact to `output` (atomically); returns its path."""
    import onnx

    model, meta = load_final(final_path)
    h, w = meta["image_size"]
    preprocess = Preprocess(h, w, bool(meta.get("meta", {}).get("normalize", False)))
    deployable = Deployable(model, int(meta.get("meta", {}).get("num_top_queries") or 300), (h, w))
    images = torch.rand(batch_size, 3, h, w)
    sizes = torch.tensor([[w, h]] * batch_size, dtype=torch.int64)
    axes = {name: {0: "N"} for name in INPUTS + OUTPUTS} if dynamic_batch else None
    output = Path(output)
    with output_dir(output.parent), tempfile.TemporaryDirectory(prefix=".deim_ray_onnx_", dir=output.parent) as tmp:
        path = Path(tmp) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python values in transformers' code
            try:
                torch.onnx.export(deployable, (images, sizes), str(path), input_names=list(INPUTS),
                                  output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=opset,
                                  do_constant_folding=True, dynamo=False)
            except Exception as e:
                raise ModelError(f"ONNX export at opset {opset} failed ({str(e).strip().splitlines()[0][:200]}); "
                                 "try another --opset") from None
        proto = onnx.load(str(path))
        for key, value in onnx_metadata(meta, preprocess).items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
        os.replace(path, output)
    return output
