"""S3Storage specifics on the real SeaweedFS server: checksums the server holds, multipart, marker objects,
abandoned uploads, and the pyarrow filesystem handed to Ray."""

import base64
import datetime as dt
import hashlib
import pickle

import pyarrow.fs as pafs
import pytest

from deim_ray.storage import ChecksumMismatch, RunStore, open_storage

from tests.fixtures_s3 import SECRET_KEY, s3_client
from tests.storage.payloads import sha256, write_file


@pytest.fixture
def s3(s3_bucket):
    return open_storage(f"s3://{s3_bucket}/root")


def test_objects_carry_server_checked_sha256(s3, s3_bucket, s3_endpoint, tmp_path):
    client = s3_client(s3_endpoint)
    s3.write_bytes("small.json", b"{}")
    head = client.head_object(Bucket=s3_bucket, Key="root/small.json", ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == sha256(b"{}")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(b"{}").digest()).decode()

    data = write_file(tmp_path / "big.pth", 20 * 2**20)  # above the multipart threshold
    info = s3.upload_file("big.pth", tmp_path / "big.pth")
    head = client.head_object(Bucket=s3_bucket, Key="root/big.pth", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts of 8 MB, each checked by the server
    assert head["ChecksumSHA256"] and head["Metadata"]["sha256"] == info.sha256 == sha256(data)
    assert s3.hash_object("big.pth") == sha256(data)
    s3.download_file("big.pth", tmp_path / "back.pth")  # ranged parallel GETs into one temp file
    assert (tmp_path / "back.pth").read_bytes() == data


def test_read_checks_the_recorded_sha256(s3, s3_bucket, s3_endpoint):
    # an object whose bytes no longer match the sha256 it was written with (e.g. damaged by another tool)
    s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key="root/m.json", Body=b"tampered",
                                      Metadata={"sha256": sha256(b"original")})
    with pytest.raises(ChecksumMismatch, match="m.json"):
        s3.read_bytes("m.json")


def test_folder_markers_are_not_keys(s3, s3_bucket, s3_endpoint):
    client = s3_client(s3_endpoint)
    client.put_object(Bucket=s3_bucket, Key="root/run/ray/", Body=b"")  # as pyarrow writes for Ray
    s3.write_bytes("run/manifest.json", b"{}")
    assert s3.list() == ["run/manifest.json"]
    assert s3.list("", recursive=False) == ["run/"]
    assert s3.list("run", recursive=False) == ["run/manifest.json", "run/ray/"]


def test_abort_stale_uploads(s3, s3_bucket, s3_endpoint):
    client = s3_client(s3_endpoint)
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="root/run/artifacts/last.pth")
    client.upload_part(Bucket=s3_bucket, Key="root/run/artifacts/last.pth", UploadId=upload["UploadId"],
                       PartNumber=1, Body=b"x" * 1024)
    other = client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/obj")  # outside the root
    assert s3.abort_stale_uploads("run/", older_than=dt.timedelta(hours=1)) == 0
    assert s3.abort_stale_uploads("run/") == 1
    remaining = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["UploadId"] for u in remaining] == [other["UploadId"]]
    assert not s3.exists("run/artifacts/last.pth")


def test_ray_storage_is_a_working_pyarrow_filesystem_without_keys(s3, s3_bucket, s3_endpoint):
    path, fs = RunStore(s3, "person-n").ray_storage("ray")
    assert path == f"{s3_bucket}/root/person-n/ray"
    assert isinstance(fs, pafs.S3FileSystem)
    blob = pickle.dumps(fs)  # what Ray ships to every worker
    assert SECRET_KEY.encode() not in blob
    worker_fs = pickle.loads(blob)
    with worker_fs.open_output_stream(f"{path}/ckpt/state.pt") as f:
        f.write(b"weights")
    with fs.open_input_stream(f"{path}/ckpt/state.pt") as f:
        assert f.read() == b"weights"
    assert s3.read_bytes("person-n/ray/ckpt/state.pt") == b"weights"
    assert [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.is_file] == [
        f"{path}/ckpt/state.pt"]
