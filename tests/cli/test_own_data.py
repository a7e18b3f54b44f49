"""A user's own dataset through the real command line (`main`, in process): `info` and `train` with `--data DIR
--model NAME` on each layout, the schedule fitted to the data, and each mistake a user makes with a folder refused
in one line before Ray starts, by `train` and `info` alike. The training itself on `--data` runs in the CLI's
end-to-end test (tests/driver); here nothing trains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import ray

from deim_ray.cli.main import main
from deim_ray.config.loader import load_config
from deim_ray.config.schema import SyntheticConfig
from deim_ray.data.layout_writer import write_layout
from deim_ray.data.synthetic import generate_shapes
from deim_ray.driver.run import RunRequest, open_run
from deim_ray.driver.shortcuts import fresh_name
from deim_ray.storage import RunState, RunStore, open_storage

ROOT = Path(__file__).resolve().parents[2]
MODEL_ARGS = ["--model", "deimv2-atto", "--epochs", "15", "--image-size", "160", "--backbone-weights", "none"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own_data") / "shapes"
    generate_shapes(root, SyntheticConfig(num_train=40, num_val=8, image_size=64, num_classes=3, max_objects=3))
    return root


def _layout(shapes: Path, tmp: Path, layout: str) -> Path:
    from deim_ray.data.synthetic import synthetic_splits

    train, val = synthetic_splits(shapes)
    write_layout(train, val, layout, tmp / layout)
    return tmp / layout


@pytest.mark.parametrize("layout, title", [("yolo", "YOLO"), ("voc", "Pascal VOC"), ("coco-export", "COCO")])
def test_info_on_a_folder_prints_the_fitted_schedule(layout, title, shapes, tmp_path, capsys):
    data = _layout(shapes, tmp_path, layout)
    assert main(["info", "--data", str(data), *MODEL_ARGS, "--no-loader"]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert f"{title}" in out + err and "train 40 images" in out
    assert "model: DEIMv2-atto (3 classes)" in out  # the dataset's classes, not COCO's 80
    # DEIMv2-Atto's COCO batch of 128 would give no step on 40 images: fitted, with why
    assert re.search(r"data.total_batch_size = 2 \(fitted to the data, configured 128", out), out
    assert "lr_scheduler.warmup_iter = " in out and "ema.decay = " in out and "warning:" not in out
    assert "epochs: 15" in out and "image_size: 160x160   total_batch_size: 2" in out


def _yolo_line(edit):
    def make(data: Path) -> None:
        label = sorted((data / "labels" / "train").glob("*.txt"))[0]
        label.write_text(edit(label.read_text()))
    return make


def _voc_without_size(data: Path) -> None:
    xml = sorted((data / "Annotations").glob("train_*.xml"))[0]
    xml.write_text(re.sub(r"<size>.*?</size>", "", xml.read_text(), flags=re.S))


def _val_class_not_in_train(data: Path) -> None:
    for label in (data / "labels" / "train").glob("*.txt"):
        label.write_text("".join(line + "\n" for line in label.read_text().splitlines() if not line.startswith("2 ")))


FOLDER_CASES = [
    ("yolo-line-with-4-numbers", "yolo", _yolo_line(lambda t: "0 0.5 0.5 0.2\n" + t), ["4 numbers", ".txt"]),
    ("yolo-class-id-beyond-names", "yolo", _yolo_line(lambda t: "7 0.5 0.5 0.2 0.2\n" + t), ["7", "names"]),
    ("voc-xml-without-size", "voc", _voc_without_size, ["<size>", ".xml"]),
    ("val-class-not-in-train", "yolo", _val_class_not_in_train, ["val", "train"]),
    ("not-a-dataset-folder", "yolo", lambda d: [p.unlink() for p in d.glob("data.y*ml")], ["no dataset layout", "YOLO"]),
]


def _refusals(argv: list[str], capsys) -> str:
    """Run `train` then `info` with `argv`'s model arguments: both exit 2 with the same single line, no Ray."""
    lines, ray_before = [], ray.is_initialized()
    for command in (["train", "--storage", str(Path(argv[0]).parent / "runs")], ["info", "--no-loader"]):
        capsys.readouterr()
        assert main([*command, "--data", *argv]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("deim-ray: error:")]
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
        lines.append(errors[0])
    assert lines[0] == lines[1]
    assert ray.is_initialized() == ray_before, "the error came after Ray was started"
    return lines[0]


