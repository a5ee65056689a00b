"""The blob stores a configuration names, built by name: the storage service's
([storage] blob_backend), and the two ends of ``lightmail blobs migrate``.

The S3 store's module (and boto3) is imported only when it is asked for: a
filesystem installation needs neither.
"""

from __future__ import annotations

from typing import Any

from lightmail.config import Config
from lightmail.storage.blobs import FilesystemBlobStore
from lightmail.storage.interfaces import IBlobStore

__all__ = ["BACKENDS", "blob_store", "s3_blob_store"]

BACKENDS = ("filesystem", "s3")


def s3_blob_store(config: Config) -> IBlobStore:
    """The [s3] section's store (its own thread pool started; close() stops it)."""
    from lightmail.storage.s3blobs import S3BlobStore
    return S3BlobStore(config.s3, config.s3_spool_dir)


def blob_store(config: Config, backend: str, pool: Any = None) -> IBlobStore:
    """The store of ``backend`` (one of BACKENDS) as ``config`` describes it; a
    filesystem store does its Deferred work on ``pool`` (None: only its ``*_now``
    methods are used)."""
    if backend == "s3":
        return s3_blob_store(config)
    if backend == "filesystem":
        return FilesystemBlobStore(config.blob_dir, pool, sync=config.storage.blob_sync)
    raise ValueError(f"no blob store is called {backend!r}")
