"""A real local Ray instance (2 CPUs) shared by the tests of one session."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    from deim_ray.driver.ray_stage import ensure_ray

    ensure_ray(resources={"train_driver": 2})  # Tune tests run their trial drivers on it
    yield ray
    ray.shutdown()
