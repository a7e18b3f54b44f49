"""`ray job submit` against a real local head started from the venv, with token auth as Ray 2.60 enables it:
the checkout travels as the working dir with cluster/runtime_env.yaml, the job runs `deim-ray train` (one epoch
per stage), and the run ends DONE with a verified final. The head is this test's own process group and is always
torn down."""

import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.driver.conftest import TINY, TWO_EPOCHS, data_overrides
from tests.fixtures_s3 import _free_ports

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 480


def _ray_env(token: str) -> dict[str, str]:
    """The venv first on PATH (the job's `deim-ray`/`python` resolve there) and token auth for client and head."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    return env | {"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                  "RAY_AUTH_TOKEN": token}


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {head.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"dashboard on port {port} did not come up in {timeout_s:.0f} s")


def _stop_head(head: subprocess.Popen) -> None:
    """Stop only this head: SIGTERM to `ray start --block` (it shuts its node down), then its process group."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # anything of this node that outlived the graceful stop
    except ProcessLookupError:
        pass
    head.wait(timeout=30)


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1 with free ports, 2 CPUs and 2 `train_driver` units, as a user would start it."""
    gcs, dashboard, client, agent = _free_ports(4)
    token = secrets.token_hex(16)
    env = _ray_env(token)
    temp_dir = tempfile.mkdtemp(prefix="drj", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--num-cpus=2",
           '--resources={"train_driver": 2}', "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_dashboard(dashboard, proc)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_submitted_train_job_ends_done_with_a_verified_final(head, tiny_data_root, tmp_path):
    address, env = head
    storage = tmp_path / "runs"
    where = 'python -c "import deim_ray; print(\'deim_ray from\', deim_ray.__file__)"'
    train = ["deim-ray", "train", "-c", TINY, "--storage", str(storage), "--name", "job1", "--workers", "2",
             "--max-failures", "1", "-u", *data_overrides(tiny_data_root), *TWO_EPOCHS]
    submission_id = f"job1-{secrets.token_hex(4)}"
    submit = _ray(["job", "submit", "--address", address, "--submission-id", submission_id, "--working-dir", ".",
                   "--runtime-env", "cluster/runtime_env.yaml", "--", "sh", "-c", f"{where} && {shlex.join(train)}"],
                  env, JOB_TIMEOUT_S)
    logs = submit.stdout[-4000:] + submit.stderr[-2000:]
    assert submit.returncode == 0, logs
    status = _ray(["job", "status", "--address", address, submission_id], env, 60)
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr

    manifest = json.loads((storage / "job1" / "manifest.json").read_text())
    assert manifest["state"] == "DONE" and manifest["final"]["artifact"] in ("best_stg1", "best_stg2")
    final = storage / "job1" / "artifacts" / "final.pth"
    assert hashlib.sha256(final.read_bytes()).hexdigest() == manifest["final"]["sha256"]
    # the driver imported the uploaded working dir (first on PYTHONPATH), not the checkout it was sent from
    imported = [line for line in submit.stdout.splitlines() if line.startswith("deim_ray from ")]
    assert len(imported) == 1 and "_ray_pkg_" in imported[0] and str(ROOT) not in imported[0], imported


def test_client_without_token_auth_is_refused(head):
    address, env = head
    plain = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    listing = _ray(["job", "list", "--address", address], plain, 60)
    assert listing.returncode != 0 and "auth" in (listing.stdout + listing.stderr).lower()
    assert _ray(["job", "list", "--address", address], env, 60).returncode == 0
