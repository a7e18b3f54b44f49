"""data layer: a seeded synthetic "shapes" detection dataset written to disk in COCO format.

Layout under `root`: `train/*.jpg`, `val/*.jpg`, `annotations/{train,val}.json`, and `.complete` (written
last; it records the settings the files were made with). Each image has a noisy background and 1..max_objects
filled shapes; the class decides both the shape (rectangle, ellipse, triangle, ...) and its colour.
Category ids are deliberately sparse and not 0-based (1, 3, 5, ...) so the id <-> class-index map is exercised.

`python -m deim_ray.data.synthetic --layout yolo|voc|coco-export|coco --out DIR [--num-train N ...]` writes the set
in any layout `data.layouts` reads (`data.layout_writer`).

Same settings -> byte-identical annotation JSON and images (per-image seeds), so every node of a cluster can
generate its own copy. Generation runs under an exclusive file lock on `root/.lock`; concurrent callers on one
machine wait and then find the dataset complete.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from deim_ray.atomic import write_atomically
from deim_ray.config.schema import DataConfig, SplitConfig, SyntheticConfig
from deim_ray.data.errors import DataError

log = logging.getLogger("deim_ray.data")

FORMAT_VERSION = 1
MARKER = ".complete"
SHAPES = ("rectangle", "ellipse", "triangle", "diamond", "cross", "hexagon")
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (255, 255, 255), (0, 0, 0))
_SPLITS = {"train": 0, "val": 1}


def category_id(k: int) -> int:
    """The COCO id of class index k: 1, 3, 5, ... (sparse and not 0-based on purpose)."""
    return 2 * k + 1


def synthetic_splits(root: str | Path) -> tuple[SplitConfig, SplitConfig]:
    """The train and val `SplitConfig`s of a synthetic dataset at `root`."""
    root = Path(root)
    return (SplitConfig(str(root / "train"), str(root / "annotations" / "train.json")),
            SplitConfig(str(root / "val"), str(root / "annotations" / "val.json")))


def _colour(k: int) -> tuple[int, int, int]:
    if k < len(PALETTE):
        return PALETTE[k]
    hue = (k * 0.618034) % 1.0  # golden-ratio hues stay apart for any number of extra classes
    return tuple(int(255 * c) for c in _hsv(hue))


def _hsv(h: float) -> tuple[float, float, float]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    return [(1, f, 0), (1 - f, 1, 0), (0, 1, f), (0, 1 - f, 1), (f, 0, 1), (1, 0, 1 - f)][i]


def _polygon(shape: str, x: int, y: int, w: int, h: int) -> list[tuple[float, float]]:
    cx, cy = x + w / 2, y + h / 2
    if shape == "triangle":
        return [(cx, y), (x + w, y + h), (x, y + h)]
    if shape == "diamond":
        return [(cx, y), (x + w, cy), (cx, y + h), (x, cy)]
    if shape == "hexagon":
        q = w / 4
        return [(x + q, y), (x + w - q, y), (x + w, cy), (x + w - q, y + h), (x + q, y + h), (x, cy)]
    a, b = w / 3, h / 3  # cross
    return [(x + a, y), (x + 2 * a, y), (x + 2 * a, y + b), (x + w, y + b), (x + w, y + 2 * b), (x + 2 * a, y + 2 * b),
            (x + 2 * a, y + h), (x + a, y + h), (x + a, y + 2 * b), (x, y + 2 * b), (x, y + b), (x + a, y + b)]


_AREA_FRACTION = {"rectangle": 1.0, "ellipse": np.pi / 4, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9,
                  "hexagon": 0.75}


def _draw(draw: ImageDraw.ImageDraw, k: int, box: tuple[int, int, int, int]) -> float:
    """Draw class k filling `box` (x, y, w, h); returns the shape's area."""
    shape = SHAPES[k % len(SHAPES)]
    x, y, w, h = box
    colour = _colour(k)
    if shape == "rectangle":
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
    elif shape == "ellipse":
        draw.ellipse([x, y, x + w - 1, y + h - 1], fill=colour)
    else:
        draw.polygon(_polygon(shape, x, y, w - 1, h - 1), fill=colour)
    return float(w * h * _AREA_FRACTION[shape])


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _place(rng: np.random.Generator, side: int, placed: list[tuple[int, ...]]) -> tuple[int, int, int, int] | None:
    """A random box of 12-45% of the side that overlaps no placed box by more than IoU 0.2 (None after 20 tries)."""
    for _ in range(20):
        w, h = (int(v) for v in rng.uniform(0.12, 0.45, size=2) * side)
        w, h = max(w, 4), max(h, 4)
        x, y = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
        if all(_iou((x, y, w, h), p) <= 0.2 for p in placed):
            return x, y, w, h
    return None


