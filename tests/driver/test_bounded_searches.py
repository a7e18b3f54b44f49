"""Bounded searches without Ray: `--stage2-branches` and Tune grids have a ceiling, and no two branches or trials
of a finite space are the same point."""

import pytest

from deim_ray.config.loader import config_sha256, load_config, override_config
from deim_ray.driver.stage2_branches import (MAX_BRANCHES, branch_ceiling, branch_config, check_branch_count,
                                             sample_branches)
from deim_ray.driver.tune_space import MAX_TRIALS, SpaceError, check_trial_count, parse_space

DEMO = "configs/demo/shapes.yml"


@pytest.fixture(scope="module")
def demo():
    return load_config(DEMO)


def _with_search(cfg, search: dict):
    return override_config(cfg, {"stage2_search": search})


def test_the_ceiling_is_the_distinct_points_plus_the_configs_own(demo):
    assert branch_ceiling(demo) == MAX_BRANCHES  # the default space has 3 x 3 x 3 points
    inside = _with_search(demo, {"schedule.ema_restart_decay": {"choice": [0.99, 0.995]}})  # 0.99 is the config's
    outside = _with_search(demo, {"schedule.ema_restart_decay": {"choice": [0.98, 0.995]}})
    assert branch_ceiling(inside) == 2 and branch_ceiling(outside) == 3


def test_every_branch_up_to_the_ceiling_is_distinct(demo):
    """Nine points and the config's own: the last draws can only find the one or two unused points, which a
    random draw rarely hits; they are taken from the space instead of repeating a branch."""
    cfg = _with_search(demo, {"schedule.ema_restart_decay": {"choice": [0.98, 0.995, 0.999]},
                              "schedule.no_aug_epochs": {"choice": [4, 10, 12]}})
    ceiling = branch_ceiling(cfg)
    assert ceiling == 10
    points = sample_branches(cfg, ceiling)
    assert len({config_sha256(branch_config(cfg, p)) for p in points}) == ceiling


@pytest.mark.parametrize("k, words", [(1000, ["1000", f"at most {MAX_BRANCHES}"]),
                                      (3, ["--stage2-branches 3", "only 2 distinct", "at most 2"])])
def test_too_many_branches_are_a_one_line_error(demo, k, words):
    cfg = _with_search(demo, {"schedule.ema_restart_decay": {"choice": [0.99, 0.995]}})
    with pytest.raises(SpaceError) as info:
        check_branch_count(cfg, k)
    assert all(w in str(info.value) for w in words) and "\n" not in str(info.value)
    check_branch_count(cfg, 2)
    check_branch_count(cfg, 1)


@pytest.mark.parametrize("raw, samples, fragment", [
    ({"optimizer.lr": {"grid": [0.1, 0.2]}}, 2, "only 2 distinct point"),          # an all-grid space, repeated
    ({"schedule.stop_epoch": {"choice": [3, 4]}}, 3, "only 2 distinct point"),     # more samples than choices
    ({"optimizer.lr": {"loguniform": [1e-4, 1e-2]}}, MAX_TRIALS + 1, f"more than the {MAX_TRIALS}"),
])
def test_a_search_that_would_repeat_trials_or_run_too_many_is_refused(raw, samples, fragment):
    with pytest.raises(SpaceError, match=fragment):
        check_trial_count(parse_space(raw), samples)


def test_bounded_searches_still_accept_what_fits():
    check_trial_count(parse_space({"optimizer.lr": {"grid": [0.1, 0.2]}}), 1)
    check_trial_count(parse_space({"optimizer.lr": {"loguniform": [1e-4, 1e-2]},
                                   "schedule.stop_epoch": {"grid": [3, 4]}}), 8)
    check_trial_count(parse_space({"train.seed": {"randint": [0, 4]}, "schedule.stop_epoch": {"grid": [3, 4]}}), 4)


def test_a_grid_that_repeats_a_value_is_refused():
    with pytest.raises(SpaceError, match="repeats a value"):
        parse_space({"optimizer.lr": {"grid": [0.1, 0.1]}})
