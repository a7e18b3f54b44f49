"""storage layer: turn boto3/botocore exceptions into one-line `StorageError`s that name the fix.

Messages carry the bucket, key and endpoint, never a credential: server text is only quoted for errors we
do not recognise, and then with any known secret removed.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError,
                                 EndpointConnectionError, NoCredentialsError, PartialCredentialsError,
                                 ReadTimeoutError)

from deim_ray.storage.errors import (BucketNotFound, ChecksumMismatch, CredentialsRejected, EndpointUnreachable,
                                     NoCredentials, ObjectNotFound, PreconditionFailed, StorageError)

_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)
_BAD_CREDENTIALS = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
                    "InvalidSecurity", "AuthorizationHeaderMalformed"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_BAD_DIGEST = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "XAmzContentChecksumMismatch",
               "FlexibleChecksumError"}
_PRECONDITION = {"PreconditionFailed", "412"}

S3_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, ClientError)
"""What S3 calls raise that `map_s3_error` translates."""


def public_endpoint(url: str | None) -> str:
    """The endpoint URL without any user:password part, query or fragment (safe to print, even when malformed)."""
    if not url:
        return "the default AWS endpoint"
    if "://" not in url:  # no scheme: whatever precedes an '@' is user info
        return url.rpartition("@")[2].split("/")[0]
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def map_s3_error(exc: BaseException, *, bucket: str, key: str, endpoint: str, attempts: int,
                 redact: Callable[[str], str], seconds: float | None = None) -> StorageError:
    """The StorageError subclass (with its one-line message) that explains `exc` for s3://bucket/key."""
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    cause = getattr(exc, "last_exception", None)  # s3transfer's retries-exceeded wrapper
    if cause is not None:
        exc = cause
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return NoCredentials(f"no S3 credentials found for {where}: set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) on every node")
    if isinstance(exc, _UNREACHABLE):
        budget = f"within {seconds:g} s (DEIM_RAY_S3_TIMEOUT), " if seconds else ""
        return EndpointUnreachable(
            f"cannot reach S3 endpoint {endpoint} for {where} {budget}up to {attempts} attempts "
            f"({type(exc).__name__}): check storage.endpoint_url / AWS_ENDPOINT_URL_S3 and that the server is up")
    if isinstance(exc, ClientError):
        return _map_client_error(exc, where=where, bucket=bucket, endpoint=endpoint, redact=redact)
    return StorageError(f"S3 request for {where} at {endpoint} failed: {type(exc).__name__}: "
                        f"{redact(str(exc))[:200]}")


def _map_client_error(exc: ClientError, *, where: str, bucket: str, endpoint: str,
                      redact: Callable[[str], str]) -> StorageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    if code == "NoSuchBucket":
        return BucketNotFound(f"bucket '{bucket}' does not exist at {endpoint} (needed for {where}): create it "
                              f"(e.g. `aws s3 mb s3://{bucket}`) or fix the storage URI")
    if code in _BAD_CREDENTIALS:
        return CredentialsRejected(
            f"{endpoint} rejected the S3 credentials for {where} ({code}): check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) on this machine")
    if code in _DENIED:
        return CredentialsRejected(f"{endpoint} refused access to {where} ({code}): check AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and that they may read/write the bucket")
    if code in _MISSING:
        return ObjectNotFound(f"{where} does not exist at {endpoint}; check the storage URI, run name and key")
    if code in _BAD_DIGEST:
        return ChecksumMismatch(f"{endpoint} refused {where}: the data did not match its checksum ({code}); "
                                "the bytes changed in transit or on disk, retry the upload")
    if code in _PRECONDITION:
        return PreconditionFailed(f"{where} changed since it was read (a conditional write was refused by {endpoint})")
    message = redact(str(error.get("Message", "")))[:200]
    return StorageError(f"S3 error {code or 'unknown'} for {where} at {endpoint}: {message}")
