"""driver layer: stage 2 as K branches (`--stage2-branches K`), run in parallel from one frozen best_stg1.

At the first stage-2 start the driver draws the branches' settings (`stage2_branches.py`), gives each branch
its own folder `<run>/stage2/<branch>/` (seeded with the run's stage-1 metrics) and records them all in the
manifest's `stage2_branches`. Then it claims one generation for the whole branch phase and starts every branch
that is not DONE as a plain concurrent Ray Train run from its own thread: each is a normal stage 2 writing through
a branch view of the RunStore (its own last, best_stg2, metrics, plots and Ray folder), so a worker failure
resumes the branch from its own `last`, and a re-run of the command resumes the unfinished branches only.

Not Ray Tune: a branch is a stage 2 of this run, resumed and fenced like one, and needs no trial bookkeeping or
experiment directory of its own.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

import ray

from deim_ray.config.loader import config_sha256
from deim_ray.config.schedule import LAST, Stage
from deim_ray.config.validate import validate
from deim_ray.driver.ray_stage import StageRunFailed
from deim_ray.driver.stage2_branches import (BranchResources, branch_config, branch_names, check_branch_count,
                                             plan_resources,
                                             sample_branches, stage2_space)
from deim_ray.driver.stage_job import RunError, RunRequest, fit_stage
from deim_ray.driver.trackers import close_tracking, open_tracking
from deim_ray.storage import Manifest, RunState, RunStore
from deim_ray.storage.manifest import BranchRecord, BranchState
from deim_ray.storage.resolve import branch_settings
from deim_ray.storage.run_store import METRICS_KEY

log = logging.getLogger("deim_ray.driver")


def check_branch_request(req: RunRequest, manifest: Manifest | None) -> None:
    """Before anything starts: the config's stage2_search is usable, and a run being continued keeps the number
    of branches its stage 2 started with."""
    if req.stage2_branches > 1 or req.cfg.stage2_search:
        stage2_space(req.cfg)
    check_branch_count(req.cfg, req.stage2_branches)
    if manifest is None or req.restart:
        return
    recorded = len(manifest.stage2_branches) if manifest.stage2_branches is not None else None
    last = manifest.artifacts.get(LAST)
    plain_stage2 = recorded is None and last is not None and last.stage == int(Stage.TWO)
    if recorded not in (None, req.stage2_branches) or (plain_stage2 and req.stage2_branches > 1):
        started = recorded if recorded is not None else 1
        raise RunError(f"run `{req.name}` started stage 2 with --stage2-branches {started}; continue it with the same "
                       "number, or use --restart to start it over")


def _create_branches(req: RunRequest, store: RunStore) -> list[BranchRecord]:
    """Draw the branches, seed each folder with the run's stage-1 metrics, then record them (a driver that dies in
    between draws the same branches again: the draw is seeded)."""
    points = sample_branches(req.cfg, req.stage2_branches)
    metrics = store.read_text(METRICS_KEY) if store.exists(METRICS_KEY) else ""
    branches = [BranchRecord(name=name, params=params) for name, params in zip(branch_names(len(points)), points)]
    for branch in branches:
        store.branch(branch.name).write_text(METRICS_KEY, metrics)
    store.record_branches(branches)
    return branches


def run_branches(req: RunRequest, store: RunStore, stg1_sha: str) -> None:
    """Run every stage-2 branch that is not DONE to its end (see the module docstring). RunError naming the
    failed branches when any failed; the others finish first, and a re-run resumes only what is unfinished."""
    branches = store.read_manifest().stage2_branches or _create_branches(req, store)
    store.renew()  # one generation for all branches: a branch's stage run must not fence off its siblings
    plan = plan_resources(req.cfg, len(branches), workers=req.workers, gpu=req.gpu,
                          cpus_per_worker=req.cpus_per_worker, cluster=ray.cluster_resources())
    todo = [b for b in branches if b.state is not BranchState.DONE]
    log.info("stage 2: %d branch(es) from best_stg1 %s, %d to run, %d at a time, %d worker(s) each at %g CPU",
             len(branches), stg1_sha[:12], len(todo), min(plan.parallel, max(len(todo), 1)), plan.workers,
             plan.cpus_per_worker)
    with ThreadPoolExecutor(max_workers=max(1, min(plan.parallel, len(todo))), thread_name_prefix="branch") as pool:
        failures = [f for f in pool.map(lambda b: _run_branch(req, store, b, stg1_sha, plan), todo) if f]
    if failures:
        store.transition(RunState.FAILED, note="; ".join(failures))
        raise RunError(f"stage 2 of run `{req.name}`: {'; '.join(failures)}. Fix the cause and re-run the same "
                       "command: the finished branches are kept, the others resume from their last checkpoint")


def _run_branch(req: RunRequest, store: RunStore, branch: BranchRecord, stg1_sha: str,
                plan: BranchResources) -> str | None:
    """One branch as a normal stage 2 through its own RunStore view; returns why it failed, or None."""
    view = store.branch(branch.name)
    cfg = branch_config(req.cfg, branch.params)
    validate(cfg, workers=plan.workers)
    # a branch's tracker run is a child of the run's (its epochs from the switch on, its own settings)
    tracking = open_tracking(cfg, view, parent=req.tracking) if req.tracking else None
    branch_req = dataclasses.replace(req, cfg=cfg, workers=plan.workers, cpus_per_worker=plan.cpus_per_worker,
                                     tracking=tracking)
    log.info("branch %s: %s (epochs %d-%d)", branch.name, branch_settings(branch), cfg.schedule.stop_epoch,
             cfg.schedule.epochs - 1)
    view.update_branch(lambda b: setattr(b, "state", BranchState.RUNNING))
    try:
        report = fit_stage(branch_req, view, Stage.TWO, stg1_sha, stage1_config_sha=config_sha256(req.cfg),
                           label=branch.name)
    except StageRunFailed as e:
        view.update_branch(lambda b: (setattr(b, "state", BranchState.FAILED), b.extra.__setitem__("error", str(e))))
        close_tracking(tracking, view, None, status="FAILED")
        return f"branch {branch.name} failed: {e}"
    close_tracking(tracking, view, None)
    digests = report.get("start_digests")
    key = "worker_resume_digests" if report.get("resumed") else "worker_start_digests"

    def done(b: BranchRecord) -> None:
        b.state = BranchState.DONE
        b.extra.pop("error", None)
        if digests:
            b.extra[key] = digests.split(",")
    view.update_branch(done)
    return None
