"""`deim-ray export --format onnx`: the exported graph (postprocessing inside) computes what the PyTorch model
computes, run with onnxruntime on the same images at another batch size than it was traced with."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deim_ray.cli.main import main
from deim_ray.models import make_final_checkpoint
from deim_ray.models.inference import Detector
from deim_ray.models.onnx_export import INPUTS, OUTPUTS

from .conftest import matched_box_error

NAMES, IDS = ["rectangle-0", "ellipse-1", "triangle-2"], [1, 3, 5]


@pytest.fixture
def final_path(tmp_path, tiny_model, tiny_cfg):
    with torch.no_grad():  # away from the init, so that weights (not the init) are what is compared
        for p in tiny_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "final.pth"
    torch.save(make_final_checkpoint(tiny_model.state_dict(), tiny_cfg, 3, IDS, NAMES, (160, 192),
                                     {"normalize": False, "ap": 0.25, "epoch": 7}), path)
    return path


def test_onnx_matches_pytorch_on_boxes_scores_and_labels(tmp_path, final_path):
    out = tmp_path / "model.onnx"
    assert main(["export", str(final_path), "--format", "onnx", "-o", str(out), "--dynamic-batch"]) == 0
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == NAMES and json.loads(meta["category_ids"]) == IDS
    assert json.loads(meta["preprocess"])["size_hw"] == [160, 192] and json.loads(meta["source"])["ap"] == 0.25
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(INPUTS)
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)

    detector = Detector.from_final(final_path)
    torch.manual_seed(1)
    images = torch.rand(3, 3, 160, 192)
    sizes = torch.tensor([[640, 480], [97, 203], [192, 160]])  # (width, height) of the original images
    with torch.no_grad():
        expected = [t.numpy() for t in detector.deployable(images, sizes)]
    got = session.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    assert got[0].shape == expected[0].shape == (3, 90)  # 30 queries x 3 classes
    for k in range(3):
        labels_o, boxes_o, scores_o = (a[k] for a in got)
        labels_t, boxes_t, scores_t = (a[k] for a in expected)
        assert sorted(labels_o.tolist()) == sorted(labels_t.tolist())
        np.testing.assert_allclose(np.sort(scores_o), np.sort(scores_t), atol=1e-5)
        assert matched_box_error((labels_o, boxes_o, scores_o), (labels_t, boxes_t, scores_t)) <= 1e-3
        assert boxes_o[:, [0, 2]].max() <= sizes[k, 0] * 1.5  # pixels of the original image, not normalised


def test_export_refuses_to_overwrite_without_force(tmp_path, final_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    assert main(["export", str(final_path), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
