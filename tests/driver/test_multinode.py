"""The stage switch on two Ray nodes that share no filesystem, on one machine.

Each node is a real `ray start` (1 CPU) in its own mount namespace, where the same path `<base>/node` is a
bind mount of that node's private directory: Ray's temp/session dir, TMPDIR (every scratch file, checkpoint
temp dir and download) and the synthetic dataset all live there, so a path written on one node does not exist
on the other. The driver (`deim-ray train --workers 2` on S3) runs in the head's namespace, like a job driver
on the head. Only the code (checkout + venv), the network and the S3 server are common to both nodes.
With 1 CPU per node and 1 CPU per worker, Ray can only place the two workers of a stage on different nodes.
The run is the shortest two-stage schedule (one epoch per stage): the switch is what crosses the nodes.

Checked: the two Train workers of each stage ran on different node ids; each node generated its own dataset
copy; both workers started stage 2 from bit-identical weights equal to best_stg1 as stored in the bucket."""

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from deim_ray.engine.state import load_train_state
from deim_ray.engine.trainer import state_digest
from deim_ray.models.build import build_model
from tests.driver.conftest import TINY, TWO_EPOCHS, data_overrides
from tests.fixtures_s3 import _free_ports, s3_client, temporary_bucket

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NAME = "mn"
TRAIN_TIMEOUT_S = 900


