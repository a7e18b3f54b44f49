"""driver layer: a worker's local scratch space, `<tmp>/deim_ray-<pid>/`, and the sweep of dead workers' ones.

Rank 0 stages each epoch's TrainState, plot and TensorBoard files on local disk before they reach the run's
storage. A worker that is killed (a lost node, an OOM kill, a preempted instance, a chaos test) cannot clean up,
and a TrainState of a large model is hundreds of MB, so every worker keeps its files under one folder named
after its process and, when it starts, removes the folders of this user's processes that no longer exist.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("deim_ray.worker")

PREFIX = "deim_ray-"


def process_scratch() -> Path:
    """This process's scratch folder (created on first use)."""
    root = Path(tempfile.gettempdir()) / f"{PREFIX}{os.getpid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_dead_scratch(tmp: Path | None = None) -> int:
    """Remove the scratch folders of this user's processes that have ended; returns how many were removed."""
    removed = 0
    for folder in Path(tmp or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        pid = folder.name[len(PREFIX):]
        if not pid.isdigit() or _alive(int(pid)) or not folder.is_dir() or folder.stat().st_uid != os.getuid():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed the scratch folders of %d ended worker process(es)", removed)
    return removed
