"""data layer: cheap checks of image files (header and end marker), shared by every annotation format.

An image is measured as a viewer shows it: EXIF orientation applied, since annotation tools draw boxes on the
upright image. The check parses the header and looks for the JPEG/PNG end-of-file marker; a file without the
marker is decoded once to decide, so a 100k-image folder is checked in seconds.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
MAX_IMAGE_PIXELS = 40_000_000
"""Largest image (width x height) a dataset uses, e.g. 8000 x 5000; larger ones are refused at preflight and
skipped by the dataset: ZoomOut alone makes a canvas up to 16 times the image."""
ORIENTATION = 0x0112
"""The EXIF tag of the orientation a viewer applies."""
"""EXIF tag: values 5..8 mean the stored pixels are transposed relative to the upright image."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""File suffixes (lower case) taken for images where a layout lists a folder instead of file names."""


def _has_end_marker(path: Path, fmt: str | None) -> bool:
    marker = _END_MARKERS.get(fmt or "")
    if marker is None:
        return True
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - len(marker)))
        return f.read() == marker


def too_large(width: int, height: int) -> bool:
    return width * height > MAX_IMAGE_PIXELS


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as shown, i.e. after its EXIF orientation."""
    w, h = im.size
    return (h, w) if im.getexif().get(ORIENTATION) in (5, 6, 7, 8) else (w, h)


def check_image(path: Path) -> tuple[str | None, tuple[int, int]]:
    """(None, (width, height)) for a usable image file (upright size), else (reason, (0, 0)); a "too large"
    image keeps its size, for the message."""
    try:
        with Image.open(path) as im:
            size, fmt = upright_size(im), im.format
    except FileNotFoundError:
        return "missing", (0, 0)
    except Exception:  # PIL raises many types for garbage files; all mean the same here
        return "unreadable", (0, 0)
    if too_large(*size):
        return "too large", size
    if _has_end_marker(path, fmt):
        return None, size
    try:  # no end marker: trailing bytes after it, or a truncated file; decoding decides
        with Image.open(path) as im:
            im.load()
    except Exception:
        return "truncated", (0, 0)
    return None, size


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively), sorted, for layouts that list a folder, not file names."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
