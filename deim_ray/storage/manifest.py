"""storage layer: the run's `manifest.json` — its state machine, artifact records and JSON contract.

The JSON is a public contract (DESIGN.md, "Artifacts"): the keys `schema, name, state, config_sha256,
epochs, stop_epoch, switch, artifacts{best_stg1, best_stg2, last, final}, final` are always written (an
artifact that does not exist is null). Fields may be added, never removed; keys this version does not know
are kept and written back, so an older reader never drops a newer writer's fields.

    NEW -> STAGE1_RUNNING -> STAGE1_DONE -> STAGE2_RUNNING -> DONE
    any state but DONE -> FAILED;  FAILED -> STAGE1_RUNNING | STAGE2_RUNNING (resume by re-running)
    STAGE1_RUNNING -> STAGE1_RUNNING and STAGE2_RUNNING -> STAGE2_RUNNING record a resumed driver

A run with stage-2 branches (`--stage2-branches K`) adds `stage2_branches`, one `BranchRecord` each (name, params,
state, best AP/epoch/uri, its own best_stg2 and last); a run without branches has no such key.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from deim_ray.config.schedule import ARTIFACT_NAMES, BEST_STG1, BEST_STG2, LAST, Stage
from deim_ray.storage.errors import ManifestError

SCHEMA = 1
MANIFEST_KEY = "manifest.json"



def artifact_key(name: str) -> str:
    """Key of an artifact inside the run directory: `artifacts/<name>.pth`."""
    if name not in ARTIFACT_NAMES:
        raise ManifestError(f"unknown artifact '{name}'; use one of: {', '.join(ARTIFACT_NAMES)}")
    return f"artifacts/{name}.pth"


def utc_now() -> str:
    """ISO-8601 UTC time to the second, e.g. 2026-01-31T12:00:00Z."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunState(str, Enum):
    NEW = "NEW"
    STAGE1_RUNNING = "STAGE1_RUNNING"
    STAGE1_DONE = "STAGE1_DONE"
    STAGE2_RUNNING = "STAGE2_RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value

    @property
    def running_stage(self) -> Stage | None:
        """The stage a *_RUNNING state is in; None for every other state."""
        return {RunState.STAGE1_RUNNING: Stage.ONE, RunState.STAGE2_RUNNING: Stage.TWO}.get(self)


_S = RunState
LEGAL_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    _S.NEW: frozenset({_S.STAGE1_RUNNING, _S.FAILED}),
    # DONE straight from stage 1: a run stopped before stop_epoch (e.g. by a Tune scheduler) resolves to best_stg1
    _S.STAGE1_RUNNING: frozenset({_S.STAGE1_RUNNING, _S.STAGE1_DONE, _S.DONE, _S.FAILED}),
    _S.STAGE1_DONE: frozenset({_S.STAGE2_RUNNING, _S.DONE, _S.FAILED}),
    _S.STAGE2_RUNNING: frozenset({_S.STAGE2_RUNNING, _S.DONE, _S.FAILED}),
    _S.FAILED: frozenset({_S.STAGE1_RUNNING, _S.STAGE2_RUNNING}),
    _S.DONE: frozenset(),
}
"""Allowed next states of each state (see the module docstring)."""


@dataclass(frozen=True)
class ArtifactRecord:
    """One artifact the manifest names: a complete, checksummed object in storage."""

    uri: str
    sha256: str
    epoch: int
    stage: int
    ap: float | None
    """COCO AP@[.5:.95] of the epoch it was saved at (None when not validated)."""
    size: int | None = None
    key: str = ""
    """Key relative to the run directory, e.g. `artifacts/best_stg1.pth`."""
    updated_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields written by a newer version, kept as they are."""

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArtifactRecord:
        if not isinstance(data, dict):
            raise ManifestError(f"an artifact record is a {type(data).__name__}, not an object; the manifest is "
                                "damaged — restore it or re-run with --restart")
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = {"uri", "sha256", "epoch", "stage", "ap"} - data.keys()
        if missing:
            raise ManifestError(f"artifact record lacks {sorted(missing)}; the manifest is damaged — "
                                "restore it or re-run with --restart")
        _check_types(data, _RECORD_TYPES, "artifact record")
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})


class BranchState(str, Enum):
    """Where a stage-2 branch is: not started, training, finished, or failed (its error in the record's extra)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value


BRANCH_ARTIFACTS = (BEST_STG2, LAST)
"""The artifacts a stage-2 branch keeps for itself (best_stg1 is the run's, shared by every branch)."""


@dataclass
class BranchRecord:
    """One stage-2 branch: its settings, progress and own artifacts (under `<run>/stage2/<name>/`)."""

    name: str
    params: dict[str, Any]
    """The stage-2 settings the branch changes (dotted config keys); empty for b0, the config's own settings."""
    state: BranchState = BranchState.PENDING
    artifacts: dict[str, ArtifactRecord | None] = field(default_factory=lambda: dict.fromkeys(BRANCH_ARTIFACTS))
    epoch_aps: dict[str, float | None] = field(default_factory=dict)
    """AP of each epoch the branch committed, keyed by the epoch (a JSON object key)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further fields (e.g. the workers' start digests), kept as they are."""

    @property
    def best(self) -> ArtifactRecord | None:
        """The branch's best_stg2: its best epoch, when that beat stage 1 (else None)."""
        return self.artifacts.get(BEST_STG2)

    def to_json(self) -> dict[str, Any]:
        best = self.best
        body = {"name": self.name, "params": self.params, "state": self.state.value,
                "ap": best.ap if best else None, "epoch": best.epoch if best else None,
                "uri": best.uri if best else None,
                "artifacts": {n: (r.to_json() if r else None) for n, r in self.artifacts.items()},
                "epoch_aps": self.epoch_aps}
        return {**self.extra, **body}

    @classmethod
    def from_json(cls, data: Any) -> BranchRecord:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("params"), dict) or data.get("state") not in [s.value for s in BranchState] \
                or not isinstance(data.get("artifacts", {}), dict):
            raise ManifestError("a `stage2_branches` entry lacks a name, params or a known state; the manifest is "
                                "damaged — restore it or re-run with --restart")
        artifacts = dict.fromkeys(BRANCH_ARTIFACTS)
        artifacts.update({n: ArtifactRecord.from_json(r) if r else None for n, r in data.get("artifacts", {}).items()})
        own = {"name", "params", "state", "ap", "epoch", "uri", "artifacts", "epoch_aps"}
        return cls(name=data["name"], params=dict(data["params"]), state=BranchState(data["state"]),
                   artifacts=artifacts, epoch_aps=dict(data.get("epoch_aps") or {}),
                   extra={k: v for k, v in data.items() if k not in own})


