"""A worker's local scratch folder, and the sweep of the folders killed workers left behind."""

import os
import subprocess
import sys

from deim_ray.driver.scratch import PREFIX, process_scratch, sweep_dead_scratch


def test_dead_processes_folders_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    mine = process_scratch()
    (mine / "ckpt_x").mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{PREFIX}{int(ended.stdout)}"
    (dead / "ckpt_y").mkdir(parents=True)
    (dead / "ckpt_y" / "state.pt").write_bytes(b"\0" * 1000)
    parent = tmp_path / f"{PREFIX}{os.getppid()}"  # alive
    parent.mkdir()
    other = tmp_path / f"{PREFIX}not-a-pid"
    other.mkdir()
    assert sweep_dead_scratch() == 1
    assert not dead.exists() and (mine / "ckpt_x").is_dir() and parent.is_dir() and other.is_dir()
    assert mine == tmp_path / f"{PREFIX}{os.getpid()}"
