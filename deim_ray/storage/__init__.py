"""storage layer: where a run lives — a local directory or s3://bucket/prefix — and what it contains.

    open_storage(uri, cfg.storage) -> Storage      LocalStorage or S3Storage (base.py, local.py, s3.py)
    RunStore(storage, name)                        one run directory: manifest, config, metrics, artifacts,
                                                   ray_storage() for RunConfig, sweep_interrupted_writes();
                                                   fenced writes (claim / renew a generation; StaleWriter)
    Manifest / RunState                            manifest.json and its state machine (manifest.py)
    resolve_final(manifest.artifacts)              which checkpoint is final, and why (resolve.py)
    fetch / describe_run / list_runs               deim-ray fetch / resolve / ls (retrieve.py); a run is
                                                   addressed as one URI `<root>/<name>` (open_run_dir)
    BackgroundUploader                             side files (plots, TensorBoard) off the training thread (transfer.py)

Every error a user can fix is a `StorageError` with a one-line message.
"""

from deim_ray.storage.base import ObjectInfo, Storage, open_storage, split_run_uri
from deim_ray.storage.errors import (BadStorageURI, BucketNotFound, ChecksumMismatch, CredentialsRejected,
                                     EndpointUnreachable, ManifestError, NoCredentials, ObjectNotFound,
                                     ResolveError, StorageError)
from deim_ray.config.schedule import ARTIFACT_NAMES, BEST_STG1, BEST_STG2, FINAL, LAST  # re-exported for storage users
from deim_ray.storage.manifest import LEGAL_TRANSITIONS, MANIFEST_KEY, ArtifactRecord, Manifest, RunState, artifact_key
from deim_ray.storage.resolve import Resolution, format_resolution, resolve_final
from deim_ray.storage.retrieve import RunSummary, describe_run, fetch, list_runs, open_run_dir
from deim_ray.storage.run_store import RunStore, check_run_name

__all__ = [
    "ARTIFACT_NAMES", "BEST_STG1", "BEST_STG2", "FINAL", "LAST", "LEGAL_TRANSITIONS", "MANIFEST_KEY",
    "ArtifactRecord", "BadStorageURI", "BucketNotFound", "ChecksumMismatch", "CredentialsRejected",
    "EndpointUnreachable", "Manifest", "ManifestError", "NoCredentials", "ObjectInfo", "ObjectNotFound",
    "Resolution", "ResolveError", "RunState", "RunStore", "RunSummary", "Storage", "StorageError",
    "artifact_key", "check_run_name", "describe_run", "fetch", "format_resolution", "list_runs", "open_run_dir",
    "open_storage", "resolve_final", "split_run_uri",
]
