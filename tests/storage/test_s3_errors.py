"""Each S3 failure a user can meet ends as one StorageError line that names the place and the fix, and never
carries the secret key (not in the message, not anywhere in the traceback)."""

import time
import traceback

import pytest
from botocore.exceptions import ClientError

from deim_ray.config.schema import StorageConfig
from deim_ray.storage import (BucketNotFound, ChecksumMismatch, CredentialsRejected, EndpointUnreachable,
                              NoCredentials, ObjectNotFound, StorageError, open_storage)
from deim_ray.storage.s3_errors import map_s3_error

from tests.fixtures_s3 import SECRET_KEY, _free_ports, s3_client

WRONG_SECRET = "wrong-secret-Hq2Tz9"


def _check_message(error: BaseException, *must_contain: str) -> str:
    message = str(error)
    assert "\n" not in message
    for text in must_contain:
        assert text in message, message
    everything = "".join(traceback.format_exception(error))
    assert SECRET_KEY not in everything and WRONG_SECRET not in everything
    return message


def test_missing_bucket(s3_endpoint, tmp_path):
    storage = open_storage("s3://no-such-bucket-4242/runs")
    (tmp_path / "f").write_bytes(b"x")
    calls = [lambda: storage.write_bytes("k", b"x"), lambda: storage.read_bytes("k"), lambda: storage.stat("k"),
             lambda: storage.upload_file("k", tmp_path / "f"), lambda: storage.list()]
    for call in calls:
        with pytest.raises(BucketNotFound) as err:
            call()
        _check_message(err.value, "no-such-bucket-4242", "create it")


@pytest.mark.parametrize("variable, value, code", [
    ("AWS_SECRET_ACCESS_KEY", WRONG_SECRET, "SignatureDoesNotMatch"),
    ("AWS_ACCESS_KEY_ID", "unknown-access-key", "InvalidAccessKeyId"),
])
def test_rejected_credentials(s3_bucket, monkeypatch, variable, value, code):
    monkeypatch.setenv(variable, value)
    storage = open_storage(f"s3://{s3_bucket}/runs")
    with pytest.raises(CredentialsRejected) as err:
        storage.write_bytes("run/manifest.json", b"{}")
    _check_message(err.value, code, s3_bucket, "AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CredentialsRejected) as err:  # HEAD answers a bare 403
        storage.exists("run/manifest.json")
    _check_message(err.value, "403", s3_bucket)


def test_no_credentials(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(NoCredentials) as err:
        open_storage(f"s3://{s3_bucket}/runs").read_bytes("run/manifest.json")
    _check_message(err.value, "no S3 credentials", "AWS_ACCESS_KEY_ID", s3_bucket)


def test_unreachable_endpoint():
    endpoint = f"http://127.0.0.1:{_free_ports(1)[0]}"
    storage = open_storage("s3://some-bucket/runs", StorageConfig(endpoint_url=endpoint))
    start = time.monotonic()
    with pytest.raises(EndpointUnreachable) as err:
        storage.write_bytes("k", b"x")
    assert time.monotonic() - start < 20  # retried with backoff, then gave up
    _check_message(err.value, endpoint, "8 attempts", "AWS_ENDPOINT_URL_S3")


def test_missing_object(s3_bucket, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}/runs")
    for call in (lambda: storage.read_bytes("run/x.pth"), lambda: storage.download_file("run/x.pth", tmp_path / "x"),
                 lambda: storage.hash_object("run/x.pth")):
        with pytest.raises(ObjectNotFound) as err:
            call()
        _check_message(err.value, f"s3://{s3_bucket}/runs/run/x.pth")
    assert not (tmp_path / "x").exists()


def test_corrupted_object_fails_download(s3_bucket, s3_endpoint, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}/runs")
    info = storage.write_bytes("run/artifacts/best_stg1.pth", b"good weights")
    # replaced behind our back, metadata and all (a bit flip at rest would look the same to us)
    s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key="runs/run/artifacts/best_stg1.pth", Body=b"bad weights",
                                      Metadata={"sha256": info.sha256})
    (tmp_path / "best_stg1.pth").write_bytes(b"older local copy")
    with pytest.raises(ChecksumMismatch) as err:
        storage.download_file("run/artifacts/best_stg1.pth", tmp_path / "best_stg1.pth")
    _check_message(err.value, "best_stg1.pth", info.sha256[:16])
    assert (tmp_path / "best_stg1.pth").read_bytes() == b"older local copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_stg1.pth"]


def test_server_checksum_refusal_maps_to_checksum_mismatch(s3_bucket, s3_endpoint):
    client = s3_client(s3_endpoint)
    with pytest.raises(ClientError) as raw:  # the server verifies x-amz-checksum-sha256 and refuses
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"payload", ChecksumSHA256="A" * 43 + "=")
    mapped = map_s3_error(raw.value, bucket=s3_bucket, key="k", endpoint=s3_endpoint, attempts=8, redact=str)
    assert isinstance(mapped, ChecksumMismatch) and isinstance(mapped, StorageError)
    _check_message(mapped, f"s3://{s3_bucket}/k", "retry")
    assert "Contents" not in client.list_objects_v2(Bucket=s3_bucket)  # nothing was stored
