"""The cluster files users deploy with: the AWS launcher config passes Ray's own validator, the KubeRay
manifests carry what KubeRay and deim_ray need, and the job runtime env ships code but never credentials.
Fast: nothing is started."""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import ray
import yaml

from deim_ray.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"


def _yaml(rel: str):
    return yaml.safe_load((CLUSTER / rel).read_text())


def _train_driver_units(resources_flag: str) -> float:
    """`{"train_driver": 4}` from a --resources value, KubeRay's quoted form included."""
    return json.loads(resources_flag.strip().strip("'").strip('"').replace('\\"', '"'))["train_driver"]


# ---------------------------------------------------------------- AWS cluster launcher

@pytest.fixture(scope="module")
def aws():
    return _yaml("aws-gpu.yaml")


def test_aws_config_passes_rays_validator(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws))  # what `ray up` runs before touching AWS


def test_rays_validator_rejects_a_broken_copy(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = dict(aws, available_node_types={**aws["available_node_types"], "gpu_worker": {"node_config": {}}})
    with pytest.raises(Exception, match="resources"):
        validate_config(prepare_config(broken))


def test_aws_head_offers_train_driver_and_workers_have_gpus_and_s3_access(aws):
    head = aws["available_node_types"][aws["head_node_type"]]
    start = " ".join(aws["head_start_ray_commands"])
    flag = re.search(r"--resources=('[^']*')", start).group(1)
    assert _train_driver_units(flag) == head["resources"]["train_driver"] >= 1
    worker = aws["available_node_types"]["gpu_worker"]
    assert worker["node_config"]["InstanceType"].startswith(("g", "p"))  # GPU instance families
    assert worker["max_workers"] >= 1 and worker["node_config"]["IamInstanceProfile"]
    assert not any(v in json.dumps(aws) for v in SECRET_VARS)


def test_aws_nodes_run_this_ray_and_python_and_install_deim_ray(aws):
    assert aws["docker"]["image"] == f"rayproject/ray:{ray.__version__}-{PY_TAG}-gpu"
    assert aws["file_mounts"] == {"/home/ray/deim_ray": "."}
    assert any("pip install" in c and "/home/ray/deim_ray" in c for c in aws["setup_commands"])


def test_dockerfile_builds_on_the_same_image(aws):
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)$", text, re.M).group(1) == aws["docker"]["image"]
    assert "pip install" in text and (CLUSTER / "Dockerfile.dockerignore").exists()


# ---------------------------------------------------------------- KubeRay

@pytest.fixture(scope="module")
def raycluster():
    return _yaml("kuberay/raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob():
    return _yaml("kuberay/rayjob.yaml")


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), "KubeRay rayStartParams values are strings"
    assert _train_driver_units(params["resources"]) >= 1
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers[0]["name"] and head_containers[0]["image"]
    assert {p["containerPort"] for p in head_containers[0]["ports"]} >= {6379, 8265}
    groups = spec["workerGroupSpecs"]
    assert groups and all({"groupName", "rayStartParams", "template"} <= g.keys() for g in groups)
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        (container,) = g["template"]["spec"]["containers"]
        res = container["resources"]
        # Kubernetes requires requests == limits for extended resources such as GPUs.
        gpus = res["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1 and res["requests"]["nvidia.com/gpu"] == gpus
        assert container["image"] == head_containers[0]["image"]
    for container in [*head_containers, *(g["template"]["spec"]["containers"][0] for g in groups)]:
        env = {e["name"]: e for e in container["env"]}
        for var in SECRET_VARS:
            assert "value" not in env[var], f"{var} must come from a Secret"
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"] == var


def test_raycluster_has_what_kuberay_requires(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"]
    _check_cluster_spec(raycluster["spec"])


def test_rayjob_has_what_kuberay_requires(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # Ray's own type checks


def test_rayjob_entrypoint_is_a_valid_deim_ray_train_command(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["deim-ray", "train"]
    args = build_parser().parse_args(argv[1:])
    assert args.gpu and args.storage.startswith("s3://") and args.name
    image_root = "/home/ray/deim_ray/"
    assert args.config.startswith(image_root) and (ROOT / args.config[len(image_root):]).is_file()
    gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert args.workers <= gpus, "more Train workers than the cluster can ever hold GPUs for"


# ---------------------------------------------------------------- ray job submit runtime env

def test_runtime_env_ships_code_not_credentials():
    from ray.runtime_env import RuntimeEnv

    env = _yaml("runtime_env.yaml")
    assert set(env) <= {"excludes", "env_vars", "pip", "py_modules", "working_dir", "config"}
    RuntimeEnv(**env, working_dir=str(ROOT))
    assert {".venv", "/runs", "/data"} <= set(env["excludes"])  # root-anchored: deim_ray/data/ is code
    assert not set(env.get("env_vars", {})) & {*SECRET_VARS, "AWS_SESSION_TOKEN"}


def test_working_dir_upload_holds_the_code_and_configs_but_no_env_or_runs():
    """Walk the checkout exactly as `ray job submit --working-dir .` packs it (Ray's own traversal, with
    .gitignore and the runtime env's excludes), so an exclude that swallows code fails here, not in a job."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    env = _yaml("runtime_env.yaml")
    uploaded: set[str] = set()
    _dir_travel(ROOT, [_get_excludes(ROOT, env["excludes"])],
                lambda p: uploaded.add(p.relative_to(ROOT).as_posix()), include_gitignore=True)
    code = {p.relative_to(ROOT).as_posix() for pattern in ("deim_ray/**/*.py", "configs/**/*.yml")
            for p in ROOT.glob(pattern) if "__pycache__" not in p.parts}
    assert code and code <= uploaded, sorted(code - uploaded)[:10]
    assert "deim_ray/data/synthetic.py" in uploaded
    # the directories themselves are pruned, so Ray never walks a virtualenv or a dataset
    assert not uploaded & {".venv", ".git", "runs", "data"}
    assert not {path.split("/")[0] for path in uploaded} & {".venv", ".git", "runs", "data"}