def _make_image(cfg: SyntheticConfig, split: str, i: int) -> tuple[Image.Image, list[tuple[int, tuple, float]]]:
    """Image i of a split and its objects [(class, (x, y, w, h), area)]; depends only on (seed, split, i)."""
    rng = np.random.default_rng([cfg.seed, _SPLITS[split], i])
    side = cfg.image_size
    base = rng.integers(90, 166, size=3)
    pixels = base + rng.normal(0.0, 14.0, size=(side, side, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    objects: list[tuple[int, tuple, float]] = []
    for _ in range(int(rng.integers(1, cfg.max_objects + 1))):
        box = _place(rng, side, [o[1] for o in objects])
        if box is not None:
            k = cfg.first_class + int(rng.integers(0, cfg.num_classes))
            objects.append((k, box, _draw(draw, k, box)))
    return image, objects


def _write_split(root: Path, cfg: SyntheticConfig, split: str, count: int) -> None:
    folder = root / split
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        image, objects = _make_image(cfg, split, i)
        name = f"{i:06d}.jpg"
        image.save(folder / name, quality=92)
        images.append({"id": i + 1, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for k, (x, y, w, h), area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category_id(k),
                                "bbox": [x, y, w, h], "area": area, "iscrowd": 0})
    categories = [{"id": category_id(k), "name": f"{SHAPES[k % len(SHAPES)]}-{k}", "supercategory": "shape"}
                  for k in range(cfg.first_class, cfg.first_class + cfg.num_classes)]
    doc = {"info": {"description": "deim_ray synthetic shapes", "version": FORMAT_VERSION},
           "images": images, "annotations": annotations, "categories": categories}
    _atomic_write(root / "annotations" / f"{split}.json", json.dumps(doc, sort_keys=True).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    write_atomically(path, lambda f: f.write(data))


def _fingerprint(cfg: SyntheticConfig) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if not (k == "first_class" and v == 0)}  # as before it existed
    return json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True)


def _validate(cfg: SyntheticConfig) -> None:
    for name in ("num_train", "num_val", "num_classes", "max_objects"):
        if getattr(cfg, name) < 1:
            raise DataError(f"data.synthetic.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.first_class < 0:
        raise DataError(f"data.synthetic.first_class must be >= 0, got {cfg.first_class}")
    if cfg.image_size < 32:
        raise DataError(f"data.synthetic.image_size must be >= 32 pixels, got {cfg.image_size}")


def generate_shapes(root: str | Path, cfg: SyntheticConfig) -> tuple[SplitConfig, SplitConfig]:
    """Write the synthetic dataset to `root` unless it is already complete; returns (train, val) splits.

    Idempotent and safe to call from several processes at once. Raises DataError if `root` holds a
    dataset made with other settings (delete it or choose another root).
    """
    _validate(cfg)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker, wanted = root / MARKER, _fingerprint(cfg)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            if marker.read_text() != wanted:
                raise DataError(f"{root} holds a synthetic dataset made with other settings ({marker.read_text()}); "
                                f"delete {root} or point data.train/val to another folder")
            return synthetic_splits(root)
        for leftover in ("train", "val", "annotations"):  # an interrupted earlier run
            shutil.rmtree(root / leftover, ignore_errors=True)
        log.info("generating synthetic shapes dataset in %s (%d train, %d val images)", root, cfg.num_train,
                 cfg.num_val)
        _write_split(root, cfg, "train", cfg.num_train)
        _write_split(root, cfg, "val", cfg.num_val)
        _atomic_write(marker, wanted.encode())
    return synthetic_splits(root)


def ensure_dataset(data: DataConfig) -> DataConfig:
    """Generate the synthetic dataset when `data.synthetic` is set (no-op otherwise); returns `data`.

    The synthetic layout is fixed, so `data.train`/`data.val` must be `synthetic_splits(root)` for one root
    (the parent of `data.train.img_folder`).
    """
    if data.synthetic is None:
        return data
    root = Path(data.train.img_folder).parent
    expected = synthetic_splits(root)
    given = (data.train, data.val)
    if [Path(p).resolve() for s in given for p in (s.img_folder, s.ann_file)] != \
            [Path(p).resolve() for s in expected for p in (s.img_folder, s.ann_file)]:
        raise DataError(f"data.synthetic is set, so data.train/val must follow the generated layout: "
                        f"train={expected[0].img_folder} + {expected[0].ann_file}, val={expected[1].img_folder} + "
                        f"{expected[1].ann_file}")
    generate_shapes(root, data.synthetic)
    return data


def main(argv: list[str] | None = None) -> int:
    """Write the shapes set in a chosen layout (tests and end-to-end tries of `--data DIR`)."""
    from deim_ray.data.layout_writer import LAYOUTS, write_layout  # the writer reads splits; this module need not

    parser = argparse.ArgumentParser(prog="python -m deim_ray.data.synthetic", description=main.__doc__)
    parser.add_argument("--layout", choices=LAYOUTS, required=True)
    parser.add_argument("--out", required=True, help="a new or empty folder")
    for f in fields(SyntheticConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    args = parser.parse_args(argv)
    cfg = SyntheticConfig(**{f.name: getattr(args, f.name) for f in fields(SyntheticConfig)})
    with tempfile.TemporaryDirectory() as tmp:
        train, val = generate_shapes(tmp, cfg)
        print(write_layout(train, val, args.layout, args.out).describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
