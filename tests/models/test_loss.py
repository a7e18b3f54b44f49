"""forward_loss, target validation, DDP safety with empty batches, and the IoU-order matcher switch."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from deim_ray.config.schema import ModelConfig
from deim_ray.models import ModelError, build_model, forward_loss, set_matcher_epoch
from deim_ray.models.loss import DeimLoss, IoUOrderMatcher
from tests.models.conftest import make_targets

IMAGES = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))


def _params_without_grad(model):
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_forward_backward_with_an_image_without_boxes(tiny_model):
    tiny_model.train()
    loss, terms = forward_loss(tiny_model, IMAGES, make_targets(3, 0))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert {"loss_mal", "loss_bbox", "loss_giou", "loss_mal_dn_0"} <= set(terms)
    assert all(not v.requires_grad for v in terms.values())
    assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-5)


def test_all_empty_batch_still_reaches_every_parameter(tiny_model):
    """What DDP(find_unused_parameters=False) needs: the stock loss leaves some parameters out of the graph
    when no image has a box; forward_loss's zero-weight term brings them back without changing the loss."""
    tiny_model.train()
    empty = make_targets(0, 0)
    torch.manual_seed(0)
    tiny_model(pixel_values=IMAGES, labels=empty).loss.backward()
    assert "model.denoising_class_embed.weight" in _params_without_grad(tiny_model)
    tiny_model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss, _ = forward_loss(tiny_model, IMAGES, empty)
    loss.backward()
    assert _params_without_grad(tiny_model) == []
    assert torch.isfinite(loss)


def test_eval_mode_gives_a_validation_loss_without_denoising_terms(tiny_model):
    tiny_model.eval()
    with torch.no_grad():
        loss, terms = forward_loss(tiny_model, IMAGES, make_targets(2, 1))
    assert torch.isfinite(loss) and not any("_dn_" in k for k in terms)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t[0].update(class_labels=t[0]["class_labels"].int()), r"target 0: class_labels must be int64"),
    (lambda t: t[1].update(boxes=t[1]["boxes"].double()), r"target 1: boxes must be float32 \[N,4\]"),
    (lambda t: t[0].update(boxes=t[0]["boxes"] * 640), r"normalised cxcywh in \[0, 1\].*divide pixel boxes"),
    (lambda t: t[0].update(class_labels=t[0]["class_labels"] + 3), r"class_labels must be in \[0, 3\)"),
    (lambda t: t.pop(), r"targets must be a list of 2 dicts"),
    (lambda t: t[0].pop("class_labels"), r"target 0 must be a dict with 'boxes' and 'class_labels'"),
])
def test_bad_targets_are_one_line_errors(tiny_model, mutate, message):
    targets = make_targets(2, 2)
    mutate(targets)
    with pytest.raises(ModelError, match=message) as err:
        forward_loss(tiny_model, IMAGES, targets)
    assert "\n" not in str(err.value)


def test_bad_image_size_is_rejected_before_the_model_runs(tiny_model):
    with pytest.raises(ModelError, match="not a multiple of 32"):
        forward_loss(tiny_model, torch.rand(2, 3, 150, 160), make_targets(1, 1))


def test_loss_uses_upstream_arrangement_not_transformers(tiny_model):
    """forward_loss installs DeimLoss: upstream's term layout (pre/dn_pre outputs, encoder term `_enc_0`),
    not transformers' stock one (which names the encoder term `_aux_1` here and has no `_pre` terms)."""
    tiny_model.train()
    torch.manual_seed(0)
    stock = tiny_model(pixel_values=IMAGES, labels=make_targets(3, 1)).loss_dict
    torch.manual_seed(0)
    _, terms = forward_loss(tiny_model, IMAGES, make_targets(3, 1))
    assert isinstance(tiny_model.loss_function, DeimLoss)
    assert {"loss_mal_pre", "loss_mal_enc_0", "loss_mal_dn_pre", "loss_mal_dn_1"} <= set(terms)
    assert "loss_mal_pre" not in stock and "loss_mal_aux_1" in stock and "loss_mal_aux_1" not in terms


def test_loss_is_computed_in_float32_outside_autocast(tiny_model):
    """Upstream's AMP loop runs the model under autocast and the criterion outside it, in full precision."""
    tiny_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = forward_loss(tiny_model, IMAGES, make_targets(3, 1))
    assert all(v.dtype == torch.float32 for v in terms.values()) and torch.isfinite(loss)


