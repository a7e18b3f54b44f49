"""Fixtures of the data-layer tests: one generated shapes dataset per session."""

from __future__ import annotations

import pytest
import torch

from deim_ray.config.schema import SplitConfig
from deim_ray.data.synthetic import generate_shapes
from tests.data.helpers import SHAPES


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine's cores are shared; intra-op threads only add contention for these small tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> tuple[SplitConfig, SplitConfig]:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), SHAPES)
