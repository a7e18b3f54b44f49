"""A second driver on a run another live driver holds is refused in the claim itself (one line, nothing
written); `take_over` fences the holder out; a holder that is gone (process ended, not seen for HOLD_SECONDS) or
released holds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from deim_ray.storage import Manifest, RunStore, open_storage
from deim_ray.storage.errors import RunHeld
from deim_ray.storage.holder import this_driver


def _holder(pid: int, seen: str | None = None) -> dict:
    holder = this_driver() | {"pid": pid}
    return holder | ({"seen": seen} if seen else {})


@pytest.fixture
def held(tmp_path):
    """A run claimed by another live process of this host (a sleeping child stands in for its driver)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    store = RunStore(open_storage(str(tmp_path)), "r")
    store.claim(Manifest.new(name="r", config_sha256="c" * 64, epochs=4, stop_epoch=2), holder=_holder(child.pid))
    yield store, child
    child.kill()
    child.wait()


def test_a_live_holder_refuses_a_second_driver_in_one_line(held):
    store, child = held
    before = (store.storage.read_bytes("r/manifest.json"))
    second = RunStore(store.storage, "r")
    with pytest.raises(RunHeld, match=f"pid {child.pid} on .*--take-over") as info:
        second.claim(holder=this_driver(), take_over=False)
    assert "\n" not in str(info.value) and store.storage.read_bytes("r/manifest.json") == before


def test_take_over_fences_the_holder_out(held):
    store, _ = held
    manifest = RunStore(store.storage, "r").claim(holder=this_driver(), take_over=True)
    assert manifest.holder["pid"] == os.getpid() and manifest.attempt == 2 and manifest.generation == 2


def test_a_holder_whose_process_ended_or_went_silent_holds_nothing(held):
    store, child = held
    child.kill()
    child.wait()
    second = RunStore(store.storage, "r")
    assert second.claim(holder=this_driver(), take_over=False).holder["pid"] == os.getpid()
    second.update_manifest(lambda m: setattr(m, "holder", _holder(os.getppid(), seen="2000-01-01T00:00:00Z")))
    assert RunStore(store.storage, "r").claim(holder=this_driver(), take_over=False).generation == 3


def test_of_two_drivers_claiming_a_new_run_together_exactly_one_gets_it(tmp_path):
    storage = open_storage(str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def claim(pid: int):
        try:
            return RunStore(storage, "n").claim(Manifest.new(name="n", config_sha256="c" * 64, epochs=4,
                                                              stop_epoch=2), holder=_holder(pid), take_over=False)
        except RunHeld as e:
            return e
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(claim, [child.pid, os.getppid()]))
    finally:
        child.kill()
        child.wait()
    assert sorted(type(r).__name__ for r in results) == ["Manifest", "RunHeld"], results
