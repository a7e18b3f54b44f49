"""models layer: upstream's decoder-head (and frozen-backbone) options that transformers' D-FINE / RT-DETRv2
configs lack.

Upstream DEIM configures the MLP heads of the decoder (`mlp_act`: relu or silu; the DEIM recipe uses silu) and,
for RT-DETRv2, the query position head (`query_pos_method: as_reg`, a 3-layer d->d->d MLP instead of the 2-layer
4->2d->d one). transformers hard-codes ReLU heads and the default query head, but keeps unknown config keys as
attributes, so the options travel inside the model config (and so inside `final.pth`) and `apply_head_options`
re-applies them whenever a model is built from such a config.

D-FINE's LQE (`lqe_layers.*.reg_conf`) runs with the decoder activation upstream (`activation`: silu under DEIM,
relu for the plain baselines); transformers always uses ReLU there. A config with `upstream_lqe_act: True` (every
D-FINE config deim_ray builds) gets upstream's; one without it (a D-FINE `final.pth` written before this option
existed) keeps the ReLU it was trained with.

Frozen backbone layers: upstream's `freeze_at` keeps the backbone stem (`freeze_at >= 0`) and some stages out of
training. The config carries it as `freeze_stem` and `freeze_stages` (the first N stages after the stem;
`import-config` translates HGNetv2's `freeze_at` / `freeze_stem_only` and PResNet's `freeze_at`).

Activations are switched by changing the class of the existing head modules (or their `act`), never by
building new ones, so parameter names and tied weights stay as transformers made them (the initial values are
then redrawn as upstream draws them, `upstream_init.py`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import init
from transformers.activations import ACT2CLS

HEAD_NAMES = frozenset({"query_pos_head", "enc_bbox_head", "pre_bbox_head"})
"""Modules named so (or inside a `bbox_embed` list) are the MLP heads upstream builds with `mlp_act`."""
MLP_ACTS = ("relu", "silu")
QUERY_POS_METHODS = ("default", "as_reg")
FREEZE_OPTIONS = {"freeze_stem": (False, True), "freeze_stages": (0, 1, 2, 3, 4)}
"""`model.extra` options of both families that freeze backbone layers, with their accepted values."""
UPSTREAM_LQE_ACT = "upstream_lqe_act"


class SiluPredictionHead(nn.Module):
    """Forward of transformers' MLP prediction heads (`layers` ModuleList) with SiLU between layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.functional.silu(x)
        return x


def apply_head_options(model: nn.Module) -> None:
    """Apply `config.query_pos_method`, `config.mlp_act`, `config.upstream_lqe_act`, `config.freeze_stem` and
    `config.freeze_stages` (when present) to a freshly built model, in place."""
    config = model.config
    if getattr(config, "freeze_stem", False):
        model.model.backbone.model.embedder.requires_grad_(False)
    if getattr(config, "freeze_stages", 0):
        for stage in model.model.backbone.model.encoder.stages[:config.freeze_stages]:
            stage.requires_grad_(False)
    if getattr(config, UPSTREAM_LQE_ACT, False):
        for lqe in model.model.decoder.lqe_layers:
            lqe.reg_conf.act = ACT2CLS[config.decoder_activation_function]()
    if getattr(config, "query_pos_method", "default") == "as_reg":
        _query_pos_as_reg(model)
    if getattr(config, "mlp_act", "relu") == "silu":
        for name, module in model.named_modules():
            if _is_head(name):
                _use_silu(module)


def _is_head(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] in HEAD_NAMES or (len(parts) >= 2 and parts[-2] == "bbox_embed")


def _use_silu(module: nn.Module) -> None:
    if isinstance(getattr(module, "act", None), nn.Module):  # D-FINE's MLP keeps its activation as a module
        module.act = nn.SiLU()
    else:  # transformers' prediction heads apply ReLU in forward; same parameters, SiLU forward
        module.__class__ = SiluPredictionHead


def _query_pos_as_reg(model: nn.Module) -> None:
    """Replace the decoder's 4 -> 2d -> d query position head by upstream's 4 -> d -> d -> d head."""
    decoder = model.model.decoder
    old = decoder.query_pos_head
    d = old.layers[-1].out_features
    new = type(old)(4, d, d, num_layers=3).to(old.layers[0].weight.device)
    for layer in new.layers[:2]:  # upstream initialises the first two layers this way
        init.xavier_uniform_(layer.weight)
    decoder.query_pos_head = new
