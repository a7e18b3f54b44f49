"""driver layer: using a trained model — `deim-ray predict` and `deim-ray export`.

Both take a run (directory or s3:// URI: its verified `final` artifact is fetched) or a `final.pth` file.
`predict` writes `detections.json` (COCO results: image_id, file_name, category_id with the dataset's own ids,
bbox [x, y, w, h] in pixels, score) and each image with its boxes, class names and scores drawn. Nothing is
overwritten unless `force` is given.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

from deim_ray.atomic import write_atomically
from deim_ray.config.schema import StorageConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DETECTIONS_FILE = "detections.json"
_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


class UseError(RuntimeError):
    """An input of predict/export a user can fix (unreadable image, no images, output exists)."""


@contextmanager
def final_artifact(source: str, storage_cfg: StorageConfig | None = None) -> Iterator[Path]:
    """A local `final.pth` for `source`: the file itself, or the run's final artifact fetched and verified."""
    path = Path(source)
    if path.is_file():
        yield path
        return
    from deim_ray.storage import fetch

    with tempfile.TemporaryDirectory(prefix="deim_ray_final_") as tmp:
        yield fetch(source, "final", tmp, storage_cfg)


def image_files(inputs: list[str]) -> list[Path]:
    """The image files named or contained (not recursively) in `inputs`, in the given order, dirs sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{item} does not exist; pass image files or folders of images")
    if not files:
        raise UseError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(inputs)}")
    return files


def _read(path: Path) -> Image.Image:
    from deim_ray.models.inference import load_rgb

    try:
        return load_rgb(path)
    except Exception as e:
        raise UseError(f"{path} is not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                       ) from None


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} output file(s) would be overwritten); "
                              "choose another -o or pass --force")


def predict(source: str, inputs: list[str], out_dir: str, *, score: float = 0.3, batch_size: int = 8,
            device: str | None = None, storage_cfg: StorageConfig | None = None, force: bool = False) -> Path:
    """Detect objects in every input image; returns the path of detections.json."""
    import torch

    from deim_ray.models.inference import Detector

    files = image_files(inputs)
    out = Path(out_dir)
    drawn = [out / f"{i:04d}_{f.stem}.jpg" for i, f in enumerate(files)]
    _refuse_overwrite([out / DETECTIONS_FILE, *drawn], force)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with final_artifact(source, storage_cfg) as final:
        detector = Detector.from_final(final, device=device)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for start in range(0, len(files), batch_size):
        batch = files[start:start + batch_size]
        images = [_read(f) for f in batch]
        for k, (f, image, dets) in enumerate(zip(batch, images, detector.detect(images, score))):
            results += _coco_results(start + k + 1, f, dets, detector.category_ids)
            _draw(image, dets, detector.class_names).save(drawn[start + k], quality=92)
    _atomic_json(out / DETECTIONS_FILE, results)
    return out / DETECTIONS_FILE


def _coco_results(image_id: int, path: Path, dets: dict, category_ids: list[int]) -> list[dict]:
    rows = []
    for label, box, score in zip(dets["labels"].tolist(), dets["boxes"].tolist(), dets["scores"].tolist()):
        x0, y0, x1, y1 = box
        rows.append({"image_id": image_id, "file_name": str(path), "category_id": category_ids[label],
                     "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                     "score": round(score, 5)})
    return rows


def _draw(image: Image.Image, dets: dict, class_names: list[str]) -> Image.Image:
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    for label, box, score in zip(dets["labels"].tolist(), dets["boxes"].tolist(), dets["scores"].tolist()):
        colour = _COLOURS[label % len(_COLOURS)]
        draw.rectangle(box, outline=colour, width=width)
        text = f"{class_names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text)
        y = max(0, box[1] - (bottom - top) - 2)
        draw.rectangle([box[0], y, box[0] + right - left + 4, y + bottom - top + 2], fill=colour)
        draw.text((box[0] + 2, y), text, fill=(255, 255, 255))
    return canvas


def _atomic_json(path: Path, doc) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(doc, indent=1).encode()))


def export(source: str, output: str, *, fmt: str = "onnx", opset: int = 17, dynamic_batch: bool = False,
           storage_cfg: StorageConfig | None = None, force: bool = False) -> Path:
    """Write the deployable model of `source` to `output` (ONNX, postprocessing inside); returns its path."""
    from deim_ray.models.onnx_export import export_onnx

    if fmt != "onnx":
        raise UseError(f"export format {fmt!r} is not supported; use --format onnx")
    _refuse_overwrite([Path(output)], force)
    with final_artifact(source, storage_cfg) as final:
        return export_onnx(final, output, opset=opset, dynamic_batch=dynamic_batch)
