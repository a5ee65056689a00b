"""``lightmail backup DEST`` and ``lightmail restore SRC``: the whole store - every
table of the metadata and the blobs it refers to - copied while the server runs, and
put back into any of the three databases.

A backup is a directory in a format no database owns::

    manifest.json           written last: the format, LightMail's schema revision,
                            each table's columns and row count, the blobs' count
    tables/NAME.jsonl       one JSON array per row, in the manifest's column order
                            (octets as {"b64": "..."})
    blobs/ab/<sha256>       the blobs, as the blob store keeps them

Consistency: every table is read in one transaction that sees one moment of the
database (SQLite's read transaction; PostgreSQL's REPEATABLE READ; MariaDB's
consistent snapshot), so the copy is what a crash at that moment would have left.
Blobs never change and are named by their content, so copying afterwards the ones that
snapshot refers to is enough; while that runs the blob store is pinned
(IBlobStore.pin_now), so that garbage collection cannot take one that was expunged
after the snapshot.  Everything streams: rows and blobs go through one at a time,
whatever the size of the store.

Restore makes an empty database's schema at the backup's revision, copies the blobs
first (checking each one's SHA-256) and then the rows, in one transaction, and
upgrades the schema to this LightMail's.  It refuses a database that holds rows
(unless ``--replace``) or whose schema is at another revision.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, Engine

import lightmail
from lightmail.admin.datatools import (
    Loader,
    Progress,
    ToolError,
    remove_partial,
    report,
    sync_filesystem,
)
from lightmail.config import Config
from lightmail.storage import migrate
from lightmail.storage.blobs import is_blob_id
from lightmail.storage.blobstores import blob_store
from lightmail.storage.database import create_engine
from lightmail.storage.interfaces import (
    BlobDamaged,
    BlobMissing,
    BlobRef,
    IBlobStore,
    IStagedBlob,
)

FORMAT = "lightmail-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ROWS_PER_INSERT = 500
#: Blobs restored together: written, made durable with one flush, renamed.
_BLOBS_PER_FLUSH = 256
_CHUNK = 1 << 20
#: What a full target looks like; EFBIG is a file over RLIMIT_FSIZE.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def run_backup(args: argparse.Namespace, load: Loader) -> dict[str, Any]:
    summary = backup(load(args), Path(args.dest), Progress())
    report(summary, args.json,
           f"backup of schema {summary['schema_revision']} in {summary['path']}: "
           f"{summary['rows']} rows, {summary['blobs']} blobs "
           f"({summary['blob_bytes']} octets)")
    return summary


def run_restore(args: argparse.Namespace, load: Loader) -> dict[str, Any]:
    summary = restore(load(args), Path(args.src), Progress(), replace=args.replace)
    report(summary, args.json,
           f"restored {summary['rows']} rows and {summary['blobs']} blobs "
           f"({summary['blobs_present']} were there already) at schema "
           f"{summary['schema_revision']}, now at {summary['schema_now']}")
    return summary


# --- the snapshot ---------------------------------------------------------------------

@contextlib.contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose reads all see one moment of the database, read-only."""
    backend = engine.dialect.name
    with engine.connect() as conn:
        if backend == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ",
                                          postgresql_readonly=True)
            with conn.begin():
                yield conn
        elif backend == "mysql":
            # InnoDB's consistent snapshot, taken now rather than at the first read.
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            try:
                yield conn
            finally:
                conn.exec_driver_sql("COMMIT")
        else:
            # SQLite in WAL mode: a read transaction sees the database as of its first
            # read, however long it lasts (writers go on; checkpoints wait for it).
            with conn.begin():
                yield conn


def _tables(conn: Connection) -> list[sa.Table]:
    """The database's tables in the order their foreign keys allow inserts."""
    metadata = sa.MetaData()
    metadata.reflect(conn)
    return [table for table in metadata.sorted_tables if table.name != "alembic_version"]


def _json_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"cannot back up a value of type {type(value).__name__}")


# --- backup ---------------------------------------------------------------------------

