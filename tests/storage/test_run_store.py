"""RunStore on a local directory and on the real S3 server: manifest, text files, artifacts, verification."""

import datetime as dt
import json
import os
import threading
from pathlib import Path

import pytest

from deim_ray.storage import (BEST_STG1, LAST, BadStorageURI, ChecksumMismatch, Manifest, ManifestError,
                              ObjectNotFound, RunState, RunStore)
from deim_ray.storage.local import LocalStorage

from tests.storage.payloads import overwrite_behind_our_back, sha256, write_file


def _new_run(storage, name="person-n") -> RunStore:
    store = RunStore(storage, name)
    store.write_manifest(Manifest.new(name=name, config_sha256="c" * 64, epochs=6, stop_epoch=4))
    return store


def test_manifest_and_text_round_trip(storage):
    store = RunStore(storage, "person-n")
    assert store.read_manifest() is None
    assert store.uri == storage.child_uri("person-n")
    store.write_manifest(Manifest.new(name="person-n", config_sha256="c" * 64, epochs=6, stop_epoch=4))
    stored = json.loads(storage.read_bytes("person-n/manifest.json"))
    assert stored["state"] == "NEW" and stored["updated_at"]
    assert store.read_manifest().to_json() == stored
    store.write_text("config.yaml", "model:\n  variant: atto\n")
    store.write_text("metrics.jsonl", '{"epoch": 0}\n')
    assert store.read_text("config.yaml") == "model:\n  variant: atto\n"
    assert store.exists("metrics.jsonl") and not store.exists("nothing.txt")
    assert storage.list("person-n/") == ["person-n/config.yaml", "person-n/manifest.json", "person-n/metrics.jsonl"]


def test_transitions_are_validated_and_persisted(storage):
    store = _new_run(storage)
    assert store.transition(RunState.STAGE1_RUNNING, note="stage 1 started").state is RunState.STAGE1_RUNNING
    with pytest.raises(ManifestError, match="cannot go from STAGE1_RUNNING to STAGE2_RUNNING"):
        store.transition(RunState.STAGE2_RUNNING)
    manifest = store.read_manifest()
    assert manifest.state is RunState.STAGE1_RUNNING
    assert manifest.transitions[-1]["note"] == "stage 1 started"


class RecordingStorage(LocalStorage):
    """A real LocalStorage that also records the order of its writes."""

    def __init__(self, root):
        super().__init__(root)
        self.writes: list[str] = []

    def write_bytes(self, key, data, **conditions):
        self.writes.append(key)
        return super().write_bytes(key, data, **conditions)

    def upload_file(self, key, local_path):
        info = super().upload_file(key, local_path)
        self.writes.append(key)
        return info

    def copy(self, src, dst, **conditions):
        info = super().copy(src, dst, **conditions)
        self.writes.append(dst)
        return info


def test_put_artifact_uploads_before_recording(tmp_path):
    storage = RecordingStorage(tmp_path / "root")
    store = _new_run(storage)
    storage.writes.clear()
    data = write_file(tmp_path / "e3.pt", 1000)
    record = store.put_artifact(BEST_STG1, tmp_path / "e3.pt", epoch=3, stage=1, ap=0.25)
    assert storage.writes == ["person-n/artifacts/best_stg1.pth.g0", "person-n/artifacts/best_stg1.pth",
                              "person-n/manifest.json"]
    assert storage.list("person-n/artifacts/") == ["person-n/artifacts/best_stg1.pth"]  # the staged copy is gone
    assert (record.sha256, record.size, record.epoch, record.stage, record.ap) == (sha256(data), 1000, 3, 1, 0.25)
    assert store.read_manifest().artifacts[BEST_STG1] == record


def test_failed_upload_leaves_the_manifest_alone(storage, tmp_path):
    store = _new_run(storage)
    before = store.read_manifest().to_json()
    with pytest.raises(ObjectNotFound):
        store.put_artifact(LAST, tmp_path / "missing.pt", epoch=0, stage=1, ap=0.1)
    assert store.read_manifest().to_json() == before


