"""What a restarted worker or driver continues from, without starting Ray of its own (the killed-process runs
themselves are in test_chaos.py):

- an epoch's commit records `last` (the one stored TrainState) and the best together, so a resume from `last`
  has nothing to reconcile; a worker killed between the commit's two steps leaves the manifest naming complete
  bytes, and the next stage start publishes the best's copy; metrics come from the history the state carries;
- workers of a stale generation stop before training;
- a Trainer resumed from a TrainState (those the session's finished run saved in stage 1) holds exactly that
  state: epoch, stage, model, EMA and its update count, optimizer, best history (stage-2 restart state
  included); the LR needs no state (a pure function of the epoch and iteration, engine/lr.py);
- re-running a finished run prints its result and starts no Ray; --restart opens a new attempt; the FaultHook
  reads several faults from its environment.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch

from deim_ray.cli.main import main
from deim_ray.driver.checkpoint_hook import CheckpointHook
from deim_ray.driver.fault_injection import Fault, FaultHook
from deim_ray.driver.run import RunRequest, open_run
from deim_ray.config.schedule import Stage
from deim_ray.engine.stages import BestTracker
from deim_ray.engine.state import load_train_state, make_train_state, save_train_state
from deim_ray.engine.trainer import StageStart, Trainer
from deim_ray.storage import BEST_STG1, LAST, Manifest, RunState, RunStore, artifact_key, open_storage
from tests.driver.conftest import FINISHED_OVERRIDES, TINY, data_overrides


def _line(epoch: int, ap: float, stage: int = 1) -> dict:
    return {"epoch": epoch, "stage": stage, "ap": ap}


def _state(epoch: int, ap: float, *, history: list[dict], best: dict | None = None, date: str | None = None,
           stage: int = 1) -> dict:
    """A small TrainState as rank 0 saves it after `epoch` (its metrics history ends with that epoch)."""
    best = best or {"top1": ap, "local_epoch": epoch, "local_ap": ap,
                    "stage_best": {str(stage): {"epoch": epoch, "ap": ap}}}
    state = make_train_state(model={"w": torch.full((4,), float(epoch))}, ema=None, optimizer={}, scaler=None,
                             epoch=epoch, stage=stage, best=best, config_sha256="c0ffee",
                             extra={"metrics": history})
    if date:
        state["date"] = date
    return state


@pytest.fixture
def store(tmp_path) -> RunStore:
    store = RunStore(open_storage(str(tmp_path / "runs")), "r1")
    store.claim(Manifest.new(name="r1", config_sha256="c0ffee", epochs=4, stop_epoch=2))
    store.transition(RunState.STAGE1_RUNNING)
    return store


def _record(store: RunStore, name: str, state: dict, tmp_path: Path, ap: float):
    path = save_train_state(state, tmp_path / f"{name}-{state['last_epoch']}.pt")
    return store.put_artifact(name, path, epoch=state["last_epoch"], stage=state["stage"], ap=ap)


def _trainer(epoch: int, tracker: BestTracker, stage: Stage = Stage.ONE):
    """The parts of a Trainer that CheckpointHook reads at the start of a stage (one process, rank 0)."""
    return types.SimpleNamespace(is_main=True, epoch=epoch, stage=stage, tracker=tracker, stop_reason=None)


def _commit(store: RunStore, state: dict, tmp_path: Path, *, best: str | None, stop_before_publish=False):
    """Rank 0's commit of one epoch (CheckpointHook._publish without Ray); optionally killed between its steps."""
    epoch = state["last_epoch"]
    path = save_train_state(state, tmp_path / f"e{epoch}.pt")
    stored = store.put_state(f"ray/stage1-g{store.generation}/epoch_{epoch:04d}/state.pt", path)
    if stop_before_publish:  # the manifest records the epoch, then the worker dies before the best's copy
        record = store._record(stored, rel=stored.key[len(store.name) + 1:], epoch=epoch, stage=1, ap=0.3)
        store.update_manifest(lambda m: m.artifacts.update({LAST: record, best: record}))
        return
    store.commit_epoch(stored, epoch=epoch, stage=1, ap=state["extra"]["metrics"][-1]["ap"], best=best,
                       metrics="".join(json.dumps(r) + "\n" for r in state["extra"]["metrics"]))