def backup(config: Config, dest: Path, progress: Progress) -> dict[str, Any]:
    """Copy the store to ``dest`` (a new directory); the summary.  On any failure the
    partial copy is removed."""
    dest = dest.absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ToolError(f"{dest} exists already: give a new directory")
    engine = create_engine(config.database, pool_size=1)
    made = not dest.exists()
    try:
        # Password hashes and everyone's mail: for LightMail's user only.
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        (dest / "tables").mkdir()
        (dest / "blobs").mkdir()
        store = blob_store(config, config.storage.blob_backend)
        try:
            with store.pin_now():
                with snapshot(engine) as conn:
                    manifest = _dump_tables(conn, dest, progress)
                manifest["blobs"] = _copy_blobs_out(store, dest, manifest, progress)
        finally:
            store.close()
        sync_filesystem(dest)
        _write_manifest(dest, manifest)
    except BaseException as exc:
        progress.finish()
        remove_partial(dest, made)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise ToolError(f"the backup's target ran out of space ({exc.strerror}"
                            f"{': ' + exc.filename if exc.filename else ''}); the "
                            f"partial backup {dest} was removed") from None
        if isinstance(exc, OSError):
            raise ToolError(f"backup failed: {exc}; the partial backup {dest} was "
                            "removed") from None
        if isinstance(exc, sa.exc.SQLAlchemyError):
            raise ToolError(f"backup failed: the database: {exc.__class__.__name__}: "
                            f"{getattr(exc, 'orig', None) or exc}") from None
        raise
    finally:
        engine.dispose()
    progress.finish()
    return {"ok": True, "path": str(dest), "schema_revision": manifest["schema_revision"],
            "rows": sum(t["rows"] for t in manifest["tables"].values()),
            "tables": {name: t["rows"] for name, t in manifest["tables"].items()},
            "blobs": manifest["blobs"]["count"], "blob_bytes": manifest["blobs"]["bytes"]}


def _dump_tables(conn: Connection, dest: Path, progress: Progress) -> dict[str, Any]:
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is None:
        raise ToolError("the database holds no LightMail schema (nothing to back up)")
    tables = _tables(conn)
    counts = {table.name: conn.execute(sa.select(sa.func.count()).select_from(table))
              .scalar_one() for table in tables}
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "lightmail": lightmail.__version__,
        "schema_revision": revision, "source": conn.dialect.name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tables": {}}
    progress.start("rows", sum(counts.values()))
    streaming = conn.execution_options(stream_results=True, yield_per=1000)
    for table in tables:
        columns = [column.name for column in table.columns]
        query = sa.select(table).order_by(*table.primary_key.columns)
        written = 0
        with (dest / "tables" / f"{table.name}.jsonl").open(
                "w", encoding="utf-8") as out:
            for row in streaming.execute(query):
                out.write(json.dumps(list(row), ensure_ascii=False, separators=(",", ":"),
                                     default=_json_value) + "\n")
                written += 1
                progress.advance()
        manifest["tables"][table.name] = {"columns": columns, "rows": written}
    return manifest


def _copy_blobs_out(store: IBlobStore, dest: Path, manifest: dict[str, Any],
                    progress: Progress) -> dict[str, int]:
    """Copy the blobs the snapshot's ``blobs`` rows name (checking each one's hash).
    A row with no references whose file is gone is garbage that collection took: it
    is skipped (the row stays; collection forgets it again after a restore)."""
    info = manifest["tables"].get("blobs")
    if info is None:
        raise ToolError("the database has no blobs table")
    columns = info["columns"]
    id_at, refs_at = columns.index("id"), columns.index("refcount")
    count = octets = 0
    made: set[str] = set()
    progress.start("blobs", info["rows"])
    for row in _rows(dest / "tables" / "blobs.jsonl"):
        blob_id, refcount = row[id_at], row[refs_at]
        try:
            source = store.open_now(blob_id)
        except BlobMissing:
            if refcount > 0:
                raise ToolError(f"blob {blob_id}, which the database refers to, is "
                                "missing from the blob store (lightmail fsck says more)"
                                ) from None
            progress.advance()
            continue
        fan = dest / "blobs" / blob_id[:2]
        if blob_id[:2] not in made:
            fan.mkdir(exist_ok=True)
            made.add(blob_id[:2])
        with source, (fan / blob_id).open("wb") as out:
            digest, size = _copy(source, out)
        if digest != blob_id:
            raise ToolError(f"blob {blob_id} in the blob store is damaged (its content "
                            f"hashes to {digest}; lightmail fsck says more)")
        count += 1
        octets += size
        progress.advance()
    return {"count": count, "bytes": octets}