def test_verify_and_open_detect_a_replaced_object(storage, tmp_path):
    store = _new_run(storage)
    data = write_file(tmp_path / "e3.pt", 4096)
    record = store.put_artifact(BEST_STG1, tmp_path / "e3.pt", epoch=3, stage=1, ap=0.3)
    assert store.verify_artifact(BEST_STG1) == record
    path = store.open_artifact(BEST_STG1, tmp_path / "dl")
    assert path == tmp_path / "dl" / "best_stg1.pth" and path.read_bytes() == data

    overwrite_behind_our_back(storage, "person-n/artifacts/best_stg1.pth", b"corrupted" + data[9:])
    with pytest.raises(ChecksumMismatch, match="best_stg1.pth"):
        store.verify_artifact(BEST_STG1)
    with pytest.raises(ChecksumMismatch):
        store.open_artifact(BEST_STG1, tmp_path / "dl")
    assert path.read_bytes() == data  # the verified copy is not replaced by the bad one
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["best_stg1.pth"]


def test_artifact_errors(storage, tmp_path):
    store = RunStore(storage, "no-manifest")
    (tmp_path / "f.pt").write_bytes(b"x")
    with pytest.raises(ManifestError, match="no manifest.json"):
        store.put_artifact(LAST, tmp_path / "f.pt", epoch=0, stage=1, ap=0.1)
    store = _new_run(storage)
    with pytest.raises(ManifestError, match="no 'best_stg1' artifact"):
        store.verify_artifact(BEST_STG1)
    with pytest.raises(ManifestError, match="unknown artifact"):
        store.put_artifact("../../x", tmp_path / "f.pt", epoch=0, stage=1, ap=0.1)


def test_nan_ap_is_recorded_as_not_validated(tmp_path):
    store = _new_run(LocalStorage(tmp_path / "root"))
    (tmp_path / "f.pt").write_bytes(b"x")
    assert store.put_artifact(LAST, tmp_path / "f.pt", epoch=0, stage=1, ap=float("nan")).ap is None
    assert json.loads(store.read_text("manifest.json"))["artifacts"]["last"]["ap"] is None


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "a\\b", "x" * 129, "has space", "a..b"])
def test_run_names_are_validated(tmp_path, name):
    with pytest.raises(BadStorageURI, match="run name"):
        RunStore(LocalStorage(tmp_path), name)


def test_concurrent_updates_from_one_process_are_not_lost(tmp_path):
    store = _new_run(LocalStorage(tmp_path / "root"))
    (tmp_path / "f.pt").write_bytes(b"weights")

    def put(name):
        for epoch in range(8):
            store.put_artifact(name, tmp_path / "f.pt", epoch=epoch, stage=1, ap=0.1)

    threads = [threading.Thread(target=put, args=(n,)) for n in (LAST, BEST_STG1)]
    for t in threads:
        t.start()
    for _ in range(8):
        store.transition(RunState.STAGE1_RUNNING, note="resumed")
    for t in threads:
        t.join()
    manifest = store.read_manifest()
    assert manifest.artifacts[LAST].epoch == 7 and manifest.artifacts[BEST_STG1].epoch == 7
    assert len(manifest.transitions) == 9


def test_ray_storage_passthrough(tmp_path):
    path, fs = RunStore(LocalStorage(tmp_path), "person-n").ray_storage("ray")
    assert (path, fs) == (str(tmp_path / "person-n" / "ray"), None)


def test_sweep_removes_only_what_interrupted_writes_left(storage, tmp_path):
    store = _new_run(storage)
    (tmp_path / "f.pt").write_bytes(b"weights")
    store.put_artifact(LAST, tmp_path / "f.pt", epoch=0, stage=1, ap=0.1)
    _leave_an_interrupted_write(storage, "person-n/artifacts/best_stg1.pth")
    assert store.sweep_interrupted_writes() == 0  # too recent: it may still be in progress
    assert store.sweep_interrupted_writes(older_than=dt.timedelta(0)) == 1
    assert store.verify_artifact(LAST).epoch == 0
    assert storage.list() == ["person-n/artifacts/last.pth", "person-n/manifest.json"]
    assert storage.abort_stale_uploads("person-n/") == 0


def _leave_an_interrupted_write(storage, key):
    """What a process killed mid-write leaves: a local temp file, or an unfinished S3 multipart upload."""
    if isinstance(storage, LocalStorage):
        (storage.root / key).parent.mkdir(parents=True, exist_ok=True)
        (storage.root / key).with_name(f".{Path(key).name}.x1y2.partial").write_bytes(b"half")
        return
    from tests.fixtures_s3 import s3_client

    client = s3_client(os.environ["AWS_ENDPOINT_URL_S3"])
    upload = client.create_multipart_upload(Bucket=storage.bucket, Key=f"{storage.prefix}/{key}")
    client.upload_part(Bucket=storage.bucket, Key=f"{storage.prefix}/{key}", UploadId=upload["UploadId"],
                       PartNumber=1, Body=b"half")
