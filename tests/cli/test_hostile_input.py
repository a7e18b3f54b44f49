"""Broken and hostile input through the real command line, each case its own `python -m deim_ray` process:
the cases whose environment matters (S3 endpoints, Ray addresses, credentials in the environment) and the
light commands (ls, resolve, fetch) on damaged or replaced runs. The rest of the bad-input matrix runs in
process, in test_bad_input.py.

Every refused case ends with exit status 2 and ONE line `deim-ray: error: ...` on stderr (nothing on stdout, no
traceback), never prints a credential (a password in an endpoint URL, the secret key of the environment) and
changes no file. Legal input (a damaged run among healthy ones, --no-verify) gives the documented result. None
of the cases needs Ray or an S3 server: the processes run a few at a time from one module fixture.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from deim_ray.config.schema import SyntheticConfig
from deim_ray.data.synthetic import generate_shapes
from deim_ray.storage import FINAL, Manifest, RunState, RunStore, open_storage
from tests.cli.test_bad_input import config_and_existing_run

ROOT = Path(__file__).resolve().parents[2]
URL_PASSWORD = "UrlPassw0rd-Xy9q"
ENV_SECRET = "EnvSecretKey-7Hq2Wm"
SECRETS = (URL_PASSWORD, ENV_SECRET)
PARALLEL = 4
LIGHT_SECONDS = 15
"""Bound for the light cases' wall time, with 4 cases sharing a loaded CI machine (about 1.5 s alone)."""
"""Cases running at once (each process imports torch)."""


@dataclass
class World:
    """Shared inputs: a valid dataset and config, a storage root with runs, and a folder per case."""

    tmp: Path
    data: Path
    config: Path
    storage: Path
    dead_port: int
    silent_port: int

    def case_dir(self, name: str) -> Path:
        path = self.tmp / "cases" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def train(self, *extra: str, config: Path | str | None = None, storage: str | None = None) -> list[str]:
        return ["train", "-c", str(config or self.config), "--storage", storage or str(self.storage),
                "--name", "existing", "--workers", "2", *extra]


@dataclass(frozen=True)
class Case:
    make: Callable[[World, Path], list[str]]
    """(world, the case's own folder) -> argv after `deim-ray`; may write input files into the folder."""
    words: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    """Extra environment; values may use {dead_port}, {silent_port} and {case}."""
    rc: int = 2
    light: bool = False
    """The answer comes before torch and Ray are imported (seconds, not a minute on a loaded machine)."""


