"""data layer: which dataset layout a folder holds, and the train/val splits to read it with.

`detect_layout(root)` recognises, in this order (a split named `val` or `valid` is taken for val):

- YOLO: `data.yaml` (or `data.yml`) with `names`, images in `images/train` + `images/val` (Ultralytics) or
  `train/images` + `valid/images` (Roboflow), labels where YOLO's rule puts them (`images` -> `labels`);
- Pascal VOC: `Annotations/`, `JPEGImages/`, `ImageSets/Main/train.txt` + `val.txt`;
- COCO as annotation tools export it (Roboflow, CVAT's "COCO" in folders): `train/_annotations.coco.json` and
  `valid/_annotations.coco.json`, each beside its images;
- COCO as the demo writes it or as COCO ships: `annotations/train.json` + `train/`, or
  `annotations/instances_train2017.json` + `train2017/` (or `images/train2017/`), and the same for val.

A folder that holds a layout's marker but misses a part (e.g. `data.yaml` without `images/val`) is a DataError
saying what is missing; a folder of no known layout is a DataError listing the layouts and what was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deim_ray.config.schema import SplitConfig
from deim_ray.data.errors import DataError
from deim_ray.data.images import image_files
from deim_ray.data.voc import read_ids
from deim_ray.data.yolo import YAML_NAMES, read_names

VAL_NAMES = ("val", "valid")
"""Folder names taken for the val split, in order of preference."""
EXPORT_JSON = "_annotations.coco.json"
"""The annotation file annotation tools write beside each split's images."""
_TITLES = {"yolo": "YOLO", "voc": "Pascal VOC", "coco": "COCO"}
KNOWN_LAYOUTS = (
    "YOLO (data.yaml with `names`, images/train + images/val or train/images + valid/images, labels beside)",
    "Pascal VOC (Annotations/, JPEGImages/, ImageSets/Main/train.txt + val.txt)",
    f"COCO as annotation tools export it (train/{EXPORT_JSON} + valid/{EXPORT_JSON} beside the images)",
    "COCO (annotations/train.json + train/, or annotations/instances_train2017.json + train2017/ or images/train2017/,"
    " and the same for val)")


@dataclass(frozen=True)
class DataLayout:
    """A dataset folder's format and its two splits (paths under `root`, as `root` was given)."""

    format: str
    """coco, yolo or voc (the splits' `SplitConfig.format`)."""
    root: str
    train: SplitConfig
    val: SplitConfig
    variant: str = ""
    """How the format is laid out, for messages: e.g. "annotation-tool export"."""

    def describe(self) -> str:
        """One line, e.g. "YOLO folder data/x: train images/train (200 images), val images/val (48)"."""
        title = _TITLES[self.format] + (f" ({self.variant})" if self.variant else "")
        (train, n_train), (val, n_val) = (self._where(s) for s in (self.train, self.val))
        return f"{title} folder {self.root}: train {train} ({n_train} images), val {val} ({n_val})"

    def _where(self, split: SplitConfig) -> tuple[str, int]:
        """The split's list (VOC) or image folder relative to the root, and how many images it holds."""
        if self.format == "voc":
            return Path(split.ann_file).relative_to(self.root).as_posix(), len(read_ids(Path(split.ann_file)))
        return Path(split.img_folder).relative_to(self.root).as_posix() + "/", len(image_files(Path(split.img_folder)))


def _first_dir(root: Path, candidates: tuple[str, ...]) -> Path | None:
    return next((root / c for c in candidates if (root / c).is_dir()), None)


