"""Stopping `deim-ray train` at any moment, with real processes on the tiny config (one run, several stops):

1. SIGINT during start-up, 2. SIGTERM mid stage 1, 3. SIGINT within a second of the stage switch: each ends
within STOP_SECONDS with exit 130/143 and exactly one line after the signal (`deim-ray: interrupted at ...;
re-run the same command to resume`: no Ray or Python stack lines), the manifest consistent and released;
4. the same command re-run twice at once: one finishes DONE (having said where it picks up), the other exits 2
in one line naming the driver that holds the run; every epoch appears once in metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.driver.conftest import TINY, data_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STOP_SECONDS = 15
"""From the signal to the process's end (the issue's bound)."""
STEP_TIMEOUT = 600


class Driver:
    """One `deim-ray train` process in its own session, its console in a file."""

    def __init__(self, tmp: Path, label: str):
        self.log = tmp / f"{label}.log"
        data = tmp / "shapes"
        cmd = [sys.executable, "-m", "deim_ray", "train", "-c", TINY, "--storage", str(tmp / "runs"), "--name", "s",
               "--workers", "2", "-u", *data_overrides(data)]
        env = os.environ | {"PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.sent_at = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, words: str, delay: float = 0.0) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while words not in self.text():
            assert self.proc.poll() is None and time.monotonic() < deadline, (words, self.text()[-3000:])
            time.sleep(0.2)
        time.sleep(delay)

    def stop(self, sig: int) -> tuple[int, float, list[str]]:
        """Send `sig`; (exit status, seconds to the end, console lines after the signal)."""
        self.sent_at = len(self.log.read_bytes())
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=60)
        finally:
            self.end()
        return rc, time.monotonic() - start, self.log.read_bytes()[self.sent_at:].decode(errors="replace").splitlines()

    def end(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of its local Ray left in its session
        except ProcessLookupError:
            pass


def _manifest(tmp: Path) -> dict:
    return json.loads((tmp / "runs" / "s" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def stops(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupts")
    results = {}
    first = Driver(tmp, "startup")
    first.wait_for("generating synthetic shapes")  # the driver's checks, before Ray starts
    results["start-up"] = (signal.SIGINT, *first.stop(signal.SIGINT), None)
    mid = Driver(tmp, "stage1")
    mid.wait_for("epoch  0/", delay=1)
    results["mid stage 1"] = (signal.SIGTERM, *mid.stop(signal.SIGTERM), _manifest(tmp))
    switch = Driver(tmp, "switch")
    switch.wait_for("stage 1 -> 2", delay=0.5)
    results["at the switch"] = (signal.SIGINT, *switch.stop(signal.SIGINT), _manifest(tmp))
    pair = [Driver(tmp, "again-a"), Driver(tmp, "again-b")]
    try:
        codes = [d.proc.wait(timeout=STEP_TIMEOUT) for d in pair]
    finally:
        for d in pair:
            d.end()
    yield results, codes, [d.text() for d in pair], tmp
    for d in (first, mid, switch, *pair):
        d.end()


@pytest.mark.parametrize("when, where", [("start-up", "interrupted at start-up"),
                                         ("mid stage 1", "interrupted at epoch 1 of stage 1"),
                                         ("at the switch", "interrupted at epoch 2 of stage 2")])
def test_a_signal_ends_the_run_in_one_line_with_its_status(stops, when, where):
    sig, rc, seconds, lines, manifest = stops[0][when]
    assert rc == 128 + sig and seconds < STOP_SECONDS, (rc, seconds, lines)
    ours = [line for line in lines if line.startswith("deim-ray:")]
    assert ours == [f"deim-ray: {where}; re-run the same command to resume"], lines
    assert lines[-1] == ours[0] and not any("Traceback" in line or "SIGTERM received" in line for line in lines)
    if manifest is not None:
        assert manifest["state"].endswith(("_RUNNING", "_DONE")) and "holder" not in manifest


def test_two_reruns_at_once_one_finishes_the_other_is_refused(stops):
    _, codes, texts, tmp = stops
    assert sorted(codes) == [0, 2], texts
    winner, loser = (texts[0], texts[1]) if codes[0] == 0 else (texts[1], texts[0])
    assert "continues in" in winner and "DONE" in winner
    refused = [line for line in loser.splitlines() if line.startswith("deim-ray: error:")]
    assert len(refused) == 1 and "another driver (pid" in refused[0] and "--take-over" in refused[0], loser
    epochs = [json.loads(line)["epoch"] for line in (tmp / "runs" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3] and _manifest(tmp)["state"] == "DONE"
