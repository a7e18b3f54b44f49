"""data layer: write a dataset in any layout `layouts.detect_layout` reads (YOLO, VOC, COCO export, COCO).

Made for tests and for trying the layouts end to end on data we can make (the synthetic shapes,
`python -m deim_ray.data.synthetic --layout yolo --out DIR`). The source is any pair of splits `read_split`
reads; images are copied, annotations rewritten so each format holds the same boxes:
YOLO normalised centre boxes (class index = rank of the category id), VOC's 1-based inclusive pixel corners (crowd
boxes as `<difficult>`), COCO unchanged. VOC puts both splits in one `JPEGImages/`, so its image ids carry the split
name (`train_000001`).
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from deim_ray.config.schema import SplitConfig
from deim_ray.data.annotations import read_split
from deim_ray.data.errors import DataError
from deim_ray.data.layouts import EXPORT_JSON, DataLayout, detect_layout

LAYOUTS = ("yolo", "voc", "coco-export", "coco")
"""What `write_layout` writes: YOLO (Ultralytics folders), Pascal VOC, COCO as annotation tools export it, and
COCO as the demo writes it (`annotations/<split>.json` + `<split>/`)."""


def _boxes_by_image(raw: dict) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = {im["id"]: [] for im in raw["images"]}
    for ann in raw["annotations"]:
        by_image[ann["image_id"]].append(ann)
    return by_image


def _copy(src_folder: Path, image: dict, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_folder / image["file_name"], dst)


def _num(v: float) -> str:
    return format(float(v), ".10g")


def _write_yolo_split(src: SplitConfig, raw: dict, root: Path, split: str, index: dict[int, int]) -> None:
    for image in raw["images"]:
        w, h = image["width"], image["height"]
        name = Path(image["file_name"])
        _copy(Path(src.img_folder), image, root / "images" / split / name)
        lines = [" ".join([str(index[a["category_id"]])] + [_num(v) for v in (
            (a["bbox"][0] + a["bbox"][2] / 2) / w, (a["bbox"][1] + a["bbox"][3] / 2) / h, a["bbox"][2] / w,
            a["bbox"][3] / h)]) for a in _boxes_by_image(raw)[image["id"]]]
        if lines:  # an image without boxes gets no label file: YOLO's background image
            label = (root / "labels" / split / name).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("\n".join(lines) + "\n")


def _voc_xml(image: dict, file_name: str, anns: list[dict], names: dict[int, str]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for key, value in (("width", image["width"]), ("height", image["height"]), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for a in anns:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = names[a["category_id"]]
        ET.SubElement(obj, "difficult").text = str(int(a.get("iscrowd", 0)))
        box = ET.SubElement(obj, "bndbox")
        x, y, w, h = a["bbox"]
        for key, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
            ET.SubElement(box, key).text = _num(value)
    return ET.tostring(root)


def _write_voc_split(src: SplitConfig, raw: dict, root: Path, split: str) -> None:
    names = {c["id"]: c["name"] for c in raw["categories"]}
    ids = []
    for image in raw["images"]:
        stem = f"{split}_{image['id']:06d}"
        file_name = stem + Path(image["file_name"]).suffix
        _copy(Path(src.img_folder), image, root / "JPEGImages" / file_name)
        xml = _voc_xml(image, file_name, _boxes_by_image(raw)[image["id"]], names)
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_bytes(xml)
        ids.append(stem)
    sets = root / "ImageSets" / "Main"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("\n".join(ids) + "\n")


def _write_coco_split(src: SplitConfig, raw: dict, folder: Path, ann_file: Path) -> None:
    for image in raw["images"]:
        _copy(Path(src.img_folder), image, folder / image["file_name"])
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(raw))


def write_layout(train: SplitConfig, val: SplitConfig, layout: str, root: str | Path) -> DataLayout:
    """Write the two splits under `root` (a new or empty folder) in `layout` (one of LAYOUTS); returns what
    `detect_layout` finds there."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} is not empty; write the dataset into a new folder")
    raws = {"train": read_split(train), "val": read_split(val)}
    sources = {"train": train, "val": val}
    if layout == "yolo":
        ids = sorted(c["id"] for c in raws["train"]["categories"])
        names = {c["id"]: c["name"] for c in raws["train"]["categories"]}
        for split, raw in raws.items():
            _write_yolo_split(sources[split], raw, root, split, {c: k for k, c in enumerate(ids)})
        doc = {"path": ".", "train": "images/train", "val": "images/val", "names": [names[c] for c in ids]}
        (root / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    for split, raw in raws.items():
        if layout == "voc":
            _write_voc_split(sources[split], raw, root, split)
        elif layout == "coco-export":
            folder = root / ("valid" if split == "val" else split)
            _write_coco_split(sources[split], raw, folder, folder / EXPORT_JSON)
        elif layout == "coco":
            _write_coco_split(sources[split], raw, root / split, root / "annotations" / f"{split}.json")
    return detect_layout(str(root))
