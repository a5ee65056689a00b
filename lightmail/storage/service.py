"""The storage service: database, thread pools, blob store, mail and queue stores, and
the write port."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from lightmail.config import Config
from lightmail.metrics.interfaces import IMetrics
from lightmail.readiness import Readiness
from lightmail.storage import migrate
from lightmail.storage.blobs import SPARE_MAX_AGE, FilesystemBlobStore
from lightmail.storage.blobstores import s3_blob_store
from lightmail.storage.changes import ChangeFeed
from lightmail.storage.database import Database, DatabaseUnreachable
from lightmail.storage.interfaces import IBlobStore, INodeStore, IWritePort
from lightmail.storage.nodestore import SQLNodeStore
from lightmail.storage.queuestore import SQLQueueStore
from lightmail.storage.sqlstore import SQLMailStore
from lightmail.storage.sqlwrites import SQLWrites
from lightmail.storage.threads import WorkerThreads
from lightmail.storage.writeport import GroupedWritePort, WriterProcessPort
from lightmail.storage.writerlink import WriterLink

GC_INTERVAL = 3600.0


#: Temporary blob files kept ready (FilesystemBlobStore's ``spare_files``): about one
#: group commit's worth.
SPARE_FILES = 16


class StorageService(Service):
    """Owns the SQL and disk thread pools; nothing else in LightMail makes threads
    for storage.  ``ready`` fires once the schema is current."""

    name = "storage"
    log = Logger()

    def __init__(self, config: Config, *, primary: bool = True,
                 writer: WriterLink | None = None, writer_dir: str | None = None,
                 sql_threads: int | None = None, one_writer: bool = False,
                 spare_files: bool = True,
                 write_port: Callable[[IWritePort], IWritePort] | None = None,
                 metrics: IMetrics | None = None) -> None:
        """Built by lightmail.wiring, which decides: ``primary`` (the main process:
        it migrates the schema, recovers blobs and collects garbage; a worker's and
        the writer process's storage are not), ``writer`` (the link to the writer
        process, whose engine then runs the write port; its socket is in
        ``writer_dir``, removed at stop), ``write_port`` (an embedder's: given the
        engine LightMail would run, returns the port to use), ``metrics`` (the
        process's: SQL latency, group commit sizes)."""
        self.config = config
        self.primary = primary
        self.db = Database(config.database,
                           threads=sql_threads or config.storage.sql_threads,
                           one_writer=one_writer, metrics=metrics)
        self.io_pool = WorkerThreads(config.storage.io_threads, "lightmail-io")
        # Spare temporary files only where GC's grace period leaves them time.
        spares = (SPARE_FILES if spare_files and
                  config.storage.blob_gc_grace >= 10 * SPARE_MAX_AGE else 0)
        #: The blob store ([storage] blob_backend), and the same store typed as the
        #: filesystem's when it is that one (None on S3): ``lightmail fsck`` checks
        #: files, and works only there.
        self.blobs: IBlobStore
        self.filesystem_blobs: FilesystemBlobStore | None = None
        if config.storage.blob_backend == "s3":
            self.blobs = s3_blob_store(config)
        else:
            self.blobs = self.filesystem_blobs = FilesystemBlobStore(
                config.blob_dir, self.io_pool, sync=config.storage.blob_sync,
                spare_files=spares, owner=config.node_id)
        self.feed = ChangeFeed()
        self.queue = SQLQueueStore(self.db, self.blobs)
        #: The nodes sharing the database (lightmail.cluster.membership).
        self.nodes: INodeStore = SQLNodeStore(self.db)
        self.writes = SQLWrites(self.blobs, self.queue)
        local = GroupedWritePort(self.db, self.writes, self.feed,
                                 config.storage.sync_flag_changes)
        port: IWritePort = local if writer is None else WriterProcessPort(writer, local)
        #: The one write port of this process (IWritePort).
        self.write_port: IWritePort = port if write_port is None else write_port(port)
        self.writer = writer
        self._writer_dir = writer_dir
        self.mailstore = SQLMailStore(self.db, self.blobs, self.feed, self.write_port,
                                      self.writes)
        self._readiness = Readiness()
        self._gc: task.LoopingCall | None = None

    @property
    def writer_socket(self) -> str | None:
        """Where workers reach this process's writer process (None: they do not)."""
        return self.writer.listen if self.writer is not None else None

    @property
    def ready(self) -> defer.Deferred[None]:
        """A new Deferred for each caller, fired once the schema is current (or failed)."""
        return self._readiness.wait()

    def startService(self) -> None:
        super().startService()
        self.db.start()
        self.io_pool.start()
        from twisted.internet import reactor
        if self.config.storage.auto_upgrade and self.primary:
            if reactor.running:  # type: ignore[attr-defined]
                d = self.db.run(self._upgrade)
            else:
                # Before the reactor runs (twistd start-up): right here, before the
                # rest starts; a failure ends the start (LightMailService.fatal).
                d = defer.maybeDeferred(self._upgrade)
        else:
            d = self.db.run(self._check_schema)
        if self.primary:
            # Before anything is served, and only here: worker processes start later.
            d.addCallback(lambda _: self.blobs.recover())
        writer = self.writer
        if writer is not None:
            # After the recovery: no writer may be at work while it runs.
            def start_writer(_: Any) -> None:
                writer.start()
            d.addCallback(start_writer)
        d.addCallback(self._started)
        d.addErrback(self._failed)

    def _upgrade(self) -> None:
        self.db.reach()
        migrate.upgrade(self.db.engine)

    def _check_schema(self) -> None:
        self.db.reach()
        current = migrate.current_revision(self.db.engine)
        if current != migrate.HEAD:
            raise RuntimeError(f"the database schema is at {current or 'nothing'}, this "
                               f"LightMail needs {migrate.HEAD}: run 'lightmail db upgrade'")

    def _started(self, _: Any) -> None:
        self.log.info("storage ready: {backend} database, blobs in {blob_dir}",
                      backend=self.db.backend, blob_dir=self.blobs.location)
        if self.primary:
            self._gc = task.LoopingCall(self.collect_garbage)
            self._gc.start(GC_INTERVAL, now=False).addErrback(
                lambda f: self.log.failure("blob garbage collection stopped", f))
        self._readiness.settle(True)

    def _failed(self, failure: Any) -> None:
        if failure.check(DatabaseUnreachable):       # said in full by its message
            self.log.error("storage failed to start: {error}",
                           error=failure.getErrorMessage())
        else:
            self.log.failure("storage failed to start", failure)
        self._readiness.settle(failure)

    def collect_garbage(self) -> defer.Deferred[int]:
        d = self.mailstore.collect_garbage(self.config.storage.blob_gc_grace)

        def done(count: int) -> int:
            if count:
                self.log.info("garbage collection removed {count} blobs", count=count)
            return count
        return d.addCallback(done)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._gc is not None and self._gc.running:
            self._gc.stop()
        if self.writer is not None:
            # Its answers first: the listeners have drained, nothing new comes.
            return self.writer.stop().addCallback(lambda _: self._close())
        self._close()
        return None

    def _close(self) -> None:
        if self._writer_dir is not None:
            shutil.rmtree(self._writer_dir, ignore_errors=True)
        # Waits for in-flight SQL and blob writes, then closes the connections.
        self.io_pool.stop()
        self.blobs.close()
        self.db.stop()
