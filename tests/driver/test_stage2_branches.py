"""Stage-2 branches without Ray: the space (default, validation), the draw, branch configs and the resource plan."""

import pytest

from deim_ray.config.loader import config_sha256, diff_configs, load_config, override_config
from deim_ray.config.validate import validate
from deim_ray.driver.stage2_branches import (STAGE2_KEYS, branch_config, default_space, plan_resources,
                                             sample_branches, stage2_space)
from deim_ray.driver.tune_space import SpaceError
from deim_ray.engine.lr import flat_cosine_factor

DEMO = "configs/demo/shapes.yml"


@pytest.fixture(scope="module")
def demo():
    return load_config(DEMO)


def test_default_space_varies_decay_length_and_tail_lr_around_the_config(demo):
    space = default_space(demo)
    assert space == {"schedule.ema_restart_decay": {"choice": [0.98, 0.99, 0.995]},
                     "schedule.no_aug_epochs": {"choice": [4, 7, 10]},
                     "lr_scheduler.tail_lr_factor": {"choice": [0.25, 0.5, 1.0]}}
    assert stage2_space(demo).keys == tuple(space)


def test_branch_zero_is_the_config_and_the_others_differ_and_repeat_on_a_rerun(demo):
    points = sample_branches(demo, 5)
    assert points[0] == {} and config_sha256(branch_config(demo, {})) == config_sha256(demo)
    assert points == sample_branches(demo, 5)  # seeded by train.seed: a restarted driver draws the same
    settings = {config_sha256(branch_config(demo, p)) for p in points}
    assert len(settings) == 5
    for point in points[1:]:
        assert point and set(point) <= set(STAGE2_KEYS)
        assert all(value != default for key, value in point.items()
                   for default in [{"schedule.ema_restart_decay": 0.99, "schedule.no_aug_epochs": 7,
                                    "lr_scheduler.tail_lr_factor": 0.5}[key]])
    other_seed = override_config(demo, {"train.seed": 1})
    assert sample_branches(other_seed, 5) != points


def test_a_longer_stage2_keeps_every_stage1_value(demo):
    cfg = branch_config(demo, {"schedule.no_aug_epochs": 10, "schedule.ema_restart_decay": 0.995,
                               "data.image_size": [192, 192]})
    assert (cfg.schedule.stop_epoch, cfg.schedule.epochs, cfg.lr_scheduler.no_aug_epoch) == (8, 18, 10)
    assert cfg.lr_scheduler.flat_epoch == demo.lr_scheduler.flat_epoch
    assert cfg.augment.policy_epoch == demo.augment.policy_epoch
    assert diff_configs(demo, cfg) == ["data.image_size", "lr_scheduler.no_aug_epoch", "schedule.ema_restart_decay",
                                       "schedule.epochs", "schedule.no_aug_epochs"]
    validate(cfg, workers=2)
    # the LR of every stage-1 iteration is the base config's
    for t in range(0, 8 * 24, 7):
        assert flat_cosine_factor(t, cfg.lr_scheduler, 18, 24) == flat_cosine_factor(t, demo.lr_scheduler, 15, 24)


def test_tail_lr_factor_sets_only_the_stage2_lr(demo):
    cfg = branch_config(demo, {"lr_scheduler.tail_lr_factor": 0.2})
    iters = 24
    stage1 = [flat_cosine_factor(t, cfg.lr_scheduler, 15, iters) for t in range(8 * iters)]
    assert stage1 == [flat_cosine_factor(t, demo.lr_scheduler, 15, iters) for t in range(8 * iters)]
    assert flat_cosine_factor(8 * iters, demo.lr_scheduler, 15, iters) == 0.5
    assert flat_cosine_factor(8 * iters, cfg.lr_scheduler, 15, iters) == 0.2
    assert flat_cosine_factor(15 * iters - 1, cfg.lr_scheduler, 15, iters) == 0.2


