"""models layer: fine-tune from other weights (upstream `-t/--tuning` semantics).

`model.pretrained` may name:

- a folder written by transformers' `save_pretrained` (config.json with model_type "deimv2" + safetensors);
- a hub id in the same transformers layout, e.g. the checkpoint transformers' own docs use,
  `harshaljanjani/DEIMv2_HGNetv2_N_COCO_Transformers` (downloaded once into the Hugging Face cache; needs network
  or a pre-filled cache);
- a `.pth` file: a deim_ray `final.pth` or training checkpoint, a plain state dict, or an upstream checkpoint of
  the model's family (DEIMv2; D-FINE or RT-DETRv2 as trained by DEIM; official release or your own
  `best_stg2.pth`; `ema.module` preferred over `model`, as upstream's tuning loader does), whose tensor names are
  converted as `deim-ray convert-weights` does.

Fine-tuning a COCO-trained model on your own classes (README snippet)::

    model:
      variant: n                      # must be the size the weights were trained with
      pretrained: harshaljanjani/DEIMv2_HGNetv2_N_COCO_Transformers

    # clusters without internet: download once, then point at the folder on every node
    #   huggingface-cli download harshaljanjani/DEIMv2_HGNetv2_N_COCO_Transformers --local-dir weights/deimv2-n
    #   model.pretrained: weights/deimv2-n

For 3 classes the log then says "loaded 670/685 tensors; re-initialised 15 (15 with another shape, e.g.
model.denoising_class_embed.weight, ...)": backbone, encoder and decoder come from COCO, the class heads (and the
denoising label embedding) start fresh for your class count.

Only tensors whose name AND shape equal the built model's are copied; everything else keeps its fresh
initialisation (e.g. class heads for another class count) and is listed in the returned `PretrainedReport`.
Upstream tensor names (a `.pth` checkpoint, or the original-layout `model.safetensors` of the
`Intellindust/DEIMv2_*_COCO` hub repos once downloaded) are renamed on the fly as `deim-ray convert-weights`
does. A source of which nothing matches is an error, never a silent from-scratch run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn
from transformers import Deimv2ForObjectDetection, PreTrainedConfig

from deim_ray.models.convert import is_upstream_state_dict, to_transformers_names
from deim_ray.models.errors import ModelError
from deim_ray.models.load_refusal import load_failure
from deim_ray.models.families import family_of_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainedReport:
    """What `load_pretrained` did; keys are the model's `state_dict` names."""

    source: str
    loaded: tuple[str, ...]
    reinitialised: tuple[str, ...]
    """Model tensors that kept their fresh initialisation (absent from the source or of another shape)."""
    shape_mismatch: tuple[str, ...]
    """The subset of `reinitialised` that the source has with a different shape (typically the class heads)."""
    unused: tuple[str, ...]
    """Source tensors with no counterpart in the model."""

    def summary(self) -> str:
        total = len(self.loaded) + len(self.reinitialised)
        examples = ", ".join(self.shape_mismatch[:3]) or ", ".join(self.reinitialised[:3]) or "-"
        return (f"pretrained {self.source}: loaded {len(self.loaded)}/{total} tensors; re-initialised "
                f"{len(self.reinitialised)} ({len(self.shape_mismatch)} with another shape, e.g. {examples}); "
                f"{len(self.unused)} source tensors unused")


def load_pretrained(model: nn.Module, source: str) -> PretrainedReport:
    """Copy every tensor of `source` whose name and shape match into `model` (in place) and report."""
    source_sd = read_state_dict(source, family_of_config(model.config).name)
    report = _copy_matching(model, source_sd, source)
    if not report.loaded:
        raise ModelError(f"no tensor of {source} matches the model by name and shape; give a DEIMv2 checkpoint "
                         "of the same size as model.variant (transformers, deim_ray or upstream DEIMv2 layout)")
    if len(report.loaded) < len(report.reinitialised):
        log.warning("only %d of %d tensors came from %s: is model.variant the size these weights were "
                    "trained with?", len(report.loaded), len(report.loaded) + len(report.reinitialised), source)
    return report


def read_state_dict(source: str, family: str = "deimv2") -> dict[str, torch.Tensor]:
    """The weights named by `source` (folder, `.pth`/`.pt`/`.safetensors` file, or hub id), on CPU; upstream
    tensor names are renamed for a model of `family`."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_transformers(str(path), source)
    if path.is_file():
        state = _from_safetensors(path) if path.suffix == ".safetensors" else _from_torch_file(path)
        if is_upstream_state_dict(state):  # upstream names: rename to transformers' (models/convert)
            state, _, _ = to_transformers_names(state, family)
        return state
    if _looks_like_hub_id(source):
        return _from_transformers(source, source)
    raise ModelError(f"model.pretrained {source!r} is not an existing file or folder, nor a hub id like "
                     "'owner/name'; fix the path")


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source \
        and not source.endswith((".pth", ".pt", ".safetensors"))


def _from_transformers(location: str, source: str) -> dict[str, torch.Tensor]:
    """Load through `from_pretrained`, keeping only tensors the checkpoint really provided."""
    try:
        raw, _ = PreTrainedConfig.get_config_dict(location)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read a transformers config from {source} ({_first_line(e)}); check the id "
                         "or folder, and the network or HF cache for hub ids") from None
    if raw.get("model_type") != "deimv2":
        raise ModelError(f"{source} is not a transformers DEIMv2 checkpoint (config model_type "
                         f"{raw.get('model_type')!r}); convert original DEIMv2 weights with transformers' "
                         "convert_deimv2_original_pytorch_checkpoint_to_hf.py first")
    try:
        src, info = Deimv2ForObjectDetection.from_pretrained(location, output_loading_info=True)
    except Exception as e:  # torch.load inside refuses pickles with its own error types
        raise ModelError(f"cannot load weights from {source} ({load_failure(e)}); check the "
                                                "checkpoint") from None
    missing = set(info.get("missing_keys", ()))
    return {k: v for k, v in src.state_dict().items() if k not in missing}


def _from_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header or truncated data
        raise ModelError(f"cannot read {path} as safetensors ({type(e).__name__}: {_first_line(e)[:120]}); the "
                         "file is damaged or not safetensors") from None


def _from_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files and refused pickles
        raise ModelError(f"cannot load {path} with weights_only=True ({load_failure(e)}); give a plain "
                         "state-dict checkpoint") from None
    state = _pick_state_dict(obj)
    if state is None:
        raise ModelError(f"{path} holds no state dict (looked for ema.module, model, or a dict of tensors); "
                         "give a model checkpoint")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _pick_state_dict(obj: object) -> dict[str, torch.Tensor] | None:
    """EMA weights first (what upstream deploys and tunes from), then raw model weights, then a bare dict."""
    if not isinstance(obj, dict):
        return None
    ema = obj.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("module"), dict):
        return ema["module"]
    if isinstance(obj.get("model"), dict):
        return obj["model"]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def _copy_matching(model: nn.Module, source_sd: dict[str, torch.Tensor], source: str) -> PretrainedReport:
    target = model.state_dict()
    take = {k: v for k, v in source_sd.items() if k in target and v.shape == target[k].shape}
    with torch.no_grad():
        model.load_state_dict(take, strict=False)
    mismatch = tuple(k for k in target if k in source_sd and k not in take)
    return PretrainedReport(
        source=source,
        loaded=tuple(k for k in target if k in take),
        reinitialised=tuple(k for k in target if k not in take),
        shape_mismatch=mismatch,
        unused=tuple(k for k in source_sd if k not in target),
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
