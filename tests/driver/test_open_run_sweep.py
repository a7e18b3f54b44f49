"""Starting or resuming a run discards what an interrupted write left in its directory (here: the hidden temp
files of atomic local writes), old enough not to belong to a live writer; complete objects stay."""

import os
import time

from deim_ray.driver.run import RunRequest, open_run
from deim_ray.storage import RunStore, open_storage


def _partial(path, age_s: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half a checkpoint")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_resume_and_restart_sweep_stale_partial_writes(tiny_cfg, tmp_path):
    req = RunRequest(cfg=tiny_cfg(), storage_uri=str(tmp_path), name="swept")
    store = RunStore(open_storage(str(tmp_path)), "swept")
    open_run(req, store)
    run_dir = tmp_path / "swept"
    stale = _partial(run_dir / "artifacts" / ".last.pth.k3j1.partial", age_s=3600)
    fresh = _partial(run_dir / "artifacts" / ".best_stg1.pth.q8z2.partial", age_s=5)
    complete = _partial(run_dir / "artifacts" / "last.pth", age_s=3600)

    open_run(req, store)  # resume
    assert not stale.exists() and fresh.exists() and complete.exists()

    stale = _partial(run_dir / "ray" / ".state.pt.a1b2.partial", age_s=3600)
    open_run(RunRequest(cfg=tiny_cfg(), storage_uri=str(tmp_path), name="swept", restart=True), store)
    assert not stale.exists() and fresh.exists() and complete.exists()
