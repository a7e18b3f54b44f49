"""Outputs a command writes (deim_ray/outputs.py): whole or not at all, also when SIGTERM ends the command."""

from __future__ import annotations

import os
import signal

import pytest

from deim_ray.driver.interrupts import Terminated, sigterm_unwinds
from deim_ray.outputs import output_dir, output_file


def test_a_file_appears_whole_and_only_at_the_end(tmp_path):
    target = tmp_path / "a" / "b" / "model.onnx"
    with output_file(target) as partial:
        partial.write_bytes(b"x" * 10)
        assert partial.suffix == ".onnx" and partial.parent == target.parent and not target.exists()
    assert target.read_bytes() == b"x" * 10 and os.listdir(target.parent) == ["model.onnx"]


def test_sigterm_mid_write_leaves_nothing_the_user_did_not_have(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(Terminated), sigterm_unwinds():
        with output_dir(tmp_path / "new" / "out") as folder, output_file(tmp_path / "kept" / "f.json") as partial:
            (folder / "0000_a.jpg").write_bytes(b"drawn")
            partial.write_text("{")
            os.kill(os.getpid(), signal.SIGTERM)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]