def _copy(source: IO[bytes], out: IO[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        out.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _rows(path: Path) -> Iterator[list[Any]]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


def _write_manifest(dest: Path, manifest: dict[str, Any]) -> None:
    """The manifest last, durably: a directory without one is no backup."""
    partial = dest / (MANIFEST + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=1, sort_keys=True)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    partial.rename(dest / MANIFEST)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- restore --------------------------------------------------------------------------

def read_manifest(src: Path) -> dict[str, Any]:
    path = src / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ToolError(f"{src} is no complete backup: it has no {MANIFEST} (a backup "
                        "that failed or is still being written)") from None
    except (OSError, ValueError) as exc:
        raise ToolError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ToolError(f"{path} is not a LightMail backup's manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ToolError(f"{src} is a backup of format version {manifest.get('version')}; "
                        f"this LightMail reads version {FORMAT_VERSION}")
    return manifest


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError
    script = ScriptDirectory(str(migrate.MIGRATIONS))
    try:
        return script.get_revision(revision) is not None
    except (CommandError, KeyError):
        return False


def restore(config: Config, src: Path, progress: Progress,
            replace: bool = False) -> dict[str, Any]:
    """Put the backup at ``src`` into the configured database and blob store."""
    src = src.absolute()
    manifest = read_manifest(src)
    revision = manifest["schema_revision"]
    head = migrate.head_revision()
    if not _known_revision(revision):
        raise ToolError(f"the backup's schema revision {revision} is unknown to this "
                        f"LightMail (whose newest is {head}): restore it with the "
                        "LightMail that made it, or a newer one")
    engine = create_engine(config.database, pool_size=1)
    try:
        _prepare_schema(engine, revision, manifest, replace)
        store = blob_store(config, config.storage.blob_backend)
        try:
            blobs, present = _copy_blobs_in(store, src, manifest, progress)
        finally:
            store.close()
        rows = _load_tables(engine, src, manifest, replace, progress)
        if revision != head:
            migrate.upgrade(engine)
    except OSError as exc:
        raise ToolError(f"restore failed: {exc}") from None
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ToolError(f"the backup at {src} is damaged ({exc.__class__.__name__}: "
                        f"{exc}): nothing was restored") from None
    except sa.exc.SQLAlchemyError as exc:
        raise ToolError(f"restore failed: the database: {exc.__class__.__name__}: "
                        f"{getattr(exc, 'orig', None) or exc}") from None
    finally:
        progress.finish()
        engine.dispose()
    return {"ok": True, "path": str(src), "schema_revision": revision,
            "schema_now": migrate.head_revision(), "rows": rows, "blobs": blobs,
            "blobs_present": present}


def _prepare_schema(engine: Engine, revision: str, manifest: dict[str, Any],
                    replace: bool) -> None:
    """An empty database gets the schema at the backup's revision; one at that
    revision must hold no rows (or be told to lose them); any other is refused."""
    current = migrate.current_revision(engine)
    if current is None:
        names = [name for name in sa.inspect(engine).get_table_names()
                 if name != "alembic_version"]
        if names:
            raise ToolError(f"the database holds tables but no LightMail schema "
                            f"({', '.join(sorted(names)[:5])}...): restore into an "
                            "empty database")
        migrate.upgrade(engine, revision)
        return
    if current != revision:
        raise ToolError(f"the database's schema is at revision {current} and the "
                        f"backup's at {revision}: restore into an empty database (it is "
                        f"made at {revision}, filled, then upgraded)")
    with engine.connect() as conn:
        tables = {table.name: table for table in _tables(conn)}
        missing = sorted(set(manifest["tables"]) - set(tables))
        if missing:
            raise ToolError(f"the database lacks the backup's tables {', '.join(missing)}")
        held = {name: n for name, table in tables.items()
                if (n := conn.execute(sa.select(sa.func.count()).select_from(table))
                    .scalar_one())}
    if held and not replace:
        listed = ", ".join(f"{name} {n}" for name, n in sorted(held.items()))
        raise ToolError(f"the database is not empty ({listed}): restore into an empty "
                        "one, or give --replace to delete what it holds")


def _copy_blobs_in(store: IBlobStore, src: Path, manifest: dict[str, Any],
                   progress: Progress) -> tuple[int, int]:
    """Every blob the backup's rows name, checked and made durable before any row that
    refers to it is committed; (copied, already there)."""
    info = manifest["tables"]["blobs"]
    columns = info["columns"]
    id_at, refs_at, size_at = (columns.index(name) for name in ("id", "refcount", "size"))
    copied = present = 0
    batch: list[IStagedBlob] = []
    progress.start("blobs", info["rows"])
    try:
        for row in _rows(src / "tables" / "blobs.jsonl"):
            blob_id = row[id_at]
            if not is_blob_id(blob_id):
                raise ToolError(f"the backup names a blob {blob_id!r}, which is no blob id")
            progress.advance()
            if store.exists_now(blob_id):
                present += 1
                continue
            try:
                source = (src / "blobs" / blob_id[:2] / blob_id).open("rb")
            except FileNotFoundError:
                if row[refs_at] > 0:
                    raise ToolError(f"the backup lacks blob {blob_id}, which its rows "
                                    "refer to") from None
                continue        # garbage the source's collection had taken
            batch.append(_stage(store, source, blob_id, row[size_at]))
            copied += 1
            if len(batch) >= _BLOBS_PER_FLUSH:
                _commit(store, batch)
        _commit(store, batch)
    finally:
        for staged in batch:
            staged.discard()
    return copied, present


def _stage(store: IBlobStore, source: IO[bytes], blob_id: str,
           size: int) -> IStagedBlob:
    """The blob copied into the store, checked, not yet durable."""
    with source:
        try:
            return store.stage_now(source, BlobRef(blob_id, size))
        except BlobDamaged as exc:
            raise ToolError(f"blob {blob_id} in the backup is damaged: {exc}") from None


def _commit(store: IBlobStore, batch: list[IStagedBlob]) -> None:
    errors = [error for error in store.commit_staged_now(batch) if error is not None]
    batch.clear()
    if errors:
        raise errors[0]


def _load_tables(engine: Engine, src: Path, manifest: dict[str, Any], replace: bool,
                 progress: Progress) -> int:
    """Every row, in one transaction: the database holds all of the backup or, should
    anything fail, what it held before."""
    total = sum(info["rows"] for info in manifest["tables"].values())
    loaded = 0
    with engine.connect() as conn:
        conn = conn.execution_options(lightmail_write=True)
        with conn.begin():
            tables = [table for table in _tables(conn) if table.name in manifest["tables"]]
            if replace:
                for table in reversed(tables):
                    conn.execute(table.delete())
            progress.start("rows", total)
            for table in tables:
                loaded += _load_table(conn, table, src, manifest["tables"][table.name],
                                      progress)
            if conn.dialect.name == "postgresql":
                _advance_sequences(conn, tables)
    return loaded


def _load_table(conn: Connection, table: sa.Table, src: Path, info: dict[str, Any],
                progress: Progress) -> int:
    columns = info["columns"]
    unknown = [name for name in columns if name not in table.c]
    if unknown:
        raise ToolError(f"the database's table {table.name} has no column "
                        f"{', '.join(unknown)}")
    booleans = {name for name in columns if isinstance(table.c[name].type, sa.Boolean)}
    batch: list[dict[str, Any]] = []
    count = 0
    for row in _rows(src / "tables" / f"{table.name}.jsonl"):
        values = {}
        for name, value in zip(columns, row, strict=True):
            if isinstance(value, dict):
                value = base64.b64decode(value["b64"])
            elif name in booleans and value is not None:
                value = bool(value)     # MariaDB keeps them as 0 and 1
            values[name] = value
        batch.append(values)
        if len(batch) >= _ROWS_PER_INSERT:
            conn.execute(table.insert(), batch)
            progress.advance(len(batch))
            count += len(batch)
            batch = []
    if batch:
        conn.execute(table.insert(), batch)
        progress.advance(len(batch))
        count += len(batch)
    if count != info["rows"]:
        raise ToolError(f"the backup's {table.name}.jsonl holds {count} rows, its "
                        f"manifest says {info['rows']}")
    return count


def _advance_sequences(conn: Connection, tables: list[sa.Table]) -> None:
    """PostgreSQL: the rows came with their ids, so each serial column's sequence
    must go on after the largest (MariaDB's AUTO_INCREMENT and SQLite's rowid do)."""
    for table in tables:
        key = list(table.primary_key.columns)
        if len(key) != 1 or not isinstance(key[0].type, sa.Integer):
            continue
        sequence = conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, :c)"),
                                {"t": table.name, "c": key[0].name}).scalar()
        if sequence is None:
            continue
        largest = conn.execute(sa.select(sa.func.max(key[0]))).scalar()
        conn.execute(sa.text("SELECT setval(:s, :v, :called)"),
                     {"s": sequence, "v": largest or 1, "called": largest is not None})
