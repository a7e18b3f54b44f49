"""model.backbone_pretrained for D-FINE and RT-DETRv2: files in upstream's layout (names and shapes of upstream's own
HGNetv2-B0 and ResNet18-vd modules, from `fixtures/upstream/family_models.json.gz`) load strictly, as upstream's
backbones load them; upstream configs name them through `import-config`. The files are written here with seeded
values; nothing is downloaded."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from deim_ray.config.loader import load_config
from deim_ray.config.schema import ModelConfig
from deim_ray.config.upstream import convert_upstream
from deim_ray.models import ModelError, build_model
from deim_ray.models.family_backbones import BACKBONE_FILES
from tests.models.seeded_weights import seeded_state

MODELS = json.loads(gzip.open(Path(__file__).parent / "fixtures" / "upstream" / "family_models.json.gz", "rt").read())
CONFIGS = Path(__file__).parents[1] / "config" / "fixtures" / "upstream_deim"
UPSTREAM = {"dfine": "deim_dfine/deim_hgnetv2_n_coco.yml", "rtdetrv2": "deim_rtdetrv2/deim_r18vd_120e_coco.yml"}


def _upstream_file(tmp_path: Path, family: str, variant: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The backbone of upstream's model of that family as a plain state dict, named as upstream's file."""
    shapes = {k.removeprefix("backbone."): s for k, s in MODELS[UPSTREAM[family]]["shapes"].items()
              if k.startswith("backbone.")}
    state = seeded_state(shapes, 3, {k: torch.tensor(7) for k in shapes if k.endswith("num_batches_tracked")})
    path = tmp_path / BACKBONE_FILES[family][variant]
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("family, variant, pairs", [
    ("dfine", "tiny", [("stem.stem1.conv.weight", "embedder.stem1.convolution.weight"),
                       ("stages.3.blocks.0.layers.2.conv2.lab.scale",
                        "encoder.stages.3.blocks.0.layers.2.conv2.lab.scale"),
                       ("stages.1.downsample.bn.running_var", "encoder.stages.1.downsample.normalization.running_var")]),
    ("rtdetrv2", "r18", [("conv1.conv1_3.norm.weight", "embedder.embedder.2.normalization.weight"),
                         ("res_layers.0.blocks.0.short.conv.weight",
                          "encoder.stages.0.layers.0.shortcut.convolution.weight"),
                         ("res_layers.2.blocks.0.short.conv.conv.weight",
                          "encoder.stages.2.layers.0.shortcut.1.convolution.weight"),
                         ("res_layers.3.blocks.1.branch2b.norm.running_mean",
                          "encoder.stages.3.layers.1.layer.1.normalization.running_mean")]),
])
def test_upstream_backbone_file_loads_every_backbone_tensor(tmp_path, caplog, family, variant, pairs):
    path, state = _upstream_file(tmp_path, family, variant)
    with caplog.at_level("INFO"):
        model = build_model(ModelConfig(family=family, variant=variant, num_queries=30, backbone_pretrained=str(path)),
                            3)
    backbone = [k for k in model.state_dict() if k.startswith("model.backbone.")]
    assert f"loaded {len(backbone)}/{len(backbone)} backbone tensors, 0 kept their initialisation" in caplog.text
    sd = model.state_dict()
    for upstream, ours in pairs:
        assert torch.equal(sd["model.backbone.model." + ours], state[upstream]), upstream


def test_frozen_norms_need_no_counters(tmp_path):
    """The plain baselines freeze the backbone norms (no `num_batches_tracked`): the file's counters stay unused."""
    path, state = _upstream_file(tmp_path, "dfine", "tiny")
    cfg = ModelConfig(family="dfine", variant="tiny", backbone_pretrained=str(path),
                      extra={"freeze_backbone_batch_norms": True})
    model = build_model(cfg, 3)
    assert not any(k.endswith("num_batches_tracked") for k in model.state_dict() if k.startswith("model.backbone."))
    stats = "model.backbone.model.encoder.stages.2.blocks.1.aggregation.0.normalization.running_var"
    assert torch.equal(model.state_dict()[stats], state["stages.2.blocks.1.aggregation.0.bn.running_var"])


def test_file_of_another_backbone_is_refused_with_its_name(tmp_path):
    path, _ = _upstream_file(tmp_path, "rtdetrv2", "r18")
    with pytest.raises(ModelError, match=r"does not fit the dfine tiny backbone \(\d+ file tensors without a place.*"
                                         r"give PPHGNetV2_B0_stage1\.pth \(https://github\.com/Peterande/"):
        build_model(ModelConfig(family="dfine", variant="tiny", backbone_pretrained=str(path)), 3)


def test_missing_file_says_where_to_get_it(tmp_path):
    missing = tmp_path / "ResNet50_vd_ssld_v2_pretrained_from_paddle.pth"
    with pytest.raises(ModelError, match="does not exist; download https://github.com/lyuwenyu/storage/releases/"
                                         "download/v0.1/ResNet50_vd_ssld_v2_pretrained_from_paddle.pth there"):
        build_model(ModelConfig(family="rtdetrv2", variant="r50m", backbone_pretrained=str(missing)), 3)


@pytest.mark.parametrize("rel, path", [
    ("deim_dfine/deim_hgnetv2_m_coco.yml", "../RT-DETR-main/D-FINE/weight/hgnetv2/PPHGNetV2_B2_stage1.pth"),
    ("deim_dfine/dfine_hgnetv2_x_coco.yml", "../RT-DETR-main/D-FINE/weight/hgnetv2/PPHGNetV2_B5_stage1.pth"),
    ("deim_rtdetrv2/deim_r50vd_m_60e_coco.yml",
     "../RT-DETR-main/rtdetrv2_pytorch/INK1k/ResNet50_vd_ssld_v2_pretrained_from_paddle.pth"),
])
def test_import_maps_pretrained_to_upstreams_file(rel, path):
    tree, notes = convert_upstream(CONFIGS / rel)
    assert tree["model"]["backbone_pretrained"] == path
    assert not any("pretrained" in n for n in notes)
    cfg = load_config(CONFIGS / rel)
    assert Path(cfg.model.backbone_pretrained).name == BACKBONE_FILES[cfg.model.family][cfg.model.variant]


def test_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "PPHGNetV2_B0_stage1.pth"
    torch.save([1, 2], path)
    with pytest.raises(ModelError, match="is not a state dict of tensors"):
        build_model(ModelConfig(family="dfine", variant="tiny", backbone_pretrained=str(path)), 3)
