"""The schedule vocabulary: the stage of an epoch, the epochs of a stage and the artifact names, defined once
in `config.schedule` and used by every layer."""

from __future__ import annotations

import ast
from pathlib import Path

from deim_ray.config.schedule import (ARTIFACT_NAMES, BEST_STG1, BEST_STG2, FINAL, LAST, Stage, best_artifact,
                                      stage_epochs, stage_of)
from deim_ray.storage import RunState

PKG = Path(__file__).resolve().parents[2] / "deim_ray"
HOME = PKG / "config" / "schedule.py"


def test_stage_switches_at_stop_epoch():
    assert [stage_of(e, 148) for e in (0, 147, 148, 159)] == [Stage.ONE, Stage.ONE, Stage.TWO, Stage.TWO]
    assert list(stage_epochs(Stage.ONE, 8, 5)) == [0, 1, 2, 3, 4]
    assert list(stage_epochs(Stage.TWO, 8, 5)) == [5, 6, 7]


def test_artifact_names():
    assert (LAST, BEST_STG1, BEST_STG2, FINAL) == ("last", "best_stg1", "best_stg2", "final")
    assert set(ARTIFACT_NAMES) == {LAST, BEST_STG1, BEST_STG2, FINAL}
    assert (best_artifact(Stage.ONE), best_artifact(Stage.TWO)) == (BEST_STG1, BEST_STG2)


def test_run_state_names_its_stage():
    assert RunState.STAGE1_RUNNING.running_stage is Stage.ONE
    assert RunState.STAGE2_RUNNING.running_stage is Stage.TWO
    assert {s.running_stage for s in RunState} - {Stage.ONE, Stage.TWO} == {None}


def _definitions(path: Path) -> list[str]:
    """Stage-vocabulary definitions in a module: a class `Stage`, functions `stage_of`/`stage_epochs`, and
    module-level constants holding an artifact name."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "Stage":
            found.append("class Stage")
        elif isinstance(node, ast.FunctionDef) and node.name in ("stage_of", "stage_epochs"):
            found.append(node.name)
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
              and node.value.value in ARTIFACT_NAMES):
            found.append(f"{node.targets[0].id} = {node.value.value!r}")
    return found


def test_the_vocabulary_has_one_home():
    elsewhere = {str(p.relative_to(PKG)): d for p in PKG.rglob("*.py") if p != HOME and (d := _definitions(p))}
    assert not elsewhere, elsewhere
    assert len(_definitions(HOME)) == 7  # the check sees real definitions
