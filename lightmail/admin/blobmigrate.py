"""``lightmail blobs migrate --to s3|filesystem``: every blob the database refers to
copied from the other blob store into this one, each checked against its SHA-256 and
made durable (a group at a time) before it counts as copied.

Nothing is deleted, and a blob the target holds already is not copied again: the
command can run beside the server (what arrives meanwhile goes to the store the
server uses), and once more after the server is stopped, to copy what came since.
Then ``[storage] blob_backend`` names the target, and the server starts on it; the
source stays as it was until the administrator removes it.
"""

from __future__ import annotations

import argparse
from typing import Any

import sqlalchemy as sa

from lightmail.admin.datatools import Loader, Progress, ToolError, report
from lightmail.config import Config
from lightmail.storage import schema as s
from lightmail.storage.blobstores import BACKENDS, blob_store
from lightmail.storage.database import create_engine
from lightmail.storage.interfaces import (
    BlobMissing,
    BlobRef,
    IBlobStore,
    IStagedBlob,
    StorageError,
)

#: Blobs made durable together (one flush on a filesystem, parallel uploads on S3).
BATCH = 64


def run_migrate(args: argparse.Namespace, load: Loader) -> dict[str, Any]:
    summary = migrate(load(args), args.to, Progress())
    report(summary, args.json,
           f"blobs {summary['source']} -> {summary['target']}: {summary['copied']} "
           f"copied ({summary['bytes']} octets), {summary['present']} there already, "
           f"{summary['gone']} unreferenced and gone; now set [storage] blob_backend = "
           f"{args.to}")
    return summary


def _open(config: Config, backend: str) -> IBlobStore:
    if backend == "s3":
        s3 = config.s3
        if not (s3.bucket and s3.access_key and s3.secret_key):
            raise ToolError("the [s3] section needs bucket, access_key and "
                            "secret_key_file")
        try:
            import boto3  # noqa: F401
        except ImportError:
            raise ToolError("the S3 blob store needs boto3: pip install "
                            "'lightmail[s3]'") from None
    return blob_store(config, backend)


def migrate(config: Config, to: str, progress: Progress) -> dict[str, Any]:
    """Copy the blobs the database names into the ``to`` store; the summary."""
    if to not in BACKENDS:
        raise ToolError(f"--to is one of {', '.join(BACKENDS)}")
    source_name = next(name for name in BACKENDS if name != to)
    engine = create_engine(config.database, pool_size=1)
    source = _open(config, source_name)
    try:
        target = _open(config, to)
    except BaseException:
        source.close()
        raise
    counts = {"copied": 0, "bytes": 0, "present": 0, "gone": 0}
    try:
        with engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(s.blobs)
                                 ).scalar_one()
        progress.start(f"blobs to {to}", total)
        # Garbage collection of the source deletes nothing meanwhile (any process of
        # this machine): an unreferenced blob could go between its row and its copy.
        with source.pin_now():
            _copy_all(engine, source, target, counts, progress)
    except StorageError as exc:
        raise ToolError(f"migration stopped: {exc} ({counts['copied']} blobs copied "
                        "so far; run it again to go on)") from None
    except sa.exc.SQLAlchemyError as exc:
        raise ToolError(f"migration stopped: the database: {exc.__class__.__name__}: "
                        f"{getattr(exc, 'orig', None) or exc}") from None
    finally:
        progress.finish()
        engine.dispose()
        source.close()
        target.close()
    return {"ok": True, "source": source.location, "target": target.location, **counts}


def _copy_all(engine: Any, source: IBlobStore, target: IBlobStore,
              counts: dict[str, int], progress: Progress) -> None:
    batch: list[IStagedBlob] = []
    query = sa.select(s.blobs.c.id, s.blobs.c.size, s.blobs.c.refcount).order_by(
        s.blobs.c.id).execution_options(yield_per=1000)
    try:
        with engine.connect() as conn:
            for blob_id, size, refcount in conn.execute(query):
                progress.advance()
                if target.exists_now(blob_id):
                    counts["present"] += 1
                    continue
                try:
                    stream = source.open_now(blob_id)
                except BlobMissing:
                    if refcount > 0:
                        raise ToolError(f"blob {blob_id}, which the database refers to, "
                                        f"is missing from {source.location} (lightmail "
                                        "fsck says more)") from None
                    counts["gone"] += 1         # garbage, collected already
                    continue
                with stream:
                    batch.append(target.stage_now(stream, BlobRef(blob_id, size)))
                counts["bytes"] += size
                if len(batch) >= BATCH:
                    _commit(target, batch, counts)
        _commit(target, batch, counts)
    finally:
        for staged in batch:
            staged.discard()


def _commit(target: IBlobStore, batch: list[IStagedBlob], counts: dict[str, int]) -> None:
    errors = [error for error in target.commit_staged_now(batch) if error is not None]
    counts["copied"] += len(batch) - len(errors)
    batch.clear()
    if errors:
        raise errors[0]
