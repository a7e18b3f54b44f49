"""Tests of the storage layer (deim_ray.storage)."""
