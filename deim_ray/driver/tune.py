"""driver layer: `deim-ray tune`, a Ray Tune search whose every trial is a full two-stage deim_ray run.

    <storage>/<name>/trial-<n>/          one run per trial: manifest.json, artifacts/final.pth, ... (as `train`)
                     ray/search/         Ray Tune's experiment state
                     tune_summary.json   best trial, its params and final artifact URI, every trial

Each trial is a Tune function trainable that acts as the Train driver: it applies its sampled values to the
base config (`override_config`, then the usual validation) and calls `run_training`. Every epoch's report
reaches Tune through Ray Train's `TuneReportCallback`, so ASHA's time unit (training_iteration) is the epoch.
A trial driver holds one unit of the custom `train_driver` resource and no CPU, so CPUs/GPUs go to workers.

ASHA stops a trial by killing its actor: the run is left mid-stage. After the search, once the stopped
trials' placement groups are removed (by this module if Ray's own cleaner lags), each stopped run is
finalized here (resolve + final.pth, the same code
`train` uses), so every trial that evaluated an epoch ends with a resolved final and the comparison is
between finals, not between last reported epochs.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.state import list_placement_groups
from ray.util.state.exception import RayStateApiException

from deim_ray.config.loader import load_config, override_config
from deim_ray.config.schema import Config
from deim_ray.config.validate import validate
from deim_ray.driver.ray_stage import check_capacity, ensure_ray, stage_callbacks
from deim_ray.driver.preflight import absolute_paths
from deim_ray.driver.run import RunRequest, run_training, write_final
from deim_ray.driver.trackers import (Tracking, check_trackers, close_tracking, finish_tracking,
                                      open_search_tracking, open_tracking)
from deim_ray.driver.tune_console import (TrialConsole, epochs_between_lines, error_line, ray_output,
                                          trial_run_name)
from deim_ray.driver.tune_space import SearchSpace, check_space_against_config, parse_space, plain
from deim_ray.logs import is_verbose
from deim_ray.storage import Manifest, RunState, RunStore, Storage, StorageError, open_storage
from deim_ray.storage.retrieve import STOPPED_BY_SCHEDULER, TUNE_SUMMARY_KEY

log = logging.getLogger("deim_ray.tune")

SUMMARY_FILE = TUNE_SUMMARY_KEY
SCHEDULER_METRICS = {"ap": "max", "ap50": "max", "loss": "min"}
"""Epoch-report metrics the scheduler may compare trials on, with their direction. AP is the default; early in
training AP is often exactly 0 for every trial, where only the loss tells trials apart. The final ranking
always uses each trial's resolved final AP."""
DRIVER_RESOURCE = "train_driver"
SCHEDULERS = ("asha", "fifo")
PG_CLEANUP_TIMEOUT_S = 90.0
REDUCTION_FACTOR = 2
"""ASHA keeps the best 1/REDUCTION_FACTOR of the trials at each rung."""
RAY_DIR = "ray"
"""Ray Tune's experiment folder under the search (`ray/search/`), as a run keeps Ray Train's under `ray/`."""


class TuneError(RuntimeError):
    """The search cannot start or produced nothing usable; the message says why and what to do."""


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs besides its sampled values (pickled to the trial actors; never secrets)."""

    base: Config
    trials_uri: str
    workers: int
    gpu: bool
    max_failures: int
    cpus_per_worker: float
    tracking: Tracking | None = None
    """The search's tracker run, parent of every trial's (None: the config names no tracker)."""


@dataclass
class TrialSummary:
    trial_id: str
    run_uri: str
    params: dict[str, Any]
    state: str
    """completed (trained its whole schedule), stopped (early, by the scheduler) or error."""
    epochs_run: int | None = None
    final_ap: float | None = None
    final_artifact: str | None = None
    final_uri: str | None = None
    reason: str | None = None
    error: str | None = None


@dataclass
class TuneSummary:
    name: str
    uri: str
    """Where tune_summary.json was written."""
    scheduler: str
    metric: str
    """The epoch metric the scheduler compared (the ranking uses final AP)."""
    best: TrialSummary | None
    trials: list[TrialSummary] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {"name": self.name, "scheduler": self.scheduler, "scheduler_metric": self.metric,
                "ranked_by": "final ap", "best_trial": best.trial_id if best else None,
                "best_run": trial_run_name(best.trial_id) if best else None,
                "best_params": best.params if best else None, "best_final_ap": best.final_ap if best else None,
                "best_final_uri": best.final_uri if best else None, "trials": [asdict(t) for t in self.trials]}


def _trial_main(params: dict[str, Any], job: TrialJob) -> None:
    """Tune function trainable: one full two-stage run with `params` applied, epochs reported to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback  # only constructible inside a Tune session

    cfg = _trial_config(job.base, params)
    trial_id = tune.get_context().get_trial_id()
    req = RunRequest(cfg=cfg, storage_uri=job.trials_uri, name=trial_run_name(trial_id), workers=job.workers,
                     gpu=job.gpu, max_failures=job.max_failures, cpus_per_worker=job.cpus_per_worker,
                     tracking_parent=job.tracking)
    with stage_callbacks([TuneReportCallback()]):
        run_training(req)


