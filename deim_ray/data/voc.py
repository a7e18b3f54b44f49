"""data layer: a Pascal VOC split (VOC2007/2012, CVAT and Roboflow exports) read as a COCO-format dict.

Layout: `JPEGImages/` (the images), `Annotations/<id>.xml` (one per image) and `ImageSets/Main/<split>.txt`
(the split's image ids, one per line; only the first word of a line counts). The image file is the XML's
`<filename>` when it exists in `JPEGImages/`, else `<id>` with an image suffix.

Classes: the names listed one per line in `labels.txt` beside `JPEGImages/` when the dataset has one (an object of
another name is then an error), else the sorted union of every `<object><name>` in `Annotations/` (all XMLs, so
train and val agree). Category ids are the class indices 0..C-1.

Boxes: VOC pixel coordinates are 1-based and inclusive, so `<xmin>` 1 is the first pixel and the COCO box is
`[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]` (as detectron2 reads VOC). A `<difficult>1</difficult>`
object becomes a crowd box: left out of training, ignored by evaluation (VOC's own rule for difficult objects).
An XML that does not parse, lacks `<size>` or a box coordinate is a DataError naming the file (and line).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from deim_ray.config.schema import SplitConfig
from deim_ray.data.errors import DataError
from deim_ray.data.images import IMAGE_SUFFIXES

LABELS_FILE = "labels.txt"
_COORDS = ("xmin", "ymin", "xmax", "ymax")


def _parse(xml_file: Path) -> ET.Element:
    try:
        return ET.parse(xml_file).getroot()
    except ET.ParseError as e:
        raise DataError(f"VOC annotation {xml_file} line {e.position[0]} does not parse as XML ({e}); repair or "
                        f"re-export it") from None
    except FileNotFoundError:
        raise DataError(f"VOC annotation {xml_file} does not exist; every id in ImageSets/Main needs "
                        f"Annotations/<id>.xml") from None


def _number(node: ET.Element, path: str, xml_file: Path) -> float:
    text = node.findtext(path)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise DataError(f"VOC annotation {xml_file}: <{path}> is {'missing' if text is None else repr(text)}; "
                        f"it must be a number") from None


def _object_names(root: ET.Element, xml_file: Path) -> list[str]:
    names = [(obj.findtext("name") or "").strip() for obj in root.iter("object")]
    if "" in names:
        raise DataError(f"VOC annotation {xml_file} has an <object> without a <name>; name it or remove it")
    return names


def class_names(root: Path) -> list[str]:
    """The dataset's class list (module docstring): `labels.txt`, else every name used in `Annotations/`."""
    listed = root / LABELS_FILE
    if listed.is_file():
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
    else:
        xmls = sorted((root / "Annotations").glob("*.xml"))
        names = sorted({n for xml in xmls for n in _object_names(_parse(xml), xml)})
    if not names:
        raise DataError(f"VOC dataset {root} names no class (no <object><name> in Annotations/ and no {LABELS_FILE})")
    return names


def _image_file(root: ET.Element, image_id: str, folder: Path) -> str:
    name = (root.findtext("filename") or "").strip()
    if name and (folder / name).is_file():
        return name
    found = [image_id + s for s in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES)
             if (folder / (image_id + s)).is_file()]
    return found[0] if found else name or image_id + ".jpg"  # a missing file is skipped and counted later


def _read_image(xml_file: Path, image_id: int, folder: Path, classes: dict[str, int], first_ann: int):
    """(COCO image entry, its annotations) of one VOC XML."""
    root = _parse(xml_file)
    size = root.find("size")
    if size is None:
        raise DataError(f"VOC annotation {xml_file} has no <size>; add <size><width>..</width><height>..</height>"
                        f"</size> or re-export it")
    w, h = _number(size, "width", xml_file), _number(size, "height", xml_file)
    entry = {"id": image_id, "file_name": _image_file(root, xml_file.stem, folder)}
    if w > 0 and h > 0:  # some tools write 0x0; the dataset then measures the file
        entry.update(width=int(w), height=int(h))
    anns = []
    for obj, name in zip(root.iter("object"), _object_names(root, xml_file)):
        if name not in classes:
            raise DataError(f"VOC annotation {xml_file}: object {name!r} is not in the class list "
                            f"{sorted(classes, key=classes.get)} ({LABELS_FILE}); add it there or fix the name")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"VOC annotation {xml_file}: object {name!r} has no <bndbox>; add it or remove the object")
        x0, y0, x1, y1 = (_number(box, c, xml_file) for c in _COORDS)
        bbox = [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]
        anns.append({"id": first_ann + len(anns), "image_id": image_id, "category_id": classes[name], "bbox": bbox,
                     "area": bbox[2] * bbox[3], "iscrowd": int((obj.findtext("difficult") or "0").strip() == "1")})
    return entry, anns


def read_ids(split_file: Path) -> list[str]:
    if not split_file.is_file():
        raise DataError(f"VOC split file {split_file} does not exist; check data.train/val.ann_file")
    return [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]


def read_voc(split: SplitConfig) -> dict:
    """The split as a COCO-format dict (see the module docstring)."""
    folder = Path(split.img_folder)
    root = folder.parent
    if not (root / "Annotations").is_dir():
        raise DataError(f"VOC dataset {root} has no Annotations/ folder beside {folder.name}/; check "
                        f"data.train/val.img_folder")
    names = class_names(root)
    classes = {n: i for i, n in enumerate(names)}
    images, annotations = [], []
    for image_id, stem in enumerate(read_ids(Path(split.ann_file)), 1):
        entry, anns = _read_image(root / "Annotations" / f"{stem}.xml", image_id, folder, classes,
                                  len(annotations) + 1)
        images.append(entry)
        annotations += anns
    categories = [{"id": i, "name": n} for i, n in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}
