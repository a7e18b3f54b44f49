"""resolve_final: which checkpoint is final, and the reason in words."""

import pytest

from deim_ray.storage import (BEST_STG1, BEST_STG2, ArtifactRecord, Manifest, ResolveError, RunState,
                              format_resolution, resolve_final)


def _rec(stage, ap, epoch):
    return ArtifactRecord(uri=f"s3://b/runs/p/artifacts/best_stg{stage}.pth", sha256=f"{stage}" * 64, epoch=epoch,
                          stage=stage, ap=ap)


def test_stage2_beats_stage1():
    r = resolve_final({BEST_STG1: _rec(1, 0.412, 131), BEST_STG2: _rec(2, 0.431, 151)})
    assert (r.artifact, r.ap, r.epoch, r.stage) == (BEST_STG2, 0.431, 151, 2)
    assert r.reason == "stage 2 beat stage 1 (0.431 > 0.412 AP)"
    assert r.record.sha256 == "2" * 64


def test_tie_goes_to_stage2():
    r = resolve_final({BEST_STG1: _rec(1, 0.412, 131), BEST_STG2: _rec(2, 0.412, 149)})
    assert r.artifact == BEST_STG2 and r.epoch == 149
    assert "tie goes to stage 2" in r.reason


def test_stage2_never_beats_stage1():
    r = resolve_final({BEST_STG1: _rec(1, 0.412, 131), BEST_STG2: _rec(2, 0.398, 150)})
    assert (r.artifact, r.ap, r.epoch, r.stage) == (BEST_STG1, 0.412, 131, 1)
    assert r.reason == "stage 2 never beat stage 1 (best 0.398 < 0.412 AP); keeping best_stg1"


def test_close_values_are_printed_apart():
    r = resolve_final({BEST_STG1: _rec(1, 0.41201, 131), BEST_STG2: _rec(2, 0.41204, 150)})
    assert r.artifact == BEST_STG2 and "0.41204 > 0.41201" in r.reason


@pytest.mark.parametrize("stg2", [None, _rec(2, None, 150), _rec(2, float("nan"), 150)])
def test_run_ended_in_stage1(stg2):
    r = resolve_final({BEST_STG1: _rec(1, 0.3, 40), BEST_STG2: stg2, "last": _rec(2, 0.9, 41)})
    assert r.artifact == BEST_STG1 and r.reason.startswith("run ended in stage 1")


def test_stage2_without_any_improvement_says_so():
    r = resolve_final({BEST_STG1: _rec(1, 0.3, 40), BEST_STG2: None}, reached_stage2=True)
    assert r.artifact == BEST_STG1 and r.reason.startswith("stage 2 never beat stage 1 (no best_stg2)")


def test_no_best_checkpoint_is_a_clear_error():
    with pytest.raises(ResolveError, match="no validated best checkpoint"):
        resolve_final({BEST_STG1: None, BEST_STG2: None, "last": _rec(1, 0.5, 3)})
    with pytest.raises(ResolveError):
        resolve_final({})


def test_format_resolution_done_and_in_progress():
    m = Manifest.new(name="person-n", config_sha256="c", epochs=160, stop_epoch=148)
    assert "no final artifact yet" in format_resolution(m)
    m.artifacts[BEST_STG1] = _rec(1, 0.412, 131)
    m.state = RunState.STAGE2_RUNNING
    text = format_resolution(m)
    assert "STAGE2_RUNNING" in text and "best_stg1" in text and "run ended in stage 1" in text
    m.state = RunState.DONE
    m.final = {"artifact": BEST_STG2, "uri": "s3://b/runs/person-n/artifacts/final.pth", "sha256": "f" * 64,
               "ap": 0.431, "epoch": 151, "stage": 2, "reason": "stage 2 beat stage 1 (0.431 > 0.412 AP)"}
    text = format_resolution(m)
    for part in ("run person-n: DONE", "final: best_stg2 -> s3://b/runs/person-n/artifacts/final.pth",
                 "AP 0.4310 at epoch 151 (stage 2)", "reason: stage 2 beat stage 1 (0.431 > 0.412 AP)"):
        assert part in text
