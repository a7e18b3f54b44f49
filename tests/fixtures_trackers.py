"""Tracker fixtures: a real MLflow tracking server (sqlite backend, local artifact root) on 127.0.0.1, and
Weights & Biases in offline mode with a reader for the run files it writes."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 300
"""The server creates its sqlite schema on start: over a minute on a busy 2-core machine."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free port; yields its tracking URI."""
    home = tmp_path_factory.mktemp("mlflow")
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    with open(home / "server.log", "wb") as out:
        proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
                                 "--default-artifact-root", str(home / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], stdout=out, stderr=subprocess.STDOUT,
                                cwd=home)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start: " + (home / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B without a network: runs are written under the returned folder (`wandb/offline-run-*`)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def _wandb_records(path: Path):
    """The protobuf records of one `.wandb` file (W&B's LevelDB-style log: 32 KiB blocks of chunked records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: the record is complete
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def read_wandb_run(root: Path, run_id: str) -> dict:
    """Everything the offline run `run_id` logged under `root`, over all its sessions (each stage run and the
    driver's close join it anew): `runs` (name, group, config), `history` (one dict per log call) and `summary`."""
    out = {"runs": [], "history": [], "summary": {}}
    for path in sorted(root.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config = {u.key: json.loads(u.value_json) for u in record.run.config.update if u.key != "_wandb"}
                out["runs"].append({"name": record.run.display_name, "group": record.run.run_group,
                                    "config": config})
            elif kind == "history":
                out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
            elif kind == "summary":
                out["summary"] |= {u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                   for u in record.summary.update}
    return out
