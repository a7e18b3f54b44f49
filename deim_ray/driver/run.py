"""driver layer: the two-stage run as a state machine persisted in the run's manifest.json.

    NEW -> STAGE1_RUNNING -> STAGE1_DONE -> STAGE2_RUNNING -> DONE      (any failure -> FAILED)

Stage 1 and stage 2 are two Ray Train runs. Between them the driver verifies best_stg1 in storage (sha256),
records the switch, and starts stage 2 from exactly that object. After stage 2 it resolves the final artifact
and writes `final.pth` (EMA weights + rebuild metadata). Opening the run claims it and each stage run renews the
claim (`RunStore.claim` / `renew`), each a new fencing generation, so a driver or worker of an older one can no
longer write (nor take the run back).
Re-running the same command continues from whatever the manifest says: a finished stage is never retrained
and a finished run only reports its result. With `--stage2-branches K` (K > 1) stage 2 is K branches run in
parallel from the same best_stg1 (`branch_run.py`), and the final artifact is resolved across all of them.
Before anything is written or a worker starts, the inputs are checked on the driver (`preflight`) and the
cluster must be able to place the workers (`check_capacity`), so bad input fails in seconds with one line.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import torch
import yaml

from deim_ray.config.schedule import BEST_STG1, FINAL, LAST, Stage
from deim_ray.config.loader import config_from_dict, config_sha256, diff_configs, dump_yaml
from deim_ray.config.schema import Config
from deim_ray.config.validate import validate
from deim_ray.driver.branch_run import check_branch_request, run_branches
from deim_ray.driver.holding import holding
from deim_ray.driver.pickup import pickup_line
from deim_ray.driver.plots import write_plot
from deim_ray.driver.preflight import check_request, check_writable, preflight
from deim_ray.driver.ray_stage import StageRunFailed, check_capacity, ensure_ray
from deim_ray.driver.stage_job import RunError, RunRequest, fit_stage
from deim_ray.driver.trackers import close_tracking, open_tracking, tracking_session
from deim_ray.driver.worker_output import log_file
from deim_ray.engine.state import load_train_state
from deim_ray.models.backbone_weights import backbone_note
from deim_ray.models.export import make_final_checkpoint
from deim_ray.storage import Manifest, RunState, RunStore, open_storage, resolve_final
from deim_ray.storage.holder import this_driver
from deim_ray.storage.run_store import METRICS_KEY

__all__ = ["RunError", "RunRequest", "open_run", "run_training", "write_final"]

log = logging.getLogger("deim_ray.driver")

CONFIG_FILE = "config.yaml"


def _stored_config(store: RunStore) -> Config | None:
    return config_from_dict(yaml.safe_load(store.read_text(CONFIG_FILE))) if store.exists(CONFIG_FILE) else None


def _sweep(store: RunStore) -> None:
    """Discard what a killed driver or worker left half-written (S3 multipart parts, local temp files)."""
    swept = store.sweep_interrupted_writes()
    if swept:
        log.info("run %s: discarded %d interrupted upload(s) left by an earlier attempt", store.name, swept)


def nothing_committed(manifest: Manifest) -> bool:
    """Whether an unfinished run has no epoch to lose: no checkpoint committed, no stage switch recorded."""
    return (manifest.state is not RunState.DONE and manifest.switch is None
            and not any(manifest.artifacts.get(name) for name in (LAST, BEST_STG1)))


def check_same_config(req: RunRequest, store: RunStore, manifest: Manifest | None) -> None:
    """Refuse to continue run `req.name` with another config than it was started with (unless --restart, or the
    run committed no epoch yet: it then starts over with the new config)."""
    if manifest is None or req.restart or manifest.config_sha256 == config_sha256(req.cfg):
        return
    if nothing_committed(manifest):
        return
    old = _stored_config(store)
    keys = ", ".join(diff_configs(old, req.cfg)[:8]) if old else "unknown keys"
    raise RunError(f"run `{req.name}` in {store.uri} was started with another config (differs in: {keys}); "
                   "use a new --name, or --restart to start this name over")


def open_run(req: RunRequest, store: RunStore) -> Manifest:
    """The run's manifest, claimed by this driver: new, continued (same config), or refused (different config
    under the same name)."""
    sha = config_sha256(req.cfg)
    manifest = store.read_manifest()
    if not req.take_over:
        store.check_not_held(manifest)  # before the sweep below writes anything
    if manifest is not None and not req.restart and manifest.config_sha256 != sha and nothing_committed(manifest):
        log.info("run %s: no epoch was committed under its earlier config; starting over with this one", req.name)
        req = dataclasses.replace(req, restart=True)
    if manifest is not None and not req.restart:
        check_same_config(req, store, manifest)
        _sweep(store)
        if manifest.state is RunState.DONE:
            return manifest  # nothing left to write: no claim, so a finished run is only read
        manifest = store.claim(holder=this_driver(), take_over=req.take_over)
        log.info("%s", pickup_line(manifest, store.uri))
        return manifest
    _sweep(store)
    attempt = (manifest.attempt + 1) if manifest is not None else 1
    manifest = store.claim(Manifest.new(name=req.name, config_sha256=sha, epochs=req.cfg.schedule.epochs,
                                        stop_epoch=req.cfg.schedule.stop_epoch, attempt=attempt),
                           holder=this_driver(), take_over=req.take_over)
    store.write_text(CONFIG_FILE, dump_yaml(req.cfg))
    log.info("run %s: new (attempt %d) in %s", req.name, attempt, store.uri)
    return manifest


def _run_stage(req: RunRequest, store: RunStore, stage: Stage, stg1_sha: str | None = None) -> dict:
    """Run one stage to its end under a newly claimed generation (`stage_job.fit_stage`); a failed stage moves
    the run to FAILED with the workers' reason."""
    store.renew()
    if removed := store.sweep_stale_states():
        log.info("run %s: removed %d objects of earlier attempts' Ray runs", req.name, removed)
    try:
        return fit_stage(req, store, stage, stg1_sha)
    except StageRunFailed as e:
        store.transition(RunState.FAILED, note=f"stage {int(stage)}: {e}")
        logs = log_file()
        raise RunError(f"stage {int(stage)} of run `{req.name}` failed: {e}. {_retry_hint(store.read_manifest())}"
                       + (f" (the workers' full output: {logs})" if logs else "")) from None


