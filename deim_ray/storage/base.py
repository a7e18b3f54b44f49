"""storage layer: the `Storage` interface every backend implements, and `open_storage` to pick one.

Paths are `str` keys relative to the storage root, never `pathlib.Path`: a Path would collapse `s3://b/x`
into `s3:/b/x`, and keys must mean the same thing on a local disk and in a bucket. Keys use `/`, have no
empty, `.` or `..` segments and never start with `/`, so no key can leave its root.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, ContextManager, Protocol, runtime_checkable
from urllib.parse import urlsplit

from deim_ray.atomic import write_atomically
from deim_ray.storage.errors import BadStorageURI, ChecksumMismatch

if TYPE_CHECKING:
    import pyarrow.fs

    from deim_ray.config.schema import StorageConfig

CHUNK = 1 << 20
"""Bytes read per step when hashing or copying."""
LOCK_SUFFIX = ".lock"
"""Suffix of the hidden lock files of local conditional writes; listings skip them."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key under the root, full URI, size in bytes and sha256 (hex)."""

    key: str
    uri: str
    size: int
    sha256: str | None
    """Hex sha256 of the content; None only for an S3 object written by another tool without our metadata."""
    etag: str | None = None
    """Version token a conditional write compares (S3 ETag; the sha256 locally); None when not known."""


@runtime_checkable
class Storage(Protocol):
    """A root location (a directory or `s3://bucket/prefix`) holding objects addressed by `str` keys.

    Writes are atomic: a reader sees the old object or the complete new one, never a partial one.
    """

    @property
    def uri(self) -> str:
        """Root URI: an absolute directory path, or `s3://bucket/prefix`."""

    def child_uri(self, key: str) -> str:
        """Full URI of `key` (for manifests and messages)."""

    def read_bytes(self, key: str) -> bytes:
        """Whole object; ObjectNotFound if absent."""

    def write_bytes(self, key: str, data: bytes, *, if_match: str | None = None,
                    if_none_match: bool = False) -> ObjectInfo:
        """Create or replace `key` atomically with `data`. With `if_match` only if the stored version (etag) is
        that one, with `if_none_match` only if `key` does not exist; else PreconditionFailed, nothing written."""

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """(content, version) of `key` for a later `write_bytes(if_match=version)`; None if absent."""

    def copy(self, src: str, dst: str, *, if_match: str | None = None, if_none_match: bool = False) -> ObjectInfo:
        """Make `dst` a copy of `src` without moving the bytes through this process (S3 CopyObject, a hard link
        locally), with the same conditions as `write_bytes`."""

    def lock(self, key: str) -> ContextManager[None]:
        """Exclusive lock for a read-check-write sequence on `key` across processes (a lock file locally; a no-op
        on S3, whose conditional writes make each write atomic by themselves)."""

    def upload_file(self, key: str, local_path: str | os.PathLike) -> ObjectInfo:
        """Create or replace `key` atomically with the content of a local file."""

    def download_file(self, key: str, local_path: str | os.PathLike,
                      expected_sha256: str | None = None) -> ObjectInfo:
        """Copy `key` to `local_path` through a temp file, verified against `expected_sha256` (else the stored
        sha256). On any failure the temp file is removed and an existing `local_path` is left untouched."""

    def exists(self, key: str) -> bool:
        """Whether `key` names a complete object."""

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Sorted keys starting with `prefix`; with recursive=False, the immediate children of the "folder"
        `prefix`, sub-folders ending in `/`."""

    def delete(self, key: str) -> None:
        """Remove `key` (no error if absent)."""

    def stat(self, key: str) -> ObjectInfo | None:
        """Size and recorded sha256 of `key`, or None if absent."""

    def hash_object(self, key: str) -> str:
        """Re-read the stored bytes and return their sha256 (what verification trusts, not metadata)."""

    def abort_stale_uploads(self, prefix: str = "", older_than: dt.timedelta = dt.timedelta(0)) -> int:
        """Discard what interrupted writes under `prefix` left behind (S3 multipart uploads, local temp files)
        if started more than `older_than` ago; complete objects are never touched. Returns how many."""

    def ray_storage(self, subdir: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
        """`(storage_path, storage_filesystem)` for `ray.train.RunConfig` pointing at `<root>/<subdir>`."""


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Return `key` if it is a safe relative key; BadStorageURI otherwise."""
    if not isinstance(key, str) or (not key and not allow_empty):
        raise BadStorageURI(f"storage key {key!r} is empty or not a string; "
                            "pass a relative key like 'run/manifest.json'")
    if not key:
        return key
    parts = key.rstrip("/").split("/")
    if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise BadStorageURI(f"storage key {key!r} is not a plain relative key (no leading '/', '\\', empty, "
                            "'.' or '..' parts); use a key like 'run/artifacts/last.pth'")
    return key


