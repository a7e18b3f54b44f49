"""Dataset layouts read directly: YOLO, Pascal VOC, COCO as annotation tools export it and as the demo writes it.

Each layout is written from the synthetic shapes (`layout_writer`) and must give the COCO JSON's boxes back through
`read_split`, the dataset and its batches, the driver's preflight and faster-coco-eval; every bad-label case is a
one-line DataError from the same preflight that runs before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from faster_coco_eval import COCO
from PIL import Image

from deim_ray.config.schema import SplitConfig
from deim_ray.data.annotations import read_split
from deim_ray.data.coco import CocoDetection
from deim_ray.data.errors import DataError
from deim_ray.data.layout_writer import LAYOUTS, write_layout
from deim_ray.data.layouts import detect_layout
from deim_ray.driver.preflight import check_split, preflight
from deim_ray.engine.data import build_data
from deim_ray.engine.evaluator import coco_stats
from tests.data.helpers import make_cfg

FORMAT_OF = {"yolo": "yolo", "voc": "voc", "coco-export": "coco", "coco": "coco"}


@pytest.fixture(scope="module")
def written(shapes, tmp_path_factory) -> dict[str, Path]:
    """The shapes set in every layout, written once; tests that change files copy one first."""
    base = tmp_path_factory.mktemp("layouts")
    return {layout: Path(write_layout(*shapes, layout, base / layout).root) for layout in LAYOUTS}


def _copy(written: dict[str, Path], layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(written[layout], tmp_path / layout))


def _one_line_error(call, match: str) -> str:
    with pytest.raises(DataError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def _source_image(layout: str, split: str, image: dict, source: dict) -> int:
    """The id of `image` in the source COCO split (VOC renames files to `<split>_<id>`; the rest keep names)."""
    if layout == "voc":
        return int(Path(image["file_name"]).stem.removeprefix(f"{split}_"))
    return next(im["id"] for im in source["images"] if im["file_name"] == image["file_name"])


def _boxes_by_source_image(raw: dict, to_source) -> dict[int, list[tuple]]:
    """Source image id -> sorted (class name, rounded bbox, crowd) of its annotations."""
    names = {c["id"]: c["name"] for c in raw["categories"]}
    out: dict[int, list[tuple]] = {to_source(im): [] for im in raw["images"]}
    image_of = {im["id"]: to_source(im) for im in raw["images"]}
    for a in raw["annotations"]:
        box = tuple(round(float(v), 6) for v in a["bbox"])
        out[image_of[a["image_id"]]].append((names[a["category_id"]], box, int(a.get("iscrowd", 0))))
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_detected_and_reads_the_coco_boxes(layout, written, shapes):
    found = detect_layout(str(written[layout]))
    assert found.format == FORMAT_OF[layout]
    for split, source_split, ours in (("train", shapes[0], found.train), ("val", shapes[1], found.val)):
        source, raw = read_split(source_split), read_split(ours)
        expected = _boxes_by_source_image(source, lambda im: im["id"])
        got = _boxes_by_source_image(raw, lambda im: _source_image(layout, split, im, source))
        assert got == expected and sum(map(len, got.values())) > 0
        assert [(im["width"], im["height"]) for im in raw["images"]] == [(96, 96)] * len(raw["images"])


def test_describe_counts_the_images(written):
    assert detect_layout(str(written["yolo"])).describe() == \
        f"YOLO folder {written['yolo']}: train images/train/ (40 images), val images/val/ (11)"


def test_roboflow_folders_valid_split_and_coco_2017_names_are_detected(written, tmp_path):
    yolo = _copy(written, "yolo", tmp_path)
    for split, new in (("train", "train"), ("val", "valid")):
        (yolo / new).mkdir(exist_ok=True)
        for kind in ("images", "labels"):
            shutil.move(yolo / kind / split, yolo / new / kind)
    names = yaml.safe_load((yolo / "data.yaml").read_text())["names"]
    (yolo / "data.yaml").unlink()
    (yolo / "data.yml").write_text(yaml.safe_dump({"nc": 3, "names": dict(enumerate(names))}))
    found = detect_layout(str(yolo))
    assert (found.format, Path(found.val.img_folder)) == ("yolo", yolo / "valid" / "images")
    assert len(read_split(found.val)["annotations"]) == len(read_split(detect_layout(str(written["yolo"])).val)
                                                              ["annotations"])

    export = _copy(written, "coco-export", tmp_path)
    shutil.move(export / "valid", export / "val")
    assert Path(detect_layout(str(export)).val.img_folder) == export / "val"

    coco = _copy(written, "coco", tmp_path)
    (coco / "images").mkdir()
    for split in ("train", "val"):
        shutil.move(coco / split, coco / "images" / f"{split}2017")
        shutil.move(coco / "annotations" / f"{split}.json", coco / "annotations" / f"instances_{split}2017.json")
    found = detect_layout(str(coco))
    assert found.train == SplitConfig(str(coco / "images" / "train2017"),
                                      str(coco / "annotations" / "instances_train2017.json"))


def test_unknown_or_incomplete_folders_are_one_line_errors(written, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"")
    message = _one_line_error(lambda: detect_layout(str(tmp_path / "photos")), "in no dataset layout")
    assert "found: a.jpg" in message and "YOLO" in message and "Pascal VOC" in message and "_annotations" in message
    _one_line_error(lambda: detect_layout(str(tmp_path / "nowhere")), "does not exist")
    yolo = _copy(written, "yolo", tmp_path)
    shutil.rmtree(yolo / "images" / "val")
    _one_line_error(lambda: detect_layout(str(yolo)), "data.yaml .YOLO. but not both image folders")
    (yolo / "data.yaml").write_text("nc: 3\n")
    _one_line_error(lambda: detect_layout(str(yolo)), "data.yaml needs `names`: a list of class names")
    voc = _copy(written, "voc", tmp_path)
    (voc / "ImageSets" / "Main" / "val.txt").unlink()
    _one_line_error(lambda: detect_layout(str(voc)), r"found: train.txt")


def _yolo(written, tmp_path) -> tuple[Path, SplitConfig, SplitConfig]:
    root = _copy(written, "yolo", tmp_path)
    layout = detect_layout(str(root))
    return root, layout.train, layout.val


def _preflight(train: SplitConfig, val: SplitConfig) -> None:
    preflight(make_cfg((train, val)), on_cluster=False)


@pytest.mark.parametrize("line, match", [
    ("0 0.5 0.5 0.2", r"line 2: 4 numbers; a YOLO label line is `class cx cy w h`"),
    ("3 0.5 0.5 0.2 0.2", r"line 2: class 3 is outside `names` \(0..2\)"),
    ("1 0.5 0.5 0.2 0.2 0.9", r"line 2: 6 numbers"),
    ("1 0.5 abc 0.2 0.2", r"line 2: '1 0.5 abc 0.2 0.2' holds a non-number"),
    ("1.5 0.5 0.5 0.2 0.2", r"line 2: class '1.5' is not a whole number"),
    ("1 48 40 20 12", r"line 2: 48 is above 1; YOLO coordinates are fractions of the image's width and height"),
])
def test_bad_yolo_lines_are_refused_by_preflight_naming_file_and_line(line, match, written, tmp_path):
    root, train, val = _yolo(written, tmp_path)
    label = root / "labels" / "train" / "000003.txt"
    first = label.read_text().splitlines()[0]
    label.write_text(f"{first}\n{line}\n")
    message = _one_line_error(lambda: _preflight(train, val), match)
    assert str(label) in message


def test_yolo_edge_cases_follow_the_coco_rules(written, tmp_path, caplog):
    """Segment polygons become their box; NaN, degenerate and off-image boxes are handled as COCO's; images
    without a label file are background images, counted."""
    root, train, val = _yolo(written, tmp_path)
    labels = root / "labels" / "train"
    (labels / "000000.txt").write_text("2 0.1 0.2 0.3 0.1 0.25 0.6\n\n")  # a triangle, and a blank line
    (labels / "000001.txt").write_text("0 nan 0.5 0.2 0.2\n1 0.5 0.5 0.0 0.3\n0 0.95 0.5 0.2 0.2\n"
                                       "2 0.1 0.2 nan 0.1 0.25 0.6\n")
    (labels / "000002.txt").unlink()
    (labels / "000004.txt").write_text("")
    raw = read_split(train)
    polygon = [a for a in raw["annotations"] if a["image_id"] == 1]
    assert [a["category_id"] for a in polygon] == [2]
    np.testing.assert_allclose(polygon[0]["bbox"], [0.1 * 96, 0.1 * 96, 0.2 * 96, 0.5 * 96])
    with caplog.at_level(logging.INFO, logger="deim_ray.data"):
        ds = CocoDetection.from_split(train)
    assert (ds.report.non_finite, ds.report.degenerate, ds.report.background) == (2, 1, 2)
    clipped = ds.records[1].boxes  # image 000001: the off-image box is clamped to the image edge
    np.testing.assert_allclose(clipped, [[0.85 * 96, 0.4 * 96, 96, 0.6 * 96]], rtol=1e-6)
    assert "(2 without labels)" in caplog.text and "2 box(es) with NaN" in caplog.text
    assert check_split("train", train).background == 2


def test_yolo_sizes_are_the_upright_image_sizes(tmp_path):
    """A phone photo stored 60x40 with EXIF orientation 6 shows as 40x60; YOLO's fractions refer to that."""
    root = tmp_path / "phone"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.new("RGB", (60, 40), "gray").save(root / "images" / split / "p.jpg", exif=exif.tobytes())
        (root / "labels" / split / "p.txt").write_text("0 0.5 0.5 0.5 0.25\n")
    (root / "data.yaml").write_text("names: [person]\n")
    raw = read_split(detect_layout(str(root)).train)
    assert (raw["images"][0]["width"], raw["images"][0]["height"]) == (40, 60)
    assert raw["annotations"][0]["bbox"] == [10.0, 22.5, 20.0, 15.0]
    ds = CocoDetection.from_split(detect_layout(str(root)).train)
    image, target = ds.load_item(0)
    assert image.size == (40, 60) and target["boxes"].tolist() == [[10.0, 22.5, 30.0, 37.5]]