def _yolo(root: Path) -> DataLayout | None:
    yaml_file = next((root / n for n in YAML_NAMES if (root / n).is_file()), None)
    if yaml_file is None:
        return None
    read_names(yaml_file)  # a data.yaml without usable `names` is an error now, not in a worker
    for train, vals in ((("images/train",), tuple(f"images/{v}" for v in VAL_NAMES)),
                        (("train/images",), tuple(f"{v}/images" for v in VAL_NAMES))):
        train_dir, val_dir = _first_dir(root, train), _first_dir(root, vals)
        if train_dir and val_dir:
            return DataLayout("yolo", str(root), SplitConfig(str(train_dir), str(yaml_file), "yolo"),
                              SplitConfig(str(val_dir), str(yaml_file), "yolo"))
    raise DataError(f"{root} has {yaml_file.name} (YOLO) but not both image folders: images/train and images/val "
                    f"(or train/images and valid/images); add the missing split")


def _voc(root: Path) -> DataLayout | None:
    if not ((root / "Annotations").is_dir() and (root / "JPEGImages").is_dir()):
        return None
    sets = root / "ImageSets" / "Main"
    files = {name: sets / f"{name}.txt" for name in ("train", *VAL_NAMES) if (sets / f"{name}.txt").is_file()}
    val = next((files[v] for v in VAL_NAMES if v in files), None)
    if "train" not in files or val is None:
        found = sorted(p.name for p in sets.glob("*.txt")) if sets.is_dir() else []
        raise DataError(f"{root} has Annotations/ and JPEGImages/ (Pascal VOC) but not ImageSets/Main/train.txt and "
                        f"val.txt (found: {', '.join(found) or 'none'}); write the two lists of image ids")
    images = str(root / "JPEGImages")
    return DataLayout("voc", str(root), SplitConfig(images, str(files["train"]), "voc"),
                      SplitConfig(images, str(val), "voc"))


def _coco_export(root: Path) -> DataLayout | None:
    train = root / "train" / EXPORT_JSON
    val = next((root / v / EXPORT_JSON for v in VAL_NAMES if (root / v / EXPORT_JSON).is_file()), None)
    if not train.is_file() and val is None:
        return None
    if not train.is_file() or val is None:
        raise DataError(f"{root} holds {EXPORT_JSON} for one split only (COCO export); it needs train/{EXPORT_JSON} "
                        f"and valid/{EXPORT_JSON}")
    return DataLayout("coco", str(root), SplitConfig(str(train.parent), str(train)),
                      SplitConfig(str(val.parent), str(val)), "annotation-tool export")


def _coco_split(root: Path, names: tuple[str, ...]) -> SplitConfig | None:
    """The split of `annotations/instances_<name>*.json` or `annotations/<name>.json` and its image folder."""
    folder = root / "annotations"
    for name in names:
        for ann in (*sorted(folder.glob(f"instances_{name}*.json")), folder / f"{name}.json"):
            stem = ann.stem.removeprefix("instances_")
            images = _first_dir(root, (stem, f"images/{stem}", name, f"images/{name}"))
            if ann.is_file() and images is not None:
                return SplitConfig(str(images), str(ann))
    return None


def _coco(root: Path) -> DataLayout | None:
    if not (root / "annotations").is_dir():
        return None
    train, val = _coco_split(root, ("train",)), _coco_split(root, VAL_NAMES)
    if train is None or val is None:
        found = sorted(p.name for p in (root / "annotations").glob("*.json"))
        raise DataError(f"{root}/annotations (COCO) has no train and val pair with image folders (found: "
                        f"{', '.join(found) or 'no JSON'}); expected annotations/train.json + train/ or "
                        f"annotations/instances_train2017.json + train2017/, and the same for val")
    return DataLayout("coco", str(root), train, val)


def detect_layout(root: str) -> DataLayout:
    """The layout of the dataset folder `root` (module docstring); DataError when it is none of them."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder; check --data")
    for detect in (_yolo, _voc, _coco_export, _coco):
        layout = detect(path)
        if layout is not None:
            return layout
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    raise DataError(f"{root} is in no dataset layout deim_ray reads (found: {shown or 'nothing'}); it reads "
                    + "; ".join(KNOWN_LAYOUTS))
