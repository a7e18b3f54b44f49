"""Test payloads shared by the storage tests: deterministic files, hashes, out-of-band object damage."""

import hashlib
import random


def write_file(path, size: int, seed: int = 0) -> bytes:
    """Write `size` deterministic pseudo-random bytes to `path` and return them."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def overwrite_behind_our_back(storage, key: str, data: bytes) -> None:
    """Replace an object without going through `storage` (another tool, a bit flip at rest)."""
    import os

    from deim_ray.storage.local import LocalStorage

    from tests.fixtures_s3 import s3_client

    if isinstance(storage, LocalStorage):
        (storage.root / key).write_bytes(data)
        return
    full = f"{storage.prefix}/{key}" if storage.prefix else key
    s3_client(os.environ["AWS_ENDPOINT_URL_S3"]).put_object(Bucket=storage.bucket, Key=full, Body=data)
