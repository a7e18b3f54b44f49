"""Chaos: real `deim-ray train` processes (each with its own local Ray, 2 CPU workers) survive SIGKILLed workers
at every fault point and a driver that freezes and comes back as a stale writer, and end with a consistent run
directory.

Faults are injected by the test-only FaultHook (DEIM_RAY_FAULT), which reaches the Ray workers through the
environment of the driver process that starts the local Ray instance; a marker per fault proves it fired.

    uninterrupted  the session's finished run (tests/driver/conftest.py): the same config and seed without
                   faults, trained by the driver in the test process: the reference final AP
    chaos          mid_epoch (epoch 0, rank 1), upload (epoch 0, rank 0), eval (epoch 1, rank 1),
                   checkpoint_write (epoch 1, rank 0), stage_start (epoch 2, rank 1); then, once the manifest's
                   `last` is the epoch-2 state, the driver's whole process tree (its local Ray and workers too)
                   is frozen (SIGSTOP) and the same command is run again to DONE; then the frozen attempt is let
                   go (SIGCONT) and must change nothing: every write of an older generation is refused;
                   in epoch 2 rank 0's loss turns NaN (nan fault) until the stage rolls back and reruns it

One run takes every kill (--max-failures 4 covers stage 1's four) so the file stays within its time budget;
each kill is followed by a completed epoch before the next one, so recoveries are measured one at a time.
For every run: DONE, a legal transition history with no stage-1 work after the switch, every artifact's sha256
verifies, metrics.jsonl holds each epoch once in order, no best artifact was ever replaced by a worse one
(the manifest is watched while the run trains), the best artifacts hold the best AP the metrics show, and EMA
update and optimizer step counts match the epochs trained (nothing lost or counted twice by a resume). Recovery
time per kill (kill -> next epoch completed) and the final AP against the uninterrupted run are printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from deim_ray.engine.state import load_train_state
from tests.driver.conftest import FINISHED_OVERRIDES, TINY, ManifestWatch, data_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, STOP, ITERS = 4, 2, 8
"""tiny.yml: 4 epochs, stage 2 from epoch 2, 32 train images / batch 4 = 8 steps per epoch on each worker."""
RUN_TIMEOUT_S = 900
AP_NOISE = 0.05
"""Final-AP difference tolerated against the uninterrupted run: a resume re-draws augmentation and denoising
randomness, and the tiny model's AP moves by this much between neighbouring epochs."""
FAULTS = "mid_epoch:0:1,upload:0:0,eval:1:1,checkpoint_write:1:0,stage_start:2:1,nan:2:0"
NAN_TOLERANCE = 2
"""train.nan_tolerance of both runs (FINISHED_OVERRIDES)."""
RERUN = "=== the same command, while the first driver is frozen ==="
STALE_WAIT_S = 90
"""How long the resumed stale attempt may run on before it is killed (it is expected to give up sooner)."""


