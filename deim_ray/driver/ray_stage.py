"""driver layer: one stage as one Ray Train (V2) `TorchTrainer` run.

Ray's own storage lives in the run directory (`<storage>/<name>/ray/stage<N>-g<generation>`): one Ray run per
fenced stage run, so the workers of a stale attempt never share a Ray run (or its checkpoint folders) with a
newer one. A stage resumes from the manifest's `last`, whichever Ray run stored it. Workers get S3 settings
from their environment, never pickled secrets.
A worker error caused by the input (config, data, weights) ends the stage at once (`StopOnInputErrors`): only
failures a retry can cure use `max_failures`. A named or recorded cluster address is probed with a timeout
before `ray.init`, which would otherwise wait silently for a dead one.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from deim_ray.config.errors import ConfigError
from deim_ray.config.schedule import Stage
from deim_ray.data.errors import DataError
from deim_ray.driver.interrupts import keep_handlers
from deim_ray.engine.optim import ParamGroupError
from deim_ray.engine.loop import NonFiniteLossError
from deim_ray.engine.state import CheckpointError
from deim_ray.models.errors import ModelError
from deim_ray.driver.worker_output import capture_worker_output
from deim_ray.logs import is_verbose
from deim_ray.storage import RunStore

log = logging.getLogger("deim_ray.driver")

# Ray polls worker reports every 2 s by default; a report waits for that poll, which dominates short epochs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


class StageRunFailed(RuntimeError):
    pass


class ClusterTooSmall(RuntimeError):
    pass


INPUT_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, ParamGroupError)
"""Worker errors caused by the run's input (config, data, weights, checkpoint): deterministic, never retried."""

NOT_RETRIED = {**dict.fromkeys(INPUT_ERRORS, "the input would fail again"),
               NonFiniteLossError: "its rollbacks are spent; a retry would resume into the same losses"}
"""Worker errors that end the stage at once, and why a retry would not help."""


class InputFailure(RuntimeError):
    """A worker failed in a way a retry repeats (the run's input, spent NaN rollbacks); raised in Ray's
    controller to end the stage without retries."""


class StopOnInputErrors(ray.train.UserCallback):
    """Ends the stage at the first worker error in NOT_RETRIED: the same input fails the same way on every
    retry, so `max_failures` retries would only repeat it (and bury its one-line message)."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            why = next((why for kind, why in NOT_RETRIED.items() if isinstance(error, kind)), None)
            if why is not None:
                text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise InputFailure(f"{text} (worker {rank}; not retried: {why})")


class ClusterUnreachable(RuntimeError):
    """The Ray cluster named by RAY_ADDRESS (or recorded by `ray start`) does not answer."""


CONNECT_TIMEOUT_S = 10.0
"""How long the driver waits for a named Ray cluster's GCS port to accept a connection."""


def _recorded_address() -> tuple[str | None, str]:
    """The address `ray start` recorded on this machine (what a bare `ray.init()` joins), and the file."""
    from ray._common.utils import get_ray_address_file  # Ray's own lookup of the file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            return f.read().strip() or None, path
    except OSError:
        return None, path


