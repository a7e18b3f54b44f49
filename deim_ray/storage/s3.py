"""storage layer: `S3Storage`, objects under `s3://bucket/prefix` on AWS or any S3-compatible server.

The endpoint is `storage.endpoint_url` when set, else whatever botocore resolves (AWS_ENDPOINT_URL_S3,
AWS_ENDPOINT_URL, the profile), like every AWS tool. A custom endpoint gets path-style addressing. Requests
are SigV4 with botocore's standard retry rules (up to 8 attempts ride out a ~1-3 s endpoint outage), bounded in
time: one request, retries included, gives up after `DEIM_RAY_S3_TIMEOUT` seconds (default 60), so an endpoint
that accepts connections and never answers is a one-line error, not a hang. Every object carries
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
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from botocore.retries import standard

from deim_ray.config.schema import StorageConfig
from deim_ray.storage.base import (ObjectInfo, atomic_local_file, check_key, check_sha256, hash_stream, join_key,
                                   sha256_file)
from deim_ray.storage.errors import (BadStorageURI, BucketNotFound, ChecksumMismatch, EndpointUnreachable,
                                     ObjectNotFound)
from deim_ray.storage.s3_errors import S3_ERRORS, map_s3_error, public_endpoint

TIMEOUT_ENV = "DEIM_RAY_S3_TIMEOUT"
"""Environment variable: seconds one S3 request may take, retries included (default DEFAULT_TIMEOUT_S)."""
DEFAULT_TIMEOUT_S = 60.0

MB = 1 << 20
TRANSFER = TransferConfig(multipart_threshold=16 * MB, multipart_chunksize=8 * MB, max_concurrency=4)
"""Parts of 8 MB: a failed part is cheap to retry and a 300 MB checkpoint is ~38 parts."""
SHA_META = "sha256"
"""User-metadata key holding the hex sha256 of the whole object."""


def _is_aws(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _check_endpoint(url: str | None, source: str) -> None:
    """BadStorageURI unless `url` (from `source`) is an http(s) URL with a host and a valid port."""
    if url is None:
        return
    parts = urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # a port that is not a number in 0..65535
        valid = False
    if not valid:
        raise BadStorageURI(f"{source} {public_endpoint(url)!r} is not an http(s) URL with a host and a valid port; "
                            "use e.g. http://127.0.0.1:8333 or https://s3.example.com")


def _configured_endpoint(cfg: StorageConfig) -> tuple[str | None, str]:
    """The endpoint URL set in the config or the environment, and where it was set."""
    for source, url in (("storage.endpoint_url", cfg.endpoint_url),
                        ("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL_S3")),
                        ("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL"))):
        if url:
            return url, source
    return None, "the AWS profile's endpoint_url"


def request_timeout_s() -> float:
    """Seconds one S3 request may take, retries included: DEIM_RAY_S3_TIMEOUT, else 60."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise BadStorageURI(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds; unset it or use e.g. 60")
    return value


@dataclass(frozen=True)
class _Timeouts:
    """Per-attempt connect/read timeouts derived from the total time one request may take."""

    total: float

    @property
    def connect(self) -> float:
        return min(5.0, self.total / 4)

    @property
    def read(self) -> float:
        return min(20.0, self.total / 2)


class _RetryDeadline:
    """botocore's standard retry rules and backoff, stopped by a deadline as well as by the attempt count.

    botocore itself only counts attempts, so a server that accepts connections and never answers would cost
    attempts x read timeout. The client is built with one attempt; this `needs-retry` handler, registered
    first, asks for another only while the next one can still end before the deadline."""

    def __init__(self, max_attempts: int, timeouts: _Timeouts):
        self.timeouts = timeouts
        self._checker = standard.StandardRetryConditions(max_attempts=max_attempts)
        self._backoff = standard.ExponentialBackoff()
        self._adapter = standard.RetryEventAdapter()

    def install(self, client) -> None:
        client.meta.events.register("before-call.s3", self._start)
        client.meta.events.register_first("needs-retry.s3", self._needs_retry)

    def _start(self, context: dict, **_) -> None:
        context["deim_ray_deadline"] = time.monotonic() + self.timeouts.total

    def _needs_retry(self, **kwargs) -> float | None:
        context = self._adapter.create_retry_context(**kwargs)
        if not self._checker.is_retryable(context):
            return None
        delay = self._backoff.delay_amount(context)
        deadline = kwargs["request_dict"]["context"].get("deim_ray_deadline", math.inf)
        worst_next = self.timeouts.connect + self.timeouts.read
        return delay if time.monotonic() + delay + worst_next <= deadline else None


