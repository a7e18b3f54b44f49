"""models layer: upstream DEIMv2's training loss (`DEIMCriterion`) computed on transformers' DEIMv2 outputs.

transformers' own DEIMv2 loss reuses the same loss formulas but arranges the decoder outputs differently from
upstream, so its total differs. What upstream computes, and this module reproduces:

- The outputs (`upstream_outputs`): the last decoder layer (logits, boxes and its own corners: it gets an FGL
  term), layers 0..L-2 as auxiliary outputs paired with their OWN corners (transformers pairs entry i's
  logits/boxes with layer i's corners, one layer off, because its logits carry one extra entry first), the
  pre-refinement output of layer 0 as a separate `pre` output, the encoder top-k, and the same for the
  denoising queries (`dn_0..dn_{L-1}`, `dn_pre`). Term names follow upstream (`loss_mal_aux_0`, `_pre`,
  `_enc_0`, `_dn_0`, `_dn_pre`).
- The dense one-to-one union of matches (`use_uni_set`) over main, auxiliary, pre and encoder matches, in that
  order, for the box (and FGL) terms.
- `num_boxes` (and the union's count) averaged over ranks with one all-reduce, so every rank normalises by the
  same number (transformers normalises by each rank's own count).
- DDF: positive/negative balance from the counts of the non-denoising outputs, reused for the denoising
  outputs as upstream does (transformers recomputes it per output). Upstream's `8 / batch` scale cancels in
  the balance and is left out. An output whose corners equal its teacher's (the last layer) gets no DDF term.
- Terms: MAL and boxes for every size; FGL/DDF ('local') only when their weights are set (upstream's Atto,
  Femto and Pico configs train without them).

Not reproduced on purpose: upstream replaces NaN terms by 0 (`nan_to_num`), which would hide a diverging run.

Boxes whose edges crossed: the D-FINE-style decoding (`distance2bbox`) lets a box's left edge pass its right one
(each edge distance reaches `-2 * up * reg_scale`, the box's own half-size is `reg_scale / 2`), giving a negative
width or height. Upstream's matcher asserts on such a box and training stops (a known D-FINE crash, at a random
epoch); transformers' raises ValueError. Here (`_sized_boxes`) the matcher, IoU and GIoU see such a size as zero
(and a non-finite box as an empty one), while the L1 term sees the box as predicted, so it pushes the negative size
back (and a non-finite box keeps the loss non-finite: the step is skipped). Boxes of non-negative size are
computed exactly as upstream computes them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_d_fine import bbox2distance
from transformers.loss.loss_deimv2 import Deimv2Loss
from transformers.loss.loss_for_object_detection import box_iou, generalized_box_iou

Targets = list[dict[str, torch.Tensor]]
Output = dict[str, Any]
DISTILL_T = 5.0
"""Temperature of the DDF distillation (upstream's default `T=5`)."""


def upstream_outputs(outputs_class: torch.Tensor, outputs_coord: torch.Tensor, predicted_corners: torch.Tensor,
                     initial_reference_points: torch.Tensor, enc_topk_logits: torch.Tensor,
                     enc_topk_bboxes: torch.Tensor, denoising_meta_values: dict | None) -> Output:
    """transformers' stacked decoder outputs ([B, entries, queries, ...]) as upstream's decoder returns them.

    In training, logits/boxes have L+1 entries (the pre-refinement output of layer 0 first) and corners/reference
    points L. In eval mode only the last layer is kept: the main and encoder outputs then make the whole loss."""
    classes, coords = outputs_class.float(), outputs_coord.float()
    corners, refs = predicted_corners.float(), initial_reference_points.float()
    out: Output = {}
    if denoising_meta_values is not None:
        split = denoising_meta_values["dn_num_split"]
        (dn_classes, classes), (dn_coords, coords) = classes.split(split, 2), coords.split(split, 2)
        (dn_corners, corners), (dn_refs, refs) = corners.split(split, 2), refs.split(split, 2)
        out["dn_outputs"] = _layers(dn_classes, dn_coords, dn_corners, dn_refs, dn_corners.shape[1], is_dn=True)
        out["dn_pre_outputs"] = {"logits": dn_classes[:, 0], "pred_boxes": dn_coords[:, 0]}
        out["dn_meta"] = denoising_meta_values
    out.update(logits=classes[:, -1], pred_boxes=coords[:, -1], pred_corners=corners[:, -1], ref_points=refs[:, -1])
    if classes.shape[1] == corners.shape[1] + 1:  # training: every layer, plus layer 0 before refinement
        out["aux_outputs"] = _layers(classes, coords, corners, refs, corners.shape[1] - 1)
        out["pre_outputs"] = {"logits": classes[:, 0], "pred_boxes": coords[:, 0]}
    out["enc_aux_outputs"] = [{"logits": enc_topk_logits.float(), "pred_boxes": enc_topk_bboxes.float()}]
    return out


def _layers(classes, coords, corners, refs, count: int, is_dn: bool = False) -> list[Output]:
    """Layer i's logits/boxes (entry i+1) with layer i's corners; the last layer is every layer's teacher."""
    return [{"logits": classes[:, i + 1], "pred_boxes": coords[:, i + 1], "pred_corners": corners[:, i],
             "ref_points": refs[:, i], "teacher_corners": corners[:, -1], "teacher_logits": classes[:, -1],
             "is_dn": is_dn} for i in range(count)]


def mean_over_ranks(*counts: int, device: torch.device) -> list[float]:
    """Each count averaged over the ranks of the process group (one all-reduce), at least 1, as upstream.

    A collective when a process group exists: every rank computes the loss every step, as in upstream's loop.
    (The models layer sits below `engine.dist`, hence torch.distributed directly.)"""
    values = torch.tensor(counts, dtype=torch.float, device=device)
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(values)
        values /= tdist.get_world_size()
    return values.clamp(min=1).tolist()


class DEIMCriterion(Deimv2Loss):
    """Upstream's DEIMCriterion over `upstream_outputs`, built from a transformers `Deimv2Config` (weights,
    gamma, matcher costs, `use_dense_one_to_one` = upstream's `use_uni_set`). Swap `matcher` for the late
    IoU-order matcher."""

    def __init__(self, config):
        super().__init__(config)
        local = bool(config.weight_loss_fgl or config.weight_loss_ddf)
        self.losses = ["mal", "boxes"] + (["local"] if local else [])
        self._ddf_counts: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, outputs: Output, targets: Targets) -> dict[str, torch.Tensor]:
        self._ddf_counts = None
        outputs = _sized_boxes(outputs)
        main = {k: outputs[k] for k in ("logits", "pred_boxes", "pred_corners", "ref_points") if k in outputs}
        decoder = outputs.get("aux_outputs", []) + ([outputs["pre_outputs"]] if "pre_outputs" in outputs else [])
        indices = self.matcher(main, targets)
        decoder_indices = [self.matcher(o, targets) for o in decoder]
        enc_indices = [self.matcher(o, targets) for o in outputs["enc_aux_outputs"]]
        union = self._get_dense_o2o_indices(indices, decoder_indices + enc_indices)
        num_boxes, num_union = mean_over_ranks(sum(len(t["class_labels"]) for t in targets),
                                               sum(len(rows) for rows, _ in union), device=main["logits"].device)
        plain = _Matching(indices, union, num_boxes, num_union, self.use_dense_one_to_one)
        losses = self._terms(main, targets, plain, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._terms(aux, targets, plain.with_own(decoder_indices[i]), f"_aux_{i}"))
        if "pre_outputs" in outputs:
            losses.update(self._terms(outputs["pre_outputs"], targets, plain.with_own(decoder_indices[-1]), "_pre"))
        for i, enc in enumerate(outputs["enc_aux_outputs"]):
            own = plain.with_own(enc_indices[i])
            losses.update(self._terms(enc, targets, own, f"_enc_{i}", union_for=("boxes",)))
        if "dn_outputs" in outputs:
            losses.update(self._denoising_terms(outputs, targets, num_boxes))
        return losses

    def _denoising_terms(self, outputs: Output, targets: Targets, num_boxes: float) -> dict[str, torch.Tensor]:
        meta = outputs["dn_meta"]
        indices = self.get_cdn_matched_indices(meta, targets)
        count = num_boxes * meta["dn_num_group"]
        fixed = _Matching(indices, indices, count, count, False)
        losses: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(outputs["dn_outputs"]):
            losses.update(self._terms(layer, targets, fixed, f"_dn_{i}"))
        if "dn_pre_outputs" in outputs:  # RT-DETRv2 has no pre-refinement output
            losses.update(self._terms(outputs["dn_pre_outputs"], targets, fixed, "_dn_pre"))
        return losses

    def _terms(self, output: Output, targets: Targets, matching: "_Matching", suffix: str,
               union_for: tuple[str, ...] = ("boxes", "local")) -> dict[str, torch.Tensor]:
        terms = {}
        for loss in self.losses:
            indices, count = matching.pick(loss in union_for)
            for key, value in self.get_loss(loss, output, targets, indices, count).items():
                if key in self.weight_dict:
                    terms[key + suffix] = value * self.weight_dict[key]
        return terms

    def loss_boxes(self, outputs: Output, targets: Targets, indices, num_boxes: float) -> dict[str, torch.Tensor]:
        """L1 on the boxes as predicted (`raw_boxes`), GIoU on their sizes floored at zero (`pred_boxes`)."""
        idx = self._get_source_permutation_idx(indices)
        target = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0)
        raw = outputs.get("raw_boxes", outputs["pred_boxes"])[idx]
        giou = generalized_box_iou(center_to_corners_format(outputs["pred_boxes"][idx]),
                                   center_to_corners_format(target))
        return {"loss_bbox": F.l1_loss(raw, target, reduction="none").sum() / num_boxes,
                "loss_giou": (1 - torch.diag(giou)).sum() / num_boxes}

    def loss_local(self, outputs: Output, targets: Targets, indices, num_boxes: float) -> dict[str, torch.Tensor]:
        """FGL on the matched queries' corners; DDF towards the last layer's corners (see the module notes)."""
        if "pred_corners" not in outputs:
            return {}
        idx = self._get_source_permutation_idx(indices)
        target_boxes = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0)
        bins = self.max_num_bins + 1
        with torch.no_grad():
            target_corners, weight_right, weight_left = bbox2distance(
                outputs["ref_points"][idx].detach(), center_to_corners_format(target_boxes), self.max_num_bins,
                self.reg_scale, self.up)
        ious = torch.diag(box_iou(center_to_corners_format(outputs["pred_boxes"][idx]),
                                  center_to_corners_format(target_boxes))[0])
        losses = {"loss_fgl": self.unimodal_distribution_focal_loss(
            outputs["pred_corners"][idx].reshape(-1, bins), target_corners, weight_right, weight_left,
            ious.unsqueeze(-1).repeat(1, 4).reshape(-1).detach(), avg_factor=num_boxes)}
        if "teacher_corners" in outputs:
            ddf = self._ddf(outputs, idx, ious, bins)
            if ddf is not None:
                losses["loss_ddf"] = ddf
        return losses

    def _ddf(self, outputs: Output, idx, ious: torch.Tensor, bins: int) -> torch.Tensor | None:
        pred = outputs["pred_corners"].reshape(-1, bins)
        teacher = outputs["teacher_corners"].reshape(-1, bins)
        if torch.equal(pred, teacher):
            return None
        weight = outputs["teacher_logits"].sigmoid().max(dim=-1)[0]
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask[idx] = True
        weight[idx] = ious.reshape_as(weight[idx]).to(weight.dtype)
        mask = mask.unsqueeze(-1).repeat(1, 1, 4).reshape(-1)
        weight = weight.unsqueeze(-1).repeat(1, 1, 4).reshape(-1).detach()
        kl = F.kl_div(F.log_softmax(pred / DISTILL_T, dim=1), F.softmax(teacher.detach() / DISTILL_T, dim=1),
                      reduction="none").sum(-1)
        per_corner = weight * DISTILL_T ** 2 * kl
        if not outputs.get("is_dn") or self._ddf_counts is None:
            counts = (mask.sum().float().sqrt(), (~mask).sum().float().sqrt())
            if not outputs.get("is_dn"):
                self._ddf_counts = counts
        else:
            counts = self._ddf_counts
        pos = per_corner[mask].mean() if mask.any() else per_corner.new_zeros(())
        neg = per_corner[~mask].mean() if (~mask).any() else per_corner.new_zeros(())
        return (pos * counts[0] + neg * counts[1]) / (counts[0] + counts[1])


