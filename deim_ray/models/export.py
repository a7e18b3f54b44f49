"""models layer: the deployable `final` artifact.

A final checkpoint holds only the EMA weights (what upstream deploys) and what is needed to rebuild and use the
model without the training config: the model family and its full transformers config (`Deimv2Config`,
`DFineConfig` or `RTDetrV2Config`) as a JSON string, the `ModelConfig` it came from,
the class table (model class index i <-> `category_ids[i]`, `class_names[i]`) and the input size. Every value
is a tensor or a JSON-like primitive, so `torch.load(weights_only=True)` reads it. Recommended `extra_meta`
keys for inference: `normalize` (ImageNet mean/std; true for the DINOv3 sizes), `num_top_queries`, plus
provenance such as the run name, epoch, stage and AP.

    ckpt = make_final_checkpoint(ema.module.state_dict(), cfg.model, num_classes, category_ids, class_names,
                                 cfg.data.image_size, {"normalize": cfg.data.normalize, "ap": 0.43})
    torch.save(ckpt, "final.pth")                 # (the engine writes it atomically)
    model, meta = load_final("final.pth")         # eval mode, strict load
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import os
from typing import Any

import torch
import transformers
from transformers import PreTrainedConfig, PreTrainedModel

from deim_ray.config.schema import ModelConfig
from deim_ray.models.build import build_from_config, build_model_config, feature_strides, validate_input_size
from deim_ray.models.errors import ModelError
from deim_ray.models.load_refusal import load_failure
from deim_ray.models.families import family_of_config, get_family

FINAL_FORMAT = "deim_ray.final/1"


def make_final_checkpoint(ema_state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, num_classes: int,
                          category_ids: list[int], class_names: list[str], image_size: tuple[int, int],
                          extra_meta: dict[str, Any]) -> dict[str, Any]:
    """The final artifact as a dict for `torch.save`; raises ModelError if the weights do not fit the config."""
    if not (len(category_ids) == len(class_names) == num_classes):
        raise ModelError(f"category_ids ({len(category_ids)}) and class_names ({len(class_names)}) must both have "
                         f"num_classes={num_classes} entries, one per model class index")
    config = build_model_config(model_cfg, num_classes)
    config.id2label = {i: str(name) for i, name in enumerate(class_names)}
    config.label2id = {str(name): i for i, name in enumerate(class_names)}
    h, w = (int(v) for v in image_size)
    validate_input_size(h, w, config.num_queries, feature_strides(config))
    weights = {k: v.detach().cpu() for k, v in ema_state_dict.items()}
    _check_weights_fit(weights, config)
    return {
        "format": FINAL_FORMAT,
        "model": weights,
        "family": family_of_config(config).name,
        "hf_config": config.to_json_string(use_diff=False),
        "model_config": json.dumps(dataclasses.asdict(model_cfg), default=str),
        "num_classes": int(num_classes),
        "category_ids": [int(c) for c in category_ids],
        "class_names": [str(n) for n in class_names],
        "image_size": [h, w],
        "meta": _json_safe(extra_meta),
        "transformers_version": transformers.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _json_safe(extra_meta: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(extra_meta))
    except (TypeError, ValueError) as e:
        raise ModelError(f"extra_meta must hold JSON values only ({e}); convert it to str/int/float/list/dict"
                         ) from None


def _check_weights_fit(weights: dict[str, torch.Tensor], config: PreTrainedConfig) -> None:
    """Compare names and shapes against the architecture, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        expected = build_from_config(config).state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise ModelError(f"EMA weights do not fit the model config ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(wrong)} with another shape, e.g. {first}); pass the EMA state dict "
                         "of a model built from the same model config and class count")


def load_final(source: str | os.PathLike | bytes) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Rebuild the model of a final artifact (path or bytes) in eval mode; returns it and the metadata
    (everything but the weights, with `hf_config` and `model_config` as JSON strings)."""
    name = "<bytes>" if isinstance(source, bytes) else os.fspath(source)
    try:
        with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as f:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"final checkpoint {name} does not exist; check the path") from None
    except Exception as e:  # torch raises several types for truncated zips and refused pickles
        raise ModelError(f"final checkpoint {name} cannot be loaded safely ({load_failure(e)}); re-fetch it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FINAL_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelError(f"{name} is not a deim_ray final checkpoint (format {found!r}, expected {FINAL_FORMAT!r}); "
                         "use the run's artifacts/final.pth")
    model = build_from_config(_hf_config(ckpt, name))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise ModelError(f"weights in {name} do not match its own config ({str(e).splitlines()[0][:160]}); "
                         "the file is inconsistent, re-export it") from None
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    return model.eval(), meta


def _hf_config(ckpt: dict[str, Any], name: str) -> PreTrainedConfig:
    """The transformers config of a final checkpoint (files written before families existed are DEIMv2)."""
    family = ckpt.get("family", "deimv2")
    text = ckpt.get("hf_config", ckpt.get("deimv2_config"))
    try:
        return get_family(family).config_class.from_dict(json.loads(text))
    except (ModelError, TypeError, ValueError) as e:
        raise ModelError(f"{name} holds no usable model config ({_first_line(e)}); re-export it") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
