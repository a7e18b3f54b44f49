"""driver layer: experiment trackers (`train.trackers: [mlflow, wandb]`) beside metrics.jsonl and TensorBoard.

One tracker run per deim_ray run, opened by the driver and continued by every stage run and every resume:

    driver   `open_tracking`   creates the tracker run (params: the resolved config, flattened to dotted keys) or
                               continues the one whose id the manifest records (`extra.trackers`; a branch's in its
                               branch record), and hands the workers a `Tracking` (plain data, no secrets)
    rank 0   `tracker_hooks`   logs each epoch's scalars (`epoch_scalars`, the same as TensorBoard's), step = epoch
    driver   `close_tracking`  logs the plots and the manifest, tags the final artifact's URI and AP, ends the run

A stage-2 branch's run and a Tune trial's run are children of the run's / the search's run (MLflow's
`mlflow.parentRunId` tag; a W&B group). A tracker never ends a training run: a logging error is a warning.
The MLflow server comes from `train.mlflow_tracking_uri`, else MLFLOW_TRACKING_URI; W&B reads its usual
environment (WANDB_API_KEY, WANDB_MODE=offline, WANDB_DIR, WANDB_ENTITY).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deim_ray.config.loader import config_to_dict
from deim_ray.config.schema import Config
from deim_ray.driver.plots import PLOT_KEY
from deim_ray.driver.tensorboard import epoch_scalars
from deim_ray.engine.hooks import Hook
from deim_ray.redact import redact
from deim_ray.storage import Manifest, RunStore

log = logging.getLogger("deim_ray.driver")

PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
"""Trackers that need a package besides deim_ray's own dependencies, and the pip name of each."""
MANIFEST_KEY = "trackers"
FINAL_URI_TAG = "deim_ray.final_uri"
MLFLOW_BATCH = 100
"""MLflow's limit of params per log_batch request."""


class TrackerError(RuntimeError):
    """A requested tracker cannot be used (package missing, no tracking URI); the message says what to do."""


@dataclass(frozen=True)
class Tracking:
    """The tracker runs one deim_ray run (or branch, or search) logs to; pickled to the workers."""

    name: str
    """The deim_ray run name (the tracker run's name)."""
    mlflow_uri: str | None = None
    mlflow_run: str | None = None
    wandb_id: str | None = None
    wandb_project: str | None = None
    wandb_group: str | None = None
    wandb_mode: str | None = None
    wandb_dir: str | None = None
    """The driver's WANDB_MODE and WANDB_DIR, so that workers log as the driver's environment says (the API key
    stays in each node's environment)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mlflow_uri(cfg: Config) -> str | None:
    return cfg.train.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_trackers(cfg: Config) -> None:
    """Preflight: every tracker the config names can be used here (its package imports, MLflow has a URI)."""
    for name in cfg.train.active_trackers:
        package = PACKAGES.get(name)
        if package and not _installed(package):
            raise TrackerError(f"`train.trackers` names {name} but the {package} package is not installed; "
                               f"`pip install {package}` (or drop {name} from train.trackers)")
    if "mlflow" in cfg.train.active_trackers and not mlflow_uri(cfg):
        raise TrackerError("`train.trackers` names mlflow but no tracking server is set; set MLFLOW_TRACKING_URI "
                           "or train.mlflow_tracking_uri (e.g. http://127.0.0.1:5000)")


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # importing it is blocked (None in sys.modules): as good as not installed
        return False


def flat_params(tree: Any, prefix: str = "") -> dict[str, str]:
    """A config tree as dotted keys -> text (what MLflow and W&B show as the run's parameters)."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() if key != "source"
                for k, v in flat_params(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): str(tree)}


# ---------------------------------------------------------------- driver side

def _recorded(store: RunStore) -> dict:
    manifest = store.read_manifest()
    extra = manifest.branch(store.branch_name).extra if store.branch_name else manifest.extra
    return dict(extra.get(MANIFEST_KEY) or {})


def _record(store: RunStore, ids: dict) -> None:
    if store.branch_name:
        store.update_branch(lambda b: b.extra.__setitem__(MANIFEST_KEY, ids))
    else:
        store.update_manifest(lambda m: m.extra.__setitem__(MANIFEST_KEY, ids))


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by a concurrent trial or branch
        return client.get_experiment_by_name(name).experiment_id