def _retry_hint(manifest: Manifest) -> str:
    """What re-running does after a failed stage (true for this run's manifest)."""
    if nothing_committed(manifest):
        return ("No epoch was committed: fix the cause and re-run the same command (it starts over, with a changed "
                "config too)")
    last = manifest.artifacts.get(LAST)
    where = f"epoch {last.epoch}" if last else "best_stg1"
    return (f"Fix the cause and re-run the same command to resume after {where} (with the same config; a changed "
            "config needs --restart or a new --name)")


def _switch(store: RunStore, stop_epoch: int) -> str:
    """Verify best_stg1 in storage and record the switch; returns the sha256 stage 2 must start from."""
    record = store.verify_artifact(BEST_STG1)
    store.record_switch({"epoch": stop_epoch, "from": BEST_STG1, "sha256": record.sha256,
                         "best_stg1_epoch": record.epoch, "best_stg1_ap": record.ap})
    store.transition(RunState.STAGE1_DONE, note=f"best_stg1 epoch {record.epoch} AP {record.ap:.4f} verified")
    log.info("stage 1 -> 2: best_stg1 (epoch %d, AP %.3f, sha256 %s) verified; stage 2 trains on clean data from it",
             record.epoch, record.ap, record.sha256[:12])
    return record.sha256


def write_final(store: RunStore, cfg: Config) -> Manifest:
    """Resolve the final artifact, write final.pth (EMA weights + rebuild metadata) and move the run to DONE; the
    end of every run, trained (`run_training`) or stopped by a Tune scheduler (`tune.py`)."""
    manifest = store.read_manifest()
    resolution = resolve_final(manifest.artifacts, reached_stage2=manifest.switch is not None,
                               branches=manifest.stage2_branches)
    source = store.branch(resolution.branch) if resolution.branch else store
    with tempfile.TemporaryDirectory(prefix="deim_ray_final_") as tmp:
        state = load_train_state(source.open_artifact(resolution.artifact, tmp))
        meta = state["extra"]
        weights = state["ema"]["module"] if state.get("ema") else state["model"]
        final = make_final_checkpoint(weights, cfg.model, num_classes=meta["num_classes"],
                                      category_ids=meta["category_ids"], class_names=meta["class_names"],
                                      image_size=tuple(meta["image_size"]),
                                      extra_meta={"source": resolution.artifact, "epoch": resolution.epoch,
                                                  "stage": resolution.stage, "ap": resolution.ap,
                                                  "config_sha256": manifest.config_sha256,
                                                  "normalize": cfg.data.normalize, "branch": resolution.branch,
                                                  # the detections per image training's evaluation kept:
                                                  # predict, eval and export keep as many
                                                  "num_top_queries": cfg.eval.num_top_queries})
        path = Path(tmp) / "final.pth"
        torch.save(final, path)
        record = store.put_artifact(FINAL, path, epoch=resolution.epoch, stage=resolution.stage, ap=resolution.ap)
    if resolution.branch:
        _adopt_branch_metrics(store, source, cfg)
    branch = {"branch": resolution.branch, "params": manifest.branch(resolution.branch).params} \
        if resolution.branch else {}
    return store.finish({"artifact": resolution.artifact, "uri": record.uri, "sha256": record.sha256,
                         "ap": resolution.ap, "epoch": resolution.epoch, "stage": resolution.stage,
                         "reason": resolution.reason, **branch}, resolution.reason)


