"""storage layer: `RunStore`, one run's directory `<root>/<name>/` and the rules for writing it.

    <root>/<name>/manifest.json          state machine + artifact records (the public contract)
                  config.yaml            resolved config            (write_text / read_text)
                  metrics.jsonl          one JSON line per epoch    (write_text / read_text)
                  artifacts/<name>.pth   last, best_stg1, best_stg2, final
                  ray/...                what Ray Train writes      (ray_storage)

An artifact is uploaded first and recorded in the manifest second, so the manifest only ever names complete,
checksummed objects. Nothing here deletes an object. One process writes a run at a time (the driver between
stages, rank 0 during a stage); within a process, manifest updates are serialised by a lock.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from pathlib import Path

from deim_ray.storage.base import ObjectInfo, Storage, check_key, join_key
from deim_ray.storage.errors import BadStorageURI, ChecksumMismatch, ManifestError
from deim_ray.storage.manifest import (MANIFEST_KEY, ArtifactRecord, Manifest, RunState, artifact_key, finite_ap,
                                       utc_now)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}")


def check_run_name(name: str) -> str:
    """Return `name` if it is one safe path segment (letters, digits and `._=+-`, starting with a letter or digit)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise BadStorageURI(f"run name {name!r} is not usable: use 1-128 letters, digits or ._=+-, starting with "
                            "a letter or digit (no '/' or '..'), e.g. person-n or trial-a1b2_00003")
    return name


class RunStore:
    """The run directory `name` inside `storage` (see the module docstring for its layout)."""

    def __init__(self, storage: Storage, name: str):
        self.storage = storage
        self.name = check_run_name(name)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r})"

    @property
    def uri(self) -> str:
        """URI of the run directory, e.g. s3://bucket/runs/person-n."""
        return self.storage.child_uri(self.name)

    def key(self, rel: str) -> str:
        """Storage key of `rel` (a key relative to the run directory)."""
        return join_key(self.name, check_key(rel))

    def exists(self, rel: str) -> bool:
        return self.storage.exists(self.key(rel))

    def read_text(self, rel: str) -> str:
        """UTF-8 text of `rel` (e.g. "config.yaml", "metrics.jsonl"); ObjectNotFound if absent."""
        return self.storage.read_bytes(self.key(rel)).decode("utf-8")

    def write_text(self, rel: str, text: str) -> ObjectInfo:
        """Replace `rel` atomically with `text`."""
        return self.storage.write_bytes(self.key(rel), text.encode("utf-8"))

    def read_manifest(self) -> Manifest | None:
        """The run's manifest, or None when the run does not exist yet."""
        key = self.key(MANIFEST_KEY)
        if not self.storage.exists(key):
            return None
        return Manifest.loads(self.storage.read_bytes(key).decode("utf-8"), source=self.storage.child_uri(key))

    def _manifest(self) -> Manifest:
        manifest = self.read_manifest()
        if manifest is None:
            raise ManifestError(f"run {self.uri} has no manifest.json; start the run (deim-ray train) first")
        return manifest

    def write_manifest(self, manifest: Manifest) -> None:
        """Write `manifest` atomically (stamping `updated_at`)."""
        if manifest.name != self.name:
            raise ManifestError(f"manifest of run '{manifest.name}' cannot be written into run '{self.name}'")
        manifest.updated_at = utc_now()
        self.storage.write_bytes(self.key(MANIFEST_KEY), manifest.dumps().encode("utf-8"))

    def transition(self, new_state: RunState, note: str = "") -> Manifest:
        """Move the stored manifest to `new_state` (ManifestError if illegal); returns the written manifest."""
        with self._lock:
            manifest = self._manifest()
            manifest.advance(new_state, note)
            self.write_manifest(manifest)
        return manifest

    def put_artifact(self, name: str, local_path: str | os.PathLike, *, epoch: int, stage: int,
                     ap: float | None) -> ArtifactRecord:
        """Upload `local_path` as `artifacts/<name>.pth`, then record it in the manifest (in that order)."""
        key = artifact_key(name)
        info = self.storage.upload_file(self.key(key), local_path)
        record = ArtifactRecord(uri=info.uri, sha256=info.sha256, epoch=int(epoch), stage=int(stage),
                                ap=finite_ap(ap), size=info.size, key=key, updated_at=utc_now())
        with self._lock:
            manifest = self._manifest()
            manifest.artifacts[name] = record
            self.write_manifest(manifest)
        return record

    def _record(self, name: str) -> ArtifactRecord:
        artifact_key(name)  # validates the name
        record = self._manifest().artifacts.get(name)
        if record is None:
            raise ManifestError(f"run {self.uri} has no '{name}' artifact recorded yet; check `deim-ray resolve "
                                f"{self.uri}` for what exists")
        return record

    def verify_artifact(self, name: str) -> ArtifactRecord:
        """Compare the stored `artifacts/<name>.pth` with the manifest (present, same size, same re-hashed sha256);
        ChecksumMismatch if not."""
        record = self._record(name)
        stored = self.storage.stat(self.key(artifact_key(name)))
        if stored is None:
            raise ChecksumMismatch(f"{record.uri} is missing although the manifest records it; resume the run to "
                                   "write it again")
        if record.size is not None and stored.size != record.size:
            raise ChecksumMismatch(f"{record.uri} has {stored.size} bytes but the manifest records {record.size}; "
                                   "the object was replaced or truncated: resume the run to write it again")
        actual = self.storage.hash_object(self.key(artifact_key(name)))
        if actual != record.sha256:
            raise ChecksumMismatch(f"{record.uri} has sha256 {actual[:16]}... but the manifest records "
                                   f"{record.sha256[:16]}...; the object was replaced or corrupted: resume the "
                                   "run to write it again")
        return record

    def open_artifact(self, name: str, local_dir: str | os.PathLike) -> Path:
        """Download `artifacts/<name>.pth` into `local_dir/<name>.pth`, verified against the manifest's sha256."""
        record = self._record(name)
        dest = Path(local_dir) / f"{name}.pth"
        self.storage.download_file(self.key(artifact_key(name)), dest, expected_sha256=record.sha256)
        return dest

    def sweep_interrupted_writes(self, older_than: dt.timedelta = dt.timedelta(minutes=15)) -> int:
        """Discard unfinished uploads / temp files of this run older than `older_than` (left by a killed
        process; never a complete object). Call it when (re)starting a run; returns how many."""
        return self.storage.abort_stale_uploads(self.name + "/", older_than)

    def ray_storage(self, subdir: str = "ray"):
        """`(storage_path, storage_filesystem)` for `ray.train.RunConfig`, at `<run>/<subdir>`."""
        return self.storage.ray_storage(self.key(subdir))
