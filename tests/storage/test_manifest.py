"""manifest.json: the public JSON contract and the run state machine."""

import json

import pytest

from deim_ray.storage import (ARTIFACT_NAMES, BEST_STG1, BEST_STG2, FINAL, LAST, LEGAL_TRANSITIONS, ArtifactRecord,
                              Manifest, ManifestError, RunState, artifact_key)

CONTRACT = ["schema", "name", "state", "config_sha256", "epochs", "stop_epoch", "switch", "artifacts", "final"]


def _record(epoch=131, stage=1, ap=0.412):
    return ArtifactRecord(uri=f"s3://b/runs/p/artifacts/x{epoch}.pth", sha256="ab" * 32, epoch=epoch, stage=stage,
                          ap=ap, size=10, key="artifacts/x.pth", updated_at="2026-01-01T00:00:00Z")


def test_new_manifest_has_every_contract_key():
    data = json.loads(Manifest.new(name="person-n", config_sha256="c" * 64, epochs=160, stop_epoch=148).dumps())
    assert list(data)[: len(CONTRACT)] == CONTRACT
    assert data["schema"] == 1 and data["state"] == "NEW" and data["name"] == "person-n"
    assert (data["epochs"], data["stop_epoch"], data["switch"], data["final"]) == (160, 148, None, None)
    assert data["artifacts"] == {"best_stg1": None, "best_stg2": None, "last": None, "final": None}
    assert data["transitions"][0]["state"] == "NEW" and data["transitions"][0]["time"].endswith("Z")


def test_design_example_round_trips():
    """The example manifest of DESIGN.md parses, and writing it back keeps every key and value."""
    rec = {"uri": "s3://b/runs/person-n/artifacts/best_stg1.pth", "sha256": "1" * 64, "epoch": 131, "stage": 1,
           "ap": 0.412}
    rec2 = dict(rec, uri=rec["uri"].replace("stg1", "stg2"), sha256="2" * 64, epoch=151, stage=2, ap=0.431)
    doc = {"schema": 1, "name": "person-n", "state": "DONE", "config_sha256": "c" * 64, "epochs": 160,
           "stop_epoch": 148, "switch": {"epoch": 148, "from": "best_stg1", "sha256": "1" * 64},
           "artifacts": {"best_stg1": rec, "best_stg2": rec2, "last": rec2, "final": dict(rec2, sha256="3" * 64)},
           "final": {"artifact": "best_stg2", "uri": "s3://b/runs/person-n/artifacts/final.pth", "ap": 0.431,
                     "epoch": 151, "stage": 2, "reason": "stage 2 beat stage 1 (0.431 > 0.412 AP)"},
           "from_a_newer_version": {"kept": True}}
    manifest = Manifest.loads(json.dumps(doc))
    assert manifest.state is RunState.DONE and manifest.artifacts[BEST_STG2].ap == 0.431
    back = json.loads(manifest.dumps())
    for key, value in doc.items():
        if key != "artifacts":
            assert back[key] == value, key
    for name, value in doc["artifacts"].items():
        assert {k: back["artifacts"][name][k] for k in value} == value


def test_artifact_names_and_keys():
    assert (LAST, BEST_STG1, BEST_STG2, FINAL) == ("last", "best_stg1", "best_stg2", "final")
    assert set(ARTIFACT_NAMES) == {LAST, BEST_STG1, BEST_STG2, FINAL}
    assert artifact_key(BEST_STG1) == "artifacts/best_stg1.pth"
    with pytest.raises(ManifestError, match="best_stg1"):
        artifact_key("../evil")


def _walk(manifest, *states):
    for state in states:
        if state is RunState.STAGE1_DONE:
            manifest.artifacts[BEST_STG1] = _record()
        if state is RunState.STAGE2_RUNNING:
            manifest.switch = {"epoch": 148, "from": BEST_STG1, "sha256": "ab" * 32}
        if state is RunState.DONE:
            manifest.final = {"artifact": BEST_STG1, "reason": "run ended in stage 1"}
        manifest.advance(state, note=f"to {state.value}")