def _client_config(timeouts: _Timeouts, path_style: bool) -> BotoConfig:
    return BotoConfig(signature_version="s3v4", retries={"mode": "standard", "total_max_attempts": 1},
                      connect_timeout=timeouts.connect, read_timeout=timeouts.read, tcp_keepalive=True,
                      s3={"addressing_style": "path"} if path_style else None)


def _conditions(if_match: str | None, if_none_match: bool) -> dict[str, str]:
    """The If-Match / If-None-Match arguments of a conditional PUT or CopyObject."""
    if if_none_match:
        return {"IfNoneMatch": "*"}
    return {"IfMatch": if_match} if if_match is not None else {}


class S3Storage:
    """Objects under `s3://bucket/prefix`; keys are relative to the prefix."""

    def __init__(self, bucket: str, prefix: str = "", storage_cfg: StorageConfig | None = None, *,
                 max_attempts: int = 8):
        cfg = storage_cfg or StorageConfig()
        endpoint, source = _configured_endpoint(cfg)
        _check_endpoint(endpoint, source)
        self.bucket, self.prefix, self.max_attempts = bucket, prefix.strip("/"), max_attempts
        self.retry = _RetryDeadline(max_attempts, _Timeouts(request_timeout_s()))
        self._session = boto3.session.Session(region_name=cfg.region)
        self.region_explicit = bool(cfg.region or self._session.region_name or os.environ.get("AWS_REGION"))
        self.region = cfg.region or self._session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
        # A first client only learns which endpoint botocore resolves (argument, env, profile); the real one
        # is then built with path-style addressing when that endpoint is not AWS.
        try:
            probe = self._session.client("s3", endpoint_url=cfg.endpoint_url, region_name=self.region,
                                         config=_client_config(self.retry.timeouts, path_style=False))
            self.endpoint_url: str = probe.meta.endpoint_url
            self.custom_endpoint = bool(cfg.endpoint_url) or not _is_aws(self.endpoint_url)
            self.client = self._session.client(
                "s3", endpoint_url=self.endpoint_url if self.custom_endpoint else None, region_name=self.region,
                config=_client_config(self.retry.timeouts, path_style=self.custom_endpoint))
        except ValueError as e:  # botocore refuses an endpoint from the profile; its text may quote the URL
            raise BadStorageURI(f"the S3 endpoint from {source} cannot be used ({type(e).__name__}); "
                                "set AWS_ENDPOINT_URL_S3 to e.g. http://127.0.0.1:8333") from None
        self.retry.install(self.client)
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
                               redact=self._redact, seconds=self.retry.timeouts.total) from e

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
                          sha256=head.get("Metadata", {}).get(SHA_META), etag=head.get("ETag"))

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

    def write_bytes(self, key: str, data: bytes, *, if_match: str | None = None,
                    if_none_match: bool = False) -> ObjectInfo:
        digest = hashlib.sha256(data)
        with self._errors(key):
            response = self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data,
                                              ChecksumSHA256=base64.b64encode(digest.digest()).decode(),
                                              Metadata={SHA_META: digest.hexdigest()},
                                              **_conditions(if_match, if_none_match))
        self._bucket_seen = True
        return ObjectInfo(key=key, uri=self.child_uri(key), size=len(data), sha256=digest.hexdigest(),
                          etag=response.get("ETag"))

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        with self._errors(key):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
                self._check_bucket()
                return None
            data = response["Body"].read()
        check_sha256(self.child_uri(key), hashlib.sha256(data).hexdigest(),
                     response.get("Metadata", {}).get(SHA_META))
        return data, response["ETag"]

    def copy(self, src: str, dst: str, *, if_match: str | None = None, if_none_match: bool = False) -> ObjectInfo:
        """Server-side CopyObject (metadata, sha256 included, is copied); objects up to 5 GB."""
        with self._errors(dst):
            response = self.client.copy_object(Bucket=self.bucket, Key=self._full(dst), MetadataDirective="COPY",
                                               CopySource={"Bucket": self.bucket, "Key": self._full(src)},
                                               **_conditions(if_match, if_none_match))
        info = self._require(dst)
        return ObjectInfo(key=dst, uri=info.uri, size=info.size, sha256=info.sha256,
                          etag=response.get("CopyObjectResult", {}).get("ETag", info.etag))

    def lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """No lock: every write that must be atomic with a check is an S3 conditional write."""
        return contextlib.nullcontext()

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

        timeouts = self.retry.timeouts
        kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
                  "connect_timeout": timeouts.connect, "request_timeout": timeouts.read}
        if self.custom_endpoint:
            parts = urlsplit(self.endpoint_url)
            kwargs.update(endpoint_override=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme,
                          region=self.region)
        else:
            kwargs["region"] = self.region if self.region_explicit else pafs.resolve_s3_region(self.bucket)
        return join_key(self.bucket, self.prefix, check_key(subdir)), pafs.S3FileSystem(**kwargs)
