"""storage layer: `resolve_final`, which checkpoint of a run is final and why (a pure function).

The highest validated AP wins between `best_stg1` and `best_stg2`; a tie goes to stage 2 (it trained on
clean data at the deployment size); a run with no `best_stg2` resolves to `best_stg1` and says so. The reason
is plain words and is written into the manifest's `final.reason`.

A run with stage-2 branches resolves across best_stg1 and every branch's best_stg2 by the same rule (a tie
between branches goes to the lower index: b0 holds the config's own settings); the reason names the winning
branch and its settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deim_ray.config.schedule import BEST_STG1, BEST_STG2
from deim_ray.storage.errors import ResolveError
from deim_ray.storage.manifest import ArtifactRecord, BranchRecord, Manifest, RunState, finite_ap


@dataclass(frozen=True)
class Resolution:
    artifact: str
    """The winning artifact name: best_stg1 or best_stg2."""
    ap: float
    epoch: int
    stage: int
    reason: str
    """Why, in words, e.g. "stage 2 beat stage 1 (0.431 > 0.412 AP)"."""
    record: ArtifactRecord
    branch: str | None = None
    """The stage-2 branch whose best_stg2 won (runs with branches only)."""


def _pair(a: float, b: float) -> tuple[str, str]:
    """Both APs with enough decimals (3 to 6) that unequal values never print the same."""
    for digits in range(3, 7):
        sa, sb = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if sa != sb or a == b:
            return sa, sb
    return f"{a!r}", f"{b!r}"


def _pick(name: str, record: ArtifactRecord, reason: str, branch: str | None = None) -> Resolution:
    return Resolution(artifact=name, ap=finite_ap(record.ap), epoch=record.epoch, stage=record.stage,
                      reason=reason, record=record, branch=branch)


def resolve_final(artifacts: Mapping[str, ArtifactRecord | None], reached_stage2: bool = False,
                  branches: Sequence[BranchRecord] | None = None) -> Resolution:
    """Choose the final artifact among `artifacts[best_stg1]` and `artifacts[best_stg2]`, or, when the run has
    stage-2 `branches`, among best_stg1 and each branch's best_stg2 (see module doc). `reached_stage2` (the run
    switched to stage 2) only changes the words of the reason.

    A record whose AP is missing or not finite was never validated and cannot win. ResolveError when no
    best checkpoint is usable.
    """
    if branches:
        return _resolve_branches(artifacts.get(BEST_STG1), branches)
    s1, s2 = artifacts.get(BEST_STG1), artifacts.get(BEST_STG2)
    ap1 = finite_ap(s1.ap) if s1 else None
    ap2 = finite_ap(s2.ap) if s2 else None
    if ap1 is None and ap2 is None:
        raise ResolveError("no validated best checkpoint (best_stg1 and best_stg2 are missing or have no AP): "
                           "the run has not finished an evaluated epoch yet; train or resume it first")
    if ap2 is None:
        why = "stage 2 never beat stage 1 (no best_stg2)" if reached_stage2 else "run ended in stage 1 (no best_stg2)"
        return _pick(BEST_STG1, s1, f"{why}; keeping best_stg1 ({ap1:.3f} AP at epoch {s1.epoch})")
    if ap1 is None:
        return _pick(BEST_STG2, s2, f"no validated best_stg1; keeping best_stg2 ({ap2:.3f} AP at epoch {s2.epoch})")
    t2, t1 = _pair(ap2, ap1)
    if ap2 > ap1:
        return _pick(BEST_STG2, s2, f"stage 2 beat stage 1 ({t2} > {t1} AP)")
    if ap2 == ap1:
        return _pick(BEST_STG2, s2, f"stage 2 tied stage 1 ({t2} = {t1} AP); a tie goes to stage 2")
    return _pick(BEST_STG1, s1, f"stage 2 never beat stage 1 (best {t2} < {t1} AP); keeping best_stg1")


def branch_settings(branch: BranchRecord) -> str:
    """A branch's settings in words, e.g. `schedule.ema_restart_decay=0.999, schedule.no_aug_epochs=4`."""
    if not branch.params:
        return "the config's own settings"
    return ", ".join(f"{key}={value}" for key, value in branch.params.items())