def _param_space(space: SearchSpace) -> dict[str, Any]:
    build = {"uniform": tune.uniform, "loguniform": tune.loguniform, "quniform": tune.quniform,
             "randint": tune.randint, "choice": lambda *a: tune.choice(list(a)),
             "grid": lambda *a: tune.grid_search(list(a))}
    return {d.key: build[d.dist](*d.args) for d in space.dimensions}


def _max_epochs(space: SearchSpace, base: Config) -> int:
    searched = [v for d in space.dimensions if d.key == "schedule.epochs" for v in d.probe_values()]
    return max([base.schedule.epochs, *searched])


def _scheduler(kind: str, epochs: int, grace_period: int):
    if kind == "fifo":
        return tune.schedulers.FIFOScheduler()
    # ASHA's rungs go up to max_t. Ending them one epoch before the last one means no trial is killed after
    # its final epoch (nothing left to save by then), and stop_last_trials=False lets trials run past max_t
    # to the end of their schedule, finishing and writing their final themselves.
    max_t = max(epochs - 1, 1)
    return tune.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                         grace_period=min(grace_period, max_t), reduction_factor=REDUCTION_FACTOR,
                                         stop_last_trials=False)


def _connect(max_concurrent: int) -> None:
    # the trial drivers' own output (Python's "Exception ignored ... SystemExit" when ASHA kills one, Ray's
    # warnings) stays in Ray's session logs: the console has a line per trial event
    ensure_ray(resources={DRIVER_RESOURCE: float(max_concurrent)}, log_to_driver=is_verbose())
    have = ray.cluster_resources().get(DRIVER_RESOURCE, 0.0)
    if have < 1:
        raise TuneError(f"the Ray cluster has no `{DRIVER_RESOURCE}` resource for trial drivers; start the head "
                        f"with `ray start --head --resources='{{\"{DRIVER_RESOURCE}\": {max_concurrent}}}'`")


def _live_placement_groups() -> set[str]:
    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def _release_placement_groups(before: set[str]) -> None:
    """Remove the placement groups this search's stopped trials left behind.

    A trial Tune stops dies with its Train controller, but the worker placement group the controller created
    lives until the job ends (Ray scopes a placement group to its job, not to the actor that created it).
    Ray Train's detached cleaner is meant to remove it, but it finds the State API by auto-detection, which
    fails ("Found multiple active Ray instances") when more than one local Ray instance runs on the machine,
    and its monitor thread dies. Once `fit` returns no trial of this job is alive, so every non-detached group
    this job created since the search began is a leftover: removing it also ends any worker still in it."""
    left = _live_placement_groups() - before
    if not left:
        return
    context = ray.get_runtime_context()
    mine = [("creator_job_id", "=", context.get_job_id())]
    try:
        ours = list_placement_groups(address=context.gcs_address, filters=mine, detail=True, timeout=60)
    except (RayStateApiException, ConnectionError) as err:  # the wait below still gives Ray's cleaner its time
        log.warning("could not list this search's placement groups (%s); waiting for Ray to release them", err)
        return
    for pg in ours:
        if pg.placement_group_id in left and not pg.is_detached:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg.placement_group_id)))


def _wait_for_placement_groups(before: set[str], timeout_s: float = PG_CLEANUP_TIMEOUT_S) -> None:
    """Wait until the placement groups this search created are released (a stopped trial's Train workers
    are cleaned up asynchronously); only then can nothing of a stopped run still write to its manifest."""
    deadline = time.monotonic() + timeout_s
    while (left := _live_placement_groups() - before) and time.monotonic() < deadline:
        time.sleep(1.0)
    if left:
        log.warning("%d placement group(s) of this search still held after %.0f s: %s", len(left), timeout_s,
                    ", ".join(sorted(left)))


