"""open_storage: which backend a URI opens, and one-line errors for URIs that cannot work."""

import os
import pickle

import pytest

from deim_ray.config.schema import StorageConfig
from deim_ray.storage import BadStorageURI, StorageError, open_storage, split_run_uri
from deim_ray.storage.local import LocalStorage
from deim_ray.storage.s3 import S3Storage

from tests.fixtures_s3 import SECRET_KEY


def test_paths_open_local_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = open_storage("runs")
    assert isinstance(rel, LocalStorage) and rel.uri == str(tmp_path / "runs")
    assert open_storage(f"file://{tmp_path}/x").uri == str(tmp_path / "x")
    assert open_storage(str(tmp_path / "y")).child_uri("a/b") == str(tmp_path / "y" / "a" / "b")


@pytest.mark.parametrize("uri, fix", [
    ("s3://", "s3://BUCKET"), ("s3:///x", "s3://BUCKET"), ("gs://bucket/x", "s3://bucket/prefix"),
    ("", "directory"), ("s3://Bucket/x", "lowercase"), ("s3://bucket/a/../b", "relative key"),
    ("s3://bucket:9000/x", "AWS_ENDPOINT_URL_S3"), ("file://host/x", "file:///"),
])
def test_malformed_uris_say_how_to_fix(uri, fix):
    with pytest.raises(BadStorageURI) as err:
        open_storage(uri)
    message = str(err.value)
    assert fix in message and "\n" not in message
    assert isinstance(err.value, StorageError)


def test_s3_endpoint_from_env_or_config(s3_endpoint):
    from_env = open_storage("s3://some-bucket/runs/")
    assert isinstance(from_env, S3Storage)
    assert from_env.uri == "s3://some-bucket/runs"
    assert from_env.child_uri("x/manifest.json") == "s3://some-bucket/runs/x/manifest.json"
    assert from_env.endpoint_url == s3_endpoint and from_env.custom_endpoint
    assert from_env.client.meta.config.s3["addressing_style"] == "path"
    override = open_storage("s3://some-bucket", StorageConfig(endpoint_url="http://127.0.0.1:1", region="eu-west-1"))
    assert (override.endpoint_url, override.region, override.uri) == ("http://127.0.0.1:1", "eu-west-1",
                                                                      "s3://some-bucket")


@pytest.mark.parametrize("endpoint", ["localhost:9000", "ftp://host:21", "http://"])
def test_bad_endpoint_is_a_one_line_error(endpoint):
    with pytest.raises(BadStorageURI, match="http://127.0.0.1:8333"):
        open_storage("s3://bucket/x", StorageConfig(endpoint_url=endpoint))


def test_pickled_s3_storage_carries_no_secret(s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}/p")
    blob = pickle.dumps(storage)
    assert SECRET_KEY.encode() not in blob and os.environ["AWS_ACCESS_KEY_ID"].encode() not in blob
    clone = pickle.loads(blob)
    clone.write_bytes("k", b"v")
    assert storage.read_bytes("k") == b"v"
    assert SECRET_KEY not in repr(storage)


@pytest.mark.parametrize("run_uri, expected", [
    ("s3://bkt/runs/person-n", ("s3://bkt/runs", "person-n")),
    ("s3://bkt/person-n/", ("s3://bkt", "person-n")),
    ("/data/runs/person-n", ("/data/runs", "person-n")),
    ("runs/person-n", ("runs", "person-n")),
    ("file:///data/runs/a", ("/data/runs", "a")),
])
def test_split_run_uri(run_uri, expected):
    assert split_run_uri(run_uri) == expected


@pytest.mark.parametrize("run_uri", ["s3://bkt", "s3://bkt/", "/", "runs/.."])
def test_split_run_uri_needs_a_name(run_uri):
    with pytest.raises(BadStorageURI):
        split_run_uri(run_uri)
