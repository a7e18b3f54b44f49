"""data layer: `read_split`, the one way to read a split's annotations, whatever their format.

Every reader returns a COCO-format dict (`images` with id/file_name/width/height, `annotations` with `bbox` xywh in
pixels, `categories` with id/name; file names relative to the split's image folder), so the dataset, the
driver's preflight and the evaluator's ground truth apply one set of rules to every format.
"""

from __future__ import annotations

import json
from pathlib import Path

from deim_ray.config.schema import SplitConfig
from deim_ray.data.errors import DataError
from deim_ray.data.voc import read_voc
from deim_ray.data.yolo import read_yolo


def read_coco_json(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise DataError(f"annotation file {ann_file} does not exist; check data.train/val.ann_file")
    try:
        raw = json.loads(ann_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file {ann_file} is not valid JSON ({e}); repair or re-export it") from None
    except RecursionError:
        raise DataError(f"annotation file {ann_file} nests JSON too deeply to be COCO; re-export it") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), list)
                                            for k in ("images", "annotations", "categories")):
        raise DataError(f"annotation file {ann_file} is not COCO detection format (needs `images`, `annotations` "
                        f"and `categories` lists); re-export it")
    return raw


def read_split(split: SplitConfig) -> dict:
    """The split's annotations as a COCO-format dict; DataError (one line) for anything unreadable."""
    if split.format == "yolo":
        return read_yolo(split)
    if split.format == "voc":
        return read_voc(split)
    return read_coco_json(Path(split.ann_file))


def split_source(split: SplitConfig) -> Path:
    """The path that names a split in messages: its annotation file, or its image folder for YOLO (whose
    `data.yaml` both splits share)."""
    return Path(split.img_folder if split.format == "yolo" else split.ann_file)