@pytest.mark.parametrize("layout, edit, words", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_folder_mistakes_are_one_line_before_ray(layout, edit, words, shapes, tmp_path, capsys):
    data = _layout(shapes, tmp_path, layout)
    edit(data)
    line = _refusals([str(data), *MODEL_ARGS], capsys)
    for word in words:
        assert word in line, (word, line)


def test_missing_backbone_file_and_too_small_images_are_one_line_before_ray(shapes, tmp_path, capsys,
                                                                             monkeypatch):
    data = _layout(shapes, tmp_path, "coco-export")
    monkeypatch.chdir(tmp_path)  # the shipped config names ./weight/hgnetv2/PPHGNetV2_B0_stage1.pth
    line = _refusals([str(data), "--model", "deimv2-atto", "--epochs", "15", "--image-size", "160"], capsys)
    assert "PPHGNetV2_B0_stage1.pth does not exist" in line and "download" in line
    line = _refusals([str(data), *MODEL_ARGS[:4], "--image-size", "64", "--backbone-weights", "none",
                      "-u", "model.num_queries=300"], capsys)
    assert "64x64 gives" in line and "num_queries=300" in line


def test_queries_follow_a_small_image_size(shapes, tmp_path, capsys):
    """DEIMv2-N has 300 queries; 160 px images give 125 encoder tokens: the queries follow the size."""
    data = _layout(shapes, tmp_path, "yolo")
    args = ["--data", str(data), "--model", "deimv2-n", "--epochs", "15", "--image-size", "160",
            "--backbone-weights", "none", "--no-loader"]
    assert main(["info", *args]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert "model.num_queries = 125" in out + err


def test_a_run_without_name_is_named_after_its_model_and_never_trains_over_a_finished_one(shapes, tmp_path):
    cfg = load_config(ROOT / "configs" / "demo" / "tiny.yml")
    storage = str(tmp_path / "runs")
    assert fresh_name(storage, cfg, "deimv2-atto") == "deimv2-atto"
    store = RunStore(open_storage(storage), "deimv2-atto")
    open_run(RunRequest(cfg=cfg, storage_uri=storage, name="deimv2-atto"), store)
    assert fresh_name(storage, cfg, "deimv2-atto") == "deimv2-atto"  # unfinished: the same command continues it
    manifest = json.loads((tmp_path / "runs" / "deimv2-atto" / "manifest.json").read_text())
    manifest["state"] = RunState.DONE.value
    (tmp_path / "runs" / "deimv2-atto" / "manifest.json").write_text(json.dumps(manifest))
    assert fresh_name(storage, cfg, "deimv2-atto") == "deimv2-atto-2"


@pytest.mark.parametrize("layout", ["yolo", "voc"])
def test_eval_and_predict_read_the_val_split_of_any_layout(layout, shapes, tmp_path, capsys):
    """`eval --data` and `predict --data` find the val split of the folders `train --data` reads (a model with
    fresh weights: the numbers are near zero, the path through the layout is what is checked)."""
    import torch

    from deim_ray.data.annotations import read_split
    from deim_ray.data.layouts import detect_layout
    from deim_ray.models.build import build_model
    from deim_ray.models.export import make_final_checkpoint

    data = _layout(shapes, tmp_path, layout)
    raw = read_split(detect_layout(str(data)).val)
    ids = [c["id"] for c in raw["categories"]]
    cfg = load_config(ROOT / "configs" / "demo" / "tiny.yml")
    final = make_final_checkpoint(build_model(cfg.model, len(ids)).state_dict(), cfg.model, len(ids), ids,
                                  [c["name"] for c in raw["categories"]], (96, 96), {"normalize": False})
    torch.save(final, tmp_path / "final.pth")
    out_json = tmp_path / "results.json"
    assert main(["eval", str(tmp_path / "final.pth"), "--data", str(data), "-o", str(out_json)]) == 0, \
        capsys.readouterr().err
    report = json.loads(out_json.read_text())
    assert [row["name"] for row in report["per_class"]] == [c["name"] for c in raw["categories"]]
    assert sum(row["instances"] for row in report["per_class"]) == len(raw["annotations"])
    assert main(["predict", str(tmp_path / "final.pth"), "--data", str(data), "-o", str(tmp_path / "p")]) == 0
    detections = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert {d["image_id"] for d in detections} <= {im["id"] for im in raw["images"]}


def test_fine_tuning_needs_no_backbone_file(shapes, tmp_path, capsys, monkeypatch):
    """`--pretrained` holds the whole model: the config's ImageNet backbone file is not asked for (the run would
    otherwise stop on a file it does not use)."""
    import torch

    from deim_ray.config.shipped import model_config
    from deim_ray.models.build import build_model

    data = _layout(shapes, tmp_path, "yolo")
    monkeypatch.chdir(tmp_path)  # where the config's ./weight/hgnetv2/PPHGNetV2_B0_stage1.pth is not
    cfg = load_config(model_config("deimv2-atto"), ["model.backbone_pretrained=null"])
    torch.save(build_model(cfg.model, 3).state_dict(), tmp_path / "weights.pth")
    args = ["--data", str(data), "--model", "deimv2-atto", "--epochs", "15", "--image-size", "160", "--no-loader"]
    assert main(["info", *args, "--pretrained", str(tmp_path / "weights.pth")]) == 0, capsys.readouterr().err
    assert main(["info", *args]) == 2  # without --pretrained the backbone file is needed
    assert "PPHGNetV2_B0_stage1.pth does not exist" in capsys.readouterr().err
