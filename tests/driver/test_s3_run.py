"""A whole two-stage run on S3 storage (the real SeaweedFS server), as a user runs it: `deim-ray train --storage
s3://...` in its own process, with its own local Ray instance whose workers get the AWS settings from their
environment only. Afterwards fresh `deim-ray resolve / fetch / ls` processes read the result back, the bucket
holds manifest, artifacts (sha256 metadata equal to the manifest) and Ray's own checkpoints under the run's
`ray/` prefix, and the secret key appears nowhere: not in any output, Ray log, temp file or stored object."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from deim_ray.models.export import load_final
from deim_ray.storage import RunStore, open_storage
from deim_ray.config.loader import load_config
from tests.driver.conftest import TINY, TWO_EPOCHS, data_overrides
from tests.fixtures_s3 import ACCESS_KEY, SECRET_KEY, s3_client, temporary_bucket

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NAME = "s3run"
TRAIN_TIMEOUT_S = 900
SCHEDULE = load_config(ROOT / TINY, list(TWO_EPOCHS)).schedule
"""The run's two-stage schedule: one epoch per stage (this test is about where things are stored)."""


def _deim_ray(argv: list[str], env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deim_ray", *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    with temporary_bucket(s3_endpoint, "t-s3run") as name:
        yield name


@pytest.fixture(scope="module")
def trained(bucket, tiny_data_root, tmp_path_factory):
    """`deim-ray train` in a fresh process; TMPDIR (hence Ray's session dir and every temp file) is a private,
    short directory (Ray's socket paths must stay < 108 bytes) that the secret scan reads afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="dsr", dir="/tmp"))
    cwd = tmp_path_factory.mktemp("s3run-cwd")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "TMPDIR": str(tmp), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    # -v: Ray's and the workers' own lines too, so the secret scan below covers the most output there is
    argv = ["-v", "train", "-c", str(ROOT / TINY), "--storage", f"s3://{bucket}/runs", "--name", NAME, "--workers", "2",
            "--max-failures", "1", "-u", *data_overrides(tiny_data_root), *TWO_EPOCHS]
    proc = _deim_ray(argv, env, cwd, timeout=TRAIN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    yield proc, tmp, cwd
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def manifest(trained, bucket, s3_endpoint):
    body = s3_client(s3_endpoint).get_object(Bucket=bucket, Key=f"runs/{NAME}/manifest.json")["Body"].read()
    return json.loads(body)


def _bucket_objects(endpoint: str, bucket: str) -> dict[str, dict]:
    client = s3_client(endpoint)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k) for k in keys}


def test_run_is_done_and_the_cli_printed_the_final(trained, manifest, bucket):
    proc, _, cwd = trained
    assert manifest["state"] == "DONE" and manifest["final"]["artifact"] in ("best_stg1", "best_stg2")
    assert f"final: {manifest['final']['artifact']} -> s3://{bucket}/runs/{NAME}/artifacts/final.pth" in proc.stdout
    assert list(cwd.iterdir()) == []  # nothing of the run was written to the local working directory


def test_resolve_from_a_fresh_process_names_artifact_and_reason(trained, manifest, bucket, tmp_path):
    proc = _deim_ray(["resolve", f"s3://{bucket}/runs/{NAME}"], dict(os.environ), tmp_path)
    assert proc.returncode == 0, proc.stderr
    final = manifest["final"]
    assert f"run {NAME}: DONE" in proc.stdout
    assert f"final: {final['artifact']} -> s3://{bucket}/runs/{NAME}/artifacts/final.pth" in proc.stdout
    assert f"sha256 {final['sha256']}" in proc.stdout
    assert f"reason: {final['reason']}" in proc.stdout and final["reason"]


def test_fetch_from_a_fresh_process_gives_the_verified_final(trained, manifest, bucket, tmp_path):
    out = tmp_path / "model"
    proc = _deim_ray(["fetch", f"s3://{bucket}/runs/{NAME}", "-o", str(out)], dict(os.environ), tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = out / "final.pth"
    assert f"final: {path}" in proc.stdout and "sha256 verified" in proc.stdout
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha == manifest["final"]["sha256"] == manifest["artifacts"]["final"]["sha256"]
    raw = torch.load(path, weights_only=True)
    assert "optimizer" not in raw
    model, meta = load_final(path)
    assert meta["meta"]["source"] == manifest["final"]["artifact"]
    assert meta["meta"]["epoch"] == manifest["final"]["epoch"]
    with torch.no_grad():
        outputs = model(pixel_values=torch.rand(1, 3, *meta["image_size"]))
    assert outputs.logits.shape[-1] == meta["num_classes"]


def test_plot_from_a_fresh_process_with_only_endpoint_url(trained, bucket, s3_endpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    uri = f"s3://{bucket}/runs/{NAME}"
    proc = _deim_ray(["plot", uri, "--endpoint-url", s3_endpoint], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {uri}/plots/metrics.png" in proc.stdout
    proc = _deim_ray(["resolve", uri, "--endpoint-url", s3_endpoint], env, tmp_path)
    assert proc.returncode == 0 and f"run {NAME}: DONE" in proc.stdout, proc.stderr


def test_ls_from_a_fresh_process_lists_the_run(trained, manifest, bucket, tmp_path):
    proc = _deim_ray(["ls", f"s3://{bucket}/runs"], dict(os.environ), tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = next(line.split() for line in proc.stdout.splitlines() if line.startswith(NAME))
    assert row[:3] == [NAME, "DONE", f"{manifest['final']['ap']:.4f}"]


def test_bucket_holds_manifest_artifacts_and_ray_checkpoints(trained, manifest, bucket, s3_endpoint):
    objects = _bucket_objects(s3_endpoint, bucket)
    run = f"runs/{NAME}/"
    # pyarrow (Ray) also writes empty "folder/" markers, e.g. `runs/`: nothing else lies outside the run
    assert all(k.startswith(run) or (k.endswith("/") and run.startswith(k)) for k in objects), sorted(objects)
    for key in ("manifest.json", "config.yaml", "metrics.jsonl", "plots/metrics.png"):
        assert run + key in objects
    assert len([k for k in objects if k.startswith(run + "tb/events.out.tfevents.")]) == 2
    recorded = {n: r for n, r in manifest["artifacts"].items() if r}
    assert {"best_stg1", "last", "final"} <= set(recorded)
    for name, record in recorded.items():
        key = run + record["key"]
        assert record["uri"] == f"s3://{bucket}/{key}"
        obj = objects[key]
        assert obj["Metadata"]["sha256"] == record["sha256"]
        assert hashlib.sha256(obj["Body"].read()).hexdigest() == record["sha256"]
    # `last` is the epoch's one stored TrainState, which is also Ray's checkpoint of the last stage run
    last_epoch = SCHEDULE.epochs - 1
    assert recorded["last"]["key"] == f"ray/stage2-g{manifest['generation']}/epoch_{last_epoch:04d}/state.pt"
    assert f"{run}artifacts/last.pth" not in objects
    for stage in (1, 2):  # Ray Train's own storage: snapshot + one checkpoint dir per reported epoch (kept 2)
        ray_run = f"{run}ray/stage{stage}-g{stage + 1}/"  # generation 1 opened the run, each stage run claims one
        assert ray_run + "checkpoint_manager_snapshot.json" in objects, sorted(objects)
        epochs = sorted(k for k in objects if k.startswith(ray_run + "epoch_") and k.endswith("/state.pt"))
        last_epoch = SCHEDULE.stop_epoch - 1 if stage == 1 else SCHEDULE.epochs - 1
        assert epochs and epochs[-1] == f"{ray_run}epoch_{last_epoch:04d}/state.pt", sorted(objects)
    metrics = [json.loads(line) for line in objects[run + "metrics.jsonl"]["Body"].read().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(SCHEDULE.epochs))


def test_the_secret_key_appears_nowhere(trained, bucket, s3_endpoint):
    proc, tmp, _ = trained
    secret = SECRET_KEY.encode()
    assert SECRET_KEY not in proc.stdout + proc.stderr
    scanned = []
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert secret not in path.read_bytes(), f"secret found in {path}"
            scanned.append(path)
    worker_logs = [p for p in scanned if p.parent.name == "logs" and p.name.startswith("worker-")]
    # the scan covered the Train workers' own output (their progress lines), not just an empty dir
    assert any(b"epoch" in p.read_bytes() for p in worker_logs), [p.name for p in scanned][:50]
    for key, obj in _bucket_objects(s3_endpoint, bucket).items():
        assert secret not in obj["Body"].read(), f"secret found in s3://{bucket}/{key}"


def test_what_the_driver_ships_to_workers_carries_no_credentials(s3_endpoint, bucket):
    """Workers get the storage URI and Ray's filesystem; neither carries a key once pickled."""
    store = RunStore(open_storage(f"s3://{bucket}/runs"), NAME)
    path, filesystem = store.ray_storage("ray")
    assert path == f"{bucket}/runs/{NAME}/ray"
    for shipped in (store.storage, filesystem):
        blob = pickle.dumps(shipped)
        assert SECRET_KEY.encode() not in blob and ACCESS_KEY.encode() not in blob
