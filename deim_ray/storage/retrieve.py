"""storage layer: reading finished runs — `fetch` an artifact, `describe_run`, `list_runs`.

These back `deim-ray fetch`, `deim-ray resolve` and `deim-ray ls`. A run is addressed by one URI, its
directory `<root>/<name>` (e.g. `s3://bucket/runs/person-n` or `./runs/person-n`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from deim_ray.config.schedule import ARTIFACT_NAMES
from deim_ray.config.schema import StorageConfig
from deim_ray.storage.base import open_storage, sha256_file, split_run_uri
from deim_ray.storage.errors import BadStorageURI, ChecksumMismatch, ManifestError
from deim_ray.storage.manifest import MANIFEST_KEY, Manifest, finite_ap
from deim_ray.storage.resolve import format_resolution
from deim_ray.storage.run_store import RunStore


def open_run_dir(run_uri: str, storage_cfg: StorageConfig | None = None) -> RunStore:
    """The RunStore of the run directory `run_uri` (`<root>/<name>`)."""
    root, name = split_run_uri(run_uri)
    return RunStore(open_storage(root, storage_cfg), name)


def _existing_manifest(store: RunStore) -> Manifest:
    manifest = store.read_manifest()
    if manifest is None:
        root = store.storage.uri
        raise ManifestError(f"no run at {store.uri} (no manifest.json); check the URI — `deim-ray ls {root}` "
                            "lists the runs there")
    return manifest


def _safe_destination(out_dir: str | os.PathLike, filename: str) -> Path:
    """`out_dir/filename`, refusing any name that would land outside `out_dir`."""
    base = Path(out_dir).resolve()
    dest = (base / filename).resolve()
    if dest.parent != base or filename in ("", ".", "..") or "/" in filename or "\\" in filename:
        raise BadStorageURI(f"refusing to write {filename!r} outside {base}; pass a plain artifact name")
    return dest


def fetch(run_uri: str, which: str = "final", out_dir: str | os.PathLike = ".",
          storage_cfg: StorageConfig | None = None) -> Path:
    """Download artifact `which` of the run into `out_dir/<which>.pth`, verified against the manifest's sha256.

    A file already there with the right sha256 is kept; otherwise it is replaced only by a verified download.
    """
    if which not in ARTIFACT_NAMES:
        raise BadStorageURI(f"unknown artifact {which!r}; choose one of: {', '.join(ARTIFACT_NAMES)}")
    store = open_run_dir(run_uri, storage_cfg)
    manifest = _existing_manifest(store)
    record = manifest.artifacts.get(which)
    if record is None:
        present = [n for n, r in manifest.artifacts.items() if r] or ["none"]
        raise ManifestError(f"run {store.uri} ({manifest.state.value}) has no '{which}' artifact; it has: "
                            f"{', '.join(present)}")
    dest = _safe_destination(out_dir, f"{which}.pth")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and sha256_file(dest)[0] == record.sha256:
        return dest
    return store.open_artifact(which, dest.parent)


def describe_run(run_uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """Text for `deim-ray resolve`: the run's state, final artifact, URI, AP/epoch/stage and the reason."""
    store = open_run_dir(run_uri, storage_cfg)
    return format_resolution(_existing_manifest(store))


@dataclass(frozen=True)
class RunSummary:
    """One line of `deim-ray ls`."""

    name: str
    state: str
    """RunState value, or "UNREADABLE" when the manifest cannot be parsed."""
    final_ap: float | None
    updated_at: str | None
    uri: str


def list_runs(root_uri: str, storage_cfg: StorageConfig | None = None) -> list[RunSummary]:
    """Every run directory under `root_uri` that holds a manifest.json, sorted by name."""
    storage = open_storage(root_uri, storage_cfg)
    names = [c.rstrip("/") for c in storage.list("", recursive=False) if c.endswith("/")]
    runs = []
    for name in names:
        key = f"{name}/{MANIFEST_KEY}"
        if not storage.exists(key):
            continue
        try:
            m = Manifest.loads(storage.read_bytes(key).decode("utf-8"), source=storage.child_uri(key))
        except (ManifestError, ChecksumMismatch, UnicodeDecodeError):
            runs.append(RunSummary(name, "UNREADABLE", None, None, storage.child_uri(name)))
            continue
        final_ap = finite_ap((m.final or {}).get("ap"))
        runs.append(RunSummary(name, m.state.value, final_ap, m.updated_at or None, storage.child_uri(name)))
    return sorted(runs, key=lambda r: r.name)
