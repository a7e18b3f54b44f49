"""`deim-ray tune`: the search-space file and its one-line errors (fast), and a real ASHA search on the tiny
config where every trial is a full two-stage run (slow): a stopped trial still ends with a resolved final,
the summary names the best trial's artifact, and no placement group outlives the search."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from deim_ray.cli.main import main
from deim_ray.config.loader import load_config, override_config
from deim_ray.driver.tune_console import trial_run_name
from deim_ray.driver.tune_space import SpaceError, check_space_against_config, load_space, parse_space, plain
from tests.driver.conftest import TINY, data_overrides

REPO = Path(__file__).resolve().parents[2]

GOOD = {
    "optimizer.lr": {"loguniform": [1.0e-4, 1.0e-2]},
    "schedule.stop_epoch": {"choice": [2, 3]},
    "augment.mixup_prob": {"uniform": [0.2, 0.6]},
    "train.seed": {"randint": [0, 100]},
    "data.image_size": {"grid": [[128, 128], [160, 160]]},
    "model.extra.num_feature_levels": {"choice": [3]},
}


def test_a_good_space_parses_in_file_order_with_edge_values():
    space = parse_space(GOOD)
    assert space.keys == tuple(GOOD)
    dims = {d.key: d for d in space.dimensions}
    assert dims["optimizer.lr"].probe_values() == (1.0e-4, 1.0e-2)
    assert dims["train.seed"].probe_values() == (0, 99)  # randint's upper bound is excluded
    assert dims["data.image_size"].probe_values() == ([128, 128], [160, 160])
    assert space.grid_size == 2


@pytest.mark.parametrize("raw, fragment", [
    ({"optimizer.lr": {"logunifrom": [1e-4, 1e-2]}}, "unknown distribution `logunifrom` (did you mean `loguniform`?)"),
    ({"optimizer.lrr": {"choice": [1e-3]}}, "`optimizer.lrr` is not a config key (did you mean `optimizer.lr`?)"),
    ({"optimiser.lr": {"choice": [1e-3]}}, "did you mean `optimizer`?"),
    ({"optimizer": {"choice": [1]}}, "`optimizer` is a config section"),
    ({"optimizer.lr.value": {"choice": [1]}}, "`optimizer.lr` is a value, not a section"),
    ({"source": {"choice": ["x.yml"]}}, "`source` is not a config key"),
    ({"optimizer.lr": {"loguniform": [0, 1e-2]}}, "needs low > 0"),
    ({"optimizer.lr": {"uniform": [1e-2, 1e-3]}}, "needs low < high"),
    ({"optimizer.lr": {"uniform": [1e-3]}}, "takes [low, high] as numbers"),
    ({"optimizer.lr": {"quniform": [0.1, 0.5, 0]}}, "needs a step > 0"),
    ({"train.seed": {"randint": [0, 9.5]}}, "integer bounds"),
    ({"schedule.stop_epoch": {"uniform": [2, 3]}}, "holds an integer, but `uniform` samples floats"),
    ({"train.use_amp": {"randint": [0, 2]}}, "`randint` samples integers"),
    ({"optimizer.lr": {"choice": []}}, "needs a non-empty list"),
    ({"optimizer.lr": {"choice": [1e-3], "grid": [1e-3]}}, "must be one distribution"),
    ({"optimizer.lr": 0.001}, "must be one distribution"),
    ({}, "must map dotted config keys to distributions"),
])
def test_bad_spaces_are_one_line_errors(raw, fragment):
    with pytest.raises(SpaceError) as err:
        parse_space(raw, where="space.yml")
    message = str(err.value)
    assert message.startswith("space.yml") and fragment in message
    assert "\n" not in message


def test_space_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("optimizer.lr: {loguniform: [1e-4, 1e-2\n")
    with pytest.raises(SpaceError, match="search space: malformed YAML in .*bad.yml"):
        load_space(bad)
    wrong = tmp_path / "wrong.yml"
    wrong.write_text("optimizer.lr: {normal: [0, 1]}\n")
    with pytest.raises(SpaceError, match=r"wrong\.yml: `optimizer.lr` uses unknown distribution `normal`"):
        load_space(wrong)


def test_sampled_values_apply_to_the_config_as_plain_python(tiny_data_root):
    import numpy as np

    base = load_config(TINY, data_overrides(tiny_data_root))
    params = {"optimizer.lr": np.float64(1.2e-05), "schedule.stop_epoch": np.int64(3),
              "data.image_size": (np.int64(128), np.int64(128)), "lr_scheduler.type": "constant"}
    cfg = override_config(base, {k: plain(v) for k, v in params.items()})
    assert type(cfg.optimizer.lr) is float and cfg.optimizer.lr == 1.2e-05
    assert type(cfg.schedule.stop_epoch) is int and cfg.schedule.stop_epoch == 3
    assert cfg.data.image_size == (128, 128) and cfg.lr_scheduler.type == "constant"
    assert cfg.model == base.model and cfg.source == base.source


def test_values_no_trial_could_use_are_rejected_before_the_search(tiny_data_root):
    base = load_config(TINY, data_overrides(tiny_data_root))
    # a searched stop_epoch derives the trial's whole schedule (flat-cosine phases, augmentation windows) ...
    check_space_against_config(parse_space({"schedule.stop_epoch": {"choice": [2, 3]}}), base, workers=1)
    # ... but stop_epoch = epochs leaves no stage 2
    with pytest.raises(SpaceError, match=r"`schedule.stop_epoch` = 4 from choice\(2, 4\) gives an invalid config"
                                         r".*stop_epoch.*must satisfy"):
        check_space_against_config(parse_space({"schedule.stop_epoch": {"choice": [2, 4]}}), base, workers=1)
    with pytest.raises(SpaceError, match="data.total_batch_size"):  # 4 does not divide over 3 workers
        check_space_against_config(parse_space({"optimizer.lr": {"choice": [1e-3]}}), base, workers=3)


def test_the_shipped_demo_space_fits_the_demo_config():
    # the README's example: `deim-ray tune -c configs/demo/shapes.yml --space configs/demo/space.yml --samples 4`
    space = load_space("configs/demo/space.yml")
    assert "schedule.stop_epoch" in space.keys
    base = load_config("configs/demo/shapes.yml")
    check_space_against_config(space, base, workers=1)
    for stop in (4, 5):
        cfg = override_config(base, {"schedule.stop_epoch": stop})
        assert cfg.augment.policy_epoch[-1] == stop and cfg.lr_scheduler.no_aug_epoch == base.schedule.epochs - stop
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "--space configs/demo/space.yml --samples 4" in readme


def test_the_shipped_coco_space_fits_the_n_config():
    space = load_space("configs/deimv2/space_coco.yml")
    base = load_config("configs/deimv2/deimv2_hgnetv2_n_custom.yml")
    check_space_against_config(space, base, workers=8)
    cfg = override_config(base, {"schedule.epochs": 60, "schedule.no_aug_epochs": 8})
    s = cfg.schedule
    assert (s.stop_epoch, cfg.augment.policy_epoch, s.matcher_change_epoch) == (52, (4, 30, 52), 46)


def test_cli_reports_a_bad_space_as_one_line_before_starting_ray(tmp_path, capsys):
    space = tmp_path / "space.yml"
    space.write_text("optimizer.lrr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    ray_was_up = ray.is_initialized()
    code = main(["tune", "-c", TINY, "--space", str(space), "--samples", "2", "--storage", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("deim-ray: error: ") and "did you mean `optimizer.lr`?" in err
    assert ray.is_initialized() == ray_was_up and not (tmp_path / "tune").exists()


def test_summary_table_ranks_trials_by_final_ap_and_names_the_best():
    from deim_ray.driver.tune import TrialSummary, TuneSummary, format_summary

    trials = [TrialSummary("a_00000", "runs/hpo/trial-a_00000", {"optimizer.lr": 1e-3}, "stopped", 1, 0.21,
                           "best_stg1", "runs/hpo/trial-a_00000/artifacts/final.pth"),
              TrialSummary("a_00001", "runs/hpo/trial-a_00001", {"optimizer.lr": 1e-2}, "error",
                           error="RunError: stage 1 failed"),
              TrialSummary("a_00002", "runs/hpo/trial-a_00002", {"optimizer.lr": 2e-3}, "completed", 4, 0.35,
                           "best_stg2", "runs/hpo/trial-a_00002/artifacts/final.pth")]
    summary = TuneSummary("hpo", "runs/hpo/tune_summary.json", "asha", "ap", best=trials[2], trials=trials)
    lines = format_summary(summary).splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["trial-2", "trial-0", "trial-1"]
    assert "0.3500" in lines[1] and "best_stg2" in lines[1] and "optimizer.lr=0.002" in lines[1]
    assert "[RunError: stage 1 failed]" in lines[3]
    assert lines[4] == "best: trial-2 final AP 0.3500 -> runs/hpo/trial-a_00002/artifacts/final.pth"
    written = summary.to_json()
    assert written["best_trial"] == "a_00002" and written["best_params"] == {"optimizer.lr": 2e-3}
    assert written["best_run"] == "trial-2"
    assert json.loads(json.dumps(written))["trials"][1]["state"] == "error"


def test_trials_are_named_by_their_counter_and_print_about_four_epoch_lines():
    from deim_ray.driver.tune_console import epochs_between_lines, error_line

    assert trial_run_name("122c8_00000") == "trial-0" and trial_run_name("122c8_00013") == "trial-13"
    assert [epochs_between_lines(0, n) for n in (1, 4, 15, 160)] == [1, 1, 4, 40]
    assert epochs_between_lines(2, 15) == 2
    wrapped = ray.exceptions.RayTaskError("_trial_main", "Traceback ...", ValueError("bad lr\nmore"))
    assert error_line(wrapped) == "ValueError: bad lr"


# ---------------------------------------------------------------- a real search (slow)

E2E_SPACE = {"optimizer.lr": {"grid": [2.0e-3, 1.0e-6]}, "schedule.stop_epoch": {"grid": [3]}}
"""Two trials, each with a stop_epoch the config does not have (tiny.yml says 2), so that its schedule is derived.
They run one after the other, the learning one first: the one that cannot learn (lr 1e-6) reaches ASHA's first
rung second, behind a recorded better loss, and is stopped there; two at once would race for the rung."""


@pytest.fixture(scope="module")
def tune_ray():
    """Ray with two `train_driver` units (two concurrent trial drivers) next to the 2 CPUs for workers."""
    from deim_ray.driver.ray_stage import ensure_ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if ray.is_initialized() and ray.cluster_resources().get("train_driver", 0) < 2:
        ray.shutdown()  # another module's instance without trial-driver resources
    ensure_ray(resources={"train_driver": 2})
    yield ray  # left running for later modules; Ray shuts down with the test process


def test_workers_reach_this_instances_state_api(tune_ray):
    # Ray Train's placement-group cleaner asks the State API, from a worker, whether a stopped trial's
    # controller is alive; with several local Ray instances on the machine its auto-detection fails
    # ("Found multiple active Ray instances"), the cleaner dies and the next trials wait forever for CPUs
    @ray.remote(num_cpus=0)
    class Controller:
        def ping(self):
            return True

    @ray.remote(num_cpus=0)
    def state_of(actor_id: str) -> str:
        from ray.util.state import get_actor

        return get_actor(actor_id, timeout=60).state

    controller = Controller.remote()
    ray.get(controller.ping.remote())
    assert ray.get(state_of.remote(controller._actor_id.hex())) == "ALIVE"


def test_leftover_placement_groups_of_the_search_are_released(tune_ray):
    # a trial Tune stops leaves its Train worker group's placement group to Ray's cleaner, whose State API
    # lookup fails when several local Ray instances share the machine: the search removes what is left
    from ray.util.placement_group import placement_group, remove_placement_group

    from deim_ray.driver.tune import _live_placement_groups, _release_placement_groups

    before = _live_placement_groups()
    leftover = placement_group([{"CPU": 0.01}])
    detached = placement_group([{"CPU": 0.01}], lifetime="detached")  # not a trial's: kept
    ray.get([leftover.ready(), detached.ready()])
    try:
        _release_placement_groups(before)
        assert _live_placement_groups() - before == {detached.id.hex()}
    finally:
        remove_placement_group(detached)


@pytest.fixture(scope="module")
def search(tune_ray, tiny_data_root, tmp_path_factory, mlflow_server):
    """`deim-ray tune` as a user runs it (its own process, its console captured), joined to this process's Ray
    instance so that the tests see what the search left on the cluster; every trial logs to MLflow."""
    from deim_ray.driver.tune import TrialSummary, TuneSummary

    storage = tmp_path_factory.mktemp("tune_runs")
    space = storage / "space.yml"
    space.write_text(yaml.safe_dump(E2E_SPACE))
    # the default flat-cosine LR: each trial's stop_epoch derives its LR phases and augmentation windows;
    # the tiny model's AP is still 0.0 for every trial after an epoch or two: ASHA compares losses
    cmd = [sys.executable, "-m", "deim_ray", "tune", "-c", TINY, "--space", str(space), "--samples", "1",
           "--scheduler", "asha", "--max-concurrent", "1", "--storage", str(storage), "--name", "hpo",
           "--workers-per-trial", "2", "--metric", "loss", "--max-failures", "1",
           "-u", *data_overrides(tiny_data_root), "train.trackers=[mlflow]",
           f"train.mlflow_tracking_uri={mlflow_server}"]
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    written = json.loads((storage / "hpo" / "tune_summary.json").read_text())
    trials = [TrialSummary(**t) for t in written["trials"]]
    best = next((t for t in trials if t.trial_id == written["best_trial"]), None)
    summary = TuneSummary("hpo", str(storage / "hpo" / "tune_summary.json"), "asha", "loss", best, trials)
    return summary, storage / "hpo", console, mlflow_server


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_every_trial_ends_with_a_resolved_final(search):
    from deim_ray.storage import resolve_final
    from deim_ray.storage.manifest import Manifest

    summary, root, *_ = search
    assert len(summary.trials) == 2
    assert {(t.params["optimizer.lr"], t.params["schedule.stop_epoch"]) for t in summary.trials} == {
        (2.0e-3, 3), (1.0e-6, 3)}
    for t in summary.trials:
        assert t.state in ("completed", "stopped") and t.error is None, t
        run_dir = root / trial_run_name(t.trial_id)
        m = Manifest.loads((run_dir / "manifest.json").read_text())
        assert m.state.value == "DONE" and m.final["artifact"] == resolve_final(m.artifacts).artifact
        assert m.final["ap"] == t.final_ap and m.final["uri"] == t.final_uri
        assert _sha(run_dir / "artifacts" / "final.pth") == m.final["sha256"]
        stop = t.params["schedule.stop_epoch"]  # the trial's whole schedule was derived from it
        cfg = load_config(run_dir / "config.yaml")
        assert (m.stop_epoch, cfg.lr_scheduler.no_aug_epoch, cfg.augment.policy_epoch[-1]) == (stop, 4 - stop, stop)


@pytest.mark.slow
def test_asha_stopped_a_trial_and_it_resolved_to_its_stage1_best(search):
    summary, root, *_ = search
    stopped = [t for t in summary.trials if t.state == "stopped"]
    assert stopped, "ASHA stopped no trial: " + json.dumps([(t.params, t.epochs_run) for t in summary.trials])
    for t in stopped:
        assert t.epochs_run < 4
        m = json.loads((root / trial_run_name(t.trial_id) / "manifest.json").read_text())
        assert m["stopped_by_scheduler"]["epochs_run"] == t.epochs_run
        if t.epochs_run <= t.params["schedule.stop_epoch"]:  # stopped in stage 1
            assert t.final_artifact == "best_stg1" and "ended in stage 1" in t.reason
    for t in summary.trials:
        if t.state == "completed":
            assert t.epochs_run == 4


@pytest.mark.slow
def test_summary_names_the_best_trial_and_its_loadable_final(search):
    from deim_ray.models.export import load_final

    summary, root, *_ = search
    best = summary.best
    assert best is not None and best.final_ap == max(t.final_ap for t in summary.trials)
    written = json.loads((root / "tune_summary.json").read_text())
    assert written["best_trial"] == best.trial_id and written["best_params"] == best.params
    assert written["best_final_uri"] == best.final_uri and len(written["trials"]) == 2
    final_path = Path(best.final_uri)
    assert final_path.is_file() and final_path.parent.parent.name == trial_run_name(best.trial_id)
    model, meta = load_final(final_path)
    assert meta and sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_no_placement_group_outlives_the_search(search):
    table = ray.util.placement_group_table()
    assert table and all(pg["state"] == "REMOVED" for pg in table.values()), {
        pg_id: pg["state"] for pg_id, pg in table.items() if pg["state"] != "REMOVED"}


@pytest.mark.slow
def test_the_console_is_one_line_per_trial_event_without_ray_tables_or_tracebacks(search):
    summary, root, console, _ = search
    lines = console.splitlines()
    assert len(lines) <= 40, console
    for bad in ("Traceback", "Exception ignored", "SystemExit", "Trial Status", "_trial_main", "start_digests",
                "checkpoint_dir_name", "tune/tune", "/tmp/ray/session_"):
        assert bad not in console, (bad, console)
    for t in summary.trials:
        name = trial_run_name(t.trial_id)
        started = [line for line in lines if line.startswith(f"{name} started: ")]
        assert len(started) == 1 and "optimizer.lr=" in started[0] and "schedule.stop_epoch=" in started[0]
        epochs = [line for line in lines if line.startswith(f"{name}  epoch ")]
        assert len(epochs) == t.epochs_run  # 4 epochs: a line each
        ends = [line for line in lines if line.startswith(f"{name} finished") or line.startswith(f"{name} stopped")]
        assert len(ends) == 1
        assert ends[0].startswith(f"{name} stopped by ASHA after epoch {t.epochs_run - 1}: its loss ") == \
            (t.state == "stopped"), ends[0]
    assert any(line.startswith("best: trial-") for line in lines)
    assert not (root / "tune").exists() and (root / "ray" / "search").is_dir()


@pytest.mark.slow
def test_ls_lists_the_search_and_marks_the_stopped_trials(search, capsys):
    summary, root, *_ = search
    assert main(["ls", str(root.parent)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("hpo "))
    assert row.split()[1:3] == ["SEARCH", f"{summary.best.final_ap:.4f}"]
    assert f"2 trials, best {trial_run_name(summary.best.trial_id)}" in row
    assert main(["ls", str(root)]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {trial_run_name(t.trial_id): "STOPPED" if t.state == "stopped" else "DONE" for t in summary.trials}


@pytest.mark.slow
def test_mlflow_has_one_run_per_trial_under_the_searchs_run(search):
    from mlflow.tracking import MlflowClient

    summary, root, _, uri = search
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("deim_ray")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs["hpo"]
    assert parent.data.params["space.optimizer.lr"] == "grid(0.002, 1e-06)"
    assert parent.data.tags["deim_ray.final_uri"] == summary.best.final_uri
    for t in summary.trials:
        run = runs[trial_run_name(t.trial_id)]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert float(run.data.params["optimizer.lr"]) == t.params["optimizer.lr"]
        assert len(client.get_metric_history(run.info.run_id, "coco/AP")) == t.epochs_run
        assert run.data.tags["deim_ray.final_uri"] == t.final_uri
        assert run.info.status == ("KILLED" if t.state == "stopped" else "FINISHED")
