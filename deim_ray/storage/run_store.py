"""storage layer: `RunStore`, one run's directory `<root>/<name>/` and the rules for writing it.

    <root>/<name>/manifest.json          state machine + artifact records (the public contract)
                  config.yaml            resolved config            (write_text / read_text)
                  metrics.jsonl          one JSON line per epoch    (write_text / read_text)
                  artifacts/<name>.pth   last, best_stg1, best_stg2, final
                  ray/...                what Ray Train writes      (ray_storage)
                  stage2/<branch>/...    a stage-2 branch's own metrics.jsonl, artifacts/best_stg2.pth, ray/, plots/, tb/

A branch view (`branch(name)`) writes the files of one stage-2 branch under `stage2/<branch>/` and records its
`last` and `best_stg2` in that branch's manifest entry; it shares the run's manifest, best_stg1 and fencing
generation. A record's `key` is always relative to the run directory.

An artifact is uploaded first and recorded in the manifest second, so the manifest only ever names complete,
checksummed objects. Nothing here deletes an object a manifest may name; `sweep_stale_states` removes the Ray
folders of earlier generations that no record names.

One writer at a time (fencing). A driver start `claim`s the run (takes it over) and each of its stage runs
`renew`s that claim (refused once taken over): either way the manifest's `generation` goes up by one in a
conditional write, and the RunStore holding it is the only one whose writes are accepted. Every write checks it:
- the manifest: read (with its version), check the generation, mutate, write only if the version is unchanged
  (S3 If-Match; locally under an flock), retried on a lost race of the same generation;
- a fixed-name object (metrics.jsonl, config.yaml, a best or final artifact): after the generation check, a
  conditional write against the version this writer last saw, so once a newer attempt has written it a stale
  write is refused by the storage itself;
- a TrainState: under a key of its own generation (Ray's checkpoint folder), so it never replaces another.
A refused writer gets `StaleWriter` and must stop. Locally the check and the write happen under one flock;
on S3 a stale writer whose check passed just before the claim can still land one write of a fixed-name object
the new attempt has not written yet: it is never recorded (the manifest write that follows is refused), readers
verify sha256 against the manifest, and the new attempt's next write of that object replaces it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deim_ray.storage.base import ObjectInfo, Storage, check_key, join_key
from deim_ray.storage.holder import describe_holder, other_live_holder
from deim_ray.storage.errors import (BadStorageURI, ChecksumMismatch, ManifestError, PreconditionFailed, RunHeld,
                                     StaleWriter, StorageError)
from deim_ray.config.schedule import LAST
from deim_ray.storage.manifest import (BRANCH_ARTIFACTS, MANIFEST_KEY, ArtifactRecord, BranchRecord, Manifest,
                                       RunState, artifact_key, finite_ap, utc_now)

METRICS_KEY = "metrics.jsonl"

_RACES = 20
"""Manifest writes retried after losing a race to a writer of the same generation (driver vs. rank 0)."""

_RAY_RUN = re.compile(r"stage\d+-g(\d+)")
"""A Ray run's folder under `ray/`: its stage and the generation that ran it."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}")

BRANCHES_DIR = "stage2"
"""Folder of the stage-2 branches inside the run directory: `stage2/<branch>/`."""