def _text(name: str, text: str | bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path
    return write


def _copy_run(w: World, d: Path, damage: Callable[[dict], None] | None = None,
              replace_final: bool = False) -> str:
    """A copy of the finished run `done` under the case folder, optionally damaged; returns its URI."""
    root = d / "runs"
    for src in (w.storage / "done").rglob("*"):
        if src.is_file():
            dst = root / "done" / src.relative_to(w.storage / "done")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    manifest = root / "done" / "manifest.json"
    if damage:
        doc = json.loads(manifest.read_text())
        damage(doc)
        manifest.write_text(json.dumps(doc))
    if replace_final:
        final = root / "done" / "artifacts" / "final.pth"
        final.write_bytes(bytes(b ^ 0xFF for b in final.read_bytes()))  # same size, other bytes
    return str(root / "done")


def _stale_ray_address(w: World, d: Path) -> list[str]:
    (d / "ray").mkdir()
    (d / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{w.dead_port}")  # as `ray start` leaves it
    return w.train()


def _fetch_over_unrelated_file(w: World, d: Path) -> list[str]:
    (d / "out").mkdir()
    (d / "out" / "final.pth").write_bytes(b"my own notes")
    return ["fetch", str(w.storage / "done"), "-o", str(d / "out")]


def _into_a_file(command: Callable[[World, Path], list[str]]) -> Callable[[World, Path], list[str]]:
    """`command(w, d)` after `d/file` was created as a plain file (the command's output lies under it)."""
    def make(w: World, d: Path) -> list[str]:
        (d / "file").write_bytes(b"x")
        return command(w, d)
    return make


def _ls_healthy_and_damaged(w: World, d: Path) -> list[str]:
    healthy = Path(_copy_run(w, d / "healthy"))
    _copy_run(w, d, lambda m: m.update(final="best"))
    healthy.rename(d / "runs" / "healthy")
    manifest = d / "runs" / "healthy" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"name": "done"', '"name": "healthy"'))
    return ["ls", str(d / "runs")]


def _s3_ls(endpoint: str) -> Case:
    return Case(lambda w, d: ["ls", "s3://bucket-x/runs"], ("AWS_ENDPOINT_URL_S3", "not an http(s) URL"),
                env={"AWS_ENDPOINT_URL_S3": endpoint})


CASES: dict[str, Case] = {
    # credentials in endpoint URLs (they must not reach the error line)
    "endpoint-password-bad-port": _s3_ls(f"http://KEYID:{URL_PASSWORD}@127.0.0.1:99999"),
    "endpoint-password-no-scheme": _s3_ls(f"KEYID:{URL_PASSWORD}@127.0.0.1:9000"),
    "endpoint-without-scheme": _s3_ls("127.0.0.1:9000"),
    # bounded waits
    "endpoint-never-answers": Case(lambda w, d: ["ls", "s3://bucket-x/runs"],
                                   ("cannot reach S3 endpoint", "within 3 s", "DEIM_RAY_S3_TIMEOUT"),
                                   env={"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:{silent_port}",
                                        "DEIM_RAY_S3_TIMEOUT": "3"}),
    "endpoint-refuses-connections": Case(lambda w, d: ["ls", "s3://bucket-x/runs"], ("cannot reach S3 endpoint",),
                                         env={"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:{dead_port}",
                                              "DEIM_RAY_S3_TIMEOUT": "3"}),
    "s3-timeout-not-a-number": Case(lambda w, d: ["ls", "s3://bucket-x/runs"], ("DEIM_RAY_S3_TIMEOUT",),
                                    env={"DEIM_RAY_S3_TIMEOUT": "nan"}),
    "stale-recorded-ray-address": Case(_stale_ray_address, ("did not answer", "ray stop"),
                                       env={"RAY_TMPDIR": "{case}"}),
    "dead-ray-address": Case(lambda w, d: w.train(), ("did not answer", "RAY_ADDRESS"),
                             env={"RAY_ADDRESS": "127.0.0.1:{dead_port}"}),
    # no silent overwrite
    "fetch-over-an-unrelated-file": Case(_fetch_over_unrelated_file, ("exists", "--force")),
    "fetch-into-a-file": Case(_into_a_file(lambda w, d: ["fetch", str(w.storage / "done"), "-o", str(d / "file")]),
                              ("is a file, not a directory",)),
    # bounded searches and argument errors: one line within seconds
    "stage2-branches-1000": Case(lambda w, d: w.train("--stage2-branches", "1000"), ("1000", "at most 16"),
                                 light=True),
    "tune-empty-space-file": Case(lambda w, d: ["tune", "-c", str(w.config), "--space", str(_text("s.yml", "")(d))],
                                  ("must map dotted config keys",), light=True),
    "tune-grid-repeated-by-samples": Case(
        lambda w, d: ["tune", "-c", str(w.config), "--space", str(_text("s.yml", "optimizer.lr: {grid: [0.1, 0.2]}")(d)),
                      "--samples", "3", "--storage", str(d / "runs")], ("only 2 distinct point",), light=True),
    "run-name-invalid": Case(lambda w, d: ["train", "-c", str(w.config), "--name", "a/../b"], ("run name",), light=True),
    # damaged manifests, replaced artifacts
    # no half-written outputs: a refused command leaves no output folder behind
    "fetch-replaced-final-into-a-new-folder": Case(
        lambda w, d: ["fetch", _copy_run(w, d, replace_final=True), "-o", str(d / "new" / "out")],
        ("sha256",)),
    "manifest-artifacts-a-list-resolve": Case(
        lambda w, d: ["resolve", _copy_run(w, d, lambda m: m.update(artifacts=[]))], ("`artifacts`", "damaged")),
    "manifest-final-a-string-resolve": Case(
        lambda w, d: ["resolve", _copy_run(w, d, lambda m: m.update(final="best"))], ("`final`", "damaged")),
    "manifest-final-a-string-fetch": Case(
        lambda w, d: ["fetch", _copy_run(w, d, lambda m: m.update(final="best")), "-o", str(d / "out")],
        ("`final`", "damaged")),
    "final-bytes-replaced-resolve": Case(lambda w, d: ["resolve", _copy_run(w, d, replace_final=True)],
                                         ("replaced or corrupted",)),
    # legal input, correct result
    "final-bytes-replaced-resolve-no-verify": Case(
        lambda w, d: ["resolve", _copy_run(w, d, replace_final=True), "--no-verify"], ("DONE",), rc=0),
    "resolve-verifies-a-healthy-run": Case(lambda w, d: ["resolve", _copy_run(w, d)], ("DONE", "verified"), rc=0),
    "ls-lists-healthy-and-damaged-runs": Case(_ls_healthy_and_damaged, ("healthy", "DONE", "done", "DAMAGED",
                                                                         "`final`"), rc=0),
}


def _finished_run(storage: Path, tmp: Path) -> None:
    store = RunStore(open_storage(str(storage)), "done")
    store.write_manifest(Manifest.new(name="done", config_sha256="0" * 64, epochs=4, stop_epoch=2))
    weights = tmp / "weights.pth"
    torch.save({"w": torch.arange(1000.0)}, weights)
    store.put_artifact("best_stg1", weights, epoch=1, stage=1, ap=0.25)
    record = store.put_artifact(FINAL, weights, epoch=1, stage=1, ap=0.25)
    manifest = store.read_manifest()
    manifest.final = {"artifact": "best_stg1", "uri": record.uri, "sha256": record.sha256, "ap": 0.25, "epoch": 1,
                      "stage": 1, "reason": "run ended in stage 1"}
    manifest.state = RunState.DONE
    store.write_manifest(manifest)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    data = tmp / "shapes"
    generate_shapes(data, SyntheticConfig(num_train=6, num_val=4, image_size=64, num_classes=3, max_objects=3))
    config, storage = config_and_existing_run(tmp, data)
    _finished_run(storage, tmp)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # accepts connections, never answers
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    yield World(tmp, data, config, storage, dead.getsockname()[1], listener.getsockname()[1])
    listener.close()
    dead.close()


def _snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None), so an output folder left behind counts as a change."""
    return {str(p): p.read_bytes() if p.is_file() else None for root in roots for p in root.rglob("*")}


def _environment(case: Case, values: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY=ENV_SECRET, PYTHONPATH=str(ROOT))
    for key, value in case.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value.format(**values)
    return env


def _run_case(world: World, name: str) -> tuple[subprocess.CompletedProcess, float, dict, dict, Path]:
    case = CASES[name]
    folder = world.case_dir(name)
    argv = case.make(world, folder)
    env = _environment(case, {"dead_port": str(world.dead_port), "silent_port": str(world.silent_port),
                              "case": str(folder)})
    before = _snapshot(world.storage, world.data, folder)
    start = time.monotonic()
    python = [sys.executable, "-X", "importtime"] if case.light else [sys.executable]
    proc = subprocess.run([*python, "-m", "deim_ray", *argv], env=env, cwd=folder, capture_output=True,
                          text=True, timeout=300)
    elapsed = time.monotonic() - start
    return proc, elapsed, before, _snapshot(world.storage, world.data, folder), folder


@pytest.fixture(scope="module")
def outcomes(world):
    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(zip(CASES, pool.map(lambda n: _run_case(world, n), CASES)))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(outcomes, name):
    case = CASES[name]
    proc, elapsed, before, after, folder = outcomes[name]
    imports = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    proc.stderr = "".join(line for line in proc.stderr.splitlines(True) if not line.startswith("import time:"))
    output = proc.stdout + proc.stderr
    assert not any(secret in output for secret in SECRETS), output
    assert "Traceback" not in output and "this must never run" not in output, output
    assert proc.returncode == case.rc, output
    if case.rc:
        lines = proc.stderr.strip().splitlines()
        assert proc.stdout == "" and len(lines) == 1 and lines[0].startswith("deim-ray: error: "), output
    for word in case.words:
        assert word in (proc.stderr if case.rc else proc.stdout), (word, output)
    if case.light:
        assert not {"torch", "ray"} & imports and elapsed < LIGHT_SECONDS, (elapsed, sorted(imports)[:20])
    changed = before.keys() ^ after.keys() | {p for p in before.keys() & after.keys() if before[p] != after[p]}
    assert not changed, changed


def test_an_endpoint_that_never_answers_costs_only_its_timeout(outcomes):
    """It takes at most DEIM_RAY_S3_TIMEOUT (3 s) more than an endpoint that refuses at once; the two processes
    ran side by side, so start-up time under load cancels out."""
    silent, refusing = outcomes["endpoint-never-answers"][1], outcomes["endpoint-refuses-connections"][1]
    assert silent - refusing < 3 + 10, (silent, refusing)
