"""The S3 server crashes (SIGKILL) in the middle of a 64 MB multipart upload and comes back on the same data.

Either the retries carry the upload through, or it fails with a clear error; in both cases no partial
object is ever visible and, after the sweep, no multipart upload lingers.
"""

import threading
import time

import pytest

from deim_ray.storage import EndpointUnreachable, StorageError, open_storage
from deim_ray.storage.s3 import S3Storage

from tests.fixtures_s3 import SECRET_KEY, s3_client
from tests.storage.payloads import sha256, write_file

KEY = "run/artifacts/last.pth"


def _upload_in_background(storage, path):
    outcome = {}

    def run():
        try:
            outcome["info"] = storage.upload_file(KEY, path)
        except StorageError as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _wait_for_multipart(client, bucket, thread, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and thread.is_alive():
        if client.list_multipart_uploads(Bucket=bucket, Prefix=f"root/{KEY}").get("Uploads"):
            return True
        time.sleep(0.01)
    return False


def _crash_mid_upload(storage, s3_server, s3_bucket, tmp_path, wait_for_client: bool):
    """Upload 64 MB, SIGKILL the server once the multipart upload exists, restart it (after 0.3 s, or once
    the client gave up); returns (client, data, outcome)."""
    data = write_file(tmp_path / "last.pth", 64 * 2**20, seed=7)
    client = s3_client(s3_server.endpoint, attempts=1)
    thread, outcome = _upload_in_background(storage, tmp_path / "last.pth")
    try:
        assert _wait_for_multipart(client, s3_bucket, thread), "upload finished before it could be interrupted"
        s3_server.stop(kill=True)
        assert thread.is_alive()
        thread.join(60 if wait_for_client else 0.3)
    finally:
        if s3_server.proc is None:
            s3_server.start()
    thread.join(90)
    assert not thread.is_alive()
    return client, data, outcome


def _check_failed_upload(storage, s3_bucket, tmp_path, data, error):
    message = str(error)
    assert f"s3://{s3_bucket}/root/{KEY}" in message and SECRET_KEY not in message and "\n" not in message
    assert storage.stat(KEY) is None  # nothing partial is visible
    assert KEY not in storage.list()
    assert storage.upload_file(KEY, tmp_path / "last.pth").sha256 == sha256(data)  # a retry succeeds


def test_short_outage_mid_upload(s3_server, s3_bucket, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}/root")  # default retries: 8 attempts
    client, data, outcome = _crash_mid_upload(storage, s3_server, s3_bucket, tmp_path, wait_for_client=False)
    if "info" in outcome:  # the retries rode out the outage (the usual case)
        assert outcome["info"].sha256 == sha256(data)
        assert storage.hash_object(KEY) == sha256(data)
    else:
        _check_failed_upload(storage, s3_bucket, tmp_path, data, outcome["error"])
    storage.abort_stale_uploads("")
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_long_outage_mid_upload_fails_cleanly(s3_server, s3_bucket, tmp_path):
    storage = S3Storage(s3_bucket, "root", max_attempts=3)  # fewer retries only to keep the test short
    client, data, outcome = _crash_mid_upload(storage, s3_server, s3_bucket, tmp_path, wait_for_client=True)
    with pytest.raises(EndpointUnreachable):
        raise outcome["error"]
    _check_failed_upload(storage, s3_bucket, tmp_path, data, outcome["error"])
    storage.abort_stale_uploads("")  # what the upload could not abort while the server was down
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