def _node_env(base: Path, token: str) -> dict[str, str]:
    """What every process of a node inherits: the S3 settings of the fixture, token auth, private TMPDIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    return env | {"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                  "RAY_AUTH_TOKEN": token, "TMPDIR": str(base / "node" / "tmp"),
                  "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                  "RAY_USAGE_STATS_ENABLED": "0"}


def _in_private_namespace(base: Path, role: str, argv: list[str]) -> list[str]:
    """`argv` in a new mount namespace where `<base>/node` is `<base>/<role>` (invisible to other nodes)."""
    node = base / "node"
    setup = f"mount --bind {base / role} {node} && mkdir -p {node}/tmp && exec \"$@\""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "sh", *argv]


def _ray_start(base: Path, role: str, extra: list[str], env: dict) -> subprocess.Popen:
    agent_port = _free_ports(1)[0]
    argv = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--object-store-memory=200000000", f"--dashboard-agent-listen-port={agent_port}",
            f"--temp-dir={base / 'node' / 'ray'}", *extra]
    with open(base / f"{role}.out", "wb") as log:
        return subprocess.Popen(_in_private_namespace(base, role, argv), env=env, cwd=ROOT,
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT)


def _ray_cli(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    """A `ray` client command from outside both nodes (HTTP to the dashboard only)."""
    env = {k: v for k, v in env.items() if k != "TMPDIR"}
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _wait_for_nodes(dashboard: str, env: dict, count: int, procs: list[subprocess.Popen], base: Path,
                    timeout_s: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                logs = "".join((base / f"{r}.out").read_text()[-1500:] for r in ("head", "worker"))
                raise RuntimeError(f"`ray start` exited with {p.returncode}: {logs}")
        listing = _ray_cli(["list", "nodes", "--address", dashboard, "--format", "json"], env)
        if listing.returncode == 0 and listing.stdout.lstrip().startswith("["):  # else "No resource ..."
            alive = [n for n in json.loads(listing.stdout) if n["state"] == "ALIVE"]
            if len(alive) == count:
                return alive
        time.sleep(2)
    raise TimeoutError(f"{count} Ray nodes did not come up in {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM `ray start --block` (it stops its node), then anything left in its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@dataclass(frozen=True)
class TwoNodes:
    base: Path
    """Holds `head/` and `worker/` (each node's private directory, seen as `node/` inside that node)."""
    head: subprocess.Popen
    gcs_address: str
    dashboard: str
    env: dict
    nodes: list
    """`ray list nodes` rows of the two live nodes."""

    def node_id(self, head: bool) -> str:
        return next(n["node_id"] for n in self.nodes if n["is_head_node"] == head)


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """Head + one worker node, 1 CPU each, each with its own private filesystem."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs util-linux unshare/nsenter to give each Ray node a private filesystem")
    base = Path(tempfile.mkdtemp(prefix="dmn", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    for d in ("head", "worker", "node"):
        (base / d).mkdir()
    env = _node_env(base, secrets.token_hex(16))
    gcs, dash, client = _free_ports(3)
    head = _ray_start(base, "head", ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                                     f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                                     "--disable-usage-stats"], env)
    procs = [head]
    try:
        dashboard = f"http://127.0.0.1:{dash}"
        _wait_for_nodes(dashboard, env, 1, procs, base)
        procs.append(_ray_start(base, "worker", [f"--address=127.0.0.1:{gcs}"], env))
        nodes = _wait_for_nodes(dashboard, env, 2, procs, base)
        yield TwoNodes(base, head, f"127.0.0.1:{gcs}", dashboard, env, nodes)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    with temporary_bucket(s3_endpoint, "t-mn") as name:
        yield name


@pytest.fixture(scope="module")
def trained(cluster, bucket, s3_endpoint):
    """`deim-ray -v train --workers 2` as a driver on the head node (in its namespace), storage on S3.

    `-v` keeps the workers' own log lines, which show where each node's Train worker wrote its log."""
    argv = ["nsenter", f"--target={cluster.head.pid}", "--mount", "--", sys.executable, "-m", "deim_ray", "-v", "train",
            "-c", str(ROOT / TINY), "--storage", f"s3://{bucket}/runs", "--name", NAME, "--workers", "2",
            "--max-failures", "0", "-u", *data_overrides(cluster.base / "node" / "data" / "shapes"), *TWO_EPOCHS]
    proc = subprocess.run(argv, env=cluster.env | {"RAY_ADDRESS": cluster.gcs_address}, cwd=ROOT,
                          capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    client = s3_client(s3_endpoint)
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"runs/{NAME}/manifest.json")["Body"].read())
    return proc, manifest


def _train_workers(cluster: TwoNodes) -> list[dict]:
    listing = _ray_cli(["list", "actors", "--address", cluster.dashboard, "--filter", "class_name=RayTrainWorker",
                        "--detail", "--format", "json", "--limit", "1000"], cluster.env)
    assert listing.returncode == 0, listing.stderr
    return json.loads(listing.stdout)


def test_the_two_workers_of_each_stage_ran_on_different_nodes(cluster, trained):
    _, manifest = trained
    assert manifest["state"] == "DONE"
    workers = _train_workers(cluster)
    assert len(workers) == 4, workers  # 2 per stage, no retries (max_failures=0)
    groups: dict[str, set[str]] = {}  # each stage's worker group has its own placement group
    for w in workers:
        groups.setdefault(w["placement_group_id"], set()).add(w["node_id"])
    both = {cluster.node_id(head=True), cluster.node_id(head=False)}
    assert list(groups.values()) == [both, both], workers


def test_each_node_used_only_its_own_filesystem(cluster, trained):
    """Both nodes hold their own dataset copy and their own Train worker's log; neither could see the other's."""
    for role in ("head", "worker"):
        private = cluster.base / role
        assert (private / "data" / "shapes" / ".complete").is_file(), role
        logs = list(private.glob("ray/session_*/logs/worker-*"))
        assert any(b"epoch" in p.read_bytes() for p in logs if p.is_file()), (role, [p.name for p in logs])
    assert not any((cluster.base / "node").iterdir())  # the shared mount point itself stayed empty


def test_both_workers_started_stage2_from_best_stg1_in_the_bucket(trained, bucket, s3_endpoint, tmp_path):
    _, manifest = trained
    digests = manifest["switch"]["worker_start_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    path = tmp_path / "best_stg1.pth"
    s3_client(s3_endpoint).download_file(bucket, f"runs/{NAME}/artifacts/best_stg1.pth", str(path))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["switch"]["sha256"]
    state = load_train_state(path)
    cfg_model = _model_config(manifest, bucket, s3_endpoint)
    model = build_model(cfg_model, state["extra"]["num_classes"])
    model.load_state_dict(state["model"])
    ema = build_model(cfg_model, state["extra"]["num_classes"])
    ema.load_state_dict(state["ema"]["module"])
    assert digests[0] == hashlib.sha256((state_digest(model) + state_digest(ema)).encode()).hexdigest()


def _model_config(manifest, bucket, s3_endpoint):
    import yaml

    from deim_ray.config.loader import config_from_dict

    text = s3_client(s3_endpoint).get_object(Bucket=bucket, Key=f"runs/{NAME}/config.yaml")["Body"].read()
    return config_from_dict(yaml.safe_load(text)).model