def test_iou_order_matcher_hand_example():
    """Query 0: score .9 but IoU 0.25 with the box; query 1: score .5 and IoU 1.
    IoU order (alpha 4): costs -.9*.25**4 = -.0035 vs -.5 -> query 1. Score alone would pick query 0."""
    def logit(p):
        return torch.log(torch.tensor(p) / (1 - torch.tensor(p)))

    outputs = {"logits": torch.stack([logit(0.9), logit(0.5)]).view(1, 2, 1),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.4, 0.4]]])}
    target = [{"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "class_labels": torch.tensor([0])}]
    ((rows, cols),) = IoUOrderMatcher(alpha=4.0)(outputs, target)
    assert rows.tolist() == [1] and cols.tolist() == [0]
    ((rows, _),) = IoUOrderMatcher(alpha=0.0)(outputs, target)  # IoU ignored -> highest score wins
    assert rows.tolist() == [0]
    empty = [{"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.int64)}]
    assert [len(r) for r, _ in IoUOrderMatcher()(outputs, empty)] == [0]


def test_set_matcher_epoch_switches_and_restores(tiny_model):
    tiny_model.train()
    assert set_matcher_epoch(tiny_model, 3, change_epoch=None) is False
    assert tiny_model.loss_function.iou_order_alpha is None
    assert set_matcher_epoch(tiny_model, 3, change_epoch=4) is False
    assert tiny_model.loss_function.iou_order_alpha is None
    assert set_matcher_epoch(tiny_model, 4, change_epoch=4, iou_order_alpha=2.0) is True
    assert isinstance(tiny_model.loss_function, DeimLoss) and tiny_model.loss_function.iou_order_alpha == 2.0
    loss, terms = forward_loss(tiny_model, IMAGES, make_targets(3, 0))
    loss.backward()
    assert torch.isfinite(loss) and "loss_mal_dn_0" in terms
    assert set_matcher_epoch(tiny_model, 1, change_epoch=4) is False  # e.g. a resume into an earlier epoch
    assert tiny_model.loss_function.iou_order_alpha is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    ddp = DistributedDataParallel(build_model(ModelConfig(variant="tiny"), 3).train(),
                                  find_unused_parameters=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    targets = make_targets(2, 1) if rank == 0 else make_targets(0, 0)  # rank 1: not a single box
    for _ in range(2):
        opt.zero_grad()
        loss, _ = forward_loss(ddp, IMAGES, targets)
        loss.backward()
        opt.step()
    digest = torch.stack([p.detach().double().sum() for p in ddp.parameters()])
    gathered = [torch.zeros_like(digest) for _ in range(2)]
    dist.all_gather(gathered, digest)
    torch.save({"equal": torch.equal(gathered[0], gathered[1])}, f"{result_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_without_find_unused_parameters_survives_an_empty_rank(tmp_path):
    """Real DDP on gloo (2 processes): upstream-style training hangs here without the zero-weight term."""
    ctx = mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP step hung: a rank without boxes left parameters without gradients")
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["equal"]



def _cross_every_box(model) -> None:
    """Every decoder layer's corner head predicts the lowest bin for all four edges: each edge moves
    `2 * up * reg_scale` inwards, past the box centre, so every refined box has negative width and height."""
    with torch.no_grad():
        for head in model.model.decoder.bbox_embed:
            head.layers[-1].weight.zero_()
            bias = head.layers[-1].bias.view(4, -1)
            bias.zero_()
            bias[:, 0] = 30.0


def test_boxes_whose_edges_crossed_train_instead_of_stopping_the_run(tiny_model):
    """Upstream's matcher asserts on such a box (training stops at a random epoch); transformers' raises
    ValueError. Here the step computes a finite loss and finite gradients."""
    _cross_every_box(tiny_model)
    tiny_model.eval()
    with torch.no_grad():
        boxes = tiny_model(pixel_values=IMAGES).pred_boxes
    assert (boxes[..., 2:] < 0).all()

    tiny_model.train()
    torch.manual_seed(0)
    loss, terms = forward_loss(tiny_model, IMAGES, make_targets(3, 2))
    loss.backward()
    assert torch.isfinite(loss)
    assert 0 < terms["loss_giou"] / tiny_model.config.weight_loss_giou <= 2  # GIoU of a zero-size box: in (-1, 0]
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)


def _boxes_and_matches(negative_width: bool):
    g = torch.Generator().manual_seed(1)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(2, 10, 2, generator=g), 0.01 + 0.4 * torch.rand(2, 10, 2, generator=g)],
                      -1)
    if negative_width:
        boxes[0, 4, 2] = -0.05
    indices = [(torch.tensor([0, 4, 7]), torch.tensor([2, 0, 1])), (torch.tensor([3, 9]), torch.tensor([1, 0]))]
    return boxes.requires_grad_(), indices


def test_a_crossed_box_gets_giou_of_zero_size_and_l1_that_widens_it(tiny_model):
    from transformers.loss.loss_rt_detr import RTDetrLoss

    from deim_ray.models.criterion import DEIMCriterion, _sized_boxes

    criterion, targets = DEIMCriterion(tiny_model.config), make_targets(3, 2)
    boxes, indices = _boxes_and_matches(negative_width=True)
    with pytest.raises(ValueError, match="corner"):  # what transformers' (and upstream's) loss does with it
        RTDetrLoss.loss_boxes(criterion, {"pred_boxes": boxes}, targets, indices, 5.0)
    terms = criterion.loss_boxes(_sized_boxes({"pred_boxes": boxes}), targets, indices, 5.0)
    assert all(torch.isfinite(v) for v in terms.values())
    (grad_l1,) = torch.autograd.grad(terms["loss_bbox"], boxes, retain_graph=True)
    (grad_giou,) = torch.autograd.grad(terms["loss_giou"], boxes)
    assert grad_l1[0, 4, 2] < 0 and grad_giou[0, 4, 2] == 0  # descending the loss widens it; GIoU has no say


def test_boxes_of_positive_size_lose_exactly_as_upstream(tiny_model):
    """The size floor is the identity for boxes of non-negative size: the terms of transformers' loss_boxes
    (upstream's formulas)."""
    from transformers.loss.loss_rt_detr import RTDetrLoss

    from deim_ray.models.criterion import DEIMCriterion, _sized_boxes

    criterion, targets = DEIMCriterion(tiny_model.config), make_targets(3, 2)
    boxes, indices = _boxes_and_matches(negative_width=False)
    ours = criterion.loss_boxes(_sized_boxes({"pred_boxes": boxes}), targets, indices, 5.0)
    stock = RTDetrLoss.loss_boxes(criterion, {"pred_boxes": boxes}, targets, indices, 5.0)
    assert ours.keys() == stock.keys() and all(torch.equal(ours[k], stock[k]) for k in ours)
