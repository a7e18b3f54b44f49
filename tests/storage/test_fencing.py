"""One writer at a time, on a local directory and on the real S3 server: a writer of an older generation (a
paused driver or worker that resumes after a newer attempt claimed the run) is refused on every kind of write
and changes nothing: no artifact, no metrics line, no manifest byte. And one epoch costs one state upload."""

from __future__ import annotations

import hashlib

import pytest

from deim_ray.storage import BEST_STG1, FINAL, LAST, Manifest, RunState, RunStore
from deim_ray.storage.errors import PreconditionFailed, StaleWriter
from tests.storage.payloads import write_file


def _new_run(storage) -> RunStore:
    store = RunStore(storage, "fenced")
    store.claim(Manifest.new(name="fenced", config_sha256="c" * 64, epochs=4, stop_epoch=2))
    store.transition(RunState.STAGE1_RUNNING)
    return store


def _epoch(store: RunStore, tmp_path, epoch: int, *, best: str | None = BEST_STG1, size: int = 2000):
    """What rank 0 does per epoch: store the TrainState under its own key, then commit it."""
    path = tmp_path / f"g{store.generation}-e{epoch}.pt"
    write_file(path, size, seed=epoch + 10 * store.generation)
    state = store.put_state(f"ray/stage1-g{store.generation}/epoch_{epoch:04d}/state.pt", path)
    store.commit_epoch(state, epoch=epoch, stage=1, ap=0.1 * (epoch + 1), best=best,
                       metrics=f'{{"epoch": {epoch}, "generation": {store.generation}}}\n')


def _snapshot(storage) -> dict[str, str]:
    return {key: hashlib.sha256(storage.read_bytes(key)).hexdigest() for key in storage.list("fenced/")}


def test_a_stale_writer_changes_nothing(storage, tmp_path):
    stale = _new_run(storage)
    _epoch(stale, tmp_path, 0)
    # the stale writer pauses here; a new attempt (same run, same storage) takes over and writes epoch 0 again
    fresh = RunStore(storage, "fenced")
    manifest = fresh.claim()
    assert manifest.generation == stale.generation + 1
    _epoch(fresh, tmp_path, 0)
    before = _snapshot(storage)
    write_file(tmp_path / "final.pt", 100)
    # the stale writer resumes: every write it tries is refused
    attempts = {
        "epoch": lambda: _epoch(stale, tmp_path, 1),
        "metrics": lambda: stale.write_text("metrics.jsonl", "stale\n"),
        "config": lambda: stale.write_text("config.yaml", "stale: true\n"),
        "plot": lambda: stale.write_bytes("plots/metrics.png", b"stale"),
        "final": lambda: stale.put_artifact(FINAL, tmp_path / "final.pt", epoch=1, stage=1, ap=0.9),
        "best": lambda: stale.publish_best(BEST_STG1),
        "transition": lambda: stale.transition(RunState.FAILED, "stale"),
        "manifest": lambda: stale.update_manifest(lambda m: m.extra.__setitem__("stale", True)),
        "renew": stale.renew,  # a stale driver starting its next stage run cannot take the run back
    }
    for what, write in attempts.items():
        with pytest.raises(StaleWriter, match="taken over by a newer attempt"):
            write()
        assert _snapshot(storage) == before, what
    record = fresh.verify_artifact(BEST_STG1)
    assert record.key == "artifacts/best_stg1.pth" and fresh.verify_artifact(LAST).key.startswith("ray/stage1-g")
    assert fresh.read_text("metrics.jsonl") == f'{{"epoch": 0, "generation": {fresh.generation}}}\n'