def start_mlflow_run(uri: str, experiment: str, name: str, params: dict[str, str], parent: str | None) -> str:
    """A new MLflow run named `name` (a child of run `parent`) holding `params`; returns its id."""
    from mlflow.entities import Param

    client = _mlflow_client(uri)
    tags = {"deim_ray.run": name} | ({"mlflow.parentRunId": parent} if parent else {})
    run_id = client.create_run(_experiment_id(client, experiment), run_name=name, tags=tags).info.run_id
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), MLFLOW_BATCH):
        client.log_batch(run_id, params=items[i:i + MLFLOW_BATCH])
    return run_id


def open_tracking(cfg: Config, store: RunStore, parent: Tracking | None = None) -> Tracking | None:
    """The tracker runs of the run (or branch) `store` names: continued when the manifest records them, else
    created and recorded. None when the config names no tracker besides TensorBoard."""
    trackers = cfg.train.active_trackers
    if "mlflow" not in trackers and "wandb" not in trackers:
        return None
    name = f"{store.name}/{store.branch_name}" if store.branch_name else store.name
    ids = _recorded(store)
    tracking = Tracking(name=name)
    if "mlflow" in trackers:
        uri = mlflow_uri(cfg)
        run_id = ids.get("mlflow_run")
        try:
            if run_id:
                _mlflow_client(uri).update_run(run_id, status="RUNNING")
            else:
                run_id = start_mlflow_run(uri, cfg.train.mlflow_experiment, name, flat_params(config_to_dict(cfg)),
                                          parent.mlflow_run if parent else None)
        except Exception as e:  # before any worker starts: the user asked for this tracker, so say it is not there
            raise TrackerError(f"could not open the MLflow run of {name} at {redact(uri)}: {_first_line(e)}; "
                               "start the server or fix the tracking URI, then re-run the command") from None
        tracking = dataclasses.replace(tracking, mlflow_uri=uri, mlflow_run=run_id)
        ids["mlflow_run"] = run_id
    if "wandb" in trackers:
        ids.setdefault("wandb_id", uuid.uuid4().hex[:12])  # W&B run ids: up to 64 of [a-z0-9_-]
        group = parent.name if parent else None
        tracking = dataclasses.replace(tracking, wandb_id=ids["wandb_id"], wandb_project=cfg.train.wandb_project,
                                       wandb_group=group, wandb_mode=os.environ.get("WANDB_MODE") or None,
                                       wandb_dir=os.environ.get("WANDB_DIR") or None)
    _record(store, ids)
    log.info("run %s: logging to %s", name, ", ".join(t for t in trackers if t in PACKAGES))
    return tracking


def close_tracking(tracking: Tracking | None, store: RunStore, manifest: Manifest | None,
                   status: str = "FINISHED") -> None:
    """The end of a tracked run: its plots and manifest as artifacts, the final artifact's URI and AP (when the
    run resolved one), and its status (FINISHED, FAILED or KILLED)."""
    if tracking is None:
        return
    with tempfile.TemporaryDirectory(prefix="deim_ray_tracker_") as tmp:
        finish_tracking(tracking, (manifest.final if manifest else None) or {}, _side_files(store, Path(tmp)),
                        status)


def finish_tracking(tracking: Tracking, final: dict, files: dict[str, Path], status: str = "FINISHED") -> None:
    """Log `files` (artifact path -> local file) and the `final` artifact's URI and AP, then end the runs."""
    try:
        if tracking.mlflow_run:
            _close_mlflow(tracking, final, files, status)
        if tracking.wandb_id:
            _close_wandb(tracking, final, files, status)
    except Exception as e:  # noqa: BLE001 - the run itself is done; the tracker only misses its last entries
        log.warning("run %s: could not close its tracker run: %s", tracking.name, _first_line(e))


def open_search_tracking(cfg: Config, name: str, params: dict[str, str]) -> Tracking | None:
    """The parent of a Tune search's trial runs: an MLflow run holding the search's settings (`params`); on W&B
    the trials share the group `name`."""
    trackers = cfg.train.active_trackers
    if "mlflow" not in trackers and "wandb" not in trackers:
        return None
    tracking = Tracking(name=name)
    if "mlflow" in trackers:
        uri = mlflow_uri(cfg)
        run_id = start_mlflow_run(uri, cfg.train.mlflow_experiment, name, params, None)
        tracking = dataclasses.replace(tracking, mlflow_uri=uri, mlflow_run=run_id)
    return tracking


def _side_files(store: RunStore, tmp: Path) -> dict[str, Path]:
    """The run's plot and manifest, copied to `tmp` (a tracker uploads local files); artifact path -> file."""
    files = {}
    for key in (PLOT_KEY, "manifest.json"):
        source = store.key(key) if key == PLOT_KEY else store.run_key(key)
        if store.storage.exists(source):
            path = tmp / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(store.storage.read_bytes(source))
            files[key] = path
    return files


