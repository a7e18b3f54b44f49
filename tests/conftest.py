"""Shared pytest fixtures: a real S3-compatible server and a real local Ray instance."""

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_ray"]
