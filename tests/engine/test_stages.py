"""The best-checkpoint rule, epoch by epoch, including the upstream consequences it must keep."""

from deim_ray.config.schedule import BEST_STG1, BEST_STG2, Stage, stage_epochs, stage_of
from deim_ray.engine.stages import BestTracker


def run(aps, stop_epoch, restart=True):
    t = BestTracker()
    out = []
    for epoch, ap in enumerate(aps):
        d = t.update(epoch, ap, stage_of(epoch, stop_epoch), restart)
        out.append((d.save, d.restart_from_stg1))
    return t, out


def test_stage_ranges_and_boundaries():
    assert list(stage_epochs(Stage.ONE, 8, 5)) == [0, 1, 2, 3, 4]
    assert list(stage_epochs(Stage.TWO, 8, 5)) == [5, 6, 7]
    assert stage_of(4, 5) is Stage.ONE and stage_of(5, 5) is Stage.TWO


def test_stage1_first_epoch_always_writes_best_even_at_zero_ap():
    _, out = run([0.0], stop_epoch=3)
    assert out == [(BEST_STG1, False)]


def test_stage1_only_strict_improvements_write_best():
    t, out = run([0.1, 0.3, 0.3, 0.2, 0.4], stop_epoch=5)
    assert [s for s, _ in out] == [BEST_STG1, BEST_STG1, None, None, BEST_STG1]
    assert t.stage_best["1"] == {"epoch": 4, "ap": 0.4}
    assert t.top1 == 0.4


def test_stage2_beating_stage1_writes_best_stg2():
    t, out = run([0.1, 0.3, 0.35, 0.36], stop_epoch=2)
    assert out[2] == (BEST_STG2, False) and out[3] == (BEST_STG2, False)
    assert t.stage_best["2"] == {"epoch": 3, "ap": 0.36}


def test_stage2_never_beats_stage1_restarts_and_writes_nothing():
    # epoch 2 is worse than best_stg1 -> restart; epoch 3 is the first after a reset: accepted as local best
    # without a restart even though it is worse than best_stg1; epoch 4 is worse than it -> restart.
    t, out = run([0.1, 0.3, 0.2, 0.25, 0.24], stop_epoch=2)
    assert out[2:] == [(None, True), (None, False), (None, True)]
    assert "2" not in t.stage_best and t.top1 == 0.3


def test_stage2_restart_can_be_turned_off():
    _, out = run([0.1, 0.3, 0.2, 0.25], stop_epoch=2, restart=False)
    assert all(not r for _, r in out)


def test_tie_with_best_is_not_an_improvement():
    _, out = run([0.1, 0.3, 0.3], stop_epoch=2)
    assert out[2] == (None, True)


def test_state_round_trip_keeps_history():
    t, _ = run([0.1, 0.3, 0.2], stop_epoch=2)
    t2 = BestTracker.from_state(t.state_dict())
    assert t2 == t
    # a resumed tracker continues with the same decisions as an uninterrupted one
    assert t2.update(3, 0.28, Stage.TWO) == t.update(3, 0.28, Stage.TWO)
