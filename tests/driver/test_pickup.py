"""The line a re-run prints about where it picks up, for every state a run can be re-entered in."""

from __future__ import annotations

import pytest

from deim_ray.storage import ArtifactRecord, Manifest, RunState
from deim_ray.storage.manifest import BranchRecord
from deim_ray.driver.pickup import pickup_line


def _record(epoch: int, stage: int, ap: float = 0.25) -> ArtifactRecord:
    return ArtifactRecord(uri="u", sha256="0" * 64, epoch=epoch, stage=stage, ap=ap)


def _manifest(state: RunState, last: tuple[int, int] | None = None, switched: bool = False,
              branches: list[BranchRecord] | None = None) -> Manifest:
    m = Manifest.new(name="d", config_sha256="c" * 64, epochs=8, stop_epoch=4)
    m.state, m.attempt, m.stage2_branches = state, 2, branches
    m.artifacts["best_stg1"] = _record(1, 1, 0.3125)
    if last:
        m.artifacts["last"] = _record(*last)
    if switched:
        m.switch = {"epoch": 4, "sha256": "a" * 64, "best_stg1_epoch": 1, "best_stg1_ap": 0.3125}
    return m


@pytest.mark.parametrize("manifest, words", [
    (_manifest(RunState.NEW), ["no epoch committed yet", "continues stage 1 from epoch 0"]),
    (_manifest(RunState.STAGE1_RUNNING, last=(2, 1)), ["epochs 0-2 of stage 1 committed", "best so far epoch 1",
                                                       "continues stage 1 at epoch 3"]),
    (_manifest(RunState.FAILED, last=(2, 1)), ["last attempt FAILED", "continues stage 1 at epoch 3"]),
    (_manifest(RunState.STAGE1_DONE, last=(3, 1), switched=True),
     ["stage 1 (best_stg1 epoch 1, AP 0.3125)", "continues stage 2 at epoch 4 from best_stg1"]),
    (_manifest(RunState.STAGE2_RUNNING, last=(5, 2), switched=True),
     ["epochs 4-5 of stage 2 committed", "continues stage 2 at epoch 6"]),
    (_manifest(RunState.STAGE2_RUNNING, last=(3, 1), switched=True,
               branches=[BranchRecord("b0", {}, state="DONE"), BranchRecord("b1", {"x": 1}, state="RUNNING")]),
     ["b0 DONE", "b1 RUNNING", "continues the 1 unfinished stage-2 branch(es)"]),
])
def test_a_rerun_says_attempt_what_is_done_and_where_it_continues(manifest, words):
    line = pickup_line(manifest, "runs/d")
    assert line.startswith("run d: attempt 2 continues in runs/d; ") and "\n" not in line
    assert all(w in line for w in words), line
