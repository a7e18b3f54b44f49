"""Shared pytest fixtures: a real S3-compatible server, a real local Ray instance, a real MLflow server."""

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_ray", "tests.fixtures_trackers"]
