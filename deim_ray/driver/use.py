"""driver layer: using a trained model — `deim-ray predict` and `deim-ray export`.

Both take a run (directory or s3:// URI: its verified `final` artifact is fetched) or a `final.pth` file.
`predict` writes `detections.json` (COCO results: image_id, file_name, category_id with the dataset's own ids,
bbox [x, y, w, h] in pixels, score) and each image with its boxes, class names and scores drawn, under its own
name (`<name>.jpg`; a name met twice, from two folders, gets `_1`, `_2`, ...). Images of an annotated set
(`data_dir`: its val split) keep the set's image ids, so the file can be scored against it; loose images are
numbered 1, 2, ... in the order given. Nothing is overwritten unless `force` is given, and a failed or interrupted
command leaves no output behind; images that cannot be read are skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

from deim_ray.config.schema import StorageConfig
from deim_ray.outputs import output_dir, output_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DETECTIONS_FILE = "detections.json"
log = logging.getLogger("deim_ray.driver")

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


def _read(path: Path) -> Image.Image | str:
    """The image, or why it cannot be read (a truncated or broken file is skipped, not fatal)."""
    from deim_ray.models.inference import load_rgb

    try:
        return load_rgb(path)
    except Exception as e:  # PIL raises several types for broken and truncated files
        return f"{path.name} ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} output file(s) would be overwritten); "
                              "choose another -o or pass --force")


def drawn_names(files: list[Path]) -> list[str]:
    """The output name of each input: `<name>.jpg`, with `_1`, `_2`, ... for a name already taken."""
    taken: set[str] = set()
    names = []
    for f in files:
        name, n = f"{f.stem}.jpg", 0
        while name.lower() in taken:  # case-blind: one folder on macOS or Windows
            n += 1
            name = f"{f.stem}_{n}.jpg"
        taken.add(name.lower())
        names.append(name)
    return names


def _images_and_ids(inputs: list[str], data_dir: str | None) -> tuple[list[Path], list[int]]:
    """The images to predict and the image id of each: the val split's own ids with `data_dir`, else 1..N."""
    if data_dir is None:
        files = image_files(inputs)
        return files, list(range(1, len(files) + 1))
    if inputs:
        raise UseError("pass images or --data DIR, not both (--data predicts its val split's images)")
    from deim_ray.data.coco import CocoDetection
    from deim_ray.driver.evaluation import val_split_of

    split = val_split_of(data_dir)
    records = CocoDetection.from_split(split).records
    return [Path(r.path) for r in records], [r.image_id for r in records]


def predict(source: str, inputs: list[str], out_dir: str, *, score: float = 0.3, batch_size: int = 8,
            device: str | None = None, storage_cfg: StorageConfig | None = None, force: bool = False,
            data_dir: str | None = None) -> Path:
    """Detect objects in every readable input image, or the val split of `data_dir` (the others are skipped with a
    warning that counts them); returns the path of detections.json. The output appears whole at the end or not at
    all."""
    import torch

    from deim_ray.models.inference import Detector

    files, image_ids = _images_and_ids(inputs, data_dir)
    out = Path(out_dir)
    names = drawn_names(files)
    _refuse_overwrite([out / DETECTIONS_FILE, *(out / name for name in names)], force)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with final_artifact(source, storage_cfg) as final:
        detector = Detector.from_final(final, device=device)
    with output_dir(out), tempfile.TemporaryDirectory(dir=out, prefix=".predict-") as staging:
        results, drawn, skipped = _detect_all(detector, files, image_ids, names, score, batch_size, Path(staging))
        if not drawn:
            raise UseError(f"none of the {len(files)} image(s) could be read, e.g. {skipped[0]}; pass image files")
        if skipped:
            log.warning("skipped %d of %d image(s) that could not be read: %s", len(skipped), len(files),
                        ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
        for name in drawn:
            os.replace(Path(staging) / name, out / name)
        _atomic_json(out / DETECTIONS_FILE, results)
    return out / DETECTIONS_FILE


def _detect_all(detector, files: list[Path], image_ids: list[int], names: list[str], score: float, batch_size: int,
                staging: Path) -> tuple[list[dict], list[str], list[str]]:
    """Detections of every readable file (COCO rows under `image_ids`), its drawn image saved in `staging` under
    its name in `names`; returns (rows, drawn file names, why each unreadable file was skipped)."""
    results, drawn, skipped = [], [], []
    for start in range(0, len(files), batch_size):
        read = [(i, _read(files[i])) for i in range(start, min(start + batch_size, len(files)))]
        skipped += [image for _, image in read if isinstance(image, str)]
        batch = [(i, image) for i, image in read if not isinstance(image, str)]
        if not batch:
            continue
        for (i, image), dets in zip(batch, detector.detect([image for _, image in batch], score)):
            results += _coco_results(image_ids[i], files[i], dets, detector.category_ids)
            drawn.append(names[i])
            _draw(image, dets, detector.class_names).save(staging / drawn[-1], quality=92)
    return results, drawn, skipped


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
    with output_file(path) as partial:
        partial.write_text(json.dumps(doc, indent=1))


def export(source: str, output: str, *, fmt: str = "onnx", opset: int = 17, dynamic_batch: bool = False,
           storage_cfg: StorageConfig | None = None, force: bool = False) -> Path:
    """Write the deployable model of `source` to `output` (ONNX, postprocessing inside); returns its path."""
    from deim_ray.models.onnx_export import export_onnx

    if fmt != "onnx":
        raise UseError(f"export format {fmt!r} is not supported; use --format onnx")
    _refuse_overwrite([Path(output)], force)
    with final_artifact(source, storage_cfg) as final:
        return export_onnx(final, output, opset=opset, dynamic_batch=dynamic_batch)