@dataclass
class Run:
    run_dir: Path
    fault_dir: Path
    log: str = ""
    wall_s: float = 0.0
    driver_kill_time: float | None = None
    kill_generation: int = 0
    """The manifest's fencing generation when the driver was frozen (its stage run's)."""
    stale: dict = field(default_factory=dict)
    """What the frozen attempt did once resumed: run files before/after, its exit status (None: still running)."""
    best_history: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    @property
    def manifest(self) -> dict:
        return json.loads((self.run_dir / "manifest.json").read_text())

    def metrics(self) -> list[dict]:
        return [json.loads(x) for x in (self.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]

    def epochs_done(self) -> list[dict]:
        path = self.fault_dir / "epochs.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _command(storage: Path, name: str, data_root: Path) -> list[str]:
    return [sys.executable, "-m", "deim_ray", "train", "-c", TINY, "--storage", str(storage), "--name", name,
            "--workers", "2", "--max-failures", "4", "-u", *data_overrides(data_root), *FINISHED_OVERRIDES]


def _env(faults: str, fault_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEIM_RAY_FAULT")}
    # a private local Ray instance per run: its workers inherit this environment, fault settings included
    return env | {"RAY_ADDRESS": "local", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                  "DEIM_RAY_FAULT": faults, "DEIM_RAY_FAULT_DIR": str(fault_dir)}


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # own session: the whole local Ray instance can be ended with the driver
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants: Ray's workers run in sessions of their own, outside the driver's group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def _signal_tree(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _end_group(proc: subprocess.Popen, tree: list[int] = ()) -> None:
    """SIGKILL whatever of this driver's process group (Ray agents outlive a killed driver) and of `tree` is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _signal_tree(list(tree), signal.SIGKILL)


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end_group(proc)
        raise


def _train(tmp: Path, name: str, data_root: Path, faults: str = "", pause_driver_when=None) -> Run:
    """Run the command to the end. With `pause_driver_when(run)`: once it holds, freeze the driver's whole process
    tree (driver, its local Ray, its workers: a stale attempt), run the same command again to DONE, then let
    the frozen attempt go on as a stale writer and record what it did (`run.stale`)."""
    run = Run(tmp / "runs" / name, tmp / f"faults-{name}")
    run.fault_dir.mkdir(parents=True)
    cmd, env, log = _command(tmp / "runs", name, data_root), _env(faults, run.fault_dir), tmp / f"{name}.log"
    watch = ManifestWatch(run.run_dir / "manifest.json", run.best_history)
    watch.start()
    started = time.monotonic()
    stale, frozen = None, []
    try:
        proc = _start(cmd, env, log)
        if pause_driver_when is not None:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not pause_driver_when(run):
                assert proc.poll() is None, f"run ended before the driver could be paused:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "the driver-pause condition never held"
                time.sleep(0.2)
            frozen = _tree(proc.pid)  # the driver, its local Ray and the Train workers
            _signal_tree(frozen, signal.SIGSTOP)
            run.driver_kill_time = time.time()
            run.kill_generation = run.manifest["generation"]
            stale, proc = proc, None
            with open(log, "a") as out:
                out.write(f"\n{RERUN}\n")
            # the same command again while the old attempt is frozen: its driver still holds the run
            proc = _start([*cmd, "--take-over"], env, log)
        rc = _wait(proc, RUN_TIMEOUT_S)
        _end_group(proc)
        if stale is not None:
            run.stale = _resume_stale(stale, frozen, run)
    finally:
        watch.done.set()
        watch.join()
        if stale is not None:
            _end_group(stale, frozen)
    run.wall_s, run.log = time.monotonic() - started, log.read_text()
    assert rc == 0, run.log[-4000:]
    return run


def _run_files(run: Run) -> dict[str, str]:
    """sha256 of everything a writer may touch: manifest, config, metrics, artifacts, every recorded object."""
    keys = {"manifest.json", "config.yaml", "metrics.jsonl"} | {
        p.relative_to(run.run_dir).as_posix() for p in (run.run_dir / "artifacts").iterdir() if p.is_file()}
    keys |= {r["key"] for r in run.manifest["artifacts"].values() if r}
    return {k: _sha(run.run_dir / k) for k in sorted(keys)}


def _resume_stale(stale: subprocess.Popen, frozen: list[int], run: Run) -> dict:
    """Let the frozen attempt run on for a while after the new one finished; what changed, and how it ended."""
    before = _run_files(run)
    _signal_tree(frozen, signal.SIGCONT)
    try:
        rc = stale.wait(timeout=STALE_WAIT_S)
    except subprocess.TimeoutExpired:
        rc = None
    return {"before": before, "after": _run_files(run), "rc": rc}


def _in_stage2_after_epoch2(run: Run) -> bool:
    """The manifest's `last` is the epoch-2 state (committed), so a new driver must resume from it."""
    try:
        last = run.manifest["artifacts"]["last"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(last) and (last["stage"], last["epoch"]) == (2, 2)


def _uninterrupted(finished) -> Run:
    """The shared finished run, seen as a Run of this module (no faults, so no fault markers)."""
    return Run(finished.run_dir, finished.run_dir.parent / "no-faults", wall_s=finished.wall_s,
               best_history=finished.best_history)


@pytest.fixture(scope="module")
def runs(finished_run, tiny_data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chaos")
    out = {"uninterrupted": _uninterrupted(finished_run),
           "chaos": _train(tmp, "chaos", tiny_data_root, FAULTS, pause_driver_when=_in_stage2_after_epoch2)}
    _print_summary(out)
    return out


def _recoveries(run: Run) -> list[tuple[str, float]]:
    """(kill point, seconds from the kill to the next completed epoch) for every kill of the run."""
    markers = [json.loads(p.read_text()) for p in run.fault_dir.glob("*.fired")]
    kills = [(f"{m['point']}@e{m['epoch']}", m["time"]) for m in markers]
    if run.driver_kill_time is not None:
        kills.append(("driver", run.driver_kill_time))
    done = sorted(e["time"] for e in run.epochs_done())
    return [(point, next(t for t in done if t > killed) - killed)
            for point, killed in sorted(kills, key=lambda k: k[1])]


def _print_summary(runs: dict[str, Run]) -> None:
    base_ap = runs["uninterrupted"].manifest["final"]["ap"]
    print("\nchaos summary (tiny DEIMv2, 2 CPU workers, 4 epochs)")
    for key, run in runs.items():
        ap = run.manifest["final"]["ap"]
        print(f"  run {key:<13} wall {run.wall_s:6.1f} s  final AP {ap:.4f} ({run.manifest['final']['artifact']})"
              f"  vs uninterrupted {ap - base_ap:+.4f}  epoch APs {[round(r['ap'], 4) for r in run.metrics()]}")
        for point, seconds in (_recoveries(run) if run.fault_dir.joinpath("epochs.jsonl").exists() else []):
            print(f"      kill at {point:<20} recovered (next epoch done) after {seconds:5.1f} s")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("key", ["uninterrupted", "chaos"])
def test_run_is_done_with_verified_artifacts(runs, key):
    m = runs[key].manifest
    assert m["state"] == "DONE"
    for name, rec in m["artifacts"].items():
        if rec is not None:
            assert _sha(runs[key].run_dir / rec["key"]) == rec["sha256"], name
    assert m["switch"]["sha256"] == m["artifacts"]["best_stg1"]["sha256"]
    assert m["final"]["sha256"] == m["artifacts"]["final"]["sha256"]


@pytest.mark.parametrize("key", ["uninterrupted", "chaos"])
def test_transitions_never_return_to_stage1_after_the_switch(runs, key):
    states = [t["state"] for t in runs[key].manifest["transitions"]]
    assert states[0] == "NEW" and states[-1] == "DONE" and "FAILED" not in states
    switch = states.index("STAGE1_DONE")
    assert states.count("STAGE1_DONE") == 1 and "STAGE1_RUNNING" not in states[switch:]


@pytest.mark.parametrize("key", ["uninterrupted", "chaos"])
def test_metrics_hold_each_epoch_once_in_order(runs, key):
    rows = runs[key].metrics()
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert [r["stage"] for r in rows] == [1] * STOP + [2] * (EPOCHS - STOP)


@pytest.mark.parametrize("key", ["uninterrupted", "chaos"])
def test_best_artifacts_only_ever_improve_and_hold_the_best_ap(runs, key):
    run = runs[key]
    assert run.best_history.get("best_stg1"), "the manifest watch saw no best_stg1"
    for name, seen in run.best_history.items():
        aps = [ap for _, ap in seen]
        assert all(b > a for a, b in zip(aps, aps[1:])), f"{name} replaced by a model that is not better: {aps}"
    m, rows = run.manifest, run.metrics()
    stg1 = m["artifacts"]["best_stg1"]
    assert stg1["ap"] >= max(r["ap"] for r in rows if r["stage"] == 1)
    best2 = max(r["ap"] for r in rows if r["stage"] == 2)
    if best2 > stg1["ap"]:
        assert m["artifacts"]["best_stg2"]["ap"] >= best2


@pytest.mark.parametrize("key", ["uninterrupted", "chaos"])
def test_ema_updates_and_optimizer_steps_match_the_epochs_trained(runs, key):
    """A resume restores the EMA update count and optimizer state: no epoch is lost or counted twice."""
    run = runs[key]
    stg1 = load_train_state(run.run_dir / "artifacts" / "best_stg1.pth")
    assert stg1["ema"]["updates"] == (stg1["last_epoch"] + 1) * ITERS
    expected = stg1["ema"]["updates"]  # stage 2 starts from best_stg1 and returns to it on each restart
    for row in run.metrics()[STOP:]:
        expected = stg1["ema"]["updates"] if row["restarted_from_stg1"] else expected + ITERS
    last = load_train_state(run.run_dir / run.manifest["artifacts"]["last"]["key"])
    assert last["last_epoch"] == EPOCHS - 1 and last["stage"] == 2
    assert last["ema"]["updates"] == expected
    steps = {int(s["step"]) for s in last["optimizer"]["state"].values()}
    assert steps == {expected}


def test_every_fault_fired_and_each_kill_was_recovered(runs):
    run = runs["chaos"]
    fired = sorted(p.name for p in run.fault_dir.glob("*.fired"))
    expected = sorted(f"{p}-e{e}-r{r}.fired" for p, e, r in (f.split(":") for f in FAULTS.split(",")))
    assert fired == expected  # the environment reached the Ray workers
    assert len(_recoveries(run)) == len(expected) + 1  # and the driver
    assert run.log.count("resuming stage") >= 2  # Ray restored committed checkpoints (e.g. after checkpoint_write)


def test_final_ap_matches_the_uninterrupted_run_within_noise(runs):
    base = runs["uninterrupted"].manifest["final"]["ap"]
    assert abs(runs["chaos"].manifest["final"]["ap"] - base) <= AP_NOISE


def test_killed_driver_resumed_stage2_without_retraining_stage1(runs):
    run = runs["chaos"]
    transitions = run.manifest["transitions"]
    states = [t["state"] for t in transitions]
    assert states.count("STAGE2_RUNNING") == 2 and states.count("STAGE1_RUNNING") == 1
    assert "stage 2 continues" in transitions[states.index("STAGE2_RUNNING") + 1]["note"]
    # the new driver's workers resumed from the manifest's `last` (epoch 2, or 3 if the frozen workers committed
    # it before the takeover) and trained only the epochs after it; the frozen attempt commits nothing after it
    rerun = run.log.split(RERUN)[-1]
    resumed = re.search(r"resuming stage 2 after epoch (\d+)", rerun)
    assert resumed and int(resumed.group(1)) >= 2, rerun[-3000:]
    newer = [e["epoch"] for e in run.epochs_done() if e["generation"] > run.kill_generation]
    assert newer == list(range(int(resumed.group(1)) + 1, EPOCHS))
    assert run.manifest["generation"] == run.kill_generation + 2  # the new driver's start and its stage-2 run


def test_the_frozen_attempt_changes_nothing_when_it_comes_back(runs):
    """The first driver, frozen with its local Ray and workers while the same command ran again to DONE, is let
    go: every write it tries carries an older generation and is refused, and it gives up."""
    stale = runs["chaos"].stale
    assert stale["before"] and stale["after"] == stale["before"]
    assert stale["rc"] is not None and stale["rc"] != 0, stale["rc"]


def test_nan_steps_were_skipped_on_both_ranks_and_the_epoch_rolled_back(runs):
    rows = {r["epoch"]: r for r in runs["chaos"].metrics()}
    events = [(r["nonfinite_steps"], r["nonfinite_rollbacks"], r["nonfinite_steps_rolled_back"]) for r in rows.values()]
    assert events == [(0, 0, 0)] * 2 + [(0, 1, NAN_TOLERANCE)] + [(0, 0, 0)]
    run = runs["chaos"]
    for key in (run.manifest["artifacts"]["last"]["key"], "artifacts/final.pth"):
        state = torch.load(run.run_dir / key, weights_only=True)
        tensors = [t for t in _tensors(state) if t.is_floating_point()]
        assert tensors and all(torch.isfinite(t).all() for t in tensors), key


def _tensors(tree):
    if torch.is_tensor(tree):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)
