"""Files and folders a command writes for the user (`-o`): whole or not at all.

Shared by all layers, like `logs.py`. A command that fails or is interrupted leaves nothing the user did not
have before: a file is written under a temporary name beside its target and moved onto it only when complete,
and the folders created on the way to it are removed again, with whatever was written into them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deim_ray.atomic import atomic_path


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (None when `folder` exists)."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


@contextmanager
def output_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """`folder`, created if needed; if the block raises (an interrupt too), the folders created here are
    removed again with their content."""
    folder = Path(folder)
    created = _first_missing(folder.absolute())
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


@contextmanager
def output_file(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `target` (same suffix, so writers that go by it pick the same format) to write
    the whole file to; moved onto `target` when the block ends (`atomic.atomic_path`), removed (with the folders
    made for it) if it raises."""
    target = Path(target)
    with output_dir(target.parent), atomic_path(target) as partial:
        yield partial
