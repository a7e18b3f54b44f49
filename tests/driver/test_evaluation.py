"""`deim-ray eval` on this machine: the JSON and console report of a final.pth on a val split, its per-class
rows against the annotation file, the confusion matrix, the plots, and one-line errors for what a user can fix. (That it
reproduces a trained run's AP, in PyTorch and in ONNX, is checked on a finished run in test_two_stage.py.)"""

import json

import pytest
import torch

from deim_ray.cli.main import main
from deim_ray.config.schema import ModelConfig, SyntheticConfig
from deim_ray.data.synthetic import generate_shapes
from deim_ray.engine.evaluator import COCO_STAT_NAMES
from deim_ray.models import build_model, make_final_checkpoint

from tests.driver.conftest import TINY, data_overrides

IDS, NAMES = [1, 3, 5], ["rectangle-0", "ellipse-1", "triangle-2"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "shapes"
    generate_shapes(root, SyntheticConfig(num_train=1, num_val=6, image_size=96, num_classes=3, seed=2))
    return root


@pytest.fixture(scope="module")
def final_path(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(variant="tiny")
    path = tmp_path_factory.mktemp("model") / "final.pth"
    torch.save(make_final_checkpoint(build_model(cfg, 3).state_dict(), cfg, 3, IDS, NAMES, (160, 160),
                                     {"normalize": False}), path)
    return path


def test_eval_reports_stats_and_per_class_rows_of_the_val_split(shapes, final_path, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(final_path), "--data", str(shapes), "--device", "cpu", "--batch-size", "4",
                 "-o", str(out), "--plots", str(tmp_path / "plots")]) == 0
    console = capsys.readouterr().out
    doc = json.loads(out.read_text())
    ann = json.loads((shapes / "annotations" / "val.json").read_text())
    assert list(doc["stats"]) == list(COCO_STAT_NAMES) and doc["images"] == 6
    assert doc["preprocess"]["size_hw"] == [160, 160]
    for row, cat in zip(doc["per_class"], ann["categories"]):
        boxes = [a for a in ann["annotations"] if a["category_id"] == cat["id"]]
        assert (row["name"], row["category_id"]) == (cat["name"], cat["id"])
        assert (row["instances"], row["images"]) == (len(boxes), len({a["image_id"] for a in boxes}))
        line = next(line for line in console.splitlines() if line.startswith(cat["name"] + " "))
        assert line.split()[-2:] == [str(len(boxes)), str(len({a["image_id"] for a in boxes}))]
    assert len(doc["per_class"]) == 3 and "class" in console and "AR100" in console
    confusion = doc["confusion_matrix"]
    assert confusion["labels"] == [*NAMES, "background"] and (confusion["iou"], confusion["score"]) == (0.5, 0.25)
    for row, cls in zip(confusion["counts"], doc["per_class"]):  # each true box: claimed once or missed
        assert sum(row) == cls["instances"]
    for name in ("pr_curves.png", "confusion_matrix.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def _with_extra_category(shapes, tmp_path):
    """A copy of the val split whose annotation file lists a category the model was never trained on."""
    root = tmp_path / "other"
    (root / "annotations").mkdir(parents=True)
    (root / "val").symlink_to(shapes / "val")
    (root / "train").symlink_to(shapes / "train")  # a dataset folder has both splits (`detect_layout`)
    (root / "annotations" / "train.json").write_text((shapes / "annotations" / "train.json").read_text())
    ann = json.loads((shapes / "annotations" / "val.json").read_text())
    ann["categories"].append({"id": 99, "name": "unicorn"})
    (root / "annotations" / "val.json").write_text(json.dumps(ann))
    return root


@pytest.mark.parametrize("case", ["no-val-split", "update-without-config", "missing-onnx", "unknown-category",
                                  "bad-image-size", "no-data"])
def test_eval_refuses_what_a_user_can_fix_in_one_line(case, shapes, final_path, tmp_path, capsys):
    model, data = str(final_path), ["--data", str(shapes)]
    expected = {"no-val-split": "is in no dataset layout", "update-without-config": "pass -c CONFIG",
                "missing-onnx": "does not exist", "unknown-category": "not trained on",
                "bad-image-size": "not a multiple of 32", "no-data": "one of the arguments --data -c"}[case]
    if case == "no-val-split":
        data = ["--data", str(tmp_path)]
    elif case == "update-without-config":
        data += ["-u", "data.image_size=[96,96]"]
    elif case == "missing-onnx":
        model = str(tmp_path / "missing.onnx")
    elif case == "unknown-category":
        data = ["--data", str(_with_extra_category(shapes, tmp_path))]
    elif case == "bad-image-size":
        data += ["--image-size", "100"]
    elif case == "no-data":
        data = []
    assert main(["-q", "eval", model, *data, "-o", str(tmp_path / "r.json")]) == 2  # -q: no data report
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deim-ray: error:") and expected in err[0], err
    assert not (tmp_path / "r.json").exists()


def test_eval_of_a_configs_val_split_generates_it_as_training_would(final_path, tmp_path):
    root = tmp_path / "tiny"
    out = tmp_path / "r.json"
    assert main(["-q", "eval", str(final_path), "-c", TINY, "-u", *data_overrides(root), "--device", "cpu",
                 "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["images"] == 12 and doc["data"]["ann_file"] == str(root / "annotations" / "val.json")
