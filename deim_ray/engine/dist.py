"""engine layer: every piece of rank logic in one place.

Works the same in a single process (tests), under `torchrun`, and inside a Ray Train worker (Ray sets up the
process group before the engine runs; the engine never imports ray). A function here that calls a collective
must be called on every rank.
"""

from __future__ import annotations

import logging
import os
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

T = TypeVar("T")
log = logging.getLogger("deim_ray.engine")


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_device() -> torch.device:
    """The device of this process: the LOCAL rank's GPU (upstream used the global rank, which breaks on node 2)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def broadcast_object(obj: T, src: int = 0) -> T:
    """Send rank `src`'s Python object to every rank (identity without a process group)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_ranks_true(flag: torch.Tensor) -> bool:
    """Whether a boolean scalar tensor is true on every rank (one MIN all-reduce; the same answer everywhere)."""
    value = flag.detach().to(torch.int32).reshape(1)
    if is_distributed():
        if tdist.get_backend() == "nccl" and value.device.type != "cuda":
            value = value.cuda()
        tdist.all_reduce(value, op=tdist.ReduceOp.MIN)
    return bool(value.item())


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of scalar tensors, in one collective; returns host floats."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in keys])
    if is_distributed():
        tdist.all_reduce(stacked, op=tdist.ReduceOp.SUM)
        stacked /= world_size()
    return dict(zip(keys, stacked.cpu().tolist()))


def wrap_ddp(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DDP-wrap `model` when a process group exists; the plain module otherwise. With `sync_bn` (upstream's
    default) every BatchNorm becomes a SyncBatchNorm first, on GPUs: torch's SyncBatchNorm runs on CUDA only, so
    a CPU (gloo) run keeps per-rank BatchNorm statistics and says so once."""
    model.to(device)
    if world_size() <= 1:
        return model
    if sync_bn and device.type == "cuda":
        model = to_sync_batchnorm(model)
    elif sync_bn and is_main():
        log.info("train.sync_bn skipped: SyncBatchNorm needs CUDA; on %s each rank keeps its own BatchNorm "
                 "statistics", device.type)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm (not yet synchronised) replaced by a SyncBatchNorm sharing its parameters and
    buffers, so optimizer, EMA and checkpoints see the same tensors under the same names."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
               for m in model.modules()):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
