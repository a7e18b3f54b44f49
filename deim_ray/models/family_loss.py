"""models layer: upstream DEIM's criterion for the D-FINE and RT-DETRv2 families.

Upstream trains both families with `DEIMCriterion`, configured per family and per recipe:

| family / recipe | classification | boxes | local (FGL + DDF) | union of matches (`use_uni_set`) | gamma |
|---|---|---|---|---|---|
| D-FINE under DEIM (`deim_hgnetv2_*`)       | MAL | L1 + GIoU | yes | yes | 1.5 |
| D-FINE baseline (`dfine_hgnetv2_*`)        | VFL | L1 + GIoU | yes | yes | 2.0 |
| RT-DETRv2 under DEIM (`deim_r*vd_*`)       | MAL | L1 + GIoU | -   | no  | 1.5 |
| RT-DETRv2 baseline (`rtdetrv2_r*vd_*`)     | VFL | L1 + GIoU | -   | no  | 2.0 |

`DeimCriterionLoss` is `loss.DeimLoss` (upstream's `DEIMCriterion` of `criterion.py`, in float32, late matcher
switch) with the family's term list and union switch from `LossRecipe`. D-FINE's decoder returns what DEIMv2's
does (`criterion.upstream_outputs`); RT-DETRv2's has no box distributions and no pre-refinement output, so
`box_outputs` arranges it as upstream's RT-DETRv2 decoder does (last layer, the earlier layers, encoder top-k,
denoising layers).

Weights: the classification term (MAL or VFL) uses the config's `weight_loss_vfl`; L1/GIoU/FGL/DDF use
`weight_loss_bbox`/`_giou`/`_fgl`/`_ddf` (all upstream DEIM configs: 1, 5, 2, 0.15, 1.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from deim_ray.models.criterion import DEIMCriterion, Output, upstream_outputs
from deim_ray.models.errors import ModelError
from deim_ray.models.loss import DeimLoss, IoUOrderMatcher

LOSS_TERMS = ("mal", "vfl", "boxes", "local")


@dataclasses.dataclass(frozen=True)
class LossRecipe:
    losses: tuple[str, ...]
    """Upstream `DEIMCriterion.losses`: one of mal/vfl, then boxes, optionally local (needs corner outputs)."""
    use_uni_set: bool
    """Boxes and local terms over the union of the matches of every decoder layer (upstream `use_uni_set`)."""

    def check(self, has_corners: bool) -> None:
        unknown = [t for t in self.losses if t not in LOSS_TERMS]
        if unknown:
            raise ModelError(f"model.losses has unknown term {unknown[0]!r}; use mal or vfl, boxes, and local")
        if ("mal" in self.losses) == ("vfl" in self.losses):
            raise ModelError(f"model.losses {list(self.losses)} must hold exactly one of mal and vfl")
        if "local" in self.losses and not has_corners:
            raise ModelError("model.losses has 'local' (FGL/DDF), but this model family predicts no box "
                             "distributions; drop it")


class _CriterionConfig:
    """The model config seen by `DEIMCriterion`, with the settings transformers' D-FINE/RT-DETRv2 configs lack."""

    def __init__(self, config: Any) -> None:
        self._config = config
        self.weight_loss_mal = config.weight_loss_vfl
        self.mal_alpha = None  # upstream DEIM leaves mal_alpha unset
        self.use_dense_one_to_one = False  # set from the recipe
        for key, default in (("max_num_bins", 32), ("reg_scale", 4.0), ("up", 0.5), ("weight_loss_fgl", 0.0),
                             ("weight_loss_ddf", 0.0)):
            if not hasattr(config, key):
                setattr(self, key, default)  # unused without the local term; the criterion reads them anyway

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class DeimCriterionLoss(DeimLoss):
    """`DeimLoss` for the D-FINE / RT-DETRv2 detectors: the family's loss terms and union switch."""

    def __init__(self, recipe: LossRecipe, iou_order_alpha: float | None = None) -> None:
        super().__init__(iou_order_alpha)
        self.recipe = recipe

    def with_matcher(self, iou_order_alpha: float | None) -> "DeimCriterionLoss":
        return DeimCriterionLoss(self.recipe, iou_order_alpha)

    def __call__(self, logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None, *,
                 enc_topk_logits=None, enc_topk_bboxes=None, denoising_meta_values=None, predicted_corners=None,
                 initial_reference_points=None, **_) -> tuple[torch.Tensor, dict[str, torch.Tensor], None]:
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            if predicted_corners is not None:
                outputs = upstream_outputs(outputs_class, outputs_coord, predicted_corners, initial_reference_points,
                                           enc_topk_logits, enc_topk_bboxes, denoising_meta_values)
            else:
                outputs = box_outputs(outputs_class, outputs_coord, enc_topk_logits, enc_topk_bboxes,
                                      denoising_meta_values)
            criterion = DEIMCriterion(_CriterionConfig(config)).to(device)
            criterion.losses = list(self.recipe.losses)
            criterion.use_dense_one_to_one = self.recipe.use_uni_set
            criterion.weight_dict["loss_vfl"] = config.weight_loss_vfl  # Deimv2Loss's table lists MAL only
            if self.iou_order_alpha is not None:
                criterion.matcher = IoUOrderMatcher(self.iou_order_alpha)
            terms = criterion(outputs, labels)
        return sum(terms.values()), terms, None


def box_outputs(outputs_class: torch.Tensor, outputs_coord: torch.Tensor, enc_topk_logits: torch.Tensor,
                enc_topk_bboxes: torch.Tensor, denoising_meta_values: dict | None) -> Output:
    """RT-DETRv2's stacked outputs ([B, layers, queries, ...]) as upstream's RT-DETRv2 decoder returns them: the
    last layer, layers 0..L-2 as auxiliary outputs, the encoder top-k, and every denoising layer."""
    classes, coords = outputs_class.float(), outputs_coord.float()
    out: Output = {}
    if denoising_meta_values is not None:
        split = denoising_meta_values["dn_num_split"]
        (dn_classes, classes), (dn_coords, coords) = classes.split(split, 2), coords.split(split, 2)
        out["dn_outputs"] = [{"logits": dn_classes[:, i], "pred_boxes": dn_coords[:, i], "is_dn": True}
                             for i in range(dn_classes.shape[1])]
        out["dn_meta"] = denoising_meta_values
    out.update(logits=classes[:, -1], pred_boxes=coords[:, -1])
    out["aux_outputs"] = [{"logits": classes[:, i], "pred_boxes": coords[:, i]} for i in range(classes.shape[1] - 1)]
    out["enc_aux_outputs"] = [{"logits": enc_topk_logits.float(), "pred_boxes": enc_topk_bboxes.float()}]
    return out
