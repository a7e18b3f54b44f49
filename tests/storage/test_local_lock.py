"""The local lock: exclusive between processes, and never a reason to wait forever for a stuck holder."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest

from deim_ray.storage import local
from deim_ray.storage.local import LocalStorage

_HOLD = """
import os, signal, sys, time
from deim_ray.storage.local import LocalStorage
with LocalStorage(sys.argv[1]).lock("run/manifest.json"):
    print("held", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen inside the critical section, as a paused attempt
    time.sleep(1.0)  # once thawed: a live holder's critical section
"""


@pytest.fixture
def frozen_holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_lock_held_by_a_frozen_process_is_taken_over_after_the_break_time(tmp_path, frozen_holder, monkeypatch,
                                                                            caplog):
    monkeypatch.setattr(local, "LOCK_BREAK_S", 1.0)
    storage = LocalStorage(tmp_path)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="deim_ray.storage"), storage.lock("run/manifest.json"):
        waited = time.monotonic() - started
        # the holder is still there, still frozen: exclusion among live processes goes on with the new lock file
        assert frozen_holder.poll() is None
        other = subprocess.run([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
                                "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
                                str(tmp_path / "run" / ".manifest.json.lock")], capture_output=True, text=True)
        assert other.returncode != 0 and "BlockingIOError" in other.stderr
    assert 1.0 <= waited < 30, waited
    assert "does not release it" in caplog.text


def test_a_live_holder_is_waited_for(tmp_path, frozen_holder, monkeypatch):
    monkeypatch.setattr(local, "LOCK_BREAK_S", 30.0)
    frozen_holder.send_signal(signal.SIGCONT)  # wakes up, leaves the critical section and exits
    started = time.monotonic()
    with LocalStorage(tmp_path).lock("run/manifest.json"):
        waited = time.monotonic() - started
        assert frozen_holder.wait(timeout=30) == 0
    assert 0.5 < waited < 25, waited