def _close_mlflow(tracking: Tracking, final: dict, files: dict[str, Path], status: str) -> None:
    client = _mlflow_client(tracking.mlflow_uri)
    for key, path in files.items():
        folder = Path(key).parent.as_posix()
        client.log_artifact(tracking.mlflow_run, str(path), artifact_path=None if folder == "." else folder)
    if final.get("uri"):
        client.set_tag(tracking.mlflow_run, FINAL_URI_TAG, final["uri"])
        client.set_tag(tracking.mlflow_run, "deim_ray.final_artifact", final.get("artifact", ""))
        if final.get("ap") is not None:
            client.log_metric(tracking.mlflow_run, "final_ap", float(final["ap"]))
    client.set_terminated(tracking.mlflow_run, status=status)


def _close_wandb(tracking: Tracking, final: dict, files: dict[str, Path], status: str) -> None:
    import wandb

    with _wandb_run(tracking) as run:
        if PLOT_KEY in files:
            run.log({"plots/metrics": wandb.Image(str(files[PLOT_KEY]))})
        run.summary["final_uri"] = final.get("uri")
        run.summary["final_ap"] = final.get("ap")
        run.summary["status"] = status


@contextmanager
def _wandb_run(tracking: Tracking, config: dict | None = None) -> Iterator[Any]:
    """The W&B run of `tracking`, joined (resume="allow") from this process and finished on exit."""
    import wandb

    run = wandb.init(id=tracking.wandb_id, project=tracking.wandb_project, name=tracking.name,
                     group=tracking.wandb_group, config=config, resume="allow", reinit="create_new",
                     mode=tracking.wandb_mode, dir=tracking.wandb_dir,
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        yield run
    finally:
        run.finish()


@contextmanager
def tracking_session(tracking: Tracking | None, store: RunStore) -> Iterator[None]:
    """Around a run's training on the driver: a failure ends the tracker run as FAILED (a resume reopens it)."""
    try:
        yield
    except BaseException:
        close_tracking(tracking, store, None, status="FAILED")
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------- worker side (rank 0)

class MLflowHook(Hook):
    """Rank 0: each epoch's scalars into the MLflow run, on the run's uploader thread (training never waits
    for the server)."""

    def __init__(self, sync, tracking: Tracking):
        self.sync, self.tracking = sync, tracking

    def before_stage(self, trainer):
        if trainer.is_main:  # here: imported on the uploader thread, mlflow's import would hold training up
            import mlflow.tracking  # noqa: F401

    def after_epoch(self, trainer, record, decision):
        if trainer.is_main and not trainer.stop_reason and self.sync.uploader is not None:
            self.sync.uploader.submit(self._log, record.epoch, epoch_scalars(record.to_json()))

    def _log(self, epoch: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        try:
            now = int(time.time() * 1000)
            metrics = [Metric(key, value, now, epoch) for key, value in scalars.items()]
            _mlflow_client(self.tracking.mlflow_uri).log_batch(self.tracking.mlflow_run, metrics=metrics)
        except Exception as e:  # noqa: BLE001 - a tracker never ends a run
            log.warning("epoch %d: could not log to MLflow: %s", epoch, _first_line(e))


class WandbHook(Hook):
    """Rank 0: joins the W&B run for the stage and logs each epoch's scalars (with `epoch` as the x axis)."""

    def __init__(self, tracking: Tracking, config: dict):
        self.tracking, self.config = tracking, config
        self.run = None
        self._session = None

    def before_stage(self, trainer):
        if trainer.is_main:
            self._session = _wandb_run(self.tracking, flat_params(self.config))
            self.run = self._session.__enter__()
            self.run.define_metric("*", step_metric="epoch")

    def after_epoch(self, trainer, record, decision):
        if self.run is not None and not trainer.stop_reason:
            self.run.log({"epoch": record.epoch, **epoch_scalars(record.to_json())})

    def after_stage(self, trainer):
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self.run = self._session = None


def tracker_hooks(sync, tracking: dict | None, config: dict) -> list[Hook]:
    """The worker's hooks for the tracker runs the driver opened (`WorkerArgs.tracking`)."""
    if not tracking:
        return []
    runs = Tracking(**tracking)
    return ([MLflowHook(sync, runs)] if runs.mlflow_run else []) + ([WandbHook(runs, config)] if runs.wandb_id else [])
