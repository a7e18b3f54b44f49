"""The Storage contract, checked identically on a local directory and on the real S3 server."""

import threading

import pytest

from deim_ray.storage import BadStorageURI, ChecksumMismatch, ObjectNotFound, Storage
from deim_ray.storage.base import atomic_local_file

from tests.storage.payloads import sha256, write_file


def test_implements_protocol(storage):
    assert isinstance(storage, Storage)
    assert storage.child_uri("a/b.txt") == storage.uri + "/a/b.txt"


def test_bytes_round_trip_with_sha256(storage):
    info = storage.write_bytes("run/notes.txt", b"hello")
    assert (info.key, info.size, info.sha256) == ("run/notes.txt", 5, sha256(b"hello"))
    assert storage.read_bytes("run/notes.txt") == b"hello"
    assert storage.stat("run/notes.txt") == info
    assert storage.hash_object("run/notes.txt") == sha256(b"hello")
    storage.write_bytes("run/notes.txt", b"replaced")
    assert storage.read_bytes("run/notes.txt") == b"replaced"


def test_file_round_trip(storage, tmp_path):
    data = write_file(tmp_path / "ckpt.pth", 3_000_000)
    up = storage.upload_file("run/artifacts/last.pth", tmp_path / "ckpt.pth")
    assert (up.size, up.sha256) == (len(data), sha256(data))
    down = storage.download_file("run/artifacts/last.pth", tmp_path / "out" / "last.pth", expected_sha256=up.sha256)
    assert (tmp_path / "out" / "last.pth").read_bytes() == data
    assert down.sha256 == up.sha256
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["last.pth"]  # no temp file left


def test_missing_objects(storage, tmp_path):
    assert storage.stat("nope") is None
    assert not storage.exists("nope")
    with pytest.raises(ObjectNotFound):
        storage.read_bytes("nope")
    with pytest.raises(ObjectNotFound):
        storage.download_file("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ObjectNotFound):
        storage.upload_file("k", tmp_path / "no-such-local-file")
    storage.delete("nope")  # deleting nothing is fine


def test_bad_download_keeps_existing_local_file(storage, tmp_path):
    storage.write_bytes("obj", b"new content")
    (tmp_path / "dl").mkdir()
    target = tmp_path / "dl" / "model.pth"
    target.write_bytes(b"precious")
    with pytest.raises(ChecksumMismatch):
        storage.download_file("obj", target, expected_sha256=sha256(b"something else"))
    assert target.read_bytes() == b"precious"
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["model.pth"]


def test_list_and_delete(storage):
    for key in ["a/1", "a/2", "a/sub/3", "b/4", "top"]:
        storage.write_bytes(key, key.encode())
    assert storage.list() == ["a/1", "a/2", "a/sub/3", "b/4", "top"]
    assert storage.list("a/") == ["a/1", "a/2", "a/sub/3"]
    assert storage.list("a/s") == ["a/sub/3"]
    assert storage.list("", recursive=False) == ["a/", "b/", "top"]
    assert storage.list("a", recursive=False) == ["a/1", "a/2", "a/sub/"]
    assert storage.list("missing/") == []
    storage.delete("a/2")
    assert storage.list("a/") == ["a/1", "a/sub/3"]


def test_keys_cannot_escape_the_root(storage, tmp_path):
    for key in ["", "/abs", "a/../b", "..", "a//b", "./a", "a\\b"]:
        with pytest.raises(BadStorageURI):
            storage.write_bytes(key, b"x")
        with pytest.raises(BadStorageURI):
            storage.download_file(key, tmp_path / "x")
    assert storage.list() == []


def test_readers_never_see_a_partial_object(storage):
    versions = [bytes([i]) * (2 * 2**20) for i in (1, 2)]
    storage.write_bytes("run/manifest.json", versions[0])
    seen, stop = set(), threading.Event()

    def read_loop():
        while not stop.is_set():
            seen.add(sha256(storage.read_bytes("run/manifest.json")))

    reader = threading.Thread(target=read_loop)
    reader.start()
    for i in range(12):
        storage.write_bytes("run/manifest.json", versions[i % 2])
    stop.set()
    reader.join()
    assert seen and seen <= {sha256(v) for v in versions}
    assert storage.list() == ["run/manifest.json"]


def test_interrupted_local_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def half_then_crash(f):
        f.write(b"new but incompl")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_local_file(target, half_then_crash, uri=str(target))
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
