"""data layer: a YOLO split (Ultralytics / Roboflow / CVAT export) read as a COCO-format dict.

Layout: `data.yaml` (or `data.yml`) with `names` (a list, or a {class id: name} mapping), images under a folder
with an `images` path component (`images/train` or `train/images`) and one label file per image at the same path
with `images` replaced by `labels` and the suffix by `.txt` (Ultralytics' rule). A label line is
`class cx cy w h`, the box centre and size as fractions of the upright image (EXIF orientation applied, as
Ultralytics does). A segmentation line (`class x1 y1 x2 y2 ...`, three or more points) becomes the bounding
box of its polygon, as Ultralytics does when it trains a detector on segment labels.

Category ids are the class indices 0..len(names)-1 and names come from `names`. An image without a label file,
or with an empty one, is a background image (kept, no boxes). Boxes outside the image or without size and NaNs
are left to the dataset's COCO rules (clamped, dropped and counted). A line that is not 5 numbers (or a polygon),
holds a non-number, names a class outside `names`, or has a coordinate above 1 (pixels, not fractions: it would
otherwise become a box far outside the image, silently dropped) is a DataError naming the file and the line.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from deim_ray.config.schema import SplitConfig
from deim_ray.data.errors import DataError
from deim_ray.data.images import IMAGE_SUFFIXES, check_image, image_files

YAML_NAMES = ("data.yaml", "data.yml")
_ROUNDING = 1e-3
"""How far above 1 a coordinate may be written by an exporter's rounding; beyond it the line holds pixels."""


def read_names(yaml_file: Path) -> list[str]:
    """The class names of a YOLO `data.yaml`, index i = class id i."""
    if not yaml_file.is_file():
        raise DataError(f"YOLO dataset file {yaml_file} does not exist; check data.train/val.ann_file")
    try:
        doc = yaml.safe_load(yaml_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{yaml_file} is not valid YAML ({str(e).splitlines()[0]}); repair it") from None
    names = doc.get("names") if isinstance(doc, dict) else None
    if isinstance(names, dict):  # {0: person, 1: car}; keys may have been written as strings
        by_id = {int(k): v for k, v in names.items() if str(k).isdigit()}
        names = [by_id[k] for k in range(len(names))] if sorted(by_id) == list(range(len(names))) else None
    if not isinstance(names, list) or not names:
        raise DataError(f"{yaml_file} needs `names`: a list of class names, or a mapping from the class ids "
                        f"0..N-1 to names")
    return [str(n) for n in names]


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last `images` component of the path becomes `labels`, the suffix `.txt`."""
    parts = list(image.parts)
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def _parse_line(text: str, where: str, num_classes: int) -> tuple[int, list[float]] | None:
    """(class id, [x0, y0, x1, y1] as fractions) of one label line, None for a blank line."""
    fields = text.split()
    if not fields:
        return None
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise DataError(f"{where}: {text.strip()[:60]!r} holds a non-number; a YOLO label line is "
                        f"`class cx cy w h` (numbers only)") from None
    if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
        raise DataError(f"{where}: {len(values)} numbers; a YOLO label line is `class cx cy w h` (5 numbers) or a "
                        f"polygon `class x1 y1 x2 y2 x3 y3 ...`")
    cls = values[0]
    if not math.isfinite(cls) or cls != int(cls):
        raise DataError(f"{where}: class {fields[0]!r} is not a whole number; it must be an index into `names`")
    if not 0 <= cls < num_classes:
        raise DataError(f"{where}: class {int(cls)} is outside `names` (0..{num_classes - 1}); add the class to "
                        f"data.yaml or fix the label")
    too_big = [v for v in values[1:] if math.isfinite(v) and v > 1 + _ROUNDING]
    if too_big:
        raise DataError(f"{where}: {too_big[0]:g} is above 1; YOLO coordinates are fractions of the image's width "
                        f"and height (pixels divided by the size)")
    if len(values) == 5:
        cx, cy, w, h = values[1:]
        return int(cls), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    xs, ys = values[1::2], values[2::2]
    if not all(map(math.isfinite, values)):  # min/max would skip a NaN; the COCO rules must see it
        return int(cls), [math.nan] * 4
    return int(cls), [min(xs), min(ys), max(xs), max(ys)]


def read_labels(path: Path, num_classes: int) -> list[tuple[int, list[float]]]:
    """Every box of one label file (empty when the file does not exist: a background image)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"label file {path} cannot be read ({e}); repair or remove it") from None
    boxes = (_parse_line(line, f"{path} line {n}", num_classes) for n, line in enumerate(lines, 1))
    return [b for b in boxes if b is not None]


def _annotations(image_id: int, size: tuple[int, int], boxes: list[tuple[int, list[float]]], first_id: int) -> list:
    w, h = size
    anns = []
    for k, (cls, (x0, y0, x1, y1)) in enumerate(boxes):
        box = [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h]
        anns.append({"id": first_id + k, "image_id": image_id, "category_id": cls, "bbox": box,
                     "area": box[2] * box[3], "iscrowd": 0})
    return anns


def read_yolo(split: SplitConfig) -> dict:
    """The split as a COCO-format dict (see the module docstring)."""
    folder = Path(os.path.abspath(split.img_folder))  # not resolved: a symlink keeps the `images` component
    names = read_names(Path(split.ann_file))
    if "images" not in folder.parts:
        raise DataError(f"YOLO image folder {folder} has no `images` component in its path, so its labels cannot be "
                        f"found; use the `images/<split>` folder (labels in `labels/<split>`)")
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; check data.train/val.img_folder")
    files = image_files(folder)
    if not files:
        raise DataError(f"YOLO image folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}); check "
                        f"data.train/val.img_folder")
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        checks = list(pool.map(check_image, files))
    images, annotations = [], []
    for image_id, (path, (problem, size)) in enumerate(zip(files, checks), 1):
        boxes = read_labels(label_path(path), len(names))
        entry = {"id": image_id, "file_name": path.relative_to(folder).as_posix()}
        if problem is None or problem == "too large":
            entry.update(width=size[0], height=size[1])
            annotations += _annotations(image_id, size, boxes, len(annotations) + 1)
        images.append(entry)
    categories = [{"id": i, "name": n} for i, n in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}

