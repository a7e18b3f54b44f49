"""data layer: the detection dataset (COCO, YOLO or VOC annotations) and the category id <-> class index map.

Annotations are read by `annotations.read_split` into one COCO-format dict whatever the split's format, so every
rule below holds for COCO, YOLO and VOC alike.

Label semantics. Annotation `category_id`s may be any integers (1..N, sparse, COCO's 1..90). `CategoryMap`
maps them to contiguous class indices 0..C-1 in ascending id order, so a model has exactly C =
len(categories) classes and predictions are mapped back to the original ids for evaluation. (Upstream used
the raw id as the class index, so `num_classes` had to exceed max(category_id), a frequent user trap.)

Loading happens once, when the dataset object is built:
- crowd annotations (iscrowd=1) are left out of training targets; they stay in `coco_gt`, as COCO
  evaluation expects;
- xywh boxes become xyxy clamped to the image; boxes left without width or height are dropped and counted,
  and so are boxes with a NaN or infinite number (left out of `coco_gt` as well);
- images without annotations are kept (background images, counted in the summary line);
- pixels are read the way a viewer shows them: EXIF orientation is applied (annotation tools draw boxes on
  the upright image, so `width`/`height` and boxes refer to it), and 16-bit greyscale is scaled to 8 bits
  (PIL's own conversion would clip it to white);
- images above MAX_IMAGE_PIXELS are skipped like unreadable ones (ZoomOut would multiply them by up to 16);
- image files that are missing, unreadable or truncated are SKIPPED with one warning and a count. The check
  is cheap (header parse plus the JPEG/PNG end-of-file marker; a file without the marker is decoded once to
  decide), so a 100k-image folder is checked in seconds. A file that passes it but fails to decode later
  raises DataError naming it. Skipped images are also left out of `coco_gt`, so evaluation covers exactly
  the images the dataset serves.
Bad annotation files (missing, not JSON, not COCO, unknown category, no usable image) raise DataError.

Items. `load_item(i)` gives the raw `(PIL image, target)`; `dataset[i]` or `dataset[(i, epoch)]` runs the
transforms, which receive the epoch that travels with the index (see `deim_ray.data.loader`).

Reduced-scale decoding. A JPEG larger than the pipeline will shrink it to is decoded by libjpeg at 1/2, 1/4
or 1/8 scale (its DCT scaling, through PIL's `draft`): `load_item(i, at_least=(w, h))` picks the largest
reduction that keeps the upright image at least w x h, so the later resize still shrinks it. Boxes and
`canvas_size` are in the decoded image's pixels (the original's divided by the reduction); `orig_size` stays
the original size, which evaluation maps predictions back to. Transforms that know their output size offer
it through `plan(epoch, num_boxes)` (see `deim_ray.data.transforms`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors

from deim_ray.config.schema import SplitConfig
from deim_ray.data.annotations import read_split, split_source
from deim_ray.data.errors import DataError
from deim_ray.data.images import ORIENTATION, check_image

log = logging.getLogger("deim_ray.data")

PER_BOX_FIELDS = ("labels", "area", "iscrowd", "ann_id")
"""Target fields with one entry per box; every op keeps them aligned with `boxes`."""

_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
"""PIL modes of 16-bit (and 32-bit integer) greyscale images."""


class CategoryMap:
    """COCO category ids of any value <-> contiguous class indices 0..C-1 (ascending id order) and names."""

    def __init__(self, ids: list[int], names: list[str]):
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        self.ids: tuple[int, ...] = tuple(int(ids[i]) for i in order)
        self.names: tuple[str, ...] = tuple(str(names[i]) for i in order)
        self._index = {cat_id: i for i, cat_id in enumerate(self.ids)}

    @classmethod
    def from_coco(cls, categories: list[dict], source: str) -> CategoryMap:
        if not isinstance(categories, list) or not categories:
            raise DataError(f"{source} lists no categories; add a `categories` entry per class")
        try:
            ids = [int(c["id"]) for c in categories]
            names = [str(c.get("name", c["id"])) for c in categories]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{source} has a category without an integer `id`; give every category one") from None
        if len(set(ids)) != len(ids):
            raise DataError(f"{source} repeats a category id; make every category id unique")
        return cls(ids, names)

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._index

    def to_index(self, category_id: int) -> int:
        try:
            return self._index[int(category_id)]
        except KeyError:
            raise DataError(f"category id {category_id} is not one of {list(self.ids)}") from None

    def to_id(self, index: int) -> int:
        if not 0 <= int(index) < len(self.ids):
            raise DataError(f"class index {index} is outside 0..{len(self.ids) - 1}")
        return self.ids[int(index)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CategoryMap) and (self.ids, self.names) == (other.ids, other.names)

    def __repr__(self) -> str:
        return f"CategoryMap({dict(zip(self.ids, self.names))})"


@dataclass(frozen=True)
class ImageRecord:
    """One usable image and its training boxes (crowd and degenerate boxes already removed)."""

    image_id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray
    """float32 [N, 4] xyxy pixels, clamped to the image."""
    labels: np.ndarray
    """int64 [N] contiguous class indices."""
    ann_ids: np.ndarray
    """int64 [N] annotation ids (to trace boxes through transforms)."""


@dataclass
class LoadReport:
    """What loading dropped, for the one summary line and for tests."""

    skipped_images: dict[str, list[str]] = field(default_factory=dict)
    """reason ('missing', 'unreadable', 'truncated', 'too large') -> file names."""
    crowd: int = 0
    degenerate: int = 0
    non_finite: int = 0
    """Boxes (or areas) with a NaN or infinite number, dropped from training and evaluation."""
    size_mismatch: int = 0
    """Images whose file size differs from the annotation's width/height (the file's size is used)."""
    background: int = 0
    """Usable images without any annotation (kept: they show the model what is not an object)."""

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped_images.values())


def image_entries(raw: dict, source: Path) -> list[dict]:
    images = raw["images"]
    if not images:
        raise DataError(f"annotation file {source} lists no images; it must describe at least one image")
    for im in images:
        if (not isinstance(im, dict) or not isinstance(im.get("id"), int) or not -2**63 <= im["id"] < 2**63
                or not isinstance(im.get("file_name"), str)):
            raise DataError(f"annotation file {source} has an image without an integer `id` and a `file_name` "
                            f"({str(im)[:80]}); fix the `images` list")
    if len({im["id"] for im in images}) != len(images):
        raise DataError(f"annotation file {source} repeats an image id; make image ids unique")
    return images


def _check_images(folder: Path, images: list[dict], report: LoadReport) -> dict[int, tuple[str, int, int]]:
    """image_id -> (path, width, height) of the usable files; the rest are counted in `report`."""
    paths = [folder / str(im["file_name"]) for im in images]
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        results = list(pool.map(check_image, paths))
    usable = {}
    for im, path, (problem, (w, h)) in zip(images, paths, results):
        if problem is not None:
            report.skipped_images.setdefault(problem, []).append(str(im["file_name"]))
            continue
        if (im.get("width"), im.get("height")) not in ((w, h), (None, None)):
            report.size_mismatch += 1
        usable[int(im["id"])] = (str(path), w, h)
    return usable


def annotation_table(raw: dict, source: Path, image_ids: set[int], cats: CategoryMap) -> dict[str, np.ndarray]:
    """All annotations (crowd included) as arrays; raises DataError on a malformed entry."""
    anns = raw["annotations"]
    ints = np.zeros((len(anns), 4), dtype=np.int64)  # id, image_id, category_id, iscrowd
    floats = np.zeros((len(anns), 5), dtype=np.float64)  # x, y, w, h, area
    for i, a in enumerate(anns):
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
            ints[i] = (int(a["id"]), int(a["image_id"]), int(a["category_id"]), int(bool(a.get("iscrowd", 0))))
            floats[i] = (x, y, w, h, float(a.get("area", w * h)))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise DataError(f"annotation #{i} in {source} needs 64-bit integer `id`, `image_id`, `category_id` "
                            f"and a 4-number `bbox`; fix that entry") from None
        if ints[i, 1] not in image_ids:
            raise DataError(f"annotation {ints[i, 0]} in {source} refers to image_id {ints[i, 1]}, which is not in "
                            f"`images`; fix the annotation or add the image")
        if int(ints[i, 2]) not in cats:
            raise DataError(f"annotation {ints[i, 0]} in {source} has category_id {ints[i, 2]}, which is not in "
                            f"`categories` {list(cats.ids)}; add the category or fix the annotation")
    if len(np.unique(ints[:, 0])) != len(anns):
        raise DataError(f"annotation file {source} repeats an annotation id; make annotation ids unique")
    return {"ints": ints, "floats": floats}


def training_boxes(table: dict[str, np.ndarray], sizes: dict[int, tuple[str, int, int]], cats: CategoryMap,
                    report: LoadReport) -> dict[int, np.ndarray]:
    """image_id -> row indices of its non-crowd, non-degenerate annotations on usable images.

    Adds `xyxy` (boxes clamped to the image) and `labels` (class indices) to `table`, one row per annotation."""
    ints, floats = table["ints"], table["floats"]
    wh = np.array([sizes.get(int(i), ("", 0, 0))[1:] for i in ints[:, 1]], dtype=np.float64).reshape(-1, 2)
    x0 = np.clip(floats[:, 0], 0, wh[:, 0])
    y0 = np.clip(floats[:, 1], 0, wh[:, 1])
    x1 = np.clip(floats[:, 0] + floats[:, 2], 0, wh[:, 0])
    y1 = np.clip(floats[:, 1] + floats[:, 3], 0, wh[:, 1])
    table["xyxy"] = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
    on_usable = np.array([int(i) in sizes for i in ints[:, 1]], dtype=bool)
    crowd = ints[:, 3] == 1
    finite = np.isfinite(floats).all(axis=1)
    degenerate = finite & ((x1 <= x0) | (y1 <= y0))
    report.crowd = int((crowd & on_usable).sum())
    report.degenerate = int((~crowd & degenerate & on_usable).sum())
    report.non_finite = int((~finite & on_usable).sum())
    keep = np.flatnonzero(on_usable & ~crowd & ~degenerate & finite)
    by_image: dict[int, list[int]] = {}
    for row in keep:
        by_image.setdefault(int(ints[row, 1]), []).append(int(row))
    table["labels"] = np.array([cats.to_index(c) for c in ints[:, 2]], dtype=np.int64)
    return {k: np.asarray(v, dtype=np.int64) for k, v in by_image.items()}


def count_unlabelled(image_ids: Iterable[int], table: dict[str, np.ndarray]) -> int:
    """How many of `image_ids` have no annotation at all in `table` (background images)."""
    return len(set(image_ids) - set(table["ints"][:, 1].tolist()))


def _log_report(report: LoadReport, ann_file: Path, n_images: int) -> None:
    if report.num_skipped:
        detail = ", ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in sorted(report.skipped_images.items()))
        log.warning("%s: skipped %d image file(s): %s; fix or remove them to silence this", ann_file,
                    report.num_skipped, detail)
    if report.size_mismatch:
        log.warning("%s: %d image(s) differ in size from their annotation's width/height; using the files' sizes",
                    ann_file, report.size_mismatch)
    if report.non_finite:
        log.warning("%s: %d box(es) with NaN or infinite numbers left out of training and evaluation; fix them in "
                    "the annotation file", ann_file, report.non_finite)
    log.info("%s: %d images (%d without labels), %d crowd and %d degenerate boxes left out of training targets",
             ann_file, n_images, report.background, report.crowd, report.degenerate)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit greyscale is scaled (65535 -> 255), not clipped. An RGB image is returned as it is
    (`convert` would copy it: on a 12-megapixel photo that costs about as much as decoding it)."""
    if im.mode in _HIGH_DEPTH_MODES:
        scaled = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    return im if im.mode == "RGB" else im.convert("RGB")


