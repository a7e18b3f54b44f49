"""BackgroundUploader: ordered, non-blocking, and no error is lost."""

import threading
import time

import pytest

from deim_ray.storage import LAST, Manifest, RunStore, StorageError
from deim_ray.storage.transfer import BackgroundUploader, UploadTimeout

from tests.storage.payloads import sha256, write_file


def test_calls_run_in_order_without_blocking_the_caller():
    done, gate = [], threading.Event()
    with BackgroundUploader() as uploader:
        start = time.monotonic()
        first = uploader.submit(gate.wait, 5)
        futures = [uploader.submit(done.append, i) for i in range(50)]
        assert time.monotonic() - start < 1.0 and done == []  # the caller did not wait for the uploads
        gate.set()
        uploader.flush(timeout=10)
    assert done == list(range(50))
    assert first.result() is True and all(f.done() for f in futures)


def test_flush_raises_the_first_error_once_and_later_calls_still_run():
    done = []

    def fail(message):
        raise StorageError(message)

    uploader = BackgroundUploader()
    failed = uploader.submit(fail, "first")
    uploader.submit(fail, "second")
    uploader.submit(done.append, "after")
    with pytest.raises(StorageError, match="first"):
        uploader.flush()
    assert done == ["after"] and isinstance(failed.exception(), StorageError)
    uploader.flush()  # already reported
    uploader.close()
    with pytest.raises(StorageError, match="closed"):
        uploader.submit(done.append, "late")


def test_close_reports_unflushed_errors_and_flush_can_time_out():
    uploader = BackgroundUploader()
    gate = threading.Event()
    uploader.submit(gate.wait, 5)
    with pytest.raises(UploadTimeout, match="still running"):
        uploader.flush(timeout=0.05)
    gate.set()
    uploader.submit(int, "not a number")
    with pytest.raises(ValueError):
        uploader.close()


def test_background_put_artifact_on_s3(s3_bucket, tmp_path):
    from deim_ray.storage import open_storage

    store = RunStore(open_storage(f"s3://{s3_bucket}/runs"), "bg")
    store.write_manifest(Manifest.new(name="bg", config_sha256="c", epochs=2, stop_epoch=1))
    data = write_file(tmp_path / "e0.pt", 100_000)
    with BackgroundUploader() as uploader:
        future = uploader.submit(store.put_artifact, LAST, tmp_path / "e0.pt", epoch=0, stage=1, ap=0.2)
        uploader.submit(store.write_text, "metrics.jsonl", '{"epoch": 0}\n')
        uploader.flush()
    assert future.result().sha256 == sha256(data) == store.verify_artifact(LAST).sha256
    assert store.read_text("metrics.jsonl") == '{"epoch": 0}\n'