def join_key(*parts: str) -> str:
    """Join key parts with `/`, ignoring empty ones."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def hash_stream(f: BinaryIO, sink: BinaryIO | None = None) -> tuple[str, int]:
    """sha256 and size of what `f` yields, optionally copying it into `sink` on the way."""
    digest, size = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest(), size


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """sha256 (hex) and size of a local file."""
    with open(path, "rb") as f:
        return hash_stream(f)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); BadStorageURI when malformed."""
    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    example = "use s3://BUCKET or s3://BUCKET/PREFIX"
    if not bucket:
        raise BadStorageURI(f"storage URI {uri!r} has no bucket name; {example}")
    if parts.query or parts.fragment or "@" in bucket or ":" in bucket:
        raise BadStorageURI(f"storage URI {uri!r} has a query, fragment, port or user part; {example} and set "
                            "the endpoint with storage.endpoint_url or AWS_ENDPOINT_URL_S3")
    if not 3 <= len(bucket) <= 63 or bucket != bucket.lower():
        raise BadStorageURI(f"bucket name {bucket!r} in {uri!r} must be 3-63 lowercase characters; {example}")
    if prefix:
        check_key(prefix)
    return bucket, prefix


def split_run_uri(run_uri: str) -> tuple[str, str]:
    """`<root>/<name>` -> (root URI, run name), for a run directory given as one URI."""
    hint = "use ROOT/NAME, e.g. s3://bucket/runs/person-n or ./runs/person-n"
    if urlsplit(run_uri).scheme.lower() == "s3":
        bucket, prefix = parse_s3_uri(run_uri)
        parent, _, name = prefix.rpartition("/")
        if not name:
            raise BadStorageURI(f"run URI {run_uri!r} names a bucket, not a run directory; {hint}")
        return f"s3://{join_key(bucket, parent)}", name
    path = urlsplit(run_uri).path if run_uri.lower().startswith("file:") else run_uri
    p = Path(path.rstrip("/") or "/").expanduser()
    if p.name in ("", ".", ".."):
        raise BadStorageURI(f"run URI {run_uri!r} does not end in a run name; {hint}")
    return str(p.parent), p.name


def open_storage(uri: str, storage_cfg: StorageConfig | None = None) -> Storage:
    """Open the storage root `uri`: a plain or relative path or `file://...` gives LocalStorage,
    `s3://bucket[/prefix]` gives S3Storage (endpoint and region from `storage_cfg`, else the AWS environment).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise BadStorageURI(f"storage URI {uri!r} is empty; pass a directory or s3://bucket/prefix")
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "s3":
        from deim_ray.storage.s3 import S3Storage

        bucket, prefix = parse_s3_uri(uri)
        return S3Storage(bucket, prefix, storage_cfg)
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise BadStorageURI(f"file URI {uri!r} must be file:///absolute/path; or pass a plain path")
        uri = parts.path
    elif len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise BadStorageURI(f"storage URI {uri!r} uses unsupported scheme '{scheme}://'; "
                            "use a directory path, file:///path or s3://bucket/prefix")
    from deim_ray.storage.local import LocalStorage

    return LocalStorage(Path(uri).expanduser())


def check_sha256(uri: str, actual: str, expected: str | None) -> None:
    """ChecksumMismatch unless `expected` is None or equals `actual`."""
    if expected is not None and actual != expected:
        raise ChecksumMismatch(f"{uri} has sha256 {actual[:16]}... but {expected[:16]}... was expected; the object "
                               "is corrupt or was replaced: re-upload it (or resume the run) and fetch again")


def atomic_local_file(path: str | os.PathLike, fill: Callable[[BinaryIO], tuple[str, int] | None], *,
                      uri: str, expected_sha256: str | None = None) -> tuple[str, int]:
    """Write `path` atomically (`deim_ray.atomic`), checking the bytes before they replace anything.

    `fill(f)` writes the content and may return (sha256, size) computed on the way; otherwise the temp file
    is hashed. A sha256 other than `expected_sha256` raises ChecksumMismatch; on any error the temp file is
    removed and an existing `path` is left untouched. Returns (sha256, size).
    """
    def fill_and_check(f: BinaryIO) -> tuple[str, int]:
        digest = fill(f)
        if digest is None:
            f.flush()
            f.seek(0)
            digest = hash_stream(f)
        check_sha256(uri, digest[0], expected_sha256)
        return digest
    return write_atomically(path, fill_and_check)
