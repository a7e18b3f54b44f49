"""storage layer: the exception types of run storage.

Every message is one line that names the location (bucket/key or path) and the fix, and never contains a
credential. The CLI prints `str(error)` as is.
"""

from __future__ import annotations


class StorageError(RuntimeError):
    """A storage problem described in one line: what failed, where, and how to fix it."""

    def __init__(self, message: str) -> None:
        # server messages can span lines; logs and the CLI want exactly one
        super().__init__(" ".join(str(message).split()))


class BadStorageURI(StorageError, ValueError):
    """The storage URI, key or run name cannot be used (malformed, unsupported scheme, path escape)."""


class BucketNotFound(StorageError):
    """The S3 bucket does not exist at the endpoint."""


class CredentialsRejected(StorageError):
    """The server refused the credentials (wrong secret, unknown access key, or no permission)."""


class NoCredentials(StorageError):
    """No S3 credentials were found in the environment, the shared files or the profile."""


class EndpointUnreachable(StorageError):
    """The S3 endpoint did not answer after all retries."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The key (or local file) does not exist."""


class ChecksumMismatch(StorageError):
    """Stored or transferred bytes do not have the sha256 they should have."""


class ResolveError(StorageError):
    """No final artifact can be resolved (no validated best checkpoint in the manifest)."""


class ManifestError(StorageError):
    """manifest.json is unreadable, from a newer schema, or a state transition is illegal."""


class PreconditionFailed(StorageError):
    """A conditional write found the object changed since it was read (S3 412; the local equivalent)."""


class RunHeld(StorageError):
    """Another live driver holds the run (its claim is fresh): this one starts nothing."""


class StaleWriter(StorageError):
    """A newer attempt of the run has taken over: this writer's generation is fenced off and wrote nothing."""