def _voc(written, tmp_path) -> tuple[Path, SplitConfig, SplitConfig]:
    root = _copy(written, "voc", tmp_path)
    layout = detect_layout(str(root))
    return root, layout.train, layout.val


def test_bad_voc_files_are_refused_by_preflight(written, tmp_path):
    root, train, val = _voc(written, tmp_path)
    xml = root / "Annotations" / "train_000005.xml"
    good = xml.read_text()
    xml.write_text(good.replace("<size><width>96</width><height>96</height><depth>3</depth></size>", ""))
    _one_line_error(lambda: _preflight(train, val), f"{xml} has no <size>")
    xml.write_text(good.replace("</annotation>", "<object><name>x</name>\n</annotation>"))
    _one_line_error(lambda: _preflight(train, val), f"{xml} line 2 does not parse as XML")
    xml.write_text(good.replace("<xmax>", "<xmax>wide"))
    _one_line_error(lambda: check_split("train", train), r"<xmax> is 'wide\d+'; it must be a number")
    xml.write_text(re.sub("<name>[^<]*</name>", "<name> </name>", good, count=1))
    _one_line_error(lambda: check_split("train", train), f"{xml} has an <object> without a <name>")
    xml.write_text(good)
    (root / "labels.txt").write_text("rectangle-0\nellipse-1\n")
    _one_line_error(lambda: check_split("train", train), r"object 'triangle-2' is not in the class list "
                                                         r"\['rectangle-0', 'ellipse-1'\] \(labels.txt\)")


