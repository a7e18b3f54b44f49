"""End to end on real Ray: `deim-ray train --stage2-branches 3` on the tiny demo config, with a worker of one
branch SIGKILLed in its second stage-2 epoch (the test-only FaultHook). The run ends DONE with 3 branches, each a
complete stage 2 from the same best_stg1; the killed branch resumed from its own last checkpoint; the final is
resolved across all of them and `resolve`, `ls` and `fetch --branch` read the branched run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deim_ray.cli.main import main
from deim_ray.engine.state import load_train_state

from tests.driver.conftest import TINY, data_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KILL_EPOCH = 3
"""The second stage-2 epoch of every branch (stop_epoch 2): the killed branch has a committed epoch to resume."""


@pytest.fixture(scope="module")
def branched_run(tiny_data_root, tmp_path_factory, mlflow_server):
    storage, faults = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("faults")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEIM_RAY_FAULT")}
    env |= {"RAY_ADDRESS": "local", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # a private Ray: it inherits faults
            "DEIM_RAY_FAULT": f"mid_epoch:{KILL_EPOCH}:0", "DEIM_RAY_FAULT_DIR": str(faults)}
    cmd = [sys.executable, "-m", "deim_ray", "train", "-c", TINY, "--storage", str(storage), "--name", "br",
           "--stage2-branches", "3", "--max-failures", "2", "-u", *data_overrides(tiny_data_root),
           "train.trackers=[mlflow]", f"train.mlflow_tracking_uri={mlflow_server}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return storage / "br", json.loads((storage / "br" / "manifest.json").read_text()), faults, done.stderr


def test_three_branches_each_train_a_whole_stage2_from_best_stg1(branched_run):
    run_dir, m, _, _ = branched_run
    assert m["state"] == "DONE" and [b["name"] for b in m["stage2_branches"]] == ["b0", "b1", "b2"]
    assert m["stage2_branches"][0]["params"] == {} and all(b["params"] for b in m["stage2_branches"][1:])
    stage1 = [json.loads(line) for line in (run_dir / "stage2/b0/metrics.jsonl").read_text().splitlines()][:2]
    for b in m["stage2_branches"]:
        epochs = 2 + b["params"].get("schedule.no_aug_epochs", 2)
        assert b["state"] == "DONE" and sorted(b["epoch_aps"], key=int) == [str(e) for e in range(2, epochs)]
        lines = [json.loads(line) for line in (run_dir / f"stage2/{b['name']}/metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in lines] == list(range(epochs)) and lines[:2] == stage1  # each epoch once
        last = b["artifacts"]["last"]
        assert last["key"].startswith(f"stage2/{b['name']}/ray/") and last["epoch"] == epochs - 1
        assert load_train_state(run_dir / last["key"])["config_sha256"] != m["config_sha256"] or not b["params"]
        if b["artifacts"]["best_stg2"]:
            assert b["artifacts"]["best_stg2"]["key"] == f"stage2/{b['name']}/artifacts/best_stg2.pth"
            assert b["ap"] == b["artifacts"]["best_stg2"]["ap"] > m["artifacts"]["best_stg1"]["ap"]
    assert m["artifacts"]["best_stg2"] is None and m["artifacts"]["last"]["stage"] == 1  # the run's own stage 2 is unused
    # every branch that started fresh loaded bit-identical weights (best_stg1's)
    starts = {d for b in m["stage2_branches"] for d in b.get("worker_start_digests", [])}
    assert len(starts) == 1


def test_the_killed_branch_resumed_from_its_own_last_checkpoint(branched_run):
    _, m, faults, _ = branched_run
    assert (faults / f"mid_epoch-e{KILL_EPOCH}-r0.fired").exists()
    resumed = [b["name"] for b in m["stage2_branches"] if "worker_resume_digests" in b]
    assert len(resumed) >= 1  # normally one; two if two branches reached the kill point at the same moment
    assert all(b["state"] == "DONE" for b in m["stage2_branches"])


def test_the_final_is_resolved_across_best_stg1_and_the_branches(branched_run):
    run_dir, m, _, stderr = branched_run
    final, branches = m["final"], m["stage2_branches"]
    aps = [b["ap"] for b in branches if b["ap"] is not None]
    if aps:
        winner = next(b for b in branches if b["ap"] == max(aps))
        assert final["branch"] == winner["name"] and final["params"] == winner["params"]
        assert f"branch {winner['name']} (" in final["reason"] and final["ap"] == max(aps)
        assert (run_dir / "metrics.jsonl").read_text() == (run_dir / f"stage2/{winner['name']}/metrics.jsonl").read_text()
    else:
        assert final["artifact"] == "best_stg1" and "no stage-2 branch beat stage 1 (3 branches" in final["reason"]
    for b in branches:  # the console labels each branch's epoch lines
        assert f"{b['name']}  epoch  2/" in stderr


def test_resolve_ls_and_fetch_read_a_branched_run(branched_run, tmp_path, capsys):
    run_dir, m, _, _ = branched_run
    assert main(["resolve", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "branch b0: DONE" in out and "branch b2: DONE" in out and "verified" in out
    assert main(["ls", str(run_dir.parent)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("br "))
    assert "DONE" in line and line.rstrip().endswith(f"3, winner {m['final']['branch']}" if m["final"].get("branch")
                                                     else "3")
    assert main(["fetch", str(run_dir), "--branch", "b1", "--which", "last", "-o", str(tmp_path)]) == 0
    fetched = tmp_path / "last-b1.pth"
    assert load_train_state(fetched)["last_epoch"] == m["stage2_branches"][1]["artifacts"]["last"]["epoch"]


def test_mlflow_has_one_child_run_per_branch(branched_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    run_dir, m, _, _ = branched_run
    client = MlflowClient(mlflow_server)
    parent = client.get_run(m["trackers"]["mlflow_run"])
    assert parent.info.run_name == "br" and parent.data.tags["deim_ray.final_uri"] == m["final"]["uri"]
    assert len(client.get_metric_history(parent.info.run_id, "coco/AP")) == 2  # stage 1; stage 2 is the branches'
    for b in m["stage2_branches"]:
        child = client.get_run(b["trackers"]["mlflow_run"])
        assert child.info.run_name == f"br/{b['name']}" and child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for key, value in b["params"].items():
            assert child.data.params[key] == str(value)
        epochs = {h.step for h in client.get_metric_history(child.info.run_id, "coco/AP")}
        assert epochs == {int(e) for e in b["epoch_aps"]}  # each of the branch's stage-2 epochs (once per step)
