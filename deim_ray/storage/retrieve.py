"""storage layer: reading finished runs — `fetch` an artifact, `describe_run`, `list_runs`.

These back `deim-ray fetch`, `deim-ray resolve` and `deim-ray ls`. A run is addressed by one URI, its
directory `<root>/<name>` (e.g. `s3://bucket/runs/person-n` or `./runs/person-n`); an artifact of a stage-2
branch by the run and the branch's name (`fetch(..., branch="b1")`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deim_ray.config.schedule import ARTIFACT_NAMES, FINAL
from deim_ray.config.schema import StorageConfig
from deim_ray.outputs import output_dir
from deim_ray.storage.base import Storage, open_storage, sha256_file, split_run_uri
from deim_ray.storage.errors import BadStorageURI, ManifestError, ResolveError, StorageError
from deim_ray.storage.manifest import BRANCH_ARTIFACTS, MANIFEST_KEY, Manifest, finite_ap
from deim_ray.storage.resolve import format_resolution, resolve_final
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
          storage_cfg: StorageConfig | None = None, force: bool = False, branch: str | None = None) -> Path:
    """Download artifact `which` of the run (of its stage-2 `branch`, if given) into `out_dir/<which>.pth`
    (`<which>-<branch>.pth`), verified against the manifest's sha256.

    A file already there with the right sha256 is kept; a different one is replaced (by a verified download)
    only with `force`, else FileExistsError: the user named the folder, not that file.
    """
    allowed = ARTIFACT_NAMES if branch is None else BRANCH_ARTIFACTS
    if which not in allowed:
        raise BadStorageURI(f"unknown artifact {which!r}{' of a branch' if branch else ''}; choose one of: "
                            f"{', '.join(allowed)}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise FileExistsError(f"output {out_dir} is a file, not a directory; pass a directory with -o")
    store = open_run_dir(run_uri, storage_cfg)
    manifest = _existing_manifest(store)
    if branch is not None:
        store = store.branch(manifest.branch(branch).name)
    table = manifest.branch(branch).artifacts if branch else manifest.artifacts
    record = table.get(which)
    if record is None:
        present = [n for n, r in table.items() if r] or ["none"]
        owner = f"branch {branch} of run {store.uri}" if branch else f"run {store.uri}"
        raise ManifestError(f"{owner} ({manifest.state.value}) has no '{which}' artifact; it has: "
                            f"{', '.join(present)}")
    dest = _safe_destination(out_dir, f"{which}-{branch}.pth" if branch else f"{which}.pth")
    if dest.exists():
        if dest.is_file() and sha256_file(dest)[0] == record.sha256:
            return dest
        if not force or not dest.is_file():
            raise FileExistsError(f"{dest} exists and is not this run's {which}; remove it, choose another -o, "
                                  "or pass --force to replace it")
    with output_dir(dest.parent):  # a refused download leaves no folder behind
        if branch is None:
            return store.open_artifact(which, dest.parent)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:  # never over another <which>.pth
            return store.open_artifact(which, tmp).replace(dest)


def describe_run(run_uri: str, storage_cfg: StorageConfig | None = None, verify: bool = True) -> str:
    """Text for `deim-ray resolve`: the run's state, final artifact, URI, AP/epoch/stage and the reason.

    With `verify`, the artifact it names (final, or the leading best of an unfinished run) is checked first:
    present, of the recorded size and sha256 (re-hashed, so the stored bytes are read once); ChecksumMismatch
    if not."""
    store = open_run_dir(run_uri, storage_cfg)
    manifest = _existing_manifest(store)
    named, branch = _named_artifact(manifest)
    if verify and named is not None:
        (store.branch(branch) if branch else store).verify_artifact(named)
    text = format_resolution(manifest)
    return f"{text}\n  verified: size and sha256 match" if verify and named is not None else text


def _named_artifact(manifest: Manifest) -> tuple[str | None, str | None]:
    """The artifact `deim-ray resolve` names and its branch: final when resolved, else what would win now (None
    if nothing)."""
    if manifest.final:
        return (FINAL if manifest.artifacts.get(FINAL) else None), None
    try:
        resolution = resolve_final(manifest.artifacts, branches=manifest.stage2_branches)
    except ResolveError:
        return None, None
    return resolution.artifact, resolution.branch


@dataclass(frozen=True)
class RunSummary:
    """One line of `deim-ray ls`."""

    name: str
    state: str
    """RunState value, or "DAMAGED" when the manifest cannot be read or parsed."""
    final_ap: float | None
    updated_at: str | None
    uri: str
    problem: str | None = None
    """Why a DAMAGED run's manifest could not be used."""
    branches: int | None = None
    """How many stage-2 branches the run has (None: a run without branches)."""
    winner: str | None = None
    """The branch whose best_stg2 is final (None: no branch won, or not finished)."""
    trials: int | None = None
    """A Tune search (state SEARCH): how many trials it ran (None: a run)."""
    best: str | None = None
    """A Tune search: its best trial's run name; `final_ap` is that trial's final AP."""


TUNE_SUMMARY_KEY = "tune_summary.json"
"""What a finished Tune search writes in its folder (`deim-ray tune`): the trials ranked by final AP."""
STOPPED_BY_SCHEDULER = "stopped_by_scheduler"
"""Manifest `extra` key of a trial run Tune's scheduler stopped early (then finalized by the search)."""


def list_runs(root_uri: str, storage_cfg: StorageConfig | None = None) -> list[RunSummary]:
    """Every run directory under `root_uri` that holds a manifest.json, and every finished Tune search (a folder
    with a tune_summary.json), sorted by name."""
    storage = open_storage(root_uri, storage_cfg)
    names = [c.rstrip("/") for c in storage.list("", recursive=False) if c.endswith("/")]
    runs = []
    for name in names:
        key = f"{name}/{MANIFEST_KEY}"
        if storage.exists(key):
            runs.append(_run_summary(storage, name, key))
        elif storage.exists(f"{name}/{TUNE_SUMMARY_KEY}"):
            runs.append(_search_summary(storage, name))
    return sorted(runs, key=lambda r: r.name)


def _run_summary(storage: Storage, name: str, key: str) -> RunSummary:
    try:
        m = Manifest.loads(storage.read_bytes(key).decode("utf-8"), source=storage.child_uri(key))
    except (StorageError, UnicodeDecodeError) as e:  # one damaged run must not hide the others
        return RunSummary(name, "DAMAGED", None, None, storage.child_uri(name), problem=str(e))
    final_ap = finite_ap((m.final or {}).get("ap"))
    branches = None if m.stage2_branches is None else len(m.stage2_branches)
    # a trial ASHA stopped is DONE (finalized by the search) but did not train its schedule
    state = "STOPPED" if m.state.value == "DONE" and STOPPED_BY_SCHEDULER in m.extra else m.state.value
    return RunSummary(name, state, final_ap, m.updated_at or None, storage.child_uri(name), branches=branches,
                      winner=(m.final or {}).get("branch"))


def _search_summary(storage: Storage, name: str) -> RunSummary:
    key = f"{name}/{TUNE_SUMMARY_KEY}"
    try:
        summary = json.loads(storage.read_bytes(key))
        best = summary.get("best_run")
        return RunSummary(name, "SEARCH", finite_ap(summary.get("best_final_ap")), None, storage.child_uri(name),
                          trials=len(summary.get("trials", [])), best=best)
    except (StorageError, ValueError, AttributeError) as e:
        return RunSummary(name, "DAMAGED", None, None, storage.child_uri(name), problem=f"{key}: {e}")