_CONTRACT_KEYS = ("schema", "name", "state", "config_sha256", "epochs", "stop_epoch", "switch", "artifacts", "final")
_NUMBER = (int, float, type(None))
_RECORD_TYPES = {"uri": str, "sha256": str, "epoch": int, "stage": int, "ap": _NUMBER, "size": (int, type(None)),
                 "key": str, "updated_at": str}
_MANIFEST_TYPES = {"name": str, "config_sha256": str, "epochs": int, "stop_epoch": int, "switch": (dict, type(None)),
                   "artifacts": dict, "final": (dict, type(None)), "attempt": int, "created_at": str,
                   "updated_at": str, "transitions": list}


def _check_types(data: dict[str, Any], types: dict[str, type | tuple[type, ...]], what: str) -> None:
    """ManifestError naming the first field of `data` whose JSON type is not the expected one."""
    for key, expected in types.items():
        value = data.get(key)
        if key in data and (not isinstance(value, expected) or (isinstance(value, bool) and expected is int)):
            raise ManifestError(f"{what} field `{key}` is a {type(value).__name__}; the manifest is damaged — "
                                "restore it or re-run with --restart")


@dataclass
class Manifest:
    """The run's persisted state. Mutate, then write it with `RunStore.write_manifest` (atomic)."""

    name: str
    config_sha256: str
    epochs: int
    stop_epoch: int
    state: RunState = RunState.NEW
    switch: dict[str, Any] | None = None
    """Stage switch record: {"epoch", "from": "best_stg1", "sha256", ...}; None before the switch."""
    artifacts: dict[str, ArtifactRecord | None] = field(default_factory=lambda: dict.fromkeys(ARTIFACT_NAMES))
    final: dict[str, Any] | None = None
    """Resolved final: {"artifact", "uri", "ap", "epoch", "stage", "reason", ...}; None until DONE."""
    attempt: int = 1
    """How many times a driver started this run name (a continuation of it, or a start over with --restart)."""
    generation: int = 0
    """Fencing token: raised by every driver start and stage run (`RunStore.claim`); a writer holding an older
    one is refused. Ray run names include it."""
    created_at: str = ""
    updated_at: str = ""
    transitions: list[dict[str, Any]] = field(default_factory=list)
    """Every state change: {"state", "time", "note"}, oldest first."""
    schema: int = SCHEMA
    stage2_branches: list[BranchRecord] | None = None
    """The stage-2 branches of a run started with `--stage2-branches K` (K > 1), recorded at the switch."""
    holder: dict[str, Any] | None = None
    """The driver that claimed the run and is training it: {"host", "pid", "since", "seen"} (`seen` renewed while
    it runs, the record removed when it stops); None when no driver holds it."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Top-level keys written by a newer version, kept as they are."""

    def branch(self, name: str) -> BranchRecord:
        """The stage-2 branch `name`; ManifestError if the run has no such branch."""
        for branch in self.stage2_branches or ():
            if branch.name == name:
                return branch
        known = ", ".join(b.name for b in self.stage2_branches or ()) or "none (the run has no stage-2 branches)"
        raise ManifestError(f"run '{self.name}' has no stage-2 branch '{name}'; its branches: {known}")

    @classmethod
    def new(cls, *, name: str, config_sha256: str, epochs: int, stop_epoch: int, attempt: int = 1) -> Manifest:
        now = utc_now()
        return cls(name=name, config_sha256=config_sha256, epochs=epochs, stop_epoch=stop_epoch,
                   attempt=attempt, created_at=now, updated_at=now,
                   transitions=[{"state": RunState.NEW.value, "time": now, "note": f"created (attempt {attempt})"}])

    def advance(self, new_state: RunState, note: str = "") -> None:
        """Move to `new_state`, recording the transition; ManifestError if the state machine forbids it."""
        new_state = RunState(new_state)
        if new_state not in LEGAL_TRANSITIONS[self.state]:
            legal = ", ".join(s.value for s in LEGAL_TRANSITIONS[self.state]) or "none (the run is finished)"
            raise ManifestError(f"run '{self.name}' cannot go from {self.state.value} to {new_state.value}; "
                                f"legal next states: {legal}")
        _check_preconditions(self, new_state)
        self.state = new_state
        self.transitions.append({"state": new_state.value, "time": utc_now(), "note": note})

    def to_json(self) -> dict[str, Any]:
        body = {
            "schema": self.schema, "name": self.name, "state": self.state.value,
            "config_sha256": self.config_sha256, "epochs": self.epochs, "stop_epoch": self.stop_epoch,
            "switch": self.switch,
            "artifacts": {n: (r.to_json() if r else None) for n, r in self.artifacts.items()},
            "final": self.final, "attempt": self.attempt, "generation": self.generation,
            "created_at": self.created_at, "updated_at": self.updated_at, "transitions": self.transitions,
        }
        if self.stage2_branches is not None:
            body["stage2_branches"] = [b.to_json() for b in self.stage2_branches]
        if self.holder is not None:
            body["holder"] = self.holder
        return {**self.extra, **body}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        missing = [k for k in _CONTRACT_KEYS if k not in data]
        if missing:
            raise ManifestError(f"manifest lacks {missing}; it is not a deim_ray manifest or is damaged")
        if not isinstance(data["schema"], int) or data["schema"] > SCHEMA:
            raise ManifestError(f"manifest schema {data['schema']!r} is newer than this deim_ray understands "
                                f"({SCHEMA}); upgrade deim_ray")
        _check_types(data, _MANIFEST_TYPES, "manifest")
        try:
            state = RunState(data["state"])
        except (ValueError, TypeError):
            raise ManifestError(f"manifest state {data['state']!r} is not one of "
                                f"{[s.value for s in RunState]}") from None
        artifacts = dict.fromkeys(ARTIFACT_NAMES)
        artifacts.update({n: ArtifactRecord.from_json(r) if r else None for n, r in data["artifacts"].items()})
        own = set(_CONTRACT_KEYS) | {"attempt", "generation", "created_at", "updated_at", "transitions",
                                     "stage2_branches", "holder"}
        holder = data.get("holder")
        branches = data.get("stage2_branches")
        if branches is not None and not isinstance(branches, list):
            raise ManifestError("manifest field `stage2_branches` is not a list; the manifest is damaged — "
                                "restore it or re-run with --restart")
        return cls(name=data["name"], config_sha256=data["config_sha256"], epochs=data["epochs"],
                   stop_epoch=data["stop_epoch"], state=state, switch=data["switch"], artifacts=artifacts,
                   final=data["final"], attempt=data.get("attempt", 1), generation=data.get("generation", 0),
                   created_at=data.get("created_at", ""),
                   updated_at=data.get("updated_at", ""), transitions=list(data.get("transitions", [])),
                   schema=data["schema"],
                   stage2_branches=None if branches is None else [BranchRecord.from_json(b) for b in branches],
                   holder=holder if isinstance(holder, dict) else None, extra={k: v for k, v in data.items() if k not in own})

    @classmethod
    def loads(cls, text: str, *, source: str = "manifest.json") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}); restore it from "
                                "a backup or re-run with --restart") from None
        except RecursionError:
            raise ManifestError(f"{source} nests JSON too deeply to be a manifest; restore it or re-run with "
                                "--restart") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{source} is not a JSON object; restore it or re-run with --restart")
        return cls.from_json(data)


def _check_preconditions(m: Manifest, new_state: RunState) -> None:
    """States that promise something durable may only be entered once it is recorded."""
    if new_state is RunState.STAGE1_DONE and m.artifacts.get(BEST_STG1) is None:
        raise ManifestError(f"run '{m.name}' cannot be STAGE1_DONE without a recorded best_stg1; "
                            "stage 1 must save (and upload) a validated best checkpoint first")
    if new_state is RunState.STAGE2_RUNNING and not m.switch:
        raise ManifestError(f"run '{m.name}' cannot start stage 2 before the switch is recorded; "
                            "verify best_stg1 and record `switch` first")
    if new_state is RunState.DONE and not m.final:
        raise ManifestError(f"run '{m.name}' cannot be DONE without a resolved `final`; resolve it first")


def finite_ap(ap: Any) -> float | None:
    """`ap` as a float if it is a real, finite number, else None (not a validated AP)."""
    if isinstance(ap, bool) or not isinstance(ap, (int, float)) or not math.isfinite(ap):
        return None
    return float(ap)