def _resolve_branches(s1: ArtifactRecord | None, branches: Sequence[BranchRecord]) -> Resolution:
    ap1 = finite_ap(s1.ap) if s1 else None
    scored = [(_best_ap(b), -i, b) for i, b in enumerate(branches) if _best_ap(b) is not None]
    if not scored:
        if ap1 is None:
            raise ResolveError("no validated best checkpoint (no best_stg1 and no branch's best_stg2): the run has "
                               "not finished an evaluated epoch yet; train or resume it first")
        return _pick(BEST_STG1, s1, f"no stage-2 branch beat stage 1 ({len(branches)} branches, no best_stg2); "
                                    f"keeping best_stg1 ({ap1:.3f} AP at epoch {s1.epoch})")
    ap, _, win = max(scored, key=lambda t: t[:2])
    others = ", ".join(f"{b.name} {_best_ap(b):.3f}" if _best_ap(b) is not None else f"{b.name} -"
                       for b in branches if b is not win)
    where = f"branch {win.name} ({branch_settings(win)})"
    if ap1 is None:
        return _pick(BEST_STG2, win.best, f"no validated best_stg1; {where} leads with {ap:.3f} AP (others: "
                                          f"{others})", branch=win.name)
    if ap < ap1:
        return _pick(BEST_STG1, s1, f"no stage-2 branch beat stage 1 (best {where}: {ap:.3f} < {ap1:.3f} AP); "
                                    "keeping best_stg1")
    t2, t1 = _pair(ap, ap1)
    verb = "beat" if ap > ap1 else "tied (a tie goes to stage 2)"
    return _pick(BEST_STG2, win.best, f"stage 2 {where} {verb} stage 1 ({t2} vs {t1} AP) and the other "
                                      f"branches ({others})", branch=win.name)


def _best_ap(branch: BranchRecord) -> float | None:
    return finite_ap(branch.best.ap) if branch.best else None


def _branch_lines(manifest: Manifest) -> list[str]:
    """One line per stage-2 branch: state, best AP (`-` when it never beat stage 1) and settings."""
    lines = []
    for b in manifest.stage2_branches or ():
        aps = [finite_ap(a) for a in b.epoch_aps.values()]
        top = max((a for a in aps if a is not None), default=None)
        lines.append(f"  branch {b.name}: {b.state}, best_stg2 AP {_ap(_best_ap(b))}, best epoch AP {_ap(top)} "
                     f"over {len(aps)} epoch(s); {branch_settings(b)}")
    return lines


def format_resolution(manifest: Manifest) -> str:
    """Human summary for `deim-ray resolve`: final artifact, URI, AP/epoch/stage and the reason.

    A finished run shows the recorded `final`; an unfinished one shows what would win right now.
    """
    head = f"run {manifest.name}: {manifest.state.value}"
    if manifest.final:
        f = manifest.final
        lines = [head, f"final: {f.get('artifact')} -> {f.get('uri')}"]
        if f.get("sha256"):
            lines.append(f"  sha256 {f['sha256']}")
        lines += [f"  AP {_ap(f.get('ap'))} at epoch {f.get('epoch')} (stage {f.get('stage')})",
                  f"  reason: {f.get('reason')}", *_branch_lines(manifest)]
        return "\n".join(lines)
    try:
        r = resolve_final(manifest.artifacts, reached_stage2=manifest.switch is not None,
                          branches=manifest.stage2_branches)
    except ResolveError as e:
        return f"{head}\nno final artifact yet: {e}"
    status = "not finished" if manifest.state is not RunState.FAILED else "failed"
    leading = f"{r.branch}/{r.artifact}" if r.branch else r.artifact
    return "\n".join([f"{head} ({status}; this is what would win now)",
                      f"leading: {leading} -> {r.record.uri}", f"  sha256 {r.record.sha256}",
                      f"  AP {_ap(r.ap)} at epoch {r.epoch} (stage {r.stage})", f"  reason: {r.reason}",
                      *_branch_lines(manifest)])


def _ap(ap) -> str:
    value = finite_ap(ap)
    return "-" if value is None else f"{value:.4f}"
