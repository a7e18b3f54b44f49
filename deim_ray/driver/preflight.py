"""driver layer: cheap checks of a run's inputs on the driver, before any Ray worker starts.

The workers would find most bad input too (the data layer raises DataError while it builds the datasets), but
only after Ray started, placed the workers and built the model, and the error would then arrive wrapped in
Ray's failure report. `preflight` reads what is cheap to read on the driver and raises the same one-line
errors at once:

- the request: at least one worker, positive CPUs per worker, non-negative --max-failures;
- each split, with the data layer's own annotation rules and messages: the image folder is a folder; the
  annotation file exists, is JSON and is COCO detection format; categories are usable; at least one image is
  listed; every annotation names a listed image and a known category; besides, the training set has usable
  boxes (finite, with width and height inside the image, not crowd) and the val set has ground truth (COCO AP
  needs it); train and val list the same categories; a sample of the listed files exists in the image folder
  (a wrong folder); no listed or sampled image is above the data layer's MAX_IMAGE_PIXELS;
- `model.pretrained` when it is a local file or folder: it loads with `weights_only=True` and holds a state
  dict.

Image decoding is left to the data layer, which skips unreadable or truncated files with a warning count.
Synthetic datasets (`data.synthetic`) are generated on the workers and are not checked here. Connected to a
cluster (RAY_ADDRESS set), the data lives on the worker nodes, which need not include the driver's: data
the driver cannot see is then a warning instead of an error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from deim_ray.config.schema import Config, SplitConfig
# the data layer's own annotation checks (same rules and messages as when the workers load the dataset)
from deim_ray.data.coco import MAX_IMAGE_PIXELS, CategoryMap, LoadReport, check_image, too_large
from deim_ray.data.coco import _annotation_table as annotation_table
from deim_ray.data.coco import _image_entries as image_entries
from deim_ray.data.coco import _read_annotations as read_annotations
from deim_ray.data.coco import _training_boxes as training_boxes
from deim_ray.data.errors import DataError
from deim_ray.models.errors import ModelError
from deim_ray.models.pretrained import read_state_dict

log = logging.getLogger("deim_ray.driver")

SAMPLED_FILES = 16
"""Listed image files checked for existence per split (spread over the list)."""


WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


class PreflightError(ValueError):
    """A run request that cannot work (e.g. zero workers); the message says how to fix it."""


@dataclass(frozen=True)
class SplitSummary:
    split: str
    images: int
    annotations: int
    categories: tuple[int, ...]


def preflight(cfg: Config, on_cluster: bool | None = None) -> list[SplitSummary]:
    """Raise a one-line DataError or ModelError for data or weights the run cannot use; returns what it read."""
    if on_cluster is None:
        on_cluster = os.environ.get("RAY_ADDRESS", "local") not in ("", "local")
    summaries = []
    if cfg.data.synthetic is None:
        summaries = [s for s in (check_split("train", cfg.data.train, on_cluster),
                                 check_split("val", cfg.data.val, on_cluster)) if s is not None]
        _check_same_categories(summaries, cfg)
    _check_pretrained(cfg.model.pretrained)
    return summaries


def check_request(workers: int, cpus_per_worker: float, max_failures: int) -> None:
    """Raise PreflightError for worker settings no cluster can satisfy (before the config checks divide by them)."""
    if workers < 1:
        raise PreflightError(f"--workers must be at least 1, got {workers}")
    if cpus_per_worker <= 0:
        raise PreflightError(f"--cpus-per-worker must be positive, got {cpus_per_worker:g}")
    if max_failures < 0:
        raise PreflightError(f"--max-failures must be 0 or more, got {max_failures}")


def check_split(split: str, paths: SplitConfig, on_cluster: bool = False) -> SplitSummary | None:
    """Check one split's folder and annotation file; None when on a cluster and the driver cannot see them."""
    folder, ann_file = Path(paths.img_folder), Path(paths.ann_file)
    missing = [(what, key) for what, key, ok in ((f"image folder {folder}", "img_folder", folder.is_dir()),
                                                 (f"annotation file {ann_file}", "ann_file", ann_file.is_file()))
               if not ok]
    if missing and on_cluster:
        log.warning("preflight: %s not visible on the driver; the workers check the data",
                    " and ".join(what for what, _ in missing))
        return None
    if missing:
        what, key = missing[0]
        raise DataError(f"{what} does not exist; check data.{split}.{key}")
    raw = read_annotations(ann_file)
    cats = CategoryMap.from_coco(raw["categories"], str(ann_file))
    images = image_entries(raw, ann_file)
    table = annotation_table(raw, ann_file, {int(im["id"]) for im in images}, cats)
    if not raw["annotations"]:
        use = "training needs boxes" if split == "train" else "COCO evaluation needs ground-truth boxes"
        raise DataError(f"{ann_file} ({split}) has no annotations; {use}: add annotations or point "
                        f"data.{split}.ann_file to the right file")
    if split == "train":
        _check_usable_boxes(table, images, cats, ann_file)
    _check_listed_sizes(images, ann_file)
    _check_files_exist(images, folder, ann_file, split)
    return SplitSummary(split, len(images), len(raw["annotations"]), cats.ids)


