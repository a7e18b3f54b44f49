"""model.backbone_pretrained: upstream's `PPHGNetV2_B0_stage1.pth` layout (names and shapes of upstream's HGNetv2-B0,
`fixtures/upstream_hgnetv2_b0_keys.json`, from `fixtures/make_upstream_backbone_keys.py`) loaded with upstream's
rules for each HGNetV2 size. The files are written here with random values; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deim_ray.config.schema import ModelConfig
from deim_ray.models import ModelError, build_model
from deim_ray.models.backbone_weights import backbone_note, load_backbone_weights

KEYS = json.loads((Path(__file__).parent / "fixtures" / "upstream_hgnetv2_b0_keys.json").read_text())
HG = "model.conv_encoder.model."


@pytest.fixture(scope="module")
def b0_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randint(0, 100, shape, generator=g) if k.endswith("num_batches_tracked")
                 else torch.randn(shape, generator=g)) for k, shape in KEYS.items()}
    path = tmp_path_factory.mktemp("weight") / "PPHGNetV2_B0_stage1.pth"
    torch.save(state, path)
    return path, state


def _build(variant: str, path) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(variant=variant, backbone_pretrained=None if path is None else str(path)), 3)


def test_n_takes_every_backbone_tensor_of_b0(b0_file):
    path, state = b0_file
    model = _build("n", None)
    report = load_backbone_weights(model, "n", str(path))
    backbone = [k for k in model.state_dict() if k.startswith(HG)]
    assert len(report.loaded) == len(backbone) == len(KEYS) and report.missing == () and report.unused == ()
    sd = model.state_dict()
    for upstream, ours in [("stem.stem1.conv.weight", "embedder.stem1.convolution.weight"),
                           ("stem.stem2a.bn.running_var", "embedder.stem2a.normalization.running_var"),
                           ("stem.stem1.lab.scale", "embedder.stem1.lab.scale"),
                           ("stages.1.downsample.conv.weight", "encoder.stages.1.downsample.convolution.weight"),
                           ("stages.0.blocks.0.aggregation.1.bn.bias",
                            "encoder.stages.0.blocks.0.aggregation.1.normalization.bias"),
                           ("stages.3.blocks.0.layers.2.conv2.conv.weight",
                            "encoder.stages.3.blocks.0.layers.2.conv2.convolution.weight")]:
        assert torch.equal(sd[HG + ours], state[upstream]), upstream


def test_atto_takes_what_fits_and_keeps_the_rest(b0_file):
    """Upstream's Atto rule: every tensor of the same name AND shape (its last stage is narrower than B0's)."""
    path, state = b0_file
    fresh, model = _build("atto", None), _build("atto", path)
    report = load_backbone_weights(_build("atto", None), "atto", str(path))
    assert 0 < len(report.missing) < len(report.loaded)
    assert any(k.startswith("stages.3.") for k in report.unused)
    sd, init = model.state_dict(), fresh.state_dict()
    assert torch.equal(sd[HG + "embedder.stem1.convolution.weight"], state["stem.stem1.conv.weight"])
    assert all(torch.equal(sd[k], init[k]) for k in report.missing)
    assert not any(k.startswith(HG) for k in set(sd) - set(report.loaded) - set(report.missing)
                   if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("variant", ["femto", "pico"])
def test_femto_and_pico_take_b0_by_name(b0_file, variant):
    path, state = b0_file
    report = load_backbone_weights(_build(variant, None), variant, str(path))
    assert report.loaded and report.missing == ()
    broken = dict(state, **{"stages.2.downsample.conv.weight": torch.zeros(1, 1, 3, 3)})
    bad = path.with_name(f"broken_{variant}.pth")
    torch.save(broken, bad)
    with pytest.raises(ModelError, match=r"stages\.2\.downsample\.convolution\.weight \(1, 1, 3, 3\) in the file"):
        load_backbone_weights(_build(variant, None), variant, str(bad))


def test_unusable_sources_are_one_line_errors(b0_file, tmp_path):
    path, state = b0_file
    with pytest.raises(ModelError, match=r"does not exist; download .*B0_stage1\.pth.*backbone_pretrained: null"):
        _build("n", tmp_path / "absent.pth")
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("stages.3.")}, partial)
    with pytest.raises(ModelError, match=r"not an HGNetV2-B0 backbone file for DEIMv2-n"):
        _build("n", partial)  # N (B0) needs every backbone tensor, as upstream's strict load
    with pytest.raises(ModelError, match="not supported for DEIMv2-s yet"):
        build_model(ModelConfig(variant="s", backbone_pretrained=str(path)), 3)


def test_backbone_note_only_when_the_backbone_starts_random():
    assert "starts from random weights" in backbone_note("n", None, None)
    assert backbone_note("n", "w.pth", None) is None and backbone_note("n", None, "hub/id") is None
    assert backbone_note("tiny", None, None) is None
