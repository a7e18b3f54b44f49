"""Driver-test helpers: the tiny config pointed at a per-session synthetic dataset."""

import pytest

from deim_ray.config.loader import load_config

TINY = "configs/demo/tiny.yml"


def data_overrides(root) -> list[str]:
    return [f"data.train.img_folder={root}/train", f"data.train.ann_file={root}/annotations/train.json",
            f"data.val.img_folder={root}/val", f"data.val.ann_file={root}/annotations/val.json"]


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_data") / "shapes"


@pytest.fixture(scope="session")
def tiny_cfg(tiny_data_root):
    def make(*overrides):
        return load_config(TINY, [*data_overrides(tiny_data_root), *overrides])
    return make
