"""Stage-2 branches in storage: the manifest's `stage2_branches`, a branch's view of the run (local and real S3),
resolving the final across best_stg1 and every branch, and fetch/ls/resolve of a branched run."""

import json

import pytest

from deim_ray.storage import (BEST_STG1, BEST_STG2, LAST, ArtifactRecord, BadStorageURI, Manifest, ManifestError,
                              ObjectNotFound, ResolveError, RunState, RunStore, describe_run, fetch, list_runs,
                              resolve_final)
from deim_ray.storage.manifest import BranchRecord, BranchState

from tests.storage.payloads import sha256

PARAMS = [{}, {"schedule.ema_restart_decay": 0.995}, {"schedule.no_aug_epochs": 4, "lr_scheduler.tail_lr_factor": 0.25}]


def _file(path, data: bytes):
    path.write_bytes(data)
    return path


def _rec(stage, ap, epoch, where="artifacts/best_stg2.pth"):
    return ArtifactRecord(uri=f"s3://b/runs/p/{where}", sha256=f"{stage}" * 64, epoch=epoch, stage=stage, ap=ap)


def _branches(*aps):
    out = []
    for i, ap in enumerate(aps):
        b = BranchRecord(name=f"b{i}", params=PARAMS[i], state=BranchState.DONE)
        b.artifacts[BEST_STG2] = None if ap is None else _rec(2, ap, 9 + i, f"stage2/b{i}/artifacts/best_stg2.pth")
        out.append(b)
    return out


def test_a_branch_beating_stage1_and_its_siblings_wins_and_is_named_with_its_settings():
    r = resolve_final({BEST_STG1: _rec(1, 0.30, 5)}, reached_stage2=True, branches=_branches(0.35, None, 0.41))
    assert (r.artifact, r.branch, r.ap, r.epoch) == (BEST_STG2, "b2", 0.41, 11)
    assert r.reason == ("stage 2 branch b2 (schedule.no_aug_epochs=4, lr_scheduler.tail_lr_factor=0.25) beat "
                        "stage 1 (0.410 vs 0.300 AP) and the other branches (b0 0.350, b1 -)")


def test_a_tie_between_branches_goes_to_the_lower_index_and_a_tie_with_stage1_to_stage2():
    r = resolve_final({BEST_STG1: _rec(1, 0.30, 5)}, branches=_branches(None, 0.30, 0.30))
    assert r.branch == "b1" and "tied (a tie goes to stage 2)" in r.reason
    assert "schedule.ema_restart_decay=0.995" in r.reason
    assert resolve_final({BEST_STG1: _rec(1, 0.30, 5)}, branches=_branches(0.4, 0.4)).branch == "b0"
    assert "the config's own settings" in resolve_final({BEST_STG1: _rec(1, 0.3, 5)}, branches=_branches(0.4)).reason


def test_no_branch_beating_stage1_keeps_best_stg1():
    r = resolve_final({BEST_STG1: _rec(1, 0.30, 5)}, branches=_branches(None, None, None))
    assert (r.artifact, r.branch) == (BEST_STG1, None)
    assert r.reason.startswith("no stage-2 branch beat stage 1 (3 branches, no best_stg2)")
    with pytest.raises(ResolveError):
        resolve_final({BEST_STG1: None}, branches=_branches(None, float("nan")))


def test_a_manifest_with_branches_round_trips_and_one_without_writes_no_key():
    m = Manifest.new(name="p", config_sha256="c" * 64, epochs=6, stop_epoch=4)
    assert "stage2_branches" not in m.to_json()
    m.stage2_branches = _branches(0.35, None)
    m.stage2_branches[0].epoch_aps = {"4": 0.31, "5": 0.35}
    data = json.loads(m.dumps())
    assert [(b["name"], b["ap"], b["epoch"], b["uri"]) for b in data["stage2_branches"]] == [
        ("b0", 0.35, 9, "s3://b/runs/p/stage2/b0/artifacts/best_stg2.pth"), ("b1", None, None, None)]
    back = Manifest.loads(m.dumps())
    assert back.to_json() == m.to_json() and back.branch("b1").params == PARAMS[1]
    with pytest.raises(ManifestError, match="no stage-2 branch 'b7'; its branches: b0, b1"):
        back.branch("b7")
    data["stage2_branches"][1]["state"] = "HALF"
    with pytest.raises(ManifestError, match="stage2_branches"):
        Manifest.from_json(data)