def check_run_name(name: str) -> str:
    """Return `name` if it is one safe path segment (letters, digits and `._=+-`, starting with a letter or digit)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise BadStorageURI(f"run name {name!r} is not usable: use 1-128 letters, digits or ._=+-, starting with "
                            "a letter or digit (no '/' or '..'), e.g. person-n or trial-a1b2_00003")
    return name


class RunStore:
    """The run directory `name` inside `storage` (see the module docstring for its layout and fencing).

    `generation` is the fencing token this writer holds (`claim` sets it); None writes unfenced, which only
    tools and tests that own the whole directory do. `branch` makes it the view of one stage-2 branch.
    """

    def __init__(self, storage: Storage, name: str, generation: int | None = None, branch: str | None = None):
        self.storage = storage
        self.name = check_run_name(name)
        self.generation = generation
        self.branch_name = None if branch is None else check_run_name(branch)
        self.home = "" if branch is None else f"{BRANCHES_DIR}/{branch}/"
        """Where this writer's own files go, relative to the run directory ("" for the run itself)."""
        self._lock = threading.RLock()
        self._depth = 0
        self._versions: dict[str, str | None] = {}
        """Version of each fixed-name object as this writer last wrote or saw it (the If-Match of its next write)."""

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r})"

    @property
    def uri(self) -> str:
        """URI of the run directory, e.g. s3://bucket/runs/person-n."""
        return self.storage.child_uri(self.name)

    def key(self, rel: str) -> str:
        """Storage key of this writer's own file `rel` (relative to the run directory, or a branch's folder)."""
        return join_key(self.name, self.home + check_key(rel))

    def run_key(self, rel: str) -> str:
        """Storage key of `rel` relative to the run directory (the manifest, a record's `key`)."""
        return join_key(self.name, check_key(rel))

    def branch(self, name: str) -> "RunStore":
        """The view of stage-2 branch `name`: same storage, manifest and fencing generation."""
        return RunStore(self.storage, self.name, generation=self.generation, branch=name)

    def _table(self, manifest: Manifest, name: str) -> dict[str, ArtifactRecord | None]:
        """The artifact records `name` lives in: the branch's own for its last/best_stg2, else the run's."""
        if self.branch_name is None or name not in BRANCH_ARTIFACTS:
            return manifest.artifacts
        return manifest.branch(self.branch_name).artifacts

    def exists(self, rel: str) -> bool:
        return self.storage.exists(self.key(rel))

    def read_text(self, rel: str) -> str:
        """UTF-8 text of `rel` (e.g. "config.yaml", "metrics.jsonl"); ObjectNotFound if absent."""
        return self.storage.read_bytes(self.key(rel)).decode("utf-8")

    def read_metrics(self) -> list[dict]:
        """The epoch lines of metrics.jsonl, in order (none while no epoch has been recorded)."""
        text = self.read_text(METRICS_KEY) if self.exists(METRICS_KEY) else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # ---- fencing ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """This process's lock plus, outermost only, the storage's lock on the manifest (an flock locally)."""
        with self._lock:
            self._depth += 1
            try:
                if self._depth == 1:
                    with self.storage.lock(self.run_key(MANIFEST_KEY)):
                        yield
                else:
                    yield
            finally:
                self._depth -= 1

    def _load(self) -> tuple[Manifest, str] | None:
        found = self.storage.read_versioned(self.run_key(MANIFEST_KEY))
        if found is None:
            return None
        data, version = found
        return Manifest.loads(data.decode("utf-8"), source=self.storage.child_uri(self.run_key(MANIFEST_KEY))), version

    def _check_fence(self, manifest: Manifest) -> None:
        if self.generation is not None and manifest.generation != self.generation:
            raise StaleWriter(f"run {self.uri} was taken over by a newer attempt (generation {manifest.generation}; "
                              f"this writer holds {self.generation}): this one stops without writing")

    def check_fence(self) -> None:
        """StaleWriter if a newer attempt has claimed the run since this writer did (no check when unfenced)."""
        if self.generation is not None:
            self._check_fence(self._manifest())

    def claim(self, fresh: Manifest | None = None, holder: dict | None = None, take_over: bool = True) -> Manifest:
        """Take the run over: write the stored manifest (or `fresh`, replacing it) with the next generation, in one
        conditional write, and hold that generation from now on. Returns the written manifest.

        With `holder` (a driver starting: `holder.this_driver()`) the claim records it and counts an attempt; then,
        unless `take_over`, a run another live driver holds is refused with RunHeld, checked in the same
        conditional write, so of two drivers starting together exactly one gets the run."""
        with self._guard():
            for _ in range(_RACES):
                loaded = self._load()
                if loaded is None and fresh is None:
                    raise ManifestError(f"run {self.uri} has no manifest.json; start the run (deim-ray train) first")
                if holder is not None and not take_over and loaded is not None:
                    self._refuse_if_held(loaded[0])
                manifest = fresh if fresh is not None else loaded[0]
                if holder is not None:
                    manifest.attempt += fresh is None  # a fresh manifest already counts its attempt
                    manifest.holder = holder
                manifest.generation = (loaded[0].generation if loaded else 0) + 1
                try:
                    self._write_manifest(manifest, version=loaded[1] if loaded else None)
                except PreconditionFailed:
                    continue
                self.generation = manifest.generation
                self._versions.clear()
                return manifest
        raise StorageError(f"run {self.uri}: could not claim the manifest after {_RACES} tries; another process "
                           "keeps rewriting it")

    def check_not_held(self, manifest: Manifest | None) -> None:
        """RunHeld when another live driver holds the run (`holder.other_live_holder`)."""
        if manifest is not None:
            self._refuse_if_held(manifest)

    def _refuse_if_held(self, manifest: Manifest) -> None:
        live = other_live_holder(manifest.holder)
        if live is not None:
            raise RunHeld(f"run {self.uri} is being trained by another driver ({describe_holder(live)}); wait for "
                          "it to end, stop it, or pass --take-over to fence it out and continue here")

    def renew(self) -> Manifest:
        """The next generation for this writer's next piece of work (a stage run), fenced: unlike `claim`, a
        writer that was taken over cannot take the run back. Returns the written manifest."""
        manifest = self.update_manifest(lambda m: setattr(m, "generation", m.generation + 1))
        self.generation = manifest.generation
        return manifest

    def update_manifest(self, mutate: Callable[[Manifest], Any]) -> Manifest:
        """Apply `mutate` to the stored manifest and write it back: one fenced, conditional write (re-read and
        re-applied when a writer of the same generation got in between). Returns the written manifest."""
        with self._guard():
            for _ in range(_RACES):
                manifest, version = self._require()
                self._check_fence(manifest)
                mutate(manifest)
                try:
                    self._write_manifest(manifest, version=version)
                    return manifest
                except PreconditionFailed:
                    continue
        raise StorageError(f"run {self.uri}: manifest.json kept changing during {_RACES} tries; another process "
                           "keeps rewriting it")

    def _write_manifest(self, manifest: Manifest, version: str | None) -> None:
        if manifest.name != self.name:
            raise ManifestError(f"manifest of run '{manifest.name}' cannot be written into run '{self.name}'")
        manifest.updated_at = utc_now()
        self.storage.write_bytes(self.run_key(MANIFEST_KEY), manifest.dumps().encode("utf-8"), if_match=version,
                                 if_none_match=version is None)

    def _fenced_write(self, rel: str, write: Callable[[str, dict], ObjectInfo]) -> ObjectInfo:
        """`write(key, conditions)` of the fixed-name object `rel` under the fence (see the module docstring)."""
        key = self.key(rel)
        with self._guard():
            for fresh_look in (False, True):
                self.check_fence()
                if fresh_look or rel not in self._versions:
                    info = self.storage.stat(key)
                    self._versions[rel] = info.etag if info else None
                version = self._versions[rel]
                try:
                    written = write(key, {"if_match": version, "if_none_match": version is None})
                except PreconditionFailed:
                    continue  # changed under us: refused if we are stale, else re-read its version once
                self._versions[rel] = written.etag
                return written
        self.check_fence()
        raise StorageError(f"{self.storage.child_uri(key)} keeps changing; another process of this attempt writes it")

    # ---- reads -------------------------------------------------------------------------------------------------
    def read_manifest(self) -> Manifest | None:
        """The run's manifest, or None when the run does not exist yet."""
        loaded = self._load()
        return loaded[0] if loaded else None

    def _require(self) -> tuple[Manifest, str]:
        loaded = self._load()
        if loaded is None:
            raise ManifestError(f"run {self.uri} has no manifest.json; start the run (deim-ray train) first")
        return loaded

    def _manifest(self) -> Manifest:
        return self._require()[0]

    # ---- writes ------------------------------------------------------------------------------------------------
    def write_text(self, rel: str, text: str) -> ObjectInfo:
        """Replace `rel` atomically with `text` (fenced)."""
        return self.write_bytes(rel, text.encode("utf-8"))

    def write_bytes(self, rel: str, data: bytes) -> ObjectInfo:
        """Replace `rel` atomically with `data` (fenced): metrics, plots, TensorBoard event files."""
        return self._fenced_write(rel, lambda key, cond: self.storage.write_bytes(key, data, **cond))

    def write_manifest(self, manifest: Manifest) -> None:
        """Replace the manifest with `manifest` unconditionally (tests and tools that own the run; the training
        path uses `claim` and `update_manifest`)."""
        with self._guard():
            loaded = self._load()
            self._write_manifest(manifest, version=loaded[1] if loaded else None)

    def transition(self, new_state: RunState, note: str = "") -> Manifest:
        """Move the stored manifest to `new_state` (ManifestError if illegal); returns the written manifest."""
        return self.update_manifest(lambda m: m.advance(new_state, note))

    def put_state(self, rel: str, local_path: str | os.PathLike) -> ObjectInfo:
        """Upload a TrainState under a key of this generation's own (never replacing another attempt's)."""
        self.check_fence()  # no lock: the key is this generation's own, no other writer's write can race it
        return self.storage.upload_file(self.key(rel), local_path)

    def commit_epoch(self, state: ObjectInfo, *, epoch: int, stage: int, ap: float | None, best: str | None,
                     metrics: str) -> None:
        """One epoch, after its TrainState `state` is stored under its own key: record it as `last` (and as `best`,
        if given) in one manifest write, publish the best under its fixed name, then rewrite metrics.jsonl."""
        record = self._record(state, rel=state.key[len(self.name) + 1:], epoch=epoch, stage=stage, ap=ap)

        def mutate(m: Manifest) -> None:
            self._table(m, LAST).update({LAST: record} | ({best: record} if best else {}))
            if self.branch_name is not None:
                m.branch(self.branch_name).epoch_aps[str(epoch)] = record.ap
        self.update_manifest(mutate)
        if best is not None:
            self.publish_best(best)
        self.write_text(METRICS_KEY, metrics)

    def publish_best(self, name: str) -> None:
        """Copy best `name`, recorded at its TrainState's own key, onto `artifacts/<name>.pth` (server-side) and
        point the record there. The second step of `commit_epoch`; a resumed stage repeats it when a worker died
        between the two (the recorded bytes stay named by the manifest at every moment)."""
        manifest = self._manifest()
        self._check_fence(manifest)
        record, rel = self._table(manifest, name).get(name), artifact_key(name)
        if record is None or record.key == self.home + rel:
            return
        copied = self._fenced_write(rel, lambda key, cond: self.storage.copy(self.run_key(record.key), key, **cond))
        moved = dataclasses.replace(record, uri=copied.uri, key=self.home + rel, updated_at=utc_now())

        def repoint(m: Manifest) -> None:
            if self._table(m, name).get(name) == record:
                self._table(m, name)[name] = moved
        self.update_manifest(repoint)

    def put_artifact(self, name: str, local_path: str | os.PathLike, *, epoch: int, stage: int,
                     ap: float | None) -> ArtifactRecord:
        """Upload `local_path` as `artifacts/<name>.pth`, then record it in the manifest (in that order).

        The bytes go to a key of this generation first and are copied (server-side) onto the fixed name with a
        conditional write, so a stale writer cannot replace what a newer attempt wrote."""
        rel = artifact_key(name)
        staged = self.put_state(f"{rel}.g{self.generation or 0}", local_path)
        info = self._fenced_write(rel, lambda key, cond: self.storage.copy(staged.key, key, **cond))
        self.storage.delete(staged.key)
        record = self._record(info, rel=self.home + rel, epoch=epoch, stage=stage, ap=ap)
        self.update_manifest(lambda m: self._table(m, name).__setitem__(name, record))
        return record

    @staticmethod
    def _record(info: ObjectInfo, *, rel: str, epoch: int, stage: int, ap: float | None) -> ArtifactRecord:
        return ArtifactRecord(uri=info.uri, sha256=info.sha256, epoch=int(epoch), stage=int(stage),
                              ap=finite_ap(ap), size=info.size, key=rel, updated_at=utc_now())

    def record_switch(self, switch: dict) -> Manifest:
        """Record the stage switch (`manifest.switch`)."""
        return self.update_manifest(lambda m: setattr(m, "switch", dict(switch)))

    def record_switch_digests(self, key: str, digests: list[str]) -> Manifest:
        """Add per-worker start digests (`key`) to the switch record."""
        return self.update_manifest(lambda m: m.switch.__setitem__(key, list(digests)))

    def record_branches(self, branches: list[BranchRecord]) -> Manifest:
        """Record the run's stage-2 branches (`manifest.stage2_branches`), once, at the switch."""
        return self.update_manifest(lambda m: setattr(m, "stage2_branches", list(branches)))

    def update_branch(self, mutate: Callable[[BranchRecord], Any]) -> Manifest:
        """Apply `mutate` to this view's branch entry, in one fenced manifest write."""
        return self.update_manifest(lambda m: mutate(m.branch(self.branch_name)))

    def finish(self, final: dict, reason: str) -> Manifest:
        """Record the resolved `final` and move to DONE, in one write."""
        def mutate(m: Manifest) -> None:
            m.final = dict(final)
            m.advance(RunState.DONE, reason)
        return self.update_manifest(mutate)

    # ---- artifacts ---------------------------------------------------------------------------------------------
    def recorded(self, name: str) -> ArtifactRecord | None:
        """The record of artifact `name` in this view (a branch's own last/best_stg2), or None."""
        return self._table(self._manifest(), name).get(name)

    def record(self, name: str) -> ArtifactRecord:
        """The manifest's record of artifact `name`; ManifestError if none."""
        artifact_key(name)  # validates the name
        record = self._table(self._manifest(), name).get(name)
        if record is None:
            raise ManifestError(f"run {self.uri} has no '{name}' artifact recorded yet; check `deim-ray resolve "
                                f"{self.uri}` for what exists")
        return record

    def _artifact_storage_key(self, name: str, record: ArtifactRecord) -> str:
        return self.run_key(record.key or artifact_key(name))

    def verify_artifact(self, name: str) -> ArtifactRecord:
        """Compare the stored artifact with the manifest (present, same size, same re-hashed sha256);
        ChecksumMismatch if not."""
        record = self.record(name)
        key = self._artifact_storage_key(name, record)
        stored = self.storage.stat(key)
        if stored is None:
            raise ChecksumMismatch(f"{record.uri} is missing although the manifest records it; resume the run to "
                                   "write it again")
        if record.size is not None and stored.size != record.size:
            raise ChecksumMismatch(f"{record.uri} has {stored.size} bytes but the manifest records {record.size}; "
                                   "the object was replaced or truncated: resume the run to write it again")
        actual = self.storage.hash_object(key)
        if actual != record.sha256:
            raise ChecksumMismatch(f"{record.uri} has sha256 {actual[:16]}... but the manifest records "
                                   f"{record.sha256[:16]}...; the object was replaced or corrupted: resume the "
                                   "run to write it again")
        return record

    def open_artifact(self, name: str, local_dir: str | os.PathLike) -> Path:
        """Download artifact `name` into `local_dir/<name>.pth`, verified against the manifest's sha256."""
        record = self.record(name)
        dest = Path(local_dir) / f"{name}.pth"
        self.storage.download_file(self._artifact_storage_key(name, record), dest, expected_sha256=record.sha256)
        return dest

    def sweep_interrupted_writes(self, older_than: dt.timedelta = dt.timedelta(minutes=15)) -> int:
        """Discard unfinished uploads / temp files of this run older than `older_than` (left by a killed
        process; never a complete object). Call it when (re)starting a run; returns how many."""
        return self.storage.abort_stale_uploads(self.name + "/", older_than)

    def sweep_stale_states(self) -> int:
        """Delete what the Ray runs of earlier generations stored (`ray/<stage>-g<generation>/...`: TrainStates,
        Ray's own bookkeeping), except folders a manifest record still names (the `last` a resume starts from).
        Called by the holder of the current generation at a stage start; returns how many objects it removed."""
        manifest = self._manifest()
        self._check_fence(manifest)
        named = {r.key.split("/")[1] for r in manifest.artifacts.values()
                 if r is not None and r.key.startswith("ray/") and r.key.count("/") >= 2}
        removed, prefix = 0, self.key("ray") + "/"
        for key in self.storage.list(prefix):
            folder = key[len(prefix):].split("/")[0]
            found = _RAY_RUN.fullmatch(folder)
            if found and int(found.group(1)) < manifest.generation and folder not in named:
                self.storage.delete(key)
                removed += 1
        return removed

    def ray_storage(self, subdir: str = "ray"):
        """`(storage_path, storage_filesystem)` for `ray.train.RunConfig`, at `<run>/<subdir>`."""
        return self.storage.ray_storage(self.key(subdir))
