"""engine layer: the one checkpoint contract, `TrainState`.

A checkpoint is a plain dict of tensors and primitives so `torch.load(weights_only=True)` reads it:
model, EMA (weights, update count, decay), optimizer, AMP scaler, the last completed epoch, its stage, the
best-metric tracker, the config hash and the non-finite remedies in force (LR scale, AMP off). The upstream key names `model`, `ema.module`, `ema.updates`,
`optimizer` and `last_epoch` are kept.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
from pathlib import Path
from typing import Any

import torch

from deim_ray.models.load_refusal import load_failure
from deim_ray.atomic import write_atomically

FORMAT = "deim_ray.train_state/1"


class CheckpointError(ValueError):
    pass


def make_train_state(*, model: dict, ema: dict | None, optimizer: dict, scaler: dict | None, epoch: int,
                     stage: int, best: dict, config_sha256: str, extra: dict | None = None,
                     remedies: dict | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model,
        "ema": ema,
        "optimizer": optimizer,
        "scaler": scaler,
        "last_epoch": int(epoch),
        "stage": int(stage),
        "best": best,
        "config_sha256": config_sha256,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
        "remedies": remedies or {},
    }


def save_train_state(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically (`deim_ray.atomic`): a reader never sees half a checkpoint."""
    write_atomically(path, lambda f: torch.save(state, f))
    return Path(path)


def load_train_state(source: str | os.PathLike | bytes, expected_config_sha256: str | None = None) -> dict[str, Any]:
    """Load with `weights_only=True`; a truncated file, a pickle payload or a foreign dict is a CheckpointError."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        f = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        with f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {name} does not exist; check the path") from None
    except Exception as e:  # torch raises several types for truncated zips and refused pickles
        raise CheckpointError(
            f"checkpoint {name} cannot be loaded safely ({load_failure(e)}); it is truncated, corrupt or not a "
            "weights-only checkpoint — re-fetch it or point to another file") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not a deim_ray training checkpoint (no format {FORMAT!r})")
    if expected_config_sha256 and state.get("config_sha256") != expected_config_sha256:
        raise CheckpointError(
            f"checkpoint {name} was written with another config (hash {str(state.get('config_sha256'))[:12]} != "
            f"{expected_config_sha256[:12]}); resume with the original config or start a new run name")
    return state