def test_voc_classes_come_from_labels_txt_in_order_and_difficult_objects_are_crowd(written, tmp_path):
    root, train, val = _voc(written, tmp_path)
    (root / "labels.txt").write_text("triangle-2\nrectangle-0\nellipse-1\nspare\n")
    xml = root / "Annotations" / "train_000001.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    raw = read_split(train)
    assert [c["name"] for c in raw["categories"]] == ["triangle-2", "rectangle-0", "ellipse-1", "spare"]
    first = [a for a in raw["annotations"] if a["image_id"] == 1]
    assert [a["iscrowd"] for a in first][0] == 1 and sum(a["iscrowd"] for a in raw["annotations"]) == 1
    ds = CocoDetection.from_split(train)
    assert ds.report.crowd == 1 and len(ds.records[0].labels) == len(first) - 1


def _drop_class(raw: dict, category_id: int) -> dict:
    return {**raw, "annotations": [a for a in raw["annotations"] if a["category_id"] != category_id]}


def test_a_val_class_without_train_boxes_is_an_error_in_every_layout(written, tmp_path):
    root, train, val = _yolo(written, tmp_path)
    for label in (root / "labels" / "train").glob("*.txt"):
        label.write_text("".join(line + "\n" for line in label.read_text().splitlines() if line[0] != "1"))
    _one_line_error(lambda: _preflight(train, val),
                    r"class 'ellipse-1' \(id 1\) has boxes in val \(.*images/val\) but none in train")
    coco = _copy(written, "coco-export", tmp_path)
    ann = coco / "train" / "_annotations.coco.json"
    ann.write_text(json.dumps(_drop_class(json.loads(ann.read_text()), 5)))
    layout = detect_layout(str(coco))
    _one_line_error(lambda: _preflight(layout.train, layout.val),
                    r"class 'triangle-2' \(id 5\) has boxes in val")
    root, train, val = _voc(written, tmp_path)
    for xml in (root / "Annotations").glob("train_*.xml"):
        xml.write_text(xml.read_text().replace("<name>rectangle-0</name>", "<name>ellipse-1</name>"))
    _one_line_error(lambda: _preflight(train, val), r"class 'rectangle-0' \(id 1\)")