def _draft(im: Image.Image, at_least: tuple[int, int] | None, transposed: bool) -> int:
    """Ask libjpeg for the smallest DCT-scaled decode of `im` whose upright size is at least `at_least`
    (width, height); the reduction it chose (1, 2, 4 or 8). Other formats decode at full size."""
    if at_least is None or im.format != "JPEG":
        return 1
    width, height = (max(1, v) for v in at_least)
    full_width = im.size[0]
    chosen = im.draft("RGB", (height, width) if transposed else (width, height))
    return 1 if chosen is None else round(full_width / chosen[1][2])  # box = (0, 0, width / r, height / r)


def decode_upright(path: str, at_least: tuple[int, int] | None = None) -> tuple[Image.Image, int]:
    """The image as a viewer shows it (EXIF orientation applied, 8-bit RGB) and the reduction it was decoded
    at: 1, or 2, 4 or 8 for a JPEG whose upright size stays at least `at_least` (width, height) after it."""
    with Image.open(path) as im:
        orientation = im.getexif().get(ORIENTATION)
        reduction = _draft(im, at_least, orientation in (5, 6, 7, 8))
        im.load()
        # exif_transpose copies an image it does not turn; turn only the ones that need it
        image = ImageOps.exif_transpose(im) if orientation in (2, 3, 4, 5, 6, 7, 8) else im
        return to_rgb(image), reduction


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset (see the module docstring for what loading drops and why).

    Args:
        img_folder: folder the annotation's `file_name`s are relative to.
        ann_file: COCO JSON with `images`, `annotations` and `categories` (yolo: `data.yaml`; voc: the
            `ImageSets/Main/<split>.txt`; see `SplitConfig`).
        transforms: called as `transforms(image, target, epoch=epoch, dataset=self)` and returning
            `(image, target)`; None returns the raw item.
        fmt: the annotation format, one of `config.schema.DATA_FORMATS` (read by `annotations.read_split`).
    """

    def __init__(self, img_folder: str | Path, ann_file: str | Path, transforms: Callable | None = None,
                 fmt: str = "coco"):
        split = SplitConfig(str(img_folder), str(ann_file), fmt)
        self.img_folder, self.ann_file = Path(img_folder), split_source(split)
        if not self.img_folder.is_dir():
            raise DataError(f"image folder {self.img_folder} does not exist; check data.train/val.img_folder")
        raw = read_split(split)
        self.categories = CategoryMap.from_coco(raw["categories"], str(self.ann_file))
        self._categories_raw = [dict(c) for c in raw["categories"]]
        self.report = LoadReport()
        images = image_entries(raw, self.ann_file)
        sizes = _check_images(self.img_folder, images, self.report)
        self._gt_table = annotation_table(raw, self.ann_file, {int(im["id"]) for im in images}, self.categories)
        rows = training_boxes(self._gt_table, sizes, self.categories, self.report)
        self.report.background = count_unlabelled(sizes, self._gt_table)
        self.records = [self._record(image_id, sizes[image_id], rows.get(image_id)) for image_id in sizes]
        if not self.records:
            raise DataError(f"no usable image in {self.ann_file} (all {len(images)} files in {self.img_folder} are "
                            f"missing or corrupt); check data.train/val.img_folder")
        _log_report(self.report, self.ann_file, len(self.records))
        self.transforms = transforms

    @classmethod
    def from_split(cls, split: SplitConfig, transforms: Callable | None = None) -> CocoDetection:
        """The dataset of a config split (`data.train` / `data.val`), in the split's format."""
        return cls(split.img_folder, split.ann_file, transforms, split.format)

    def _record(self, image_id: int, size: tuple[str, int, int], rows: np.ndarray | None) -> ImageRecord:
        rows = np.zeros(0, dtype=np.int64) if rows is None else rows
        return ImageRecord(image_id=image_id, path=size[0], width=size[1], height=size[2],
                           boxes=self._gt_table["xyxy"][rows].reshape(-1, 4),
                           labels=self._gt_table["labels"][rows], ann_ids=self._gt_table["ints"][rows, 0])

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def load_item(self, idx: int, at_least: tuple[int, int] | None = None) -> tuple[Image.Image, dict[str, Any]]:
        """The raw image and its target (xyxy pixel `BoundingBoxes`, per-box fields, image_id, orig_size).

        With `at_least` (width, height), a larger JPEG is decoded at reduced scale (see the module docstring);
        its boxes are divided by the same reduction."""
        rec = self.records[idx]
        image, reduction = self._decode(rec, at_least)
        n = len(rec.labels)
        boxes = torch.from_numpy(rec.boxes / reduction if reduction != 1 else rec.boxes.copy())
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(image.height, image.width)),
            "labels": torch.from_numpy(rec.labels.copy()),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
            "ann_id": torch.from_numpy(rec.ann_ids.copy()),
            "image_id": torch.tensor(rec.image_id, dtype=torch.int64),
            "orig_size": torch.tensor([rec.width, rec.height], dtype=torch.int64),
            "ops": (),
        }
        return image, target

    def _decode(self, rec: ImageRecord, at_least: tuple[int, int] | None) -> tuple[Image.Image, int]:
        try:
            image, reduction = decode_upright(rec.path, at_least)
        except Exception as e:
            raise DataError(f"image {rec.path} could not be decoded ({e}); re-encode it or remove it from "
                            f"{self.ann_file}") from None
        if image.size != (-(-rec.width // reduction), -(-rec.height // reduction)):  # libjpeg rounds up
            raise DataError(f"image {rec.path} changed size since the dataset was loaded; rebuild the dataset")
        return image, reduction

    def __getitem__(self, key: int | tuple[int, int]):
        idx, epoch = key if isinstance(key, tuple) else (key, None)
        if self.transforms is None:
            return self.load_item(int(idx))
        if not hasattr(self.transforms, "plan"):  # a user's own callable
            image, target = self.load_item(int(idx))
            image, target = self.transforms(image, target, epoch=epoch, dataset=self)
        else:  # the ops are drawn first, so the decode knows the size they need
            plan = self.transforms.plan(epoch, len(self.records[int(idx)].labels))
            image, target = self.load_item(int(idx), plan.decode_size)
            image, target = self.transforms(image, target, epoch=epoch, dataset=self, plan=plan)
        target["epoch"] = epoch
        return image, target

    @cached_property
    def coco_gt(self):
        """A faster_coco_eval `COCO` of the usable images and ALL their annotations (crowd included)."""
        from faster_coco_eval import COCO

        return COCO(self._gt_dict(), print_function=lambda *a, **k: None)

    def _gt_dict(self) -> dict:
        ints, floats = self._gt_table["ints"], self._gt_table["floats"]
        kept = {r.image_id for r in self.records}
        images = [{"id": r.image_id, "file_name": Path(r.path).name, "width": r.width, "height": r.height}
                  for r in self.records]
        anns = [{"id": int(i[0]), "image_id": int(i[1]), "category_id": int(i[2]), "iscrowd": int(i[3]),
                 "bbox": [float(v) for v in f[:4]], "area": float(f[4])}
                for i, f in zip(ints, floats) if int(i[1]) in kept and np.isfinite(f).all()]
        return {"images": images, "annotations": anns, "categories": [dict(c) for c in self._categories_raw]}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("coco_gt", None)  # rebuilt on demand; loader workers never need it
        return state