def _check_usable_boxes(table: dict, images: list[dict], cats: CategoryMap, ann_file: Path) -> None:
    """The data layer's own box rules, with the annotation's image sizes (unbounded where it gives none)."""
    sizes = {int(im["id"]): ("", _number(im.get("width")), _number(im.get("height"))) for im in images}
    report = LoadReport()
    if not training_boxes(table, sizes, cats, report):
        raise DataError(f"{ann_file} (train) has no usable box: of {len(table['ints'])} annotations, "
                        f"{report.crowd} are crowd, {report.degenerate} have no width or height inside the image "
                        f"and {report.non_finite} hold NaN or infinite numbers; fix the boxes")


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("inf")


def _huge(w: float, h: float, name: str, where: str) -> DataError:
    return DataError(f"image {name} in {where} is {w:g}x{h:g} pixels, above the {MAX_IMAGE_PIXELS / 1e6:g} MP "
                     "limit (augmentation multiplies it up to 16 times); downscale it and its boxes, or remove it")


def _check_listed_sizes(images: list[dict], ann_file: Path) -> None:
    for im in images:
        w, h = _number(im.get("width")), _number(im.get("height"))
        if w != float("inf") and h != float("inf") and too_large(w, h):
            raise _huge(w, h, im["file_name"], str(ann_file))


def _check_files_exist(images: list[dict], folder: Path, ann_file: Path, split: str) -> None:
    """A wrong folder shows as none of the sampled files existing (single missing files are skipped later)."""
    step = max(1, len(images) // SAMPLED_FILES)
    sample = images[::step][:SAMPLED_FILES]
    if not any((folder / im["file_name"]).is_file() for im in sample):
        raise DataError(f"none of the {len(sample)} sampled image files of {ann_file} exist in {folder} (e.g. "
                        f"{sample[0]['file_name']}); check data.{split}.img_folder")
    for im in sample:
        problem, size = check_image(folder / im["file_name"])
        if problem == "too large":
            raise _huge(*size, im["file_name"], str(folder))


def _check_same_categories(summaries: list[SplitSummary], cfg: Config) -> None:
    if len(summaries) == 2 and summaries[0].categories != summaries[1].categories:
        raise DataError(f"train and val annotation files list different categories ({cfg.data.train.ann_file}: "
                        f"{list(summaries[0].categories)} vs {cfg.data.val.ann_file}: "
                        f"{list(summaries[1].categories)}); use one category list")


def _check_pretrained(source: str | None) -> None:
    """Local weights (a file or a folder) must load safely now, not in every worker later (hub ids load on the
    workers: a hub id may need a download the driver should not do)."""
    if not source:
        return
    path = Path(source).expanduser()
    if path.exists():
        read_state_dict(source)
    elif not path.exists() and (source.endswith(WEIGHT_SUFFIXES) or source.startswith((".", "/", "~"))):
        raise ModelError(f"model.pretrained {source!r} does not exist; fix the path")
