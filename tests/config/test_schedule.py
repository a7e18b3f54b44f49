"""The schedule vocabulary (the stage of an epoch, the epochs of a stage, the artifact names: defined once in
`config.schedule`, used by every layer) and the derived schedule, checked against upstream's documented rule
and its configs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from deim_ray.config import ConfigError, config_to_dict, load_config, override_config, validate
from deim_ray.config.loader import load_config_explained
from deim_ray.config.schedule import (ARTIFACT_NAMES, AUTO, BEST_STG1, BEST_STG2, FINAL, LAST, Stage, best_artifact,
                                      derive_schedule, stage_epochs, stage_of)
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


# --- the derived schedule -----------------------------------------------------------------------------

CONFIGS = sorted(str(p.relative_to(PKG.parent)) for folder in ("deimv2", "dfine", "rtdetrv2", "demo")
                 for p in (PKG.parent / "configs" / folder).glob("*.yml") if not p.name.startswith("space"))
SCHEDULE_KEYS = ("schedule.epochs", "schedule.stop_epoch", "lr_scheduler.flat_epoch", "lr_scheduler.no_aug_epoch",
                 "augment.policy_epoch", "augment.mixup_epochs", "augment.copyblend_epochs",
                 "schedule.matcher_change_epoch")


def _schedule(cfg) -> dict:
    tree = config_to_dict(cfg)
    return {key: _at(tree, key) for key in SCHEDULE_KEYS}


def _at(tree: dict, key: str):
    for segment in key.split("."):
        tree = tree[segment]
    return tree


def test_upstream_readme_example_custom_epochs():
    # DEIMv2 README §3.4 "Customizing Epoch": DEIMv2-S for 20 training epochs plus its 12 EMA epochs
    cfg = load_config("configs/deimv2/deimv2_dinov3_s_coco.yml", ["schedule.epochs=32"])
    assert _schedule(cfg) == {"schedule.epochs": 32, "schedule.stop_epoch": 20, "lr_scheduler.flat_epoch": 14,
                              "lr_scheduler.no_aug_epoch": 12, "augment.policy_epoch": [4, 14, 20],
                              "augment.mixup_epochs": [4, 14], "augment.copyblend_epochs": [4, 20],
                              "schedule.matcher_change_epoch": 18}
    validate(cfg)


@pytest.mark.parametrize("epochs, no_aug, flat, stop", [
    # upstream configs/deimv2/*.yml whose values follow the rule: (epoches, no_aug_epoch) -> flat_epoch, stop_epoch
    (132, 12, 64, 120),  # deimv2_hgnetv2_s / dinov3_s
    (102, 12, 49, 90),   # deimv2_hgnetv2_m / dinov3_m
    (68, 8, 34, 60),     # deimv2_dinov3_l
    (58, 8, 29, 50),     # deimv2_hgnetv2_x / dinov3_x
    (160, 12, 78, 148),  # deimv2_hgnetv2_n (policy and MixUp; its CopyBlend ends at flat_epoch)
])
def test_rule_reproduces_upstream_configs(epochs, no_aug, flat, stop):
    tree = {"schedule": {"epochs": epochs, "no_aug_epochs": no_aug}}
    derive_schedule(tree)
    assert tree["schedule"]["stop_epoch"] == stop
    assert tree["lr_scheduler"] == {"flat_epoch": flat, "no_aug_epoch": no_aug}
    assert tree["augment"] == {"policy_epoch": [4, flat, stop], "mixup_epochs": [4, flat],
                               "copyblend_epochs": [4, stop]}
    assert "matcher_change_epoch" not in tree["schedule"]  # left out: no matcher switch


def test_matcher_switch_at_90_percent_when_auto():
    tree = {"schedule": {"epochs": 58, "no_aug_epochs": 8, "matcher_change_epoch": AUTO}}
    derive_schedule(tree)
    assert tree["schedule"]["matcher_change_epoch"] == 45  # upstream deimv2_hgnetv2_x


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("epochs", [12, 24, 60, 120])
def test_any_epoch_count_gives_a_valid_schedule(config, epochs):
    cfg = load_config(config, [f"schedule.epochs={epochs}"])
    validate(cfg)
    s = _schedule(cfg)
    stop = s["schedule.stop_epoch"]
    assert s["schedule.epochs"] == epochs and epochs / 2 <= stop < epochs
    assert s["augment.policy_epoch"][-1] == stop and s["lr_scheduler.no_aug_epoch"] == epochs - stop


def test_shipped_configs_keep_upstream_values():
    n = _schedule(load_config("configs/deimv2/deimv2_hgnetv2_n_coco.yml"))
    assert (n["schedule.stop_epoch"], n["augment.policy_epoch"], n["augment.copyblend_epochs"],
            n["schedule.matcher_change_epoch"]) == (148, [4, 78, 148], [4, 78], 136)
    atto = _schedule(load_config("configs/deimv2/deimv2_hgnetv2_atto_coco.yml"))
    assert (atto["schedule.stop_epoch"], atto["augment.policy_epoch"], atto["lr_scheduler.flat_epoch"]) == \
        (468, [4, 250, 400], 250)


def test_explicit_values_win_and_are_checked():
    cfg = load_config("configs/deimv2/deimv2_hgnetv2_n_coco.yml",
                      ["schedule.epochs=60", "schedule.stop_epoch=50", "schedule.matcher_change_epoch=40"])
    s = _schedule(cfg)
    assert (s["schedule.stop_epoch"], s["lr_scheduler.no_aug_epoch"], s["schedule.matcher_change_epoch"]) == \
        (50, 10, 40)
    assert s["augment.policy_epoch"] == [4, 29, 50]
    bad = load_config("configs/deimv2/deimv2_hgnetv2_n_coco.yml",
                      ["schedule.epochs=60", "augment.mixup_epochs=[4, 55]"])
    with pytest.raises(ConfigError, match=r"`augment.mixup_epochs` ends at 55"):
        validate(bad)


def test_a_switched_off_window_or_matcher_stays_off():
    atto = load_config("configs/deimv2/deimv2_hgnetv2_atto_coco.yml", ["schedule.epochs=24"])
    assert atto.augment.mixup_epochs == (0, 0) and atto.augment.copyblend_epochs == (0, 0)
    shapes = load_config("configs/demo/shapes.yml", ["schedule.epochs=12"])
    assert shapes.schedule.matcher_change_epoch is None and shapes.schedule.stop_epoch == 6  # no_aug 7 capped at 6


def test_a_file_that_moves_the_schedule_rederives_its_includes(write):
    n = Path("configs/deimv2/deimv2_hgnetv2_n_coco.yml").resolve()
    path = write("short.yml", f"__include__: [{n}]\nschedule: {{epochs: 24}}\n")
    assert _schedule(load_config(path)) == _schedule(load_config(n, ["schedule.epochs=24"]))
    _, notes = load_config_explained(path)
    assert any(note.startswith("schedule.matcher_change_epoch = 10 (90% of stop_epoch 12); re-derived: ")
               and "short.yml moves the schedule (was set in " in note for note in notes), notes


def test_override_order_does_not_matter():
    a = load_config("configs/demo/shapes.yml", ["schedule.stop_epoch=4", "schedule.epochs=7"])
    b = load_config("configs/demo/shapes.yml", ["schedule.epochs=7", "schedule.stop_epoch=4"])
    assert _schedule(a) == _schedule(b) and a.schedule.stop_epoch == 4


def test_search_overrides_derive_each_trials_schedule():
    # the README's Tune example searches stop_epoch on the demo config: every value must give a valid trial
    base = load_config("configs/demo/shapes.yml")
    for overrides in ({"schedule.stop_epoch": 4}, {"schedule.stop_epoch": 5}, {"schedule.epochs": 6},
                      {"schedule.epochs": 10}):
        validate(override_config(base, overrides), workers=2)
    assert override_config(base, {"schedule.stop_epoch": 4}).augment.policy_epoch == (1, 3, 4)
    assert override_config(base, {"optimizer.lr": 1e-3}).lr_scheduler.flat_epoch == 5  # nothing re-derived


def test_info_shows_what_was_derived_and_refuses_what_train_refuses(capsys):
    from deim_ray.cli.main import main

    assert main(["info", "-c", "configs/deimv2/deimv2_hgnetv2_n_coco.yml", "--no-data", "--no-loader", "-u",
                 "schedule.epochs=12"]) == 0
    out = capsys.readouterr().out
    assert "stop_epoch: 6" in out and "schedule.stop_epoch = 6 (epochs 12 - no_aug 6: no_aug_epochs 12 capped" in out
    assert re.search(r"\n\s+6-11\s+2\s", out)  # stage 2 in the phase table
    assert main(["info", "-c", "configs/demo/shapes.yml", "-u", "augment.mixup_epochs=[1, 9]"]) == 2
    assert main(["info", "-c", "configs/demo/shapes.yml", "--workers", "3"]) == 2  # batch 8 over 3 workers
    err = capsys.readouterr().err
    assert "`augment.mixup_epochs` ends at 9" in err and "must divide by --workers (3)" in err
