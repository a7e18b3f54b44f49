"""`deim-ray predict` on a final artifact: any size, EXIF-rotated, grayscale and RGBA images; COCO results with
the dataset's own category ids (and image ids with --data); drawn images under their own names; no silent
overwrite."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deim_ray.cli.main import main
from deim_ray.config.schema import SyntheticConfig
from deim_ray.data.synthetic import generate_shapes
from deim_ray.models import make_final_checkpoint
from deim_ray.models.inference import Detector, load_rgb

from .conftest import matched_box_error

IDS = [1, 3, 5]


@pytest.fixture
def final_path(tmp_path, tiny_model, tiny_cfg):
    path = tmp_path / "final.pth"
    torch.save(make_final_checkpoint(tiny_model.state_dict(), tiny_cfg, 3, IDS, ["a", "b", "c"], (160, 160),
                                     {"normalize": False}), path)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rotated = Image.fromarray(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8))  # stored 200 wide x 120 high
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": upright it is 120 wide x 200 high
    rotated.save(folder / "a_rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 255, (75, 333), dtype=np.uint8), "L").save(folder / "b_gray.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / "c_rgba.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_load_rgb_applies_exif_orientation_and_makes_rgb(images):
    upright = load_rgb(images / "a_rotated.jpg")
    assert upright.size == (120, 200) and upright.mode == "RGB"
    assert load_rgb(images / "b_gray.png").mode == "RGB" and load_rgb(images / "c_rgba.png").mode == "RGB"


def test_predict_writes_coco_results_and_drawn_images(tmp_path, final_path, images, capsys):
    out = tmp_path / "pred"
    extra = tmp_path / "big.jpg"
    Image.new("RGB", (1000, 700), (90, 120, 200)).save(extra)
    assert main(["predict", str(final_path), str(images), str(extra), "-o", str(out), "--score", "0",
                 "--batch-size", "3"]) == 0
    assert "detections.json" in capsys.readouterr().out
    results = json.loads((out / "detections.json").read_text())
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    assert sorted(by_image) == [1, 2, 3, 4]  # the folder's 3 images in name order, then big.jpg
    assert by_image[1][0]["file_name"].endswith("a_rotated.jpg") and by_image[4][0]["file_name"] == str(extra)
    assert {r["category_id"] for r in results} <= set(IDS)
    sizes = {1: (120, 200), 2: (333, 75), 3: (64, 64), 4: (1000, 700)}
    for image_id, rows in by_image.items():
        w, h = sizes[image_id]
        assert len(rows) == 90 and rows == sorted(rows, key=lambda r: -r["score"])
        xs = [r["bbox"][0] + r["bbox"][2] for r in rows]
        assert max(xs) <= 1.5 * w and max(r["bbox"][1] + r["bbox"][3] for r in rows) <= 1.5 * h
    drawn = sorted(p.name for p in out.glob("*.jpg"))
    assert drawn == ["a_rotated.jpg", "b_gray.jpg", "big.jpg", "c_rgba.jpg"]  # the inputs' own names
    assert Image.open(out / "a_rotated.jpg").size == (120, 200)


def test_predict_keeps_names_apart_and_writes_the_datasets_image_ids(tmp_path, final_path, images):
    twin = tmp_path / "other" / "A_rotated.png"  # the same name from another folder (and another case)
    twin.parent.mkdir()
    Image.new("RGB", (50, 40)).save(twin)
    assert main(["predict", str(final_path), str(images), str(twin), "-o", str(tmp_path / "p1")]) == 0
    assert sorted(p.name for p in (tmp_path / "p1").glob("*.jpg")) == \
        ["A_rotated_1.jpg", "a_rotated.jpg", "b_gray.jpg", "c_rgba.jpg"]
    root = tmp_path / "shapes"
    generate_shapes(root, SyntheticConfig(num_train=1, num_val=3, image_size=64, num_classes=3, seed=0))
    assert main(["predict", str(final_path), "--data", str(root), "-o", str(tmp_path / "p2"), "--score", "0"]) == 0
    ann = json.loads((root / "annotations" / "val.json").read_text())
    ids = {im["file_name"]: im["id"] for im in ann["images"]}
    results = json.loads((tmp_path / "p2" / "detections.json").read_text())
    assert {(Path(r["file_name"]).name, r["image_id"]) for r in results} == set(ids.items())
    assert sorted(p.name for p in (tmp_path / "p2").glob("*.jpg")) == sorted(ids)


def test_batches_give_the_same_detections_as_single_images(final_path, images):
    detector = Detector.from_final(final_path)
    pictures = [load_rgb(p) for p in sorted(images.glob("*.*")) if p.suffix != ".txt"]
    together = detector.detect(pictures)
    for picture, batched in zip(pictures, together):
        alone = detector.detect([picture])[0]
        torch.testing.assert_close(alone["scores"], batched["scores"], atol=1e-5, rtol=0)
        as_numpy = [tuple(d[k].numpy() for k in ("labels", "boxes", "scores")) for d in (alone, batched)]
        assert matched_box_error(*as_numpy) <= 1e-3


def test_predict_refuses_to_overwrite_and_reports_bad_input(tmp_path, final_path, images, capsys):
    out = tmp_path / "pred"
    out.mkdir()
    (out / "detections.json").write_text("[]")
    assert main(["predict", str(final_path), str(images), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "detections.json").read_text() == "[]"
    assert main(["predict", str(final_path), str(images), "-o", str(out), "--force"]) == 0
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    assert main(["predict", str(final_path), str(tmp_path / "broken.jpg"), "-o", str(tmp_path / "p2" / "x")]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 image(s) could be read" in err and "broken.jpg" in err, err
    assert not (tmp_path / "p2").exists()  # a failed predict leaves no output folder
    assert main(["predict", str(final_path), str(tmp_path / "missing"), "-o", str(tmp_path / "p3")]) == 2


def test_predict_skips_unreadable_images_with_a_count(tmp_path, final_path, images, caplog):
    whole = (images / "a_rotated.jpg").read_bytes()
    (images / "d_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "e_empty.png").write_bytes(b"")
    out = tmp_path / "pred"
    with caplog.at_level("WARNING", logger="deim_ray.driver"):
        assert main(["predict", str(final_path), str(images), "-o", str(out), "--score", "0"]) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "skipped 2 of 5 image(s)" in warning and "d_truncated.jpg" in warning and "e_empty.png" in warning
    names = {row["file_name"].rsplit("/", 1)[-1] for row in json.loads((out / "detections.json").read_text())}
    assert names == {"a_rotated.jpg", "b_gray.png", "c_rgba.png"}
    assert sorted(p.name for p in out.iterdir()) == ["a_rotated.jpg", "b_gray.jpg", "c_rgba.jpg", "detections.json"]
