"""Upstream DEIM's D-FINE and RT-DETRv2 configs (ShihuaHuang95/DEIM `configs/deim_dfine/`, `configs/deim_rtdetrv2/`,
copied under fixtures/upstream_deim) load, build upstream's parameter count, and match the shipped configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from deim_ray.config.loader import load_config
from deim_ray.config.upstream import convert_upstream, write_converted
from deim_ray.driver.info import describe_config
from deim_ray.engine.optim import build_param_groups
from deim_ray.models import build_model_config, count_parameters
from deim_ray.models.build import build_from_config

ROOT = Path(__file__).parent / "fixtures" / "upstream_deim"
REFERENCE = json.loads((Path(__file__).parents[1] / "models" / "fixtures" / "family_params.json").read_text())
CONFIGS = sorted(REFERENCE["params"])
SHIPPED = {"deim_dfine": "configs/dfine", "deim_rtdetrv2": "configs/rtdetrv2"}
VARIANT = {"hgnetv2_n": "n", "hgnetv2_s": "s", "hgnetv2_m": "m", "hgnetv2_l": "l", "hgnetv2_x": "x",
           "r18vd": "r18", "r34vd": "r34", "r50vd_m": "r50m", "r50vd_6": "r50", "r50vd_60": "r50", "r101vd": "r101"}


def _expected_variant(rel: str) -> str:
    return next(v for key, v in VARIANT.items() if key in rel)


def test_every_upstream_family_config_is_covered():
    assert len(CONFIGS) == 22
    found = {str(p.relative_to(ROOT)) for d in SHIPPED for p in (ROOT / d).rglob("*.yml")}
    assert found == set(CONFIGS)


@pytest.mark.parametrize("rel", CONFIGS)
def test_upstream_config_builds_upstreams_parameter_count_and_is_shipped(rel):
    cfg = load_config(ROOT / rel)
    assert cfg.model.family == ("dfine" if rel.startswith("deim_dfine") else "rtdetrv2")
    assert cfg.model.variant == _expected_variant(rel)
    with torch.device("meta"):  # no weights, and no backbone file read
        model = build_from_config(build_model_config(cfg.model, REFERENCE["num_classes"]))
    got, want = count_parameters(model), REFERENCE["params"][rel]
    assert abs(got / want - 1) <= 0.005, f"{rel}: {got} vs upstream {want}"
    build_param_groups(model, cfg.optimizer)  # the translated groups are exclusive, as upstream asserts
    family_dir, *rest = Path(rel).parts
    shipped = load_config(Path(SHIPPED[family_dir], *rest))
    data = dataclasses.replace(cfg.data, train=shipped.data.train, val=shipped.data.val)
    # the same backbone file, in deim_ray's ./weight/ folder instead of the upstream authors' local_model_dir
    assert Path(cfg.model.backbone_pretrained).name == Path(shipped.model.backbone_pretrained).name
    assert shipped.model.backbone_pretrained.startswith("./weight/")
    model_cfg = dataclasses.replace(cfg.model, backbone_pretrained=shipped.model.backbone_pretrained)
    assert dataclasses.replace(cfg, data=data, model=model_cfg, source="") == dataclasses.replace(shipped, source="")


def test_recipes_differ_as_upstream_says():
    deim = convert_upstream(ROOT / "deim_rtdetrv2/deim_r50vd_60e_coco.yml")[0]["model"]
    plain = convert_upstream(ROOT / "deim_rtdetrv2/rtdetrv2_r50vd_6x_coco.yml")[0]["model"]
    assert deim == {"family": "rtdetrv2", "variant": "r50", "focal_loss_gamma": 1.5, "backbone_pretrained":
                    "../RT-DETR-main/rtdetrv2_pytorch/INK1k/ResNet50_vd_ssld_v2_pretrained_from_paddle.pth"}
    assert plain["losses"] == ["vfl", "boxes"] and plain["focal_loss_gamma"] == 2.0
    assert plain["extra"] == {"freeze_backbone_batch_norms": True, "freeze_stem": True,
                              "decoder_activation_function": "relu", "mlp_act": "relu", "query_pos_method": "default"}
    tree, notes = convert_upstream(ROOT / "deim_rtdetrv2/rtdetrv2_r50vd_m_7x_coco.yml")
    assert tree["model"]["decoder_layers"] == 6
    assert any(n.startswith("RTDETRTransformerv2.eval_idx=2") for n in notes)


@pytest.mark.parametrize("rel, section, keys, stem, stages", [
    ("deim_rtdetrv2/rtdetrv2_r50vd_6x_coco.yml", "PResNet", {"freeze_at": 2}, True, 2),
    ("deim_dfine/dfine_hgnetv2_x_coco.yml", "HGNetv2", {"freeze_at": 1, "freeze_stem_only": False}, True, 2),
    ("deim_dfine/dfine_hgnetv2_x_coco.yml", "HGNetv2", {"freeze_at": 1}, True, 0),
    ("deim_dfine/dfine_hgnetv2_x_coco.yml", "HGNetv2", {"freeze_at": -1}, False, 0),
])
def test_freeze_at_keeps_upstreams_frozen_backbone_layers_out_of_training(tmp_path, rel, section, keys, stem, stages):
    """HGNetv2 freezes its stem and, unless `freeze_stem_only` (its default), stages 0..freeze_at; PResNet its
    stem and the first `freeze_at` stages."""
    config = tmp_path / "frozen.yml"
    config.write_text(yaml.safe_dump({"__include__": [str(ROOT / rel)], section: keys}))
    extra = convert_upstream(config)[0]["model"]["extra"]
    assert extra.get("freeze_stem", False) == stem and extra.get("freeze_stages", 0) == stages
    cfg = load_config(config, ["model.backbone_pretrained=null"])
    with torch.device("meta"):
        model = build_from_config(build_model_config(cfg.model, 80))
    backbone = model.model.backbone.model
    assert all(p.requires_grad != stem for p in backbone.embedder.parameters())
    for i, stage in enumerate(backbone.encoder.stages):
        assert all(p.requires_grad == (i >= stages) for p in stage.parameters())


def test_param_groups_follow_upstreams_names():
    """deim_hgnetv2_s: backbone minus its batch norms at the backbone LR; every norm without weight decay."""
    cfg = load_config(ROOT / "deim_dfine/deim_hgnetv2_s_coco.yml")
    with torch.device("meta"):
        model = build_from_config(build_model_config(cfg.model, 80))
    backbone, norms, rest = build_param_groups(model, cfg.optimizer)
    assert backbone["lr"] == 0.0002 and all(n.startswith("model.backbone.") for n in backbone["names"])
    assert not any("normalization" in n for n in backbone["names"])
    assert any(n.endswith(".lab.scale") for n in backbone["names"])
    assert norms["weight_decay"] == 0.0 and "model.enc_output.1.weight" in norms["names"]
    assert any(n.startswith("model.backbone.") for n in norms["names"])
    assert not any("norm" in n for n in rest["names"] if not n.startswith("model.enc_output"))


def test_import_config_writes_a_loadable_file_and_info_names_the_family(tmp_path):
    out = tmp_path / "r18.yml"
    write_converted(ROOT / "deim_rtdetrv2/deim_r18vd_120e_coco.yml", out)
    assert out.read_text().startswith("# converted from upstream DEIM-family config")
    cfg = load_config(out)
    text = describe_config(cfg)
    assert text.splitlines()[0] == "model: RT-DETRv2-r18 (80 classes)"
    assert f"parameters: {REFERENCE['params']['deim_rtdetrv2/deim_r18vd_120e_coco.yml']}" in text