def _fit(space: SearchSpace, job: TrialJob, root: RunStore, samples: int, scheduler: str, metric: str,
         max_concurrent: int, grace_period: int, every: int) -> tune.ResultGrid:
    storage_path, filesystem = root.ray_storage(RAY_DIR)
    trainable = tune.with_resources(tune.with_parameters(_trial_main, job=job), {DRIVER_RESOURCE: 1})
    console = TrialConsole(lambda params: _trial_config(job.base, params).schedule.epochs, every, metric,
                           REDUCTION_FACTOR)
    with ray_output() as output:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(space),
            tune_config=tune.TuneConfig(metric=metric, mode=SCHEDULER_METRICS[metric], num_samples=samples,
                                        max_concurrent_trials=max_concurrent,
                                        scheduler=_scheduler(scheduler, _max_epochs(space, job.base), grace_period)),
            # A failed trial is not retried by Tune: Ray Train already survives worker failures inside each stage,
            # and a bad combination of values would only fail again.
            run_config=tune.RunConfig(name="search", storage_path=storage_path, storage_filesystem=filesystem,
                                      failure_config=tune.FailureConfig(max_failures=0), callbacks=[console],
                                      **output),
        )
        return tuner.fit()


def _trial_config(base: Config, params: dict[str, Any]) -> Config:
    return override_config(base, {k: plain(v) for k, v in params.items()})


def _finalize_killed(store: RunStore, cfg: Config, summary: TrialSummary, job: TrialJob) -> Manifest:
    """Resolve a run whose trial Tune killed (a scheduler stop) and write its final.pth, as `train` does at its
    end, and end its tracker run as KILLED; a run that cannot be finalized is noted on its row instead of failing
    the search's summary."""
    try:
        store.claim()  # the trial's driver is gone: take the run over so none of its workers can still write
        store.update_manifest(lambda m: m.extra.__setitem__(
            STOPPED_BY_SCHEDULER, {"epochs_run": summary.epochs_run, "in_state": m.state.value}))
        manifest = write_final(store, cfg)
        close_tracking(open_tracking(cfg, store, job.tracking), store, manifest, status="KILLED")
        return manifest
    except StorageError as e:
        summary.error = f"not finalized: {error_line(e)}"
        return store.read_manifest()


def _summarize_trial(result: tune.Result, job: TrialJob, trials: Storage) -> TrialSummary:
    """One trial's row: its state and its resolved final (finalizing the run first if Tune killed it)."""
    trial_id = result.metrics["trial_id"]
    params = {k: plain(v) for k, v in (result.config or {}).items()}
    store = RunStore(trials, trial_run_name(trial_id))
    epoch = result.metrics.get("epoch")
    summary = TrialSummary(trial_id=trial_id, run_uri=store.uri, params=params, state="completed",
                           epochs_run=None if epoch is None else int(epoch) + 1)
    if result.error is not None:
        summary.state, summary.error = "error", error_line(result.error)
        return summary
    manifest = store.read_manifest()
    if manifest is not None and manifest.state is not RunState.DONE:
        # Killed by the scheduler: early, or right after its last epoch (ASHA's top rung), which is no stop.
        if (summary.epochs_run or 0) < manifest.epochs:
            summary.state = "stopped"
        manifest = _finalize_killed(store, override_config(job.base, params), summary, job)
    final = (manifest.final if manifest else None) or {}
    summary.final_ap, summary.final_artifact = final.get("ap"), final.get("artifact")
    summary.final_uri, summary.reason = final.get("uri"), final.get("reason")
    return summary


def _best(trials: list[TrialSummary]) -> TrialSummary | None:
    finished = [t for t in trials if t.final_ap is not None]
    return max(finished, key=lambda t: t.final_ap) if finished else None


def format_summary(summary: TuneSummary) -> str:
    """The table printed at the end of a search: one row per trial, then the best trial's final artifact."""
    rows = [f"{'trial':<24} {'state':<9} {'epochs':>6} {'final AP':>8}  {'artifact':<10} params"]
    for t in sorted(summary.trials, key=lambda t: (t.final_ap is None, -(t.final_ap or 0.0), t.trial_id)):
        ap = f"{t.final_ap:.4f}" if t.final_ap is not None else "-"
        params = " ".join(f"{k}={json.dumps(v)}" for k, v in t.params.items())
        rows.append(f"{trial_run_name(t.trial_id):<24} {t.state:<9} {t.epochs_run or '-':>6} {ap:>8}  "
                    f"{t.final_artifact or '-':<10} {params}" + (f"  [{t.error}]" if t.error else ""))
    best = summary.best
    rows.append(f"best: {trial_run_name(best.trial_id)} final AP {best.final_ap:.4f} -> {best.final_uri}"
                if best else "best: none (no trial evaluated an epoch)")
    rows.append(f"summary: {summary.uri}")
    return "\n".join(rows)


