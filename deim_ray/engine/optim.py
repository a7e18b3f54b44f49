"""engine layer: optimizer with regex parameter groups.

Each `optimizer.params` entry selects the trainable parameters whose name matches its regex (`re.search`) and
overrides lr / weight_decay for them; unmatched trainable parameters form a last default group. Every trainable
parameter must land in exactly one group: overlapping regexes are an error, as upstream asserts.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from deim_ray.config.schema import OptimizerConfig


class ParamGroupError(ValueError):
    pass


def _unique_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    named = _unique_named_parameters(model)
    owner: dict[str, int] = {}
    groups: list[dict] = []
    for gi, spec in enumerate(cfg.params):
        pattern = re.compile(spec.params)
        chosen = [(n, p) for n, p in named if pattern.search(n)]
        for n, _ in chosen:
            if n in owner:
                raise ParamGroupError(
                    f"parameter `{n}` matches optimizer.params[{owner[n]}] and optimizer.params[{gi}]; "
                    "make the regexes exclusive")
            owner[n] = gi
        group = {"params": [p for _, p in chosen], "names": [n for n, _ in chosen]}
        if spec.lr is not None:
            group["lr"] = spec.lr
        if spec.weight_decay is not None:
            group["weight_decay"] = spec.weight_decay
        groups.append(group)
    rest = [(n, p) for n, p in named if n not in owner]
    groups.append({"params": [p for _, p in rest], "names": [n for n, _ in rest]})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = build_param_groups(model, cfg)
    if cfg.type == "AdamW":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.type == "SGD":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0], weight_decay=cfg.weight_decay)
    raise ParamGroupError(f"optimizer.type `{cfg.type}` is not supported; use AdamW or SGD")
