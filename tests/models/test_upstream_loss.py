"""deim_ray's loss equals upstream DEIMv2's `DEIMCriterion` on the same decoder outputs and targets.

`fixtures/upstream_loss.pt` holds, per case, the decoder outputs a deim_ray model (Atto, N with 150 queries to keep
the file small; weights perturbed so that the DDF terms are active) passed to its loss, the targets, and the
weighted terms upstream's own criterion computed from them with upstream's settings for that size
(`fixtures/make_upstream_loss.py`, run outside CI against a checkout of Intellindust-AI-Lab/DEIMv2). Cases:
denoising off at epoch 0, denoising off past the matcher switch (IoU-order matcher), denoising on.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deim_ray.config.schema import ModelConfig
from deim_ray.models.build import build_model_config
from deim_ray.models.loss import DeimLoss

CASES = torch.load(Path(__file__).parent / "fixtures" / "upstream_loss.pt", weights_only=True)


def _our_terms(case: dict) -> dict[str, float]:
    model_cfg = ModelConfig(variant=case["variant"], num_denoising=case["num_denoising"],
                            num_queries=case["num_queries"])
    config = build_model_config(model_cfg, case["num_classes"])
    rec = dict(case["outputs"])
    classes, coords = rec.pop("outputs_class"), rec.pop("outputs_coord")
    switched = case["epoch"] >= case["matcher_change_epoch"]
    with torch.no_grad():
        total, terms, _ = DeimLoss(4.0 if switched else None)(None, case["targets"], "cpu", None, config, classes,
                                                             coords, **rec)
    assert float(total) == pytest.approx(sum(float(v) for v in terms.values()), rel=1e-6)
    return {k: float(v) for k, v in terms.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['variant']}-dn{c['num_denoising']}-epoch{c['epoch']}")
def test_loss_terms_and_sum_equal_upstream_criterion(case):
    ours, theirs = _our_terms(case), case["upstream_terms"]
    assert set(ours) == set(theirs)
    total_ours, total_theirs = sum(ours.values()), sum(theirs.values())
    assert abs(total_ours - total_theirs) <= 1e-3 * abs(total_theirs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


def test_fixture_covers_the_upstream_term_layout():
    """N (FGL/DDF, dense one-to-one) has upstream's 37 terms with denoising and DDF on; Atto 15 without."""
    count = {(c["variant"], c["num_denoising"], c["epoch"]): len(c["upstream_terms"]) for c in CASES}
    assert count[("n", 20, 0)] == 37 and count[("atto", 0, 0)] == 15
    n_terms = next(c["upstream_terms"] for c in CASES if c["variant"] == "n" and c["num_denoising"])
    assert {"loss_fgl", "loss_ddf_aux_0", "loss_mal_pre", "loss_mal_enc_0", "loss_ddf_dn_0", "loss_mal_dn_pre"} \
        <= set(n_terms)
    assert "loss_ddf" not in n_terms and "loss_ddf_dn_2" not in n_terms  # the teacher itself gets no DDF