@pytest.mark.parametrize("layout", ["yolo", "voc"])
def test_the_dataset_and_its_batches_load_from_each_layout(layout, written):
    found = detect_layout(str(written[layout]))
    cfg = make_cfg((found.train, found.val))
    summaries = [check_split("train", found.train), check_split("val", found.val)]
    assert [(s.images, s.background) for s in summaries] == [(40, 0), (11, 0)]
    bundle = build_data(cfg, rank=0, world_size=1)
    assert bundle.category_ids == [0, 1, 2]
    assert bundle.class_names == (["ellipse-1", "rectangle-0", "triangle-2"] if layout == "voc" else
                                  ["rectangle-0", "ellipse-1", "triangle-2"])
    images, targets = next(iter(bundle.train_loader))
    assert images.shape[1:] == (3, 64, 64) and all(t["class_labels"].max() < 3 for t in targets)
    images, targets = next(iter(bundle.val_loader))
    assert images.shape[0] == 4 and sum(len(t["class_labels"]) for t in targets) > 0


def _detections(gt: dict, category_of) -> list[dict]:
    """Imperfect detections: every third box missed, the rest shifted 3 px, scores falling."""
    dets = []
    for k, a in enumerate(sorted(gt["annotations"], key=lambda a: a["id"])):
        if k % 3:
            x, y, w, h = a["bbox"]
            dets.append({"image_id": a["image_id"], "category_id": category_of(a["category_id"]),
                         "bbox": [x + 3, y, w, h], "score": 1.0 - k / 1000})
    return dets


def test_yolo_ground_truth_scores_like_the_coco_json_with_faster_coco_eval(written, shapes):
    coco_val = CocoDetection.from_split(shapes[1])
    yolo_val = CocoDetection.from_split(detect_layout(str(written["yolo"])).val)
    coco_gt = coco_val.coco_gt.dataset
    # YOLO has no `area`: a box's area is w*h (the shapes' JSON gives the shape's own area, which moves some
    # boxes between the small/medium ranges), so the COCO side is scored with box areas too
    boxed = {**coco_gt, "annotations": [{**a, "area": a["bbox"][2] * a["bbox"][3]} for a in coco_gt["annotations"]]}
    # the YOLO split lists the same files in the same order, and class k is the k-th category id
    to_yolo = {c: k for k, c in enumerate(coco_val.categories.ids)}
    expected = coco_stats(COCO(boxed), _detections(coco_gt, lambda c: c))
    got = coco_stats(yolo_val.coco_gt, _detections(coco_gt, to_yolo.get))
    assert 0.2 < expected[0] < 0.9 and expected[3] > 0
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_read_split_dispatches_on_the_format(written, shapes):
    assert read_split(shapes[0]) == json.loads(Path(shapes[0].ann_file).read_text())
    layout = detect_layout(str(written["yolo"]))
    with pytest.raises(DataError, match="is not valid JSON"):
        read_split(dataclasses.replace(layout.train, format="coco"))


def test_a_roboflow_project_category_without_boxes_leaves_the_ap_as_it_is(shapes):
    """Roboflow's COCO export lists the project as category 0 with no boxes; detections of it cost no AP."""
    gt = CocoDetection.from_split(shapes[1]).coco_gt.dataset
    with_project = {**gt, "categories": [{"id": 0, "name": "shapes-project"}, *gt["categories"]]}
    dets = _detections(gt, lambda c: c)
    stray = [{**d, "category_id": 0, "score": 0.99} for d in dets[::2]]
    expected = coco_stats(COCO(gt), dets)
    np.testing.assert_allclose(coco_stats(COCO(with_project), dets + stray), expected, atol=1e-12)
    assert 0.2 < expected[0] < 0.9