def _sized_boxes(outputs: Output) -> Output:
    """`outputs` with every `pred_boxes` (cx, cy, w, h) given a size of at least zero and finite values, the boxes
    as predicted kept as `raw_boxes` (see the module notes). Identity, values and gradients, for boxes of
    non-negative finite size."""
    if isinstance(outputs, list):
        return [_sized_boxes(o) for o in outputs]
    if not isinstance(outputs, dict):
        return outputs
    out = {k: _sized_boxes(v) for k, v in outputs.items()}
    if "pred_boxes" in outputs:
        boxes = outputs["pred_boxes"]
        sized = torch.cat([boxes[..., :2], boxes[..., 2:].clamp(min=0)], -1)
        out["pred_boxes"] = torch.nan_to_num(sized, nan=0.0, posinf=1.0, neginf=0.0)
        out["raw_boxes"] = boxes
    return out


class _Matching:
    """Which indices and box count a term uses: the output's own matches, or the dense union of all matches."""

    def __init__(self, own, union, num_own: float, num_union: float, use_union: bool):
        self.own, self.union, self.num_own, self.num_union, self.use_union = own, union, num_own, num_union, use_union

    def with_own(self, own) -> "_Matching":
        return _Matching(own, self.union, self.num_own, self.num_union, self.use_union)

    def pick(self, union_term: bool):
        if self.use_union and union_term:
            return self.union, self.num_union
        return self.own, self.num_own