def test_an_epoch_commit_records_last_and_best_together(store, tmp_path):
    history = [_line(0, .1), _line(1, .3)]
    _commit(store, _state(0, 0.1, history=history[:1]), tmp_path, best=BEST_STG1)
    _commit(store, _state(1, 0.3, history=history), tmp_path, best=None)
    m = store.read_manifest()
    assert (m.artifacts[LAST].epoch, m.artifacts[BEST_STG1].epoch) == (1, 0)
    assert m.artifacts[LAST].key == f"ray/stage1-g{store.generation}/epoch_0001/state.pt"  # the one upload
    assert m.artifacts[BEST_STG1].key == artifact_key(BEST_STG1)  # a server-side copy (a hard link here)
    assert store.verify_artifact(BEST_STG1).sha256 != store.verify_artifact(LAST).sha256
    assert [json.loads(x) for x in store.read_text("metrics.jsonl").splitlines()] == history


def test_a_resumed_stage_finishes_a_commit_its_worker_died_in(store, tmp_path):
    """Killed after the manifest recorded the epoch's best at its TrainState's key and before the copy onto
    best_stg1.pth: the manifest names complete bytes all along, and the next stage start publishes the copy."""
    _commit(store, _state(0, 0.1, history=[_line(0, .1)]), tmp_path, best=BEST_STG1)
    _commit(store, _state(1, 0.3, history=[_line(0, .1), _line(1, .3)]), tmp_path, best=BEST_STG1,
            stop_before_publish=True)
    record = store.verify_artifact(BEST_STG1)
    assert record.key.endswith("epoch_0001/state.pt") and record.epoch == 1
    resume = load_train_state(store.open_artifact(LAST, tmp_path / "dl"))
    hook = CheckpointHook(store, "stage1-g9", resume=resume)
    hook.before_stage(_trainer(1, BestTracker.from_state(resume["best"])))
    published = store.verify_artifact(BEST_STG1)
    assert published.key == artifact_key(BEST_STG1) and published.sha256 == record.sha256
    assert hook.metrics == resume["extra"]["metrics"]


def test_fresh_stage2_keeps_stage1_metrics_and_drops_a_failed_try(store, tmp_path):
    lines = [_line(0, .1), _line(1, .3), _line(2, .2, stage=2)]
    store.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    hook = CheckpointHook(store, "stage2-g9")
    hook.before_stage(_trainer(1, BestTracker(), Stage.TWO))
    assert hook.metrics == lines[:2]  # stage 2 starts after epoch 1


def test_workers_of_a_stale_generation_stop_before_training(store, tmp_path):
    stale = RunStore(store.storage, store.name, generation=store.generation)
    RunStore(store.storage, store.name).claim()  # a newer attempt took over
    trainer = _trainer(0, BestTracker())
    CheckpointHook(stale, "stage1-g1").before_stage(trainer)
    assert "taken over by a newer attempt" in trainer.stop_reason


@pytest.fixture(scope="module")
def trained(finished_run, tiny_cfg):
    """The TrainStates rank 0 of the session's finished run saved after each stage-1 epoch (its stage-1 Ray run's
    checkpoints, kept: keep_checkpoints 2), and that run's config with absolute data paths."""
    torch.set_num_threads(1)  # as in a Ray worker (OMP_NUM_THREADS=1)
    stage1 = sorted((finished_run.run_dir / "ray").glob("stage1-g*/epoch_*/state.pt"))
    states = [load_train_state(path) for path in stage1]
    assert [s["last_epoch"] for s in states] == [0, 1], stage1
    return tiny_cfg(*FINISHED_OVERRIDES), states


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


@pytest.mark.slow
def test_trainer_resumes_exactly_the_saved_state(trained, tmp_path):
    cfg, states = trained
    saved = load_train_state(save_train_state(states[-1], tmp_path / "s.pt"))  # through the file, as Ray does
    assert saved["ema"]["updates"] == 2 * 8 and saved["last_epoch"] == 1
    resumed = Trainer(cfg, saved["config_sha256"])
    resumed.run_stage(StageStart(Stage.ONE, resume=saved))  # stage 1 is complete: nothing left to train
    again = resumed.state_dict()
    for key in ("model", "ema", "optimizer", "scaler", "last_epoch", "stage", "best", "config_sha256"):
        assert _equal(again[key], saved[key]), key


@pytest.mark.slow
def test_trainer_resumes_a_stage2_restart_in_flight(trained):
    """A stage-2 state saved right after a restart decision: the next epoch starts from best_stg1's weights and
    a reset local best; both survive the resume."""
    cfg, states = trained
    stage1_best = copy.deepcopy(states[0])
    state = dict(states[0])
    state["stage"], state["last_epoch"] = 2, 2
    state["best"] = {"top1": 0.4, "local_epoch": -1, "local_ap": -1.0, "stage_best": {"1": {"epoch": 0, "ap": .4}}}
    resumed = Trainer(cfg, "sha")
    resumed.run_stage(StageStart(Stage.TWO, resume=state, stage1_best=stage1_best))
    assert resumed.epoch == 2 + 1 and resumed.stage is Stage.TWO  # epoch 3, the last one, ran
    assert resumed.tracker.top1 >= 0.4 and resumed.tracker.stage_best["1"] == {"epoch": 0, "ap": .4}
    assert resumed.ema.decay == cfg.schedule.ema_restart_decay
    # training stepped its own optimizer state, not best_stg1's, which every later restart loads again
    assert resumed.ema.updates == 8 + 8 and _equal(stage1_best["optimizer"], states[0]["optimizer"])


