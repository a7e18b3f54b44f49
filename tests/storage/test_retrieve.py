"""fetch / describe_run / list_runs (deim-ray fetch, resolve, ls) on a local directory and on real S3."""

import os

import pytest

from deim_ray.storage import (BEST_STG1, BEST_STG2, FINAL, BadStorageURI, ChecksumMismatch, Manifest, ManifestError,
                              RunState, RunStore, describe_run, fetch, list_runs, open_storage,
                              resolve_final)
from deim_ray.storage.retrieve import _safe_destination

from tests.storage.payloads import overwrite_behind_our_back, sha256, write_file


def _finished_run(storage, tmp_path, name="person-n"):
    """A DONE run with best_stg1, best_stg2 and final, written the way the driver writes it."""
    store = RunStore(storage, name)
    store.write_manifest(Manifest.new(name=name, config_sha256="c" * 64, epochs=6, stop_epoch=4))
    store.transition(RunState.STAGE1_RUNNING)
    store.put_artifact(BEST_STG1, _payload(tmp_path, "s1", 1), epoch=2, stage=1, ap=0.40)
    manifest = store.read_manifest()
    manifest.switch = {"epoch": 4, "from": BEST_STG1, "sha256": manifest.artifacts[BEST_STG1].sha256}
    store.write_manifest(manifest)
    store.transition(RunState.STAGE1_DONE)
    store.transition(RunState.STAGE2_RUNNING)
    store.put_artifact(BEST_STG2, _payload(tmp_path, "s2", 2), epoch=5, stage=2, ap=0.45)
    resolution = resolve_final(store.read_manifest().artifacts)
    record = store.put_artifact(FINAL, _payload(tmp_path, "final", 3), epoch=resolution.epoch,
                                stage=resolution.stage, ap=resolution.ap)
    manifest = store.read_manifest()
    manifest.final = {"artifact": resolution.artifact, "uri": record.uri, "sha256": record.sha256,
                      "ap": resolution.ap, "epoch": resolution.epoch, "stage": resolution.stage,
                      "reason": resolution.reason}
    store.write_manifest(manifest)
    store.transition(RunState.DONE, note=resolution.reason)
    return store


def _payload(tmp_path, name, seed):
    path = tmp_path / f"{name}.pt"
    write_file(path, 2048, seed=seed)
    return path


def test_fetch_downloads_and_verifies(storage, tmp_path):
    store = _finished_run(storage, tmp_path)
    run_uri = store.uri
    out = tmp_path / "model"
    path = fetch(run_uri, "final", out)
    assert path == (out / "final.pth").resolve()
    assert sha256(path.read_bytes()) == store.read_manifest().artifacts[FINAL].sha256
    before = os.stat(path).st_mtime_ns
    assert fetch(run_uri, "final", out) == path and os.stat(path).st_mtime_ns == before  # verified copy kept
    assert fetch(run_uri, BEST_STG1, out).read_bytes() == (tmp_path / "s1.pt").read_bytes()


def test_fetch_never_replaces_a_file_with_a_bad_download(storage, tmp_path):
    store = _finished_run(storage, tmp_path)
    out = tmp_path / "model"
    out.mkdir()
    (out / "best_stg2.pth").write_bytes(b"an older local copy")
    overwrite_behind_our_back(storage, "person-n/artifacts/best_stg2.pth", b"damaged")
    with pytest.raises(FileExistsError, match="--force"):  # a file the user did not name is never replaced
        fetch(store.uri, BEST_STG2, out)
    with pytest.raises(ChecksumMismatch):  # with --force, only by a verified download
        fetch(store.uri, BEST_STG2, out, force=True)
    assert (out / "best_stg2.pth").read_bytes() == b"an older local copy"
    assert sorted(p.name for p in out.iterdir()) == ["best_stg2.pth"]


def test_fetch_refuses_names_that_escape(tmp_path):
    with pytest.raises(BadStorageURI, match="unknown artifact"):
        fetch(str(tmp_path / "runs" / "r"), "../../etc/passwd", tmp_path)
    for name in ("../x.pth", "a/b.pth", "..", ""):
        with pytest.raises(BadStorageURI, match="refusing"):
            _safe_destination(tmp_path / "out", name)
    assert not (tmp_path / "x.pth").exists()


def test_fetch_explains_what_is_missing(tmp_path):
    with pytest.raises(ManifestError, match="no run at .*deim-ray ls"):
        fetch(str(tmp_path / "runs" / "nothing-here"), "final", tmp_path / "out")
    store = RunStore(open_storage(str(tmp_path / "runs")), "early")
    store.write_manifest(Manifest.new(name="early", config_sha256="c", epochs=6, stop_epoch=4))
    with pytest.raises(ManifestError, match="has no 'final' artifact; it has: none"):
        fetch(store.uri, "final", tmp_path / "out")
    assert not (tmp_path / "out" / "final.pth").exists()


def test_describe_run(storage, tmp_path):
    store = _finished_run(storage, tmp_path)
    text = describe_run(store.uri)
    assert "run person-n: DONE" in text and "final: best_stg2" in text
    assert "stage 2 beat stage 1 (0.450 > 0.400 AP)" in text


def test_list_runs(storage, tmp_path):
    _finished_run(storage, tmp_path, "alpha")
    RunStore(storage, "beta").write_manifest(Manifest.new(name="beta", config_sha256="c", epochs=6, stop_epoch=4))
    storage.write_bytes("not-a-run/notes.txt", b"x")
    storage.write_bytes("broken/manifest.json", b"{oops")
    runs = list_runs(storage.uri)
    assert [(r.name, r.state, r.final_ap) for r in runs] == [
        ("alpha", "DONE", 0.45), ("beta", "NEW", None), ("broken", "DAMAGED", None)]
    assert runs[0].updated_at and runs[0].uri == storage.child_uri("alpha")
    assert list_runs(storage.uri.rstrip("/") + "/empty-subdir") == []


def test_list_runs_shows_tune_searches_and_the_trials_a_scheduler_stopped(tmp_path):
    import json

    from deim_ray.driver.tune import TrialSummary, TuneSummary
    from deim_ray.storage.retrieve import STOPPED_BY_SCHEDULER, TUNE_SUMMARY_KEY

    storage = open_storage(str(tmp_path / "runs"))
    trials = [TrialSummary("x_00000", "", {}, "stopped", 1, 0.2), TrialSummary("x_00001", "", {}, "completed", 4, 0.3)]
    summary = TuneSummary("hpo", "", "asha", "ap", best=trials[1], trials=trials)
    storage.write_bytes(f"hpo/{TUNE_SUMMARY_KEY}", json.dumps(summary.to_json()).encode())
    _finished_run(storage, tmp_path, "solo")
    assert [(r.name, r.state, r.final_ap, r.trials, r.best) for r in list_runs(storage.uri)] == [
        ("hpo", "SEARCH", 0.3, 2, "trial-1"), ("solo", "DONE", 0.45, None, None)]
    trial_storage = open_storage(storage.child_uri("hpo"))
    for name, stopped in (("trial-0", True), ("trial-1", False)):
        store = _finished_run(trial_storage, tmp_path, name)
        if stopped:
            store.update_manifest(lambda m: m.extra.__setitem__(STOPPED_BY_SCHEDULER, {"epochs_run": 1}))
    assert [(r.name, r.state) for r in list_runs(trial_storage.uri)] == [("trial-0", "STOPPED"), ("trial-1", "DONE")]
