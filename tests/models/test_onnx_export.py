"""`deim-ray export --format onnx`: the exported graph (postprocessing inside) computes what the PyTorch model
computes, run with onnxruntime on the same images at another batch size than it was traced with; so do
`OnnxDetector` (what `deim-ray eval MODEL.onnx` runs) and the README's ONNX Runtime example."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from deim_ray.cli.main import main
from deim_ray.models import make_final_checkpoint
from deim_ray.models.inference import Detector, load_rgb
from deim_ray.models.onnx_export import INPUTS, OUTPUTS
from deim_ray.models.onnx_runtime import OnnxDetector

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


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_onnx_example() -> str:
    """The README's ONNX Runtime example: the python block of "Using the model" that opens an InferenceSession."""
    section = README.read_text().split("## Using the model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return next(b for b in blocks if "InferenceSession" in b)


@pytest.fixture
def photo(tmp_path):
    """An RGB photo of another size and shape than the model's input, so the resize matters."""
    rng = np.random.default_rng(3)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (211, 317, 3), dtype=np.uint8)).save(path, quality=95)
    return path


def test_readme_onnx_example_computes_what_the_detector_computes(tmp_path, final_path, photo, monkeypatch, capsys):
    assert main(["export", str(final_path), "-o", str(tmp_path / "demo.onnx")]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    namespace: dict = {}
    exec(compile(_readme_onnx_example(), "README.md", "exec"), namespace)
    expected = Detector.from_final(final_path).detect([load_rgb(photo)])[0]
    got = (namespace["labels"][0], namespace["boxes"][0], namespace["scores"][0])
    np.testing.assert_allclose(np.sort(got[2]), np.sort(expected["scores"].numpy()), atol=1e-4)
    assert matched_box_error(got, tuple(expected[k].numpy() for k in ("labels", "boxes", "scores"))) <= 1e-2
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == int((got[2] >= 0.5).sum())


def test_onnx_detector_runs_the_export_as_the_pytorch_detector(tmp_path, final_path, photo):
    assert main(["export", str(final_path), "-o", str(tmp_path / "m.onnx")]) == 0
    onnx_detector = OnnxDetector(tmp_path / "m.onnx")
    assert onnx_detector.category_ids == IDS and onnx_detector.class_names == NAMES
    assert onnx_detector.fixed_batch == 1
    images = [load_rgb(photo), Image.new("RGB", (90, 60), (200, 30, 30))]
    for got, want in zip(onnx_detector.detect(images, 0.0), Detector.from_final(final_path).detect(images)):
        torch.testing.assert_close(torch.sort(got["scores"]).values, torch.sort(want["scores"]).values, atol=1e-5,
                                   rtol=0)
        as_numpy = [tuple(d[k].numpy() for k in ("labels", "boxes", "scores")) for d in (got, want)]
        assert matched_box_error(*as_numpy) <= 1e-3