def test_finished_run_prints_its_result_and_starts_no_ray(tiny_cfg, tiny_data_root, tmp_path, capsys):
    import ray

    root = tmp_path / "runs"
    store = RunStore(open_storage(str(root)), "done")
    open_run(RunRequest(cfg=tiny_cfg(), storage_uri=str(root), name="done"), store)
    history = [_line(0, .1), _line(1, .2)]
    store.transition(RunState.STAGE1_RUNNING)
    _record(store, BEST_STG1, _state(1, 0.2, history=history), tmp_path, 0.2)
    manifest = store.read_manifest()
    manifest.switch = {"epoch": 2, "from": BEST_STG1, "sha256": manifest.artifacts[BEST_STG1].sha256}
    manifest.final = {"artifact": BEST_STG1, "ap": 0.2, "epoch": 1, "stage": 1, "reason": "run ended in stage 1"}
    store.write_manifest(manifest)
    for state in (RunState.STAGE1_DONE, RunState.STAGE2_RUNNING, RunState.DONE):
        store.transition(state)
    per_class = {e: [{"name": "disc", "category_id": 1, "ap": ap, "ap50": 2 * ap, "instances": 7}]
                 for e, ap in ((0, .125), (1, .375))}  # the final is epoch 1: its classes are printed
    store.write_text("metrics.jsonl", "".join(json.dumps(r | {"loss": 1.0, "lr": 1e-3, "coco_stats": [r["ap"]] * 12,
                                                              "per_class": per_class[r["epoch"]]})
                                           + "\n" for r in history))
    before = (root / "done" / "manifest.json").read_bytes()
    was_running = ray.is_initialized()
    rc = main(["train", "-c", TINY, "--storage", str(root), "--name", "done", "-u", *data_overrides(tiny_data_root)])
    out = capsys.readouterr().out
    assert rc == 0 and "DONE" in out and "best_stg1" in out and "0.2000" in out
    assert "per class, final artifact (epoch 1)" in out
    assert out.splitlines()[-2].split() == ["disc", "0.375", "0.750", "7"]  # the last line: what to do next
    assert (root / "done" / "manifest.json").read_bytes() == before
    assert ray.is_initialized() == was_running


def test_restart_opens_a_new_attempt(tiny_cfg, tmp_path):
    root = tmp_path / "runs"
    store = RunStore(open_storage(str(root)), "again")
    req = RunRequest(cfg=tiny_cfg(), storage_uri=str(root), name="again")
    open_run(req, store)
    store.transition(RunState.STAGE1_RUNNING)
    assert open_run(req, store).state is RunState.STAGE1_RUNNING  # same command: continue
    fresh = open_run(RunRequest(cfg=tiny_cfg(), storage_uri=str(root), name="again", restart=True), store)
    assert fresh.state is RunState.NEW and fresh.attempt == 3  # started, continued, started over
    assert fresh.generation == 3  # each open claimed the run: a worker of the first attempt can no longer write


def test_fault_hook_reads_several_faults(tmp_path):
    hook = FaultHook.from_env({"DEIM_RAY_FAULT": "mid_epoch:0:1, upload:3:0", "DEIM_RAY_FAULT_DIR": str(tmp_path)})
    assert hook.faults == [Fault("mid_epoch", 0, 1), Fault("upload", 3, 0)]
    assert FaultHook.from_env({}) is None
    with pytest.raises(ValueError, match="not one of"):
        FaultHook.from_env({"DEIM_RAY_FAULT": "somewhere:0:0", "DEIM_RAY_FAULT_DIR": str(tmp_path)})


def test_a_worker_error_of_ours_reaches_the_user_as_its_own_line():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from deim_ray.data.errors import DataError
    from deim_ray.driver.stage_job import worker_error as _worker_error

    bad = DataError("image x.jpg could not be decoded; re-encode it")
    failure = WorkerGroupError("rank 1: Traceback ...", {0: RuntimeError("gloo: peer closed"), 1: bad})
    assert _worker_error(failure) == "image x.jpg could not be decoded; re-encode it"
    assert _worker_error(WorkerGroupError("lost", {0: RuntimeError("boom")})) is None
