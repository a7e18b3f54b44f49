"""Fixtures of the storage tests: the same test runs on a local directory and on the real S3 server."""

import pytest

from deim_ray.storage import open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    """A fresh storage root: a temp directory, or `s3://<fresh bucket>/root` on the SeaweedFS fixture."""
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/root")