def test_happy_path_and_resumes_are_recorded():
    m = Manifest.new(name="r", config_sha256="c", epochs=4, stop_epoch=2)
    S = RunState
    _walk(m, S.STAGE1_RUNNING, S.STAGE1_RUNNING, S.FAILED, S.STAGE1_RUNNING, S.STAGE1_DONE, S.STAGE2_RUNNING,
          S.FAILED, S.STAGE2_RUNNING, S.DONE)
    assert m.state is S.DONE
    assert [t["state"] for t in m.transitions] == ["NEW", "STAGE1_RUNNING", "STAGE1_RUNNING", "FAILED",
                                                   "STAGE1_RUNNING", "STAGE1_DONE", "STAGE2_RUNNING", "FAILED",
                                                   "STAGE2_RUNNING", "DONE"]
    assert m.transitions[-1]["note"] == "to DONE"


@pytest.mark.parametrize("path, illegal", [
    ([], RunState.STAGE2_RUNNING), ([], RunState.DONE), ([], RunState.STAGE1_DONE),
    ([RunState.STAGE1_RUNNING], RunState.NEW), ([RunState.STAGE1_RUNNING], RunState.STAGE2_RUNNING),
    ([RunState.STAGE1_RUNNING, RunState.STAGE1_DONE], RunState.STAGE1_RUNNING),
    ([RunState.STAGE1_RUNNING, RunState.STAGE1_DONE, RunState.STAGE2_RUNNING, RunState.DONE], RunState.FAILED),
    ([RunState.FAILED], RunState.DONE),
])
def test_illegal_transitions_are_refused(path, illegal):
    m = Manifest.new(name="r", config_sha256="c", epochs=4, stop_epoch=2)
    _walk(m, *path)
    before = json.loads(m.dumps())
    with pytest.raises(ManifestError, match=f"cannot go from {m.state.value} to {illegal.value}"):
        m.advance(illegal)
    assert json.loads(m.dumps()) == before
    assert illegal not in LEGAL_TRANSITIONS[m.state]


def test_a_run_stopped_in_stage1_may_finish_with_a_final():
    m = Manifest.new(name="r", config_sha256="c", epochs=4, stop_epoch=2)
    m.advance(RunState.STAGE1_RUNNING)
    with pytest.raises(ManifestError, match="final"):
        m.advance(RunState.DONE)
    m.final = {"artifact": "best_stg1", "reason": "run ended in stage 1"}
    m.advance(RunState.DONE)
    assert m.state is RunState.DONE


def test_durable_states_need_their_records():
    m = Manifest.new(name="r", config_sha256="c", epochs=4, stop_epoch=2)
    m.advance(RunState.STAGE1_RUNNING)
    with pytest.raises(ManifestError, match="best_stg1"):
        m.advance(RunState.STAGE1_DONE)
    m.artifacts[BEST_STG1] = _record()
    m.advance(RunState.STAGE1_DONE)
    with pytest.raises(ManifestError, match="switch"):
        m.advance(RunState.STAGE2_RUNNING)
    m.switch = {"epoch": 2, "from": BEST_STG1, "sha256": "ab" * 32}
    m.advance(RunState.STAGE2_RUNNING)
    with pytest.raises(ManifestError, match="final"):
        m.advance(RunState.DONE)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"), ("[]", "not a JSON object"), ('{"schema": 1}', "lacks"),
])
def test_unreadable_manifests(text, match):
    with pytest.raises(ManifestError, match=match):
        Manifest.loads(text)


def test_newer_schema_and_unknown_state_are_refused():
    data = json.loads(Manifest.new(name="r", config_sha256="c", epochs=4, stop_epoch=2).dumps())
    with pytest.raises(ManifestError, match="upgrade"):
        Manifest.from_json(dict(data, schema=2))
    with pytest.raises(ManifestError, match="PAUSED"):
        Manifest.from_json(dict(data, state="PAUSED"))


def test_nan_ap_cannot_reach_the_json():
    m = Manifest.new(name="r", config_sha256="c", epochs=4, stop_epoch=2)
    m.artifacts[LAST] = _record(ap=float("nan"))
    with pytest.raises(ValueError):
        m.dumps()
