"""driver layer: the one line a re-run prints about where it picks up (pure: reads a manifest, writes nothing).

    run demo: attempt 2 continues in runs/demo; done: stage 1 (best_stg1 epoch 5, AP 0.312), epochs 0-9 committed;
    continues stage 2 at epoch 10 from the last committed epoch

One function per state a run can be re-entered in; a FAILED run says so and continues the stage that failed.
"""

from __future__ import annotations

from deim_ray.config.schedule import BEST_STG1, LAST, stage_of
from deim_ray.storage import Manifest, RunState
from deim_ray.storage.manifest import BranchRecord


def pickup_line(manifest: Manifest, uri: str) -> str:
    """Attempt, what is done and what this driver continues with, for a run being continued."""
    done, next_step = _progress(manifest)
    failed = "the last attempt FAILED; " if manifest.state is RunState.FAILED else ""
    return (f"run {manifest.name}: attempt {manifest.attempt} continues in {uri}; {failed}done: {done}; "
            f"continues {next_step}")


def _progress(m: Manifest) -> tuple[str, str]:
    last = m.artifacts.get(LAST)
    if m.switch is None:  # stage 1 unfinished (NEW, STAGE1_RUNNING or failed in stage 1)
        if last is None:
            return "no epoch committed yet", "stage 1 from epoch 0"
        return (f"{_epochs(0, last.epoch)} of stage 1 committed{_best(m)}",
                f"stage 1 at epoch {last.epoch + 1} from the last committed epoch")
    stage1 = f"stage 1 (best_stg1 epoch {m.switch.get('best_stg1_epoch')}, AP {m.switch.get('best_stg1_ap', 0):.4f})"
    if m.stage2_branches:
        return stage1 + ", " + ", ".join(_branch(b) for b in m.stage2_branches), \
            f"the {sum(b.state != 'DONE' for b in m.stage2_branches)} unfinished stage-2 branch(es)"
    if last is None or last.stage != 2:
        return stage1, f"stage 2 at epoch {m.stop_epoch} from best_stg1"
    return (f"{stage1}, {_epochs(m.stop_epoch, last.epoch)} of stage 2 committed",
            f"stage 2 at epoch {last.epoch + 1} from the last committed epoch")


def _epochs(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def _best(m: Manifest) -> str:
    best = m.artifacts.get(BEST_STG1)
    return f" (best so far epoch {best.epoch}, AP {best.ap:.4f})" if best is not None and best.ap is not None else ""


def _branch(b: BranchRecord) -> str:
    last = b.artifacts.get(LAST)
    return f"{b.name} {b.state}" + (f" at epoch {last.epoch}" if last is not None and b.state != "DONE" else "")


def position(manifest: Manifest | None) -> str:
    """Where a run stands for the line of an interrupted command: `epoch E of stage S`, E the epoch in progress
    (the one after the last committed, of the run or any stage-2 branch), or `start-up` before a manifest."""
    if manifest is None:
        return "start-up"
    lasts = [r for r in (manifest.artifacts.get(LAST), *(b.artifacts.get(LAST) for b in manifest.stage2_branches
                                                         or ())) if r is not None]
    epoch = max((r.epoch + 1 for r in lasts), default=0)
    return f"epoch {epoch} of stage {int(stage_of(epoch, manifest.stop_epoch))}"