def _adopt_branch_metrics(store: RunStore, branch: RunStore, cfg: Config) -> None:
    """The winning branch's epochs (stage 1 + its stage 2) become the run's metrics.jsonl and plot."""
    store.write_text(METRICS_KEY, branch.read_text(METRICS_KEY))
    write_plot(store, store.read_metrics(), cfg.schedule.stop_epoch)


def run_training(req: RunRequest) -> Manifest:
    """Run (or continue) the two-stage training named `req.name` in `req.storage_uri`; returns the DONE manifest."""
    check_request(req.workers, req.cpus_per_worker, req.max_failures)
    validate(req.cfg, workers=req.workers)
    store = RunStore(open_storage(req.storage_uri, req.cfg.storage), req.name)
    check_writable(req.storage_uri)
    checked = preflight(req.cfg, workers=req.workers, keep=req.explicit)
    if checked.fit_summary:
        log.info("fitted to the %d train images: %s (deim-ray info says why)", checked.train_images,
                 checked.fit_summary)
    if checked.cfg is not req.cfg:
        req = dataclasses.replace(req, cfg=checked.cfg)
        validate(req.cfg, workers=req.workers)
    existing = store.read_manifest()
    check_same_config(req, store, existing)
    check_branch_request(req, existing)
    if not req.take_over:
        store.check_not_held(existing)  # before Ray starts; the claim checks again, atomically
    if not _is_finished(req, existing):  # a finished run only reports its result: no cluster needed
        ensure_ray()
        check_capacity(req.workers, req.gpu, req.cpus_per_worker)
    manifest = open_run(req, store)
    if manifest.state is RunState.NEW and (note := backbone_note(req.cfg.model.variant, req.cfg.model.backbone_pretrained,
                                                                 req.cfg.model.pretrained)):
        log.warning("%s", note)
    if manifest.state is RunState.DONE:
        log.info("run %s is already DONE; nothing to train (use --restart to train again)", req.name)
        return manifest
    with holding(store):
        req = dataclasses.replace(req, tracking=open_tracking(req.cfg, store, req.tracking_parent))
        with tracking_session(req.tracking, store):
            _train_stages(req, store, manifest)
            manifest = write_final(store, req.cfg)
        close_tracking(req.tracking, store, manifest)
        return manifest


def _train_stages(req: RunRequest, store: RunStore, manifest: Manifest) -> None:
    """Stage 1, the switch and stage 2 (or its branches), from wherever the manifest says the run is (a stage not
    finished is resumed by Ray from its last)."""
    state = manifest.state
    interrupted = _interrupted_stage(manifest)
    if state is RunState.FAILED:
        state = RunState.STAGE1_DONE if manifest.switch else RunState.NEW
    if state in (RunState.NEW, RunState.STAGE1_RUNNING):
        store.transition(RunState.STAGE1_RUNNING, note=_start_note(interrupted, Stage.ONE, "stage 1 started"))
        _run_stage(req, store, Stage.ONE)
        _switch(store, req.cfg.schedule.stop_epoch)
        state = RunState.STAGE1_DONE
    if state in (RunState.STAGE1_DONE, RunState.STAGE2_RUNNING):
        stg1_sha = store.read_manifest().switch["sha256"]
        store.transition(RunState.STAGE2_RUNNING,
                         note=_start_note(interrupted, Stage.TWO, f"stage 2 starts from best_stg1 {stg1_sha[:12]}"))
        if req.stage2_branches > 1:
            run_branches(req, store, stg1_sha)
        else:
            _record_digests(store, _run_stage(req, store, Stage.TWO, stg1_sha))


def _is_finished(req: RunRequest, manifest: Manifest | None) -> bool:
    return manifest is not None and manifest.state is RunState.DONE and not req.restart


def _interrupted_stage(manifest: Manifest) -> Stage | None:
    """The stage a dead driver or a failed run left unfinished (Ray resumes it), if any."""
    if manifest.state is RunState.FAILED:
        return Stage.TWO if manifest.switch else Stage.ONE
    return manifest.state.running_stage


def _start_note(interrupted: Stage | None, stage: Stage, fresh: str) -> str:
    if interrupted is stage:
        return f"stage {int(stage)} continues (run re-started; the workers resume from the manifest's last)"
    return fresh


def _record_digests(store: RunStore, report: dict) -> None:
    """Per-worker digests of the weights stage 2 started from (equal on every worker, checked before training):
    from best_stg1 on a fresh start, from the manifest's `last` when the workers resumed."""
    digests = report.get("start_digests")
    if not digests:
        return
    key = "worker_resume_digests" if report.get("resumed") else "worker_start_digests"
    store.record_switch_digests(key, digests.split(","))