def test_earlier_generations_ray_folders_are_swept_unless_a_record_names_them(storage, tmp_path):
    first = _new_run(storage)
    _epoch(first, tmp_path, 0)  # stage1-g1: `last` after the takeovers below still names it
    storage.write_bytes(first.key("ray/stage1-g1/.ray_bookkeeping.json"), b"{}")
    orphan = RunStore(storage, "fenced")
    orphan.claim()  # an attempt that stored a state but died before committing it
    orphan.put_state(f"ray/stage1-g{orphan.generation}/epoch_0001/state.pt", tmp_path / "g1-e0.pt")
    storage.write_bytes(orphan.key(f"ray/stage1-g{orphan.generation}/checkpoint_manager.json"), b"{}")
    storage.write_bytes(orphan.key("ray/not-a-ray-run/keep.txt"), b"x")
    fresh = RunStore(storage, "fenced")
    fresh.claim()
    fresh.put_state(f"ray/stage1-g{fresh.generation}/epoch_0001/state.pt", tmp_path / "g1-e0.pt")
    before = set(storage.list("fenced/ray/"))
    with pytest.raises(StaleWriter):
        orphan.sweep_stale_states()  # only the current generation sweeps
    assert set(storage.list("fenced/ray/")) == before
    assert fresh.sweep_stale_states() == 2
    assert set(storage.list("fenced/ray/")) == before - {f"fenced/ray/stage1-g{orphan.generation}/epoch_0001/state.pt",
                                                         f"fenced/ray/stage1-g{orphan.generation}/checkpoint_manager.json"}
    assert fresh.verify_artifact(LAST).key == "ray/stage1-g1/epoch_0000/state.pt"


def test_a_write_raced_by_a_takeover_is_refused_by_the_storage_itself(storage, tmp_path):
    """The fence check and the write are one step: a stale writer whose check passed just before the takeover
    still cannot replace an object the new attempt has written (If-Match on S3, compared under the lock locally)."""
    stale = _new_run(storage)
    stale.write_text("metrics.jsonl", "epoch 0 of the old attempt\n")
    seen = stale.storage.stat(stale.key("metrics.jsonl")).etag
    fresh = RunStore(storage, "fenced")
    fresh.claim()
    fresh.write_text("metrics.jsonl", "epoch 0 of the new attempt\n")
    with storage.lock(stale.key("manifest.json")), pytest.raises(PreconditionFailed):
        storage.write_bytes(stale.key("metrics.jsonl"), b"stale\n", if_match=seen)
    assert fresh.read_text("metrics.jsonl") == "epoch 0 of the new attempt\n"


def test_claims_are_exclusive(storage):
    """Two attempts claiming from the same manifest version: exactly one wins each generation."""
    first = _new_run(storage)
    version = storage.read_versioned(first.key("manifest.json"))[1]
    RunStore(storage, "fenced").claim()
    with storage.lock(first.key("manifest.json")), pytest.raises(PreconditionFailed):
        storage.write_bytes(first.key("manifest.json"), b"{}", if_match=version)
    assert first.read_manifest().generation == first.generation + 1


def test_one_state_upload_per_epoch_against_the_real_server(s3_bucket, tmp_path):
    """Counts the requests that reach the S3 server while rank 0 commits epochs: one upload of the TrainState,
    the best as a server-side copy (no body), and only small objects besides."""
    from deim_ray.storage import open_storage

    storage = open_storage(f"s3://{s3_bucket}/root")
    store = _new_run(storage)
    sent: list[tuple[str, str, int]] = []

    def count(request, **_):
        body = request.body
        size = len(body) if isinstance(body, (bytes, bytearray)) else int(request.headers.get("Content-Length", 0))
        sent.append((request.method, request.url.split("?")[0].rsplit("/", 2)[-1], size))

    storage.client.meta.events.register("before-send.s3", count)
    state_size = 3 << 20
    for epoch, best in ((0, BEST_STG1), (1, None), (2, BEST_STG1)):
        sent.clear()
        _epoch(store, tmp_path, epoch, best=best, size=state_size)
        puts = [s for s in sent if s[0] == "PUT"]
        big = [s for s in puts if s[2] > 64 << 10]
        assert [s[1] for s in big] == ["state.pt"], (epoch, puts)  # the one upload of the epoch
        assert sum(s[2] for s in puts) < state_size + (64 << 10), (epoch, puts)
        copies = [s for s in puts if s[1] == "best_stg1.pth"]
        assert len(copies) == (1 if best else 0) and all(s[2] == 0 for s in copies), (epoch, puts)
    assert store.verify_artifact(BEST_STG1).epoch == 2