@pytest.mark.parametrize("raw, fragment", [
    ({"optimizer.lr": {"choice": [1e-3, 2e-3]}}, "`optimizer.lr` is not a stage-2 key"),
    ({"schedule.stop_epoch": {"choice": [6, 7]}}, "`schedule.stop_epoch` is not a stage-2 key"),
    ({"schedule.ema_restart_decay": {"choice": [0.99, 1.5]}}, "schedule.ema_restart_decay` = 1.5"),
    ({"schedule.no_aug_epochs": {"choice": [0, 3]}}, "is not a number of epochs"),
    ({"data.image_size": {"choice": [[160, 160], [150, 150]]}}, "multiples of 32"),
    ({"lr_scheduler.tail_lr_factor": {"uniform": [0.5, 0.1]}}, "low < high"),
    ({"schedule.ema_restart_decay": {"normal": [0.9, 1]}}, "unknown distribution"),
    ({"schedule.ema_restart_decays": {"choice": [0.9]}}, "did you mean `schedule.ema_restart_decay`"),
])
def test_bad_stage2_search_is_a_one_line_error(demo, raw, fragment):
    cfg = override_config(demo, {"stage2_search": raw})
    with pytest.raises(SpaceError, match="stage2_search") as err:
        stage2_space(cfg)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_stage2_search_section_is_drawn_from(demo):
    cfg = override_config(demo, {"stage2_search": {"data.image_size": {"grid": [[192, 192], [224, 224]]},
                                                   "schedule.stage2_restart": {"choice": [False]}}})
    points = sample_branches(cfg, 3)
    assert points == [{}, {"data.image_size": [192, 192], "schedule.stage2_restart": False},
                      {"data.image_size": [224, 224], "schedule.stage2_restart": False}]
    assert branch_config(cfg, points[2]).data.image_size == (224, 224)


def test_the_branches_share_the_stage_workers(demo):
    # the 2-core box: 2 workers for 3 branches -> 1 worker each, all at once, at 2/3 CPU
    small = plan_resources(demo, 3, workers=2, gpu=False, cpus_per_worker=1.0, cluster={"CPU": 2.0})
    assert (small.workers, small.cpus_per_worker, small.parallel) == (1, 0.6666, 3)
    assert 3 * small.cpus_per_worker <= 2.0  # rounded down: all three fit, none waits for another to end
    # a big CPU cluster: each branch keeps full CPUs; the batch (8) must divide by the workers of a branch
    plan = plan_resources(demo, 2, workers=8, gpu=False, cpus_per_worker=2.0, cluster={"CPU": 64.0})
    assert (plan.workers, plan.cpus_per_worker, plan.parallel) == (4, 2.0, 2)
    odd = plan_resources(demo, 2, workers=6, gpu=False, cpus_per_worker=1.0, cluster={"CPU": 8.0})
    assert odd.workers == 2  # 3 does not divide the batch of 8
    # GPUs: each branch keeps --workers GPUs (the per-GPU batch as configured); the rest wait for a slot
    gpu = plan_resources(demo, 4, workers=2, gpu=True, cpus_per_worker=4.0, cluster={"CPU": 32.0, "GPU": 4.0})
    assert (gpu.workers, gpu.cpus_per_worker, gpu.parallel) == (2, 4.0, 2)
    assert plan_resources(demo, 3, workers=8, gpu=True, cpus_per_worker=1.0, cluster={"GPU": 8.0}).parallel == 1


def test_a_continued_run_keeps_its_number_of_branches(demo):
    from deim_ray.driver.branch_run import check_branch_request
    from deim_ray.driver.run import RunError, RunRequest
    from deim_ray.storage import ArtifactRecord, Manifest
    from deim_ray.storage.manifest import BranchRecord

    m = Manifest.new(name="r", config_sha256="c", epochs=15, stop_epoch=8)
    check_branch_request(RunRequest(cfg=demo, name="r", stage2_branches=3), m)  # stage 2 not started: any K
    m.stage2_branches = [BranchRecord(name=f"b{i}", params={}) for i in range(3)]
    check_branch_request(RunRequest(cfg=demo, name="r", stage2_branches=3), m)
    for k in (1, 2):
        with pytest.raises(RunError, match="started stage 2 with --stage2-branches 3"):
            check_branch_request(RunRequest(cfg=demo, name="r", stage2_branches=k), m)
    check_branch_request(RunRequest(cfg=demo, name="r", stage2_branches=2, restart=True), m)
    m.stage2_branches = None
    m.artifacts["last"] = ArtifactRecord(uri="u", sha256="s", epoch=9, stage=2, ap=0.1)
    with pytest.raises(RunError, match="with --stage2-branches 1"):
        check_branch_request(RunRequest(cfg=demo, name="r", stage2_branches=3), m)
    bad = override_config(demo, {"stage2_search": {"optimizer.lr": {"choice": [1e-3]}}})
    with pytest.raises(SpaceError):  # checked even for K = 1: a typo in the section is not silently ignored
        check_branch_request(RunRequest(cfg=bad, name="r"), None)
