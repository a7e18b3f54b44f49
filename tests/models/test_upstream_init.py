"""models/deimv2/init.py: a freshly built DEIMv2 model starts from weights drawn as upstream's constructors draw them.

The reference statistics (`fixtures/upstream/init_stats.json.gz`, made by `make_init_stats.py` from upstream's own
freshly built models) give per tensor the std, mean and size of upstream's fresh values under deim_ray's names.
transformers' own init (N(0, 0.01-0.02) for every Linear/Conv2d) is 2-10x smaller than upstream's in most
layers, which trained markedly worse from a random backbone (bench/train_vs_upstream.py).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from deim_ray.config.loader import load_config
from deim_ray.models import build_model

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
CONFIGS = Path(__file__).parents[1] / "config" / "fixtures"
UPSTREAM_CONFIGS = {"dfine_n": "upstream_deim/deim_dfine/deim_hgnetv2_n_coco.yml",
                    "rtdetrv2_r18": "upstream_deim/deim_rtdetrv2/deim_r18vd_120e_coco.yml"}
STATS = json.loads(gzip.open(FIXTURES / "init_stats.json.gz", "rt").read())
VIT = "model.conv_encoder.backbone."  # the ViT keeps transformers' (ViT-recipe) init


def _fresh(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    rel = UPSTREAM_CONFIGS.get(name, f"upstream/deimv2/deimv2_{name}_coco.yml")
    cfg = load_config(CONFIGS / rel, ["model.backbone_pretrained=null"])
    return build_model(cfg.model, 80).state_dict()


@pytest.mark.parametrize("name", sorted(STATS))
def test_fresh_weights_are_drawn_as_upstream_draws_them(name):
    ours, reference = _fresh(name), STATS[name]
    off = []
    for key, (std, mean, numel) in reference.items():
        if key.startswith(VIT) or key not in ours:
            continue
        t = ours[key].double()
        if std == 0.0:  # a constant: zeros, ones, the prior-probability bias, the offset grid's repeated values
            if not torch.allclose(t, torch.full_like(t, mean), atol=1e-6):
                off.append(f"{key}: constant {mean:.4g} upstream, std {t.std().item():.3g} here")
        elif numel >= 128 and not 0.8 < t.std().item() / std < 1.25:
            off.append(f"{key}: std {std:.4f} upstream, {t.std().item():.4f} here")
    compared = sum(1 for k in reference if not k.startswith(VIT) and k in ours)
    assert compared > 0.9 * sum(1 for k in reference if not k.startswith(VIT))
    assert not off, "\n".join(off)


def test_every_decoder_layer_starts_from_the_same_score_head():
    """Upstream deep-copies one initial score head (and box head) for every decoder layer."""
    ours = _fresh("hgnetv2_atto")
    heads = sorted(k for k in ours if k.startswith("model.decoder.class_embed.") and k.endswith(".weight"))
    assert len(heads) == 3
    assert all(torch.equal(ours[heads[0]], ours[k]) for k in heads[1:])


def test_denoising_boxes_keep_their_size_where_noise_crossed_two_corners():
    """Upstream takes |w|, |h| of a noised box whose corners crossed; transformers kept the negative size, which
    its inverse_sigmoid clamps to a zero-size box (about 4 in 10 negative queries)."""
    from transformers.models.deimv2 import modeling_deimv2

    from deim_ray.models.deimv2 import denoising

    _fresh("hgnetv2_atto")  # building a DEIMv2 model installs upstream's denoising boxes
    assert modeling_deimv2.get_contrastive_denoising_training_group is denoising.denoising_group_as_upstream
    targets = [{"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3],
                                                                            [0.3, 0.6, 0.1, 0.1]])}]
    args = dict(targets=targets, num_classes=3, num_queries=10, class_embed=torch.nn.Embedding(4, 8),
                num_denoising_queries=100, label_noise_ratio=0.5, box_noise_scale=1.0)
    torch.manual_seed(0)
    ours = denoising.denoising_group_as_upstream(**args)[1].sigmoid()
    torch.manual_seed(0)
    plain = denoising._GROUP(**args)[1].sigmoid()
    collapsed = (plain[..., 2:] < 1e-4).any(-1)
    assert 0.2 < collapsed.float().mean() < 0.6           # the case is common
    assert (ours[..., 2:] > 1e-4).all()                    # upstream's boxes keep a size
    assert torch.allclose(ours[~collapsed], plain[~collapsed])   # and nothing else changes
    assert modeling_deimv2.corners_to_center_format is denoising._TO_CENTRE
