"""model.backbone_pretrained: upstream's `PPHGNetV2_B0_stage1.pth` layout (names and shapes of upstream's HGNetv2-B0,
`fixtures/upstream_hgnetv2_b0_keys.json`, from `fixtures/make_upstream_backbone_keys.py`) loaded with upstream's
rules for each HGNetV2 size; the DINOv3 sizes' ViT files (`vitt_distill.pt`, `vittplus_distill.pt`, the official
DINOv3 ViT-S/16 and S+/16 checkpoints) in the layout of upstream's ViT modules (names and shapes from the state
dicts of upstream's built models, `fixtures/upstream/models.json.gz`). The files are written here with random
values; nothing is downloaded."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from deim_ray.config.loader import load_config
from deim_ray.config.schema import ModelConfig
from deim_ray.models import ModelError, build_model, build_model_config
from deim_ray.models.build import build_from_config
from deim_ray.models.backbone_weights import backbone_note, load_backbone_weights

KEYS = json.loads((Path(__file__).parent / "fixtures" / "upstream_hgnetv2_b0_keys.json").read_text())
MODELS = json.loads(gzip.open(Path(__file__).parent / "fixtures" / "upstream" / "models.json.gz", "rt").read())
HG = "model.conv_encoder.model."
VIT = "model.conv_encoder.backbone."
# size -> (upstream config, where the ViT file's names sit in upstream's model, upstream's file name)
VIT_FILES = {"s": ("dinov3_s", "backbone.dinov3._model.", "vitt_distill.pt"),
             "m": ("dinov3_m", "backbone.dinov3._model.", "vittplus_distill.pt"),
             "l": ("dinov3_l", "backbone.dinov3.", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
             "x": ("dinov3_x", "backbone.dinov3.", "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth")}


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
    with pytest.raises(ModelError, match=r"not supported for DEIMv2-tiny_custom"):
        load_backbone_weights(_build("atto", None), "tiny_custom", str(path))


@pytest.mark.parametrize("size,stem", [("hgnetv2_s", "B0"), ("hgnetv2_m", "B2")])
def test_hgnetv2_s_to_x_take_their_own_file_whole(tmp_path, b0_file, size, stem):
    """Upstream loads `PPHGNetV2_<B>_stage1.pth` strictly for S/M/L/X (names and shapes: upstream's built models)."""
    g = torch.Generator().manual_seed(2)
    state = {k.removeprefix("backbone."): torch.randn(shape, generator=g)
             for k, shape in MODELS[size]["shapes"].items() if k.startswith("backbone.")}
    path = tmp_path / f"PPHGNetV2_{stem}_stage1.pth"
    torch.save(state, path)
    model = _build(size, None)
    report = load_backbone_weights(model, size, str(path))
    assert report.missing == () and report.unused == () and len(report.loaded) == len(state)
    sd = model.state_dict()
    assert torch.equal(sd[HG + "embedder.stem1.convolution.weight"], state["stem.stem1.conv.weight"])
    assert torch.equal(sd[HG + "encoder.stages.2.downsample.normalization.running_var"],
                       state["stages.2.downsample.bn.running_var"])
    if stem != "B0":
        with pytest.raises(ModelError, match=rf"give PPHGNetV2_{stem}_stage1\.pth"):
            load_backbone_weights(model, size, str(b0_file[0]))


def test_backbone_note_only_when_the_backbone_starts_random():
    assert "starts from random weights" in backbone_note("n", None, None)
    assert backbone_note("n", "w.pth", None) is None and backbone_note("n", None, "hub/id") is None
    assert backbone_note("tiny", None, None) is None


def _vit_file(tmp_path: Path, size: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ViT file in upstream's layout for `size`: random values; DINOv3's key-bias mask as in the official files."""
    config, prefix, name = VIT_FILES[size]
    g = torch.Generator().manual_seed(1)
    state = {k.removeprefix(prefix): torch.randn(shape, generator=g)
             for k, shape in MODELS[config]["shapes"].items() if k.startswith(prefix)}
    for key, mask in state.items():
        if key.endswith("qkv.bias_mask"):
            mask.fill_(1)
            mask[mask.numel() // 3: 2 * mask.numel() // 3] = 0
    path = tmp_path / name
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("size", ["s", "m", "l", "x"])
def test_dinov3_sizes_take_every_vit_tensor_of_upstreams_file(tmp_path, size):
    path, state = _vit_file(tmp_path, size)
    model = _build(size, None)
    adapter = "model.conv_encoder.spatial_tuning_adapter.stem_conv.conv.weight"
    adapter_init = model.state_dict()[adapter].clone()
    report = load_backbone_weights(model, size, str(path))
    vit = [k for k in model.state_dict() if k.startswith(VIT)]
    assert len(report.loaded) + len(report.missing) == len(vit) and len(report.loaded) > 100
    # kept at init: the mask token, plus layer scale (fixed at 1) and the empty registers of the ViT-Tiny files
    assert {k.rsplit(".", 1)[-1] for k in report.missing} <= {"mask_token", "lambda1", "register_tokens"}
    assert {k.rsplit(".", 1)[-1] for k in report.unused} <= {"periods", "bias_mask"}
    sd = model.state_dict()
    qkv_w, qkv_b = state["blocks.3.attn.qkv.weight"], state["blocks.3.attn.qkv.bias"]
    layer = VIT + "model.layer.3.attention."
    assert torch.equal(sd[layer + "q_proj.weight"], qkv_w.chunk(3)[0])
    assert torch.equal(sd[layer + "v_proj.bias"], qkv_b.chunk(3)[2])
    key_bias = qkv_b.chunk(3)[1] * (0 if size in ("l", "x") else 1)  # the official files mask it to zero
    assert torch.equal(sd[layer + "k_proj.bias"], key_bias)
    assert torch.equal(sd[VIT + "embeddings.patch_embeddings.weight"], state["patch_embed.proj.weight"])
    if size in ("l", "x"):
        assert torch.equal(sd[VIT + "model.layer.0.layer_scale1.lambda1"], state["blocks.0.ls1.gamma"])
        assert torch.equal(sd[VIT + "embeddings.register_tokens"], state["storage_tokens"])
    assert torch.equal(sd[adapter], adapter_init)  # upstream loads the ViT only


def test_model_backbone_pretrained_loads_a_vit_file_and_says_so(tmp_path, caplog):
    path, state = _vit_file(tmp_path, "s")
    with caplog.at_level("INFO", logger="deim_ray"):
        model = _build("s", path)
    assert f"backbone weights {path}: loaded 195/221 backbone tensors, 26 kept their initialisation" in caplog.text
    assert torch.equal(model.state_dict()[VIT + "embeddings.cls_token"], state["cls_token"])


def test_vit_files_that_do_not_fit_are_one_line_errors(tmp_path):
    """A misfit is refused before anything is loaded, so models on the meta device show every case fast."""
    path_l, state_l = _vit_file(tmp_path, "l")
    with pytest.raises(ModelError, match=r"tensors with another shape: .*cls_token \(1, 1, 384\) vs \(1, 1, 192\)"
                                         r".*give vitt_distill\.pt"):
        _build("s", path_l)
    meta = {}
    for size in ("x", "l"):
        with torch.device("meta"):
            meta[size] = build_from_config(build_model_config(ModelConfig(variant=size), 3))
    with pytest.raises(ModelError, match=r"model tensors the checkpoint does not provide: .*layer\.0\.mlp\.gate_proj"):
        load_backbone_weights(meta["x"], "x", str(path_l))  # ViT-S+ has a SwiGLU FFN (w1/w2/w3), ViT-S fc1/fc2
    extra = tmp_path / "extra.pth"
    torch.save(dict(state_l, **{"head.weight": torch.zeros(3)}), extra)
    with pytest.raises(ModelError, match=r"no deim_ray counterpart: backbone\.dinov3\.head\.weight"):
        load_backbone_weights(meta["l"], "l", str(extra))
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state_l.items() if not k.startswith("blocks.11.")}, partial)
    with pytest.raises(ModelError, match=r"model tensors the checkpoint does not provide: .*layer\.11\."):
        load_backbone_weights(meta["l"], "l", str(partial))
    with pytest.raises(ModelError, match=r"absent\.pt does not exist; get vittplus_distill\.pt from https://"):
        load_backbone_weights(meta["l"], "m", str(tmp_path / "absent.pt"))


def test_shipped_dinov3_configs_name_upstreams_files():
    for size, (_, _, name) in VIT_FILES.items():
        cfg = load_config(Path(__file__).parents[2] / "configs" / "deimv2" / f"deimv2_dinov3_{size}_coco.yml")
        assert cfg.model.backbone_pretrained == f"./ckpts/{name}"