@pytest.fixture
def branched(storage, tmp_path):
    """A run at its stage-2 branches: best_stg1 published by the run, two branch views with the run's generation."""
    run = RunStore(storage, "p")
    run.claim(Manifest.new(name="p", config_sha256="c" * 64, epochs=6, stop_epoch=4))
    stg1 = run.put_state(f"ray/stage1-g{run.generation}/epoch_0003/state.pt", _file(tmp_path / "s1", b"one"))
    run.commit_epoch(stg1, epoch=3, stage=1, ap=0.3, best=BEST_STG1, metrics='{"epoch": 3}\n')
    run.record_branches([BranchRecord(name="b0", params={}), BranchRecord(name="b1", params=PARAMS[1])])
    run.renew()
    return run, tmp_path


def test_a_branch_view_writes_its_own_folder_and_manifest_entry(branched):
    run, tmp = branched
    b1 = run.branch("b1")
    assert b1.generation == run.generation
    state = b1.put_state(f"ray/stage2-g{b1.generation}/epoch_0004/state.pt", _file(tmp / "s2", b"two"))
    assert state.key == f"p/stage2/b1/ray/stage2-g{b1.generation}/epoch_0004/state.pt"
    b1.commit_epoch(state, epoch=4, stage=2, ap=0.4, best=BEST_STG2, metrics='{"epoch": 3}\n{"epoch": 4}\n')
    m = run.read_manifest()
    entry = m.branch("b1")
    assert entry.best.key == "stage2/b1/artifacts/best_stg2.pth" and entry.best.ap == 0.4
    assert entry.artifacts[LAST].key.startswith("stage2/b1/ray/") and entry.epoch_aps == {"4": 0.4}
    assert m.artifacts[BEST_STG2] is None and m.artifacts[LAST].stage == 1  # the run's own records are untouched
    assert m.branch("b0").best is None and b1.recorded(BEST_STG1) == m.artifacts[BEST_STG1]
    assert b1.read_text("metrics.jsonl").endswith('{"epoch": 4}\n') and run.read_text("metrics.jsonl") == '{"epoch": 3}\n'
    assert b1.verify_artifact(BEST_STG2) == entry.best and b1.verify_artifact(BEST_STG1)
    assert (tmp / "x").mkdir() is None and b1.open_artifact(BEST_STG2, tmp / "x").read_bytes() == b"two"
    with pytest.raises(ManifestError, match="no 'best_stg2' artifact"):
        run.branch("b0").record(BEST_STG2)
    assert sha256(b"two") == entry.best.sha256


def test_fetch_ls_and_resolve_understand_a_branched_run(branched, storage, tmp_path):
    run, tmp = branched
    b1 = run.branch("b1")
    state = b1.put_state("ray/stage2-g3/epoch_0004/state.pt", _file(tmp / "s2", b"two"))
    b1.commit_epoch(state, epoch=4, stage=2, ap=0.4, best=BEST_STG2, metrics="")
    run_uri = storage.child_uri("p")
    assert "leading: b1/best_stg2" in describe_run(run_uri)
    assert "branch b1: PENDING, best_stg2 AP 0.4000" in describe_run(run_uri)
    out = tmp_path / "out"
    out.mkdir()
    (out / "best_stg2.pth").write_bytes(b"the user's own file")
    got = fetch(run_uri, "best_stg2", out, branch="b1")
    assert got == out / "best_stg2-b1.pth" and got.read_bytes() == b"two"
    assert (out / "best_stg2.pth").read_bytes() == b"the user's own file" and sorted(p.name for p in out.iterdir()) \
        == ["best_stg2-b1.pth", "best_stg2.pth"]
    with pytest.raises(ManifestError, match="branch b0 of run .* has no 'best_stg2'"):
        fetch(run_uri, "best_stg2", out, branch="b0")
    with pytest.raises(BadStorageURI, match="of a branch"):
        fetch(run_uri, "final", out, branch="b1")
    with pytest.raises(ManifestError, match="no stage-2 branch 'b9'"):
        fetch(run_uri, "last", out, branch="b9")
    run.update_manifest(lambda m: m.advance(RunState.FAILED, "test"))
    (summary,) = list_runs(storage.uri)
    assert (summary.name, summary.branches, summary.winner) == ("p", 2, None)
    with pytest.raises(ObjectNotFound):
        storage.read_bytes("p/artifacts/best_stg2.pth")
