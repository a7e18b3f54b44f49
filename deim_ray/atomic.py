"""One way to write a local file atomically, shared by all layers (like `logs.py` and `redact.py`).

The content goes to a hidden temp file with a unique name in the target's folder (`.<name>.<random>.partial`),
is flushed and fsynced, then renamed over the target and the rename persisted: a reader (or a crash) sees the
old file or the complete new one, never a part, and two writers never share a temp file. On any error the temp
file is removed and the target is left as it was. Local storage's listings skip the temp files (TEMP_SUFFIX).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")

TEMP_SUFFIX = ".partial"
"""Suffix of the hidden temp files of atomic local writes."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename in `path` (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _replacing(tmp: str, path: Path) -> Iterator[None]:
    """Rename `tmp` (written and fsynced inside the block) onto `path`, persisting the rename; remove `tmp` and
    leave `path` as it was if the block raised."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A unique temp path beside `path` (ending in `path`'s suffix, for writers that go by it) to write the whole
    file to, by name; on leaving the block it is fsynced and renamed onto `path`, or removed if the block raised."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f"{TEMP_SUFFIX}{path.suffix}")
    os.close(fd)
    with _replacing(tmp, path):
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def write_atomically(path: str | os.PathLike, fill: Callable[[BinaryIO], T]) -> T:
    """Create or replace `path` with what `fill(f)` writes to the binary file `f` (readable too, for a check
    before the rename: an exception from `fill` leaves `path` untouched). Returns what `fill` returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    with _replacing(tmp, path):
        with os.fdopen(fd, "w+b") as f:
            result = fill(f)
            f.flush()
            os.fsync(f.fileno())
    return result