def run_tune(cfg_path: str, overrides: list[str], space: dict | SearchSpace, samples: int,
             scheduler: str = "asha", max_concurrent: int = 2, storage_uri: str = "./runs", name: str = "tune",
             workers_per_trial: int = 1, gpu: bool = False, *, metric: str = "ap", cpus_per_worker: float = 1.0,
             max_failures: int = 3, grace_period: int = 1, report_every: int = 0) -> TuneSummary:
    """Search `space` around the config at `cfg_path`; every trial is a full two-stage run under
    `<storage_uri>/<name>/`, printing one line per trial event (`tune_console.py`; an epoch line every
    `report_every` epochs, 0: a few per trial). Returns (and writes as tune_summary.json) the trials ranked by
    resolved final AP."""
    if scheduler not in SCHEDULERS:
        raise TuneError(f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULERS)}")
    if metric not in SCHEDULER_METRICS:
        raise TuneError(f"unknown scheduler metric {metric!r}; use one of {', '.join(SCHEDULER_METRICS)}")
    if samples < 1 or max_concurrent < 1 or workers_per_trial < 1:
        raise TuneError("--samples, --max-concurrent and --workers-per-trial must be at least 1")
    space = space if isinstance(space, SearchSpace) else parse_space(space)
    base = absolute_paths(load_config(cfg_path, overrides))  # trials run in their own working directories
    validate(base, workers=workers_per_trial)
    check_space_against_config(space, base, workers_per_trial)
    check_trackers(base)
    root = RunStore(open_storage(storage_uri, base.storage), name)
    if root.exists(SUMMARY_FILE):
        raise TuneError(f"a search named `{name}` already ran in {root.uri} ({SUMMARY_FILE} exists); use a new --name")
    _connect(max_concurrent)
    check_capacity(workers_per_trial, gpu, cpus_per_worker)
    tracking = open_search_tracking(base, name, _search_params(space, samples, scheduler, metric))
    job = TrialJob(base=base, trials_uri=root.uri, workers=workers_per_trial, gpu=gpu,
                   max_failures=max_failures, cpus_per_worker=cpus_per_worker, tracking=tracking)
    before = _live_placement_groups()
    log.info("tune %s: %d sample(s) x %d grid point(s), %d concurrent, scheduler %s, runs under %s", name, samples,
             space.grid_size, max_concurrent, scheduler, root.uri)
    every = epochs_between_lines(report_every, _max_epochs(space, base))
    grid = _fit(space, job, root, samples, scheduler, metric, max_concurrent, grace_period, every)
    _release_placement_groups(before)
    _wait_for_placement_groups(before)
    trials_storage = open_storage(root.uri, base.storage)
    trials = [_summarize_trial(result, job, trials_storage) for result in grid]
    summary = TuneSummary(name=name, uri=root.storage.child_uri(root.key(SUMMARY_FILE)), scheduler=scheduler,
                          metric=metric, best=_best(trials), trials=trials)
    root.write_text(SUMMARY_FILE, json.dumps(summary.to_json(), indent=2) + "\n")
    if tracking is not None:
        _finish_search_tracking(tracking, summary)
    return summary


def _search_params(space: SearchSpace, samples: int, scheduler: str, metric: str) -> dict[str, str]:
    """What the search's parent tracker run shows as its parameters: each searched key's distribution."""
    return {"samples": str(samples), "scheduler": scheduler, "scheduler_metric": metric,
            **{f"space.{d.key}": d.describe() for d in space.dimensions}}


def _finish_search_tracking(tracking: Tracking, summary: TuneSummary) -> None:
    best = summary.best
    final = {"uri": best.final_uri, "ap": best.final_ap, "artifact": trial_run_name(best.trial_id)} if best else {}
    with tempfile.TemporaryDirectory(prefix="deim_ray_tune_") as tmp:
        path = Path(tmp) / SUMMARY_FILE
        path.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
        finish_tracking(tracking, final, {SUMMARY_FILE: path})