def check_reachable(address: str, source: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """ClusterUnreachable unless `address` (host:port or ray://host:port) accepts a TCP connection in `timeout` s:
    `ray.init` would otherwise wait for a dead cluster without a word."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        hint = ("run `ray stop` to forget it, or `ray start --head` again" if source.startswith("recorded")
                else "start the cluster or fix RAY_ADDRESS (unset it to start a local Ray)")
        raise ClusterUnreachable(f"the Ray cluster at {address} ({source}) did not answer within {timeout:g} s; "
                                 f"{hint}") from None


def ensure_ray(address: str | None = None, resources: dict[str, float] | None = None,
               log_to_driver: bool = True) -> None:
    """Connect to the cluster (`address`, else RAY_ADDRESS / `ray job submit`, else the one `ray start` recorded
    on this machine) or start a local Ray instance. ClusterUnreachable if a named cluster does not answer.

    `resources` are custom resources of a local instance (e.g. `train_driver` for Tune's trial drivers);
    a cluster declares its own with `ray start --resources`. `log_to_driver=False` keeps the output of the tasks
    and actors this driver starts off its console (it stays in Ray's log files).
    """
    if ray.is_initialized():
        return
    source = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if is_verbose() else logging.WARNING
    if address in (None, "", "auto"):
        address, file = _recorded_address()
        source = f"recorded by `ray start` in {file}"
    if address and address != "local":  # a cluster (or `ray job submit`): its runtime_env stays in charge
        check_reachable(address, source)
        ray.init(address=address, logging_level=level, log_to_driver=log_to_driver)
        keep_handlers()  # ray.init replaced the SIGTERM handler with one that prints stack lines
        capture_worker_output(is_verbose())
        return
    dashboard_port = _free_port()
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"],
           # Ray Train's placement-group cleaner (it releases the workers of a run whose controller died,
           # e.g. a Tune trial ASHA stopped) finds the State API by auto-detection, which fails when
           # several local Ray instances share the machine: name this instance's API server.
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}
    if not is_verbose():  # a local instance is never preempted; its watcher only logs a core_worker error per stage
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    with _quiet_token_notice():
        try:
            ray.init(address="local", logging_level=level, resources=resources, dashboard_port=dashboard_port,
                     runtime_env={"env_vars": env}, log_to_driver=log_to_driver)
        except Exception as e:  # Ray's start-up errors are plain Exceptions with a long explanation
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ClusterUnreachable(f"could not start a local Ray instance ({reason}); the machine may be short of "
                                     "CPU or memory: retry, or start one with `ray start --head`") from None
    keep_handlers()
    capture_worker_output(is_verbose())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _quiet_token_notice() -> Iterator[None]:
    """Hide Ray's "Token authentication is enabled" notice about the local instance we start (shown with -v)."""
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    old = notice.level
    if not is_verbose():
        notice.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notice.setLevel(old)


def check_capacity(workers: int, gpu: bool, cpus_per_worker: float) -> None:
    """Fail fast instead of waiting forever for workers the cluster cannot place."""
    total = ray.cluster_resources()
    need = {"CPU": workers * cpus_per_worker} | ({"GPU": float(workers)} if gpu else {})
    for res, amount in need.items():
        have = total.get(res, 0.0)
        if have < amount:
            raise ClusterTooSmall(
                f"--workers {workers} needs {amount:g} {res} but the Ray cluster has {have:g}; lower --workers"
                + ("" if gpu else " or --cpus-per-worker") + " or add nodes")


# Ray Train `UserCallback`s for every stage run started in this thread (Tune's TuneReportCallback); set by
# `stage_callbacks` so `run_training` needs no knowledge of Tune.
_STAGE_CALLBACKS: ContextVar[tuple] = ContextVar("deim_ray_stage_callbacks", default=())


@contextmanager
def stage_callbacks(callbacks: Sequence[ray.train.UserCallback]) -> Iterator[None]:
    """Add `callbacks` to the RunConfig of every stage run started inside this block (same thread)."""
    token = _STAGE_CALLBACKS.set(tuple(callbacks))
    try:
        yield
    finally:
        _STAGE_CALLBACKS.reset(token)


def run_stage(*, stage: Stage, args: dict, store: RunStore, ray_run: str, workers: int, gpu: bool,
              max_failures: int, cpus_per_worker: float, keep_checkpoints: int) -> ray.train.Result:
    from deim_ray.driver.worker import train_stage  # the worker module imports torch-heavy layers

    ensure_ray()
    check_capacity(workers, gpu, cpus_per_worker)
    storage_path, filesystem = store.ray_storage("ray")
    trainer = TorchTrainer(
        train_stage,
        train_loop_config=args,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cpus_per_worker} | ({"GPU": 1} if gpu else {})),
        run_config=RunConfig(
            name=ray_run, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(keep_checkpoints, 1)),
            callbacks=[StopOnInputErrors(), *_STAGE_CALLBACKS.get()],
            # Ray Train's per-report and per-checkpoint lines stay in its log files unless -v
            logging_config=LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")),
    )
    # debug: the epoch lines (and the switch line) already say which stage runs
    log.debug("stage %d: starting %d worker(s) (%s)", int(stage), workers, "GPU/NCCL" if gpu else "CPU/gloo")
    # Ray Train's fit installs a SIGINT handler that aborts the run and lets the driver carry on (to the next
    # stage); our interrupt handling (interrupts.py) stops the whole command instead, so it keeps SIGINT
    trainer._register_sigint_handler = lambda controller: None
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        cause = getattr(e, "controller_failure", None)
        text = str(cause) if isinstance(cause, InputFailure) else str(e).strip().splitlines()[0][:300]
        raise StageRunFailed(text) from e
