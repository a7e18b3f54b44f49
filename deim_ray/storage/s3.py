"""storage layer: `S3Storage`, objects under `s3://bucket/prefix` on AWS or any S3-compatible server.

The endpoint is `storage.endpoint_url` when set, else whatever botocore resolves (AWS_ENDPOINT_URL_S3,
AWS_ENDPOINT_URL, the profile), like every AWS tool. A custom endpoint gets path-style addressing. Requests
are SigV4 with standard-mode retries (8 attempts ride out a ~1-3 s endpoint outage). Every object carries
an x-amz-checksum-sha256 the server verifies and `Metadata={'sha256': hex}` of the whole content, which
downloads are checked against. A PUT or a completed multipart upload is atomic, so readers never see a
partial object; a failed multipart upload is aborted (or swept later with `abort_stale_uploads`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import hashlib
import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from deim_ray.config.schema import StorageConfig
from deim_ray.storage.base import (ObjectInfo, atomic_local_file, check_key, check_sha256, hash_stream, join_key,
                                   sha256_file)
from deim_ray.storage.errors import (BadStorageURI, BucketNotFound, ChecksumMismatch, EndpointUnreachable,
                                     ObjectNotFound)
from deim_ray.storage.s3_errors import S3_ERRORS, map_s3_error, public_endpoint

MB = 1 << 20
TRANSFER = TransferConfig(multipart_threshold=16 * MB, multipart_chunksize=8 * MB, max_concurrency=4)
"""Parts of 8 MB: a failed part is cheap to retry and a 300 MB checkpoint is ~38 parts."""
SHA_META = "sha256"
"""User-metadata key holding the hex sha256 of the whole object."""


def _is_aws(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _check_endpoint(url: str | None) -> None:
    parts = urlsplit(url or "")
    if url is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise BadStorageURI(f"storage.endpoint_url {public_endpoint(url)!r} is not an http(s) URL; "
                            "use e.g. http://127.0.0.1:8333 or https://s3.example.com")


def _client_config(max_attempts: int, path_style: bool) -> BotoConfig:
    return BotoConfig(signature_version="s3v4", retries={"mode": "standard", "total_max_attempts": max_attempts},
                      connect_timeout=5, read_timeout=60, tcp_keepalive=True,
                      s3={"addressing_style": "path"} if path_style else None)


class S3Storage:
    """Objects under `s3://bucket/prefix`; keys are relative to the prefix."""

    def __init__(self, bucket: str, prefix: str = "", storage_cfg: StorageConfig | None = None, *,
                 max_attempts: int = 8):
        cfg = storage_cfg or StorageConfig()
        _check_endpoint(cfg.endpoint_url)
        self.bucket, self.prefix, self.max_attempts = bucket, prefix.strip("/"), max_attempts
        self._session = boto3.session.Session(region_name=cfg.region)
        self.region_explicit = bool(cfg.region or self._session.region_name or os.environ.get("AWS_REGION"))
        self.region = cfg.region or self._session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
        # A first client only learns which endpoint botocore resolves (argument, env, profile); the real one
        # is then built with path-style addressing when that endpoint is not AWS.
        probe = self._session.client("s3", endpoint_url=cfg.endpoint_url, region_name=self.region,
                                     config=_client_config(max_attempts, path_style=False))
        self.endpoint_url: str = probe.meta.endpoint_url
        self.custom_endpoint = bool(cfg.endpoint_url) or not _is_aws(self.endpoint_url)
        self.client = self._session.client(
            "s3", endpoint_url=self.endpoint_url if self.custom_endpoint else None, region_name=self.region,
            config=_client_config(max_attempts, path_style=self.custom_endpoint))
        self._bucket_seen = False

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r}, endpoint={public_endpoint(self.endpoint_url)!r})"

    def __reduce__(self):
        # Rebuilt from location only: a pickled S3Storage (e.g. sent to Ray workers) carries no credentials.
        cfg = StorageConfig(endpoint_url=self.endpoint_url if self.custom_endpoint else None,
                            region=self.region if self.region_explicit else None)
        return functools.partial(S3Storage, max_attempts=self.max_attempts), (self.bucket, self.prefix, cfg)

    @property
    def uri(self) -> str:
        return f"s3://{join_key(self.bucket, self.prefix)}"

    def child_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _full(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _redact(self, text: str) -> str:
        creds = self._session.get_credentials()
        frozen = creds.get_frozen_credentials() if creds else None
        for secret in (frozen.secret_key, frozen.token) if frozen else ():
            if secret:
                text = text.replace(secret, "***")
        return text

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """Translate S3 exceptions raised inside the block into one-line StorageErrors."""
        try:
            yield
        except S3_ERRORS as e:
            raise map_s3_error(e, bucket=self.bucket, key=self._full(key) if key else self.prefix,
                               endpoint=public_endpoint(self.endpoint_url), attempts=self.max_attempts,
                               redact=self._redact) from e

    def _check_bucket(self) -> None:
        """Tell a missing bucket from a missing key (both answer HEAD with a bare 404)."""
        if self._bucket_seen:
            return
        with self._errors(""):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                    raise BucketNotFound(f"bucket '{self.bucket}' does not exist at "
                                         f"{public_endpoint(self.endpoint_url)}: create it (e.g. `aws s3 mb "
                                         f"s3://{self.bucket}`) or fix the storage URI") from None
                raise
        self._bucket_seen = True

    def stat(self, key: str) -> ObjectInfo | None:
        with self._errors(key):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
                self._check_bucket()
                return None
        self._bucket_seen = True
        return ObjectInfo(key=key, uri=self.child_uri(key), size=head["ContentLength"],
                          sha256=head.get("Metadata", {}).get(SHA_META))

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def _require(self, key: str) -> ObjectInfo:
        info = self.stat(key)
        if info is None:
            raise ObjectNotFound(f"{self.child_uri(key)} does not exist at {public_endpoint(self.endpoint_url)}; "
                                 "check the storage URI, run name and key")
        return info

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            data = response["Body"].read()
        check_sha256(self.child_uri(key), hashlib.sha256(data).hexdigest(),
                     response.get("Metadata", {}).get(SHA_META))
        return data

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        digest = hashlib.sha256(data)
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data,
                                   ChecksumSHA256=base64.b64encode(digest.digest()).decode(),
                                   Metadata={SHA_META: digest.hexdigest()})
        self._bucket_seen = True
        return ObjectInfo(key=key, uri=self.child_uri(key), size=len(data), sha256=digest.hexdigest())

    def upload_file(self, key: str, local_path: str | os.PathLike) -> ObjectInfo:
        """Upload (multipart above 16 MB) with per-part SHA256 checksums the server verifies; the whole-file
        sha256 goes in the metadata and is checked on the stored object afterwards."""
        if not os.path.isfile(local_path):
            raise ObjectNotFound(f"local file {local_path} does not exist; nothing to upload")
        sha, size = sha256_file(local_path)
        started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=60)
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {SHA_META: sha}}
        try:
            with self._errors(key), create_transfer_manager(self.client, TRANSFER) as manager:
                manager.upload(os.fspath(local_path), self.bucket, self._full(key), extra_args=extra).result()
        except EndpointUnreachable:
            raise  # an abort cannot get through either; `abort_stale_uploads` sweeps the parts later
        except BaseException:
            self._abort_quietly(self._full(key), started)
            raise
        stored = self._require(key)
        if stored.size != size or stored.sha256 != sha:
            raise ChecksumMismatch(f"{stored.uri} was stored with size {stored.size} / sha256 "
                                   f"{str(stored.sha256)[:16]}... instead of {size} / {sha[:16]}...; retry the upload")
        return stored

    def download_file(self, key: str, local_path: str | os.PathLike,
                      expected_sha256: str | None = None) -> ObjectInfo:
        info = self._require(key)
        expected = expected_sha256 or info.sha256

        def fill(f):
            with self._errors(key), create_transfer_manager(self.client, TRANSFER) as manager:
                manager.download(self.bucket, self._full(key), f).result()

        sha, size = atomic_local_file(local_path, fill, uri=info.uri, expected_sha256=expected)
        return ObjectInfo(key=key, uri=info.uri, size=size, sha256=sha)

    def hash_object(self, key: str) -> str:
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
            with contextlib.closing(body):
                return hash_stream(body)[0]

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        check_key(prefix, allow_empty=True)
        root = self.prefix + "/" if self.prefix else ""
        query = {"Bucket": self.bucket, "Prefix": root + prefix}
        if not recursive:
            query.update(Prefix=root + (prefix.rstrip("/") + "/" if prefix else ""), Delimiter="/")
        keys: set[str] = set()
        with self._errors(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(**query):
                # pyarrow (Ray) writes empty "folder/" marker objects: they are folders, not keys
                keys.update(o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/"))
                keys.update(p["Prefix"] for p in page.get("CommonPrefixes", []))
        return sorted(k[len(root):] for k in keys)

    def abort_stale_uploads(self, prefix: str = "", older_than: dt.timedelta = dt.timedelta(0)) -> int:
        """Abort unfinished multipart uploads under `prefix` started more than `older_than` ago (their parts
        use space but are never visible as objects). Returns how many were aborted."""
        cutoff = dt.datetime.now(dt.timezone.utc) - older_than
        full = join_key(self.prefix, check_key(prefix, allow_empty=True))
        aborted = 0
        with self._errors(prefix):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full)
            for upload in (u for page in pages for u in page.get("Uploads", [])):
                if upload["Initiated"] <= cutoff:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                    aborted += 1
        return aborted

    def _abort_quietly(self, full_key: str, since: dt.datetime) -> None:
        """Abort this key's uploads started since `since`; the server may be the thing that failed."""
        with contextlib.suppress(Exception):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                 Prefix=full_key)
            for upload in (u for page in pages for u in page.get("Uploads", [])):
                if upload["Key"] == full_key and upload["Initiated"] >= since:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=full_key,
                                                       UploadId=upload["UploadId"])

    def ray_storage(self, subdir: str):
        """`("bucket/prefix/subdir", pyarrow S3FileSystem)` for `ray.train.RunConfig`.

        The filesystem names the endpoint, scheme and region but no keys: pyarrow reads credentials from each
        node's environment or profile, so pickling it to workers ships no secret.
        """
        import pyarrow.fs as pafs

        kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts)}
        if self.custom_endpoint:
            parts = urlsplit(self.endpoint_url)
            kwargs.update(endpoint_override=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme,
                          region=self.region)
        else:
            kwargs["region"] = self.region if self.region_explicit else pafs.resolve_s3_region(self.bucket)
        return join_key(self.bucket, self.prefix, check_key(subdir)), pafs.S3FileSystem(**kwargs)
