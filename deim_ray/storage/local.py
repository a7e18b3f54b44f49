"""storage layer: `LocalStorage`, a directory on this machine's disk (or a mounted shared filesystem).

Every write goes to a hidden temp file in the target's folder, is fsynced, then renamed over the target, so
a reader sees the old file or the complete new one. sha256 is computed while the bytes are written and is the
version a conditional write compares; `lock(key)` (an flock on a hidden lock file next to `key`) makes a
read-compare-write sequence atomic for every process that takes it.

A lock held for longer than `LOCK_BREAK_S` belongs to a process that is stuck (frozen, partitioned from the
filesystem, stopped in a debugger): the waiter replaces the lock file with a new one and goes on, so a newer
attempt of a run never waits forever for a stale one. The stale holder, should it wake up, still meets the
version checks of every conditional write.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import io
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from deim_ray.atomic import TEMP_SUFFIX, fsync_dir
from deim_ray.storage.base import (LOCK_SUFFIX, ObjectInfo, atomic_local_file, check_key, hash_stream, join_key,
                                   sha256_file)
from deim_ray.storage.errors import BadStorageURI, ObjectNotFound, PreconditionFailed

log = logging.getLogger("deim_ray.storage")

LOCK_BREAK_S = 120.0
"""How long one holder may keep a lock before a waiter takes it as stuck (critical sections take milliseconds)."""


class LocalStorage:
    """Objects are files under `root`; keys are their `/`-separated paths relative to it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.abspath(root))
        if self.root.exists() and not self.root.is_dir():
            raise BadStorageURI(f"storage root {self.root} is a file, not a directory; pass a directory path")

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    @property
    def uri(self) -> str:
        return str(self.root)

    def child_uri(self, key: str) -> str:
        return str(self._path(key))

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _info(self, key: str, sha: str, size: int) -> ObjectInfo:
        return ObjectInfo(key=key, uri=self.child_uri(key), size=size, sha256=sha, etag=sha)

    def _check_condition(self, key: str, if_match: str | None, if_none_match: bool) -> None:
        """PreconditionFailed unless `key`'s current version meets the condition (atomic only under `lock`)."""
        if if_match is None and not if_none_match:
            return
        path = self._path(key)
        current = sha256_file(path)[0] if path.is_file() else None
        if (if_none_match and current is not None) or (if_match is not None and current != if_match):
            raise PreconditionFailed(f"{path} changed since it was read (version {str(current)[:12]}, expected "
                                     f"{'none' if if_none_match else if_match[:12]})")

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _acquire(path.parent / f".{path.name}{LOCK_SUFFIX}", LOCK_BREAK_S) as f:
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        data = path.read_bytes()
        return data, hash_stream(io.BytesIO(data))[0]

    def copy(self, src: str, dst: str, *, if_match: str | None = None, if_none_match: bool = False) -> ObjectInfo:
        """A hard link where the filesystem has them (no bytes copied; it outlives a later delete of `src`)."""
        source, target = self._path(src), self._path(dst)
        if not source.is_file():
            raise ObjectNotFound(f"{source} does not exist; nothing to copy")
        self._check_condition(dst, if_match, if_none_match)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{os.getpid()}.{time.monotonic_ns()}{TEMP_SUFFIX}"
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links (some network mounts): copy the bytes
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        sha, size = sha256_file(target)
        return self._info(dst, sha, size)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{self.child_uri(key)} does not exist; check the storage root and key") from None

    def write_bytes(self, key: str, data: bytes, *, if_match: str | None = None,
                    if_none_match: bool = False) -> ObjectInfo:
        self._check_condition(key, if_match, if_none_match)
        sha, size = atomic_local_file(self._path(key), lambda f: hash_stream(io.BytesIO(data), f),
                                      uri=self.child_uri(key))
        return self._info(key, sha, size)

    def upload_file(self, key: str, local_path: str | os.PathLike) -> ObjectInfo:
        with self._open_source(local_path) as src:
            sha, size = atomic_local_file(self._path(key), lambda f: hash_stream(src, f), uri=self.child_uri(key))
        return self._info(key, sha, size)

    def download_file(self, key: str, local_path: str | os.PathLike,
                      expected_sha256: str | None = None) -> ObjectInfo:
        uri = self.child_uri(key)
        try:
            src = open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{uri} does not exist; check the storage root and key") from None
        with src:
            sha, size = atomic_local_file(local_path, lambda f: hash_stream(src, f), uri=uri,
                                          expected_sha256=expected_sha256)
        return self._info(key, sha, size)

    @staticmethod
    def _open_source(local_path: str | os.PathLike):
        try:
            return open(local_path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"local file {local_path} does not exist; nothing to upload") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        sha, size = sha256_file(path)
        return self._info(key, sha, size)

    def hash_object(self, key: str) -> str:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"{path} does not exist; check the storage root and key")
        return sha256_file(path)[0]

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _walk(self, prefix: str):
        """(key, path) of every file, temp files included, whose key starts with `prefix`."""
        start = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        for folder, _, files in os.walk(start):
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                key = join_key("" if rel == "." else rel, name)
                if key.startswith(prefix):
                    yield key, Path(folder) / name

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        check_key(prefix, allow_empty=True)
        if recursive:
            return sorted(key for key, path in self._walk(prefix) if not _is_hidden(path.name))
        folder = self.root / prefix if prefix else self.root
        if not folder.is_dir():
            return []
        return sorted(join_key(prefix, e.name) + ("/" if e.is_dir() else "")
                      for e in os.scandir(folder) if not _is_hidden(e.name))

    def abort_stale_uploads(self, prefix: str = "", older_than: dt.timedelta = dt.timedelta(0)) -> int:
        """Remove temp files of interrupted writes under `prefix` older than `older_than` (a killed process
        leaves them; they are never objects). Returns how many were removed."""
        check_key(prefix, allow_empty=True)
        cutoff = time.time() - older_than.total_seconds()
        stale = [path for _, path in self._walk(prefix) if _is_temp(path.name) and path.stat().st_mtime <= cutoff]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def ray_storage(self, subdir: str) -> tuple[str, None]:
        """Ray writes straight into `<root>/<subdir>` (an absolute path; no filesystem object needed)."""
        return str(self._path(subdir)), None


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _is_hidden(name: str) -> bool:
    """Temp and lock files: never objects."""
    return _is_temp(name) or (name.startswith(".") and name.endswith(LOCK_SUFFIX))


def _acquire(lock_path: Path, break_after: float):
    """The open lock file, flocked by this process. Polls without blocking; a lock file whose one holder kept
    it `break_after` seconds is replaced (a new inode nobody holds); a lock won on a replaced file is retried."""
    held_by, since, pause = None, time.monotonic(), 0.001
    while True:
        f = open(lock_path, "a")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            inode = os.fstat(f.fileno()).st_ino
            f.close()
            if inode != held_by:
                held_by, since = inode, time.monotonic()
            elif time.monotonic() - since > break_after:
                log.warning("%s was held for more than %.0f s by a process that does not release it; replacing it",
                            lock_path, break_after)
                _replace(lock_path)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            continue
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(f.fileno()).st_ino:
            return f
        f.close()  # won the lock of a file that was replaced meanwhile: take the new one


def _replace(lock_path: Path) -> None:
    fresh = lock_path.parent / f"{lock_path.name}.{os.getpid()}.{time.monotonic_ns()}{TEMP_SUFFIX}"
    fresh.touch()
    os.replace(fresh, lock_path)
