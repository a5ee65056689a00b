"""One SQL database behind a bounded thread pool.

Every SQL statement LightMail runs goes through :meth:`Database.read` or
:meth:`Database.write`, which run a function with a SQLAlchemy connection inside a
transaction on a worker thread and hand back a Deferred.  The reactor thread never
waits for the database.

Backends: SQLite (embedded default: WAL journal, ``synchronous=FULL`` so a commit is
on disk before it returns, write transactions begun ``IMMEDIATE`` so two writers never
deadlock on a lock upgrade), PostgreSQL through psycopg 3 and MariaDB/MySQL through
PyMySQL.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from lightmail.config import DatabaseLink
from lightmail.metrics.interfaces import IMetrics
from lightmail.metrics.registry import Metrics
from lightmail.storage.interfaces import IStagedBlob
from lightmail.storage.threads import WorkerThreads

T = TypeVar("T")

SUPPORTED_DRIVERS = ("sqlite", "postgresql+psycopg", "mysql+pymysql", "mariadb+pymysql")


class DatabaseURLError(ValueError):
    """The database URL names no backend LightMail supports."""


class DatabaseUnreachable(Exception):
    """No connection to the database could be made; the message says where (the URL
    without its password) and the driver's reason, in one line."""


def now_ms() -> int:
    """Current time as stored in TIMESTAMP columns."""
    return int(time.time() * 1000)


def masked(url: str) -> str:
    """``url`` with any password in it replaced by ``***``: what may be shown."""
    # USER:PASSWORD@, with or without a scheme before it (an unparsable URL too).
    return re.sub(r"([^/@:]*:)[^/@]*@", r"\1***@", url)


def check_url(url: str) -> sa.URL:
    """Parse ``url`` and check that it names a supported backend."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise DatabaseURLError(f"not a database URL: {masked(url)!r}") from None
    if parsed.drivername not in SUPPORTED_DRIVERS:
        raise DatabaseURLError(
            f"unsupported database driver {parsed.drivername!r}; use sqlite:///PATH, "
            "postgresql+psycopg://USER@HOST/DB or mysql+pymysql://USER@HOST/DB")
    return parsed


def link_arguments(link: DatabaseLink, backend: str) -> dict[str, Any]:
    """What the driver is given besides the URL: the password (never in the URL, so
    never in a message that shows it) and TLS.  PostgreSQL: libpq's sslmode
    verify-full (a server without TLS, a certificate from another CA or for another
    host is refused), its root certificates the CA file or the system's; MariaDB:
    PyMySQL's ssl_* (TLS required once any is given)."""
    args: dict[str, Any] = {}
    if link.password:
        args["password"] = link.password
    if not link.tls:
        return args
    if backend == "postgresql":
        args.update(sslmode="verify-full",
                    sslrootcert=str(link.ca_file) if link.ca_file else "system")
        if link.cert_file is not None and link.key_file is not None:
            args.update(sslcert=str(link.cert_file), sslkey=str(link.key_file))
    elif backend == "mysql":
        args.update(ssl_verify_cert=True, ssl_verify_identity=True)
        if link.ca_file is not None:
            args["ssl_ca"] = str(link.ca_file)
        if link.cert_file is not None and link.key_file is not None:
            args.update(ssl_cert=str(link.cert_file), ssl_key=str(link.key_file))
    return args


def create_engine(link: DatabaseLink | str, pool_size: int = 8,
                  writer: bool = False) -> Engine:
    """An Engine configured for LightMail's durability and concurrency needs, on
    ``link`` (``Config.database``; a URL alone: no password nor TLS besides it).

    ``writer`` (SQLite): connections only for write transactions, which never wait in
    SQLite's busy handler (see _begin_immediate)."""
    if isinstance(link, str):
        link = DatabaseLink(link)
    parsed = check_url(link.url)
    linked = link_arguments(link, parsed.get_backend_name())
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            parsed, pool_size=pool_size, max_overflow=0, pool_pre_ping=False,
            connect_args={"check_same_thread": False, "timeout": 60})
        _configure_sqlite(engine, writer)
        return engine
    if parsed.get_backend_name() == "mysql":
        # READ COMMITTED: our UID allocation locks the mailbox row explicitly, and
        # MariaDB's default REPEATABLE READ would give stale reads after the lock.
        return sa.create_engine(
            parsed, pool_size=pool_size, max_overflow=0, pool_pre_ping=True,
            pool_recycle=3600, isolation_level="READ COMMITTED",
            connect_args={"charset": "utf8mb4", **linked})
    return sa.create_engine(parsed, pool_size=pool_size, max_overflow=0,
                            pool_pre_ping=True, isolation_level="READ COMMITTED",
                            connect_args=linked)


def _configure_sqlite(engine: Engine, writer: bool = False) -> None:
    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that "begin"
        # below decides between DEFERRED (reads) and IMMEDIATE (writes).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=0" if writer else "PRAGMA busy_timeout=60000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        if writer:
            _begin_immediate(conn.connection.dbapi_connection, toggle=False)
        elif conn.get_execution_options().get("lightmail_write"):
            _begin_immediate(conn.connection.dbapi_connection)
        else:
            # The driver's own execute: SQLAlchemy's costs 20 us of Python a read.
            conn.connection.dbapi_connection.execute("BEGIN")  # type: ignore[union-attr]


# Waiting for SQLite's write lock.  SQLite's own busy handler sleeps 1, 2, 5, 10, 15,
# 20, 25... ms between tries, which is right for rare collisions but, when several
# processes (``[server] workers``) commit small transactions all the time, leaves
# the lock free most of each sleep: each collision cost milliseconds of latency.
# BEGIN IMMEDIATE is the one place a writer waits (it takes the lock for the whole
# transaction), so there we retry ourselves, sooner; other statements keep the
# long busy_timeout for the rare reader that has to wait.  The Database's own writes
# use connections of their own whose busy_timeout stays 0 (``toggle=False``: one
# statement to begin instead of three); a write through a reading engine (start-up,
# the command-line tool) sets it to 0 for the BEGIN and back.
_LOCK_FIRST_DELAY = 0.0002
_LOCK_MAX_DELAY = 0.002
_LOCK_TIMEOUT = 60.0


def _begin_immediate(dbapi_connection: Any, toggle: bool = True) -> None:
    deadline = time.monotonic() + _LOCK_TIMEOUT
    delay = _LOCK_FIRST_DELAY
    if toggle:
        dbapi_connection.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, _LOCK_MAX_DELAY)
    finally:
        if toggle:
            dbapi_connection.execute("PRAGMA busy_timeout=60000")


# -- statements run through the DBAPI cursor ---------------------------------------------
#
# SQLAlchemy spends about 20 us of Python on each execution of even a statement built
# once (contexts, result set-up, events), where SQLite itself takes 3: on the path of
# every message filed (three statements a message, inside the group commit that the
# message's 250 waits for) that was most of the transaction's time.  Those statements
# are compiled once per dialect and handed to the driver's cursor directly.

_Plan = tuple[str, tuple[str, ...], Any, tuple[tuple[str, Callable[[Any], Any]], ...]]
_direct: dict[tuple[int, str, frozenset[str]], _Plan | None] = {}


def run_direct(conn: Connection, stmt: Any,
               params: dict[str, Any] | list[dict[str, Any]]) -> Any:
    """Execute ``stmt`` (built once, at module level) with ``params`` (a list of them:
    executemany) in ``conn``'s transaction, through the DBAPI cursor on SQLite;
    returns the cursor, whose rows are plain tuples in the statement's column order.
    Elsewhere, or for a statement with an expanding IN, it runs through SQLAlchemy
    and returns its Result (whose rows are tuples too)."""
    batch: list[dict[str, Any]] | None = params if isinstance(params, list) else None
    first: dict[str, Any] = (batch[0] if batch else {}) if batch is not None else \
        params  # type: ignore[assignment]
    dialect = conn.dialect
    key = (id(stmt), dialect.name, frozenset(first))
    try:
        plan = _direct[key]
    except KeyError:
        plan = _direct[key] = _plan(stmt, dialect, first)
    if plan is None or batch == []:
        return conn.execute(stmt, params)
    sql, order, compiled, processors = plan
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    if batch is not None:
        cursor.executemany(sql, [_positional(compiled, processors, order, one)
                                 for one in batch])
    else:
        cursor.execute(sql, _positional(compiled, processors, order, first))
    return cursor


def _positional(compiled: Any, processors: Any, order: tuple[str, ...],
                params: dict[str, Any]) -> tuple[Any, ...]:
    values = compiled.construct_params(params)
    for name, process in processors:
        values[name] = process(values[name])
    return tuple(values[name] for name in order)


_row_types: dict[tuple[str, ...], Any] = {}


def rows_direct(conn: Connection, stmt: Any, params: dict[str, Any]) -> list[Any]:
    """All rows of ``stmt`` (a SELECT, or DML with RETURNING) run by :func:`run_direct`,
    each with its columns as attributes, as SQLAlchemy's rows have them."""
    result = run_direct(conn, stmt, params)
    if isinstance(result, sa.engine.Result):
        return list(result.all())
    names = tuple(column[0] for column in result.description)
    row_type: Any = _row_types.get(names)
    if row_type is None:
        row_type = _row_types[names] = collections.namedtuple("Row", names, rename=True)
    make = row_type._make
    return [make(row) for row in result.fetchall()]


def first_direct(conn: Connection, stmt: Any, params: dict[str, Any]) -> Any:
    """The first row of :func:`rows_direct` (None if there is none): for statements
    that match one row at most (a key, a unique index, an aggregate)."""
    rows = rows_direct(conn, stmt, params)
    return rows[0] if rows else None


def _plan(stmt: Any, dialect: Any, params: dict[str, Any]) -> _Plan | None:
    if dialect.name != "sqlite":
        return None
    compiled = stmt.compile(dialect=dialect, column_keys=list(params))
    if not compiled.positional or "POSTCOMPILE" in compiled.string:
        return None             # an expanding IN (...): its text depends on the list
    # The type processing SQLAlchemy would do on the way in (LargeBinary's, say).
    processors = tuple(getattr(compiled, "_bind_processors", {}).items())
    # The statement object is kept alive by the module that built it once; the plan
    # holds it too (compiled.statement), so its id is never reused for another one.
    return compiled.string, tuple(compiled.positiontup or ()), compiled, processors


def _synchronous(dbapi_connection: Any, level: str) -> None:
    """SQLite's flush level for the connection's next commits (write_unsynced)."""
    dbapi_connection.execute(f"PRAGMA synchronous={level}")


class GroupedWrite(NamedTuple):
    """A grouped write waiting for its group (``merge``: see write_merged).  ``d`` is
    None for a group run by someone else (the writer process: commit_group_now)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    d: defer.Deferred[Any] | None
    merge: bool
    before: IStagedBlob | None = None           # see write_grouped_after
    durable: bool = True                        # see write_unsynced


def _run_merged(conn: Connection, batch: list[GroupedWrite]) -> list[tuple[bool, Any]]:
    """Run a group's requests in one transaction, each merged request's function once
    for all of its requests (where the first of them stands); results in order."""
    results: list[tuple[bool, Any]] = [(True, None)] * len(batch)
    merged: dict[Any, list[int]] = {}
    for index, request in enumerate(batch):
        if request.merge:
            merged.setdefault(request.fn, []).append(index)
    done: set[Any] = set()
    for index, request in enumerate(batch):
        if not request.merge:
            results[index] = (True, request.fn(conn, *request.args, **request.kwargs))
        elif request.fn not in done:
            done.add(request.fn)
            indexes = merged[request.fn]
            values = request.fn(conn, [batch[i].args[0] for i in indexes])
            if len(values) != len(indexes):
                raise RuntimeError(f"{request.fn!r} gave {len(values)} results for "
                                   f"{len(indexes)} requests")
            for i, value in zip(indexes, values, strict=True):
                results[i] = (True, value)
    return results


def _timed(d: defer.Deferred[T], observe: Callable[[float], None]) -> defer.Deferred[T]:
    """``d``, whose time until it fires is observed (seconds)."""
    start = time.perf_counter()

    def done(result: Any) -> Any:
        observe(time.perf_counter() - start)
        return result
    return d.addBoth(done)


class Database:
    """An Engine and the bounded thread pool that is the only place SQL runs."""

    log = Logger()

    def __init__(self, link: DatabaseLink | str, threads: int = 0, one_writer: bool = False,
                 metrics: IMetrics | None = None) -> None:
        """``link``: ``Config.database`` (or a URL alone).  ``one_writer``: groups are
        committed by one thread only (the writer process's, calling
        commit_group_now), which keeps its connection rather than taking one from
        the pool for each group (a checkout and return cost 50 us of
        Python a group).  ``metrics``: where SQL latency and group sizes are recorded
        (the process's, from lightmail.wiring; a private one if not given)."""
        self.link = link if isinstance(link, DatabaseLink) else DatabaseLink(link)
        self.metrics: IMetrics = metrics if metrics is not None else Metrics()
        self._read_seconds = self.metrics.sql_timer("read")
        self._write_seconds = self.metrics.sql_timer("write")
        self.one_writer = one_writer
        self._kept: Connection | None = None
        backend = check_url(self.link.url).get_backend_name()
        if not threads:         # see [storage] sql_threads
            threads = 2 if backend == "sqlite" else 8
        self.threads = threads
        self.engine = create_engine(self.link, pool_size=threads)
        self.backend = self.engine.dialect.name  # sqlite, postgresql, mysql
        # SQLite: the group commit and write_now have connections of their own.
        self.write_engine = (create_engine(self.link, pool_size=threads, writer=True)
                             if self.backend == "sqlite" else self.engine)
        self.pool = WorkerThreads(threads, "lightmail-sql")
        self._started = False
        self._group_pending: list[GroupedWrite] = []
        self._groups_running: set[defer.Deferred[Any]] = set()
        # SQLite has one writer at a time anyway; servers can commit groups in parallel.
        self._max_groups = 1 if self.backend == "sqlite" else max(1, threads // 2)

    def reach(self) -> None:
        """Open a connection (blocking: at start-up, on a thread or before the reactor
        runs).  One that cannot be made (down, TLS refused either way, a wrong
        password) raises :class:`DatabaseUnreachable`."""
        try:
            with self.engine.connect():
                pass
        except sa.exc.DBAPIError as exc:
            # The driver's own words (psycopg: "connection failed: connection to
            # server at ... failed: SSL error: certificate verify failed"), on one line.
            why = " ".join(str(exc.orig).split())
            raise DatabaseUnreachable(
                f"cannot connect to the {self.backend} database at "
                f"{masked(self.link.url)}: {why}") from None

    def start(self) -> None:
        if not self._started:
            self.pool.start()
            self._started = True

    def stop(self) -> None:
        if self._kept is not None:
            self._kept.close()
            self._kept = None
        if self._started:
            self.pool.stop()
            self._started = False
        self.engine.dispose()
        if self.write_engine is not self.engine:
            self.write_engine.dispose()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Run ``fn`` on the SQL thread pool (no connection given)."""
        from twisted.internet import reactor
        return threads.deferToThreadPool(reactor, self.pool, fn, *args, **kwargs)  # type: ignore[arg-type]

    def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Run ``fn(conn, *args)`` in a read transaction on the thread pool."""
        return _timed(self.run(self.read_now, fn, *args, **kwargs), self._read_seconds)

    def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Run ``fn(conn, *args)`` in a write transaction on the thread pool.

        The Deferred fires only after the transaction has committed, which on every
        backend here means it is durable.
        """
        if self.backend == "sqlite":
            # One writer at a time is all SQLite allows: queueing our writes behind
            # each other beats contending for the lock in SQLite's sleeping busy
            # handler (which costs milliseconds a message).
            return self.write_grouped(fn, *args, **kwargs)
        return _timed(self.run(self.write_now, fn, *args, **kwargs), self._write_seconds)

    def write_grouped(self, fn: Callable[..., T], *args: Any,
                      **kwargs: Any) -> defer.Deferred[T]:
        """Like :meth:`write`, but commits together with other grouped writes.

        Group commit: while one group's transaction is committing, new requests wait
        and then go in the next group, so that under load many SMTP acceptances share
        one commit (one fsync) and one thread hop.  A request that fails is rolled
        back alone and fails only its own Deferred (the group is then run again with
        a savepoint per request, so ``fn`` may run twice and must act only on the
        database).  Each Deferred fires after the group has committed.
        """
        return self.write_grouped_after(None, fn, *args, **kwargs)

    def write_grouped_after(self, before: IStagedBlob | None, fn: Callable[..., T],
                            *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """:meth:`write_grouped`, with the staged blob ``before`` made durable first on
        the same worker thread, outside the transaction, exactly once (one thread hop
        for the blob's flush and the commit).  If that fails, ``fn`` does not run and
        the Deferred fails with its exception.  The staged blobs of a group are made
        durable together, by their store's ``commit_staged_now`` (one disk flush).
        """
        return self._add(GroupedWrite(fn, args, kwargs, defer.Deferred(), False, before))

    def write_unsynced(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Like :meth:`write`, but on SQLite the commit need not be on disk when the
        Deferred fires, only in the operating system's cache (WAL with
        ``synchronous=NORMAL``): a crash of this process, even ``kill -9``, keeps
        it; a power loss may undo it, and the commits after it, never one before.
        The next durable commit (any other write) puts it on disk too.  For what a
        mail client can lose without losing mail: flag changes, expunges (see
        ``[storage] sync_flag_changes``).  Other backends: :meth:`write`."""
        if self.backend != "sqlite":
            return self.write(fn, *args)
        return self._add(GroupedWrite(fn, args, {}, defer.Deferred(), False, durable=False))

    def groups_idle(self) -> bool:
        """Whether a grouped write would start at once (no group running or waiting)."""
        return not self._group_pending and len(self._groups_running) < self._max_groups

    def write_merged(self, fn_many: Callable[[Connection, list[Any]], list[T]],
                     arg: Any) -> defer.Deferred[T]:
        """Like :meth:`write_grouped`, and besides, the requests of one group that
        name the same ``fn_many`` become one call, ``fn_many(conn, [arg, ...])``,
        which returns one result per ``arg``, in order: set-based statements (one
        ``executemany``, one ``IN (...)``) instead of a few statements per request.
        The group's requests were all pending at once, so their order within the
        transaction is free.  Should the merged call fail, the group runs again with
        a savepoint per request, ``fn_many(conn, [arg])`` each, so that only the
        failing one is left out.
        """
        return self._add(GroupedWrite(fn_many, (arg,), {}, defer.Deferred(), True))

    def _add(self, request: GroupedWrite) -> defer.Deferred[Any]:
        self._group_pending.append(request)
        if len(self._groups_running) < self._max_groups:
            self._start_group()
        assert request.d is not None
        # From the request to its group's commit: what the caller waits for.
        return _timed(request.d, self._write_seconds)

    _GROUP_MAX = 200

    def _start_group(self) -> None:
        batch = self._group_pending[:self._GROUP_MAX]
        del self._group_pending[:self._GROUP_MAX]
        if not batch:
            return
        self.metrics.group_committed(len(batch))
        running = self.run(self.commit_group_now, batch)
        self._groups_running.add(running)

        def settled(outcome: Any) -> None:
            self._groups_running.discard(running)
            if isinstance(outcome, Failure):   # the commit itself failed
                for request in batch:
                    assert request.d is not None
                    request.d.errback(outcome)
            else:
                for (ok, value), request in zip(outcome, batch, strict=True):
                    assert request.d is not None
                    if ok:
                        request.d.callback(value)
                    else:
                        request.d.errback(value)
            if self._group_pending:
                self._start_group()
        running.addBoth(settled)

    def commit_group_now(self, batch: list[GroupedWrite]) -> list[tuple[bool, Any]]:
        """Run a group (worker thread): its staged blobs made durable, by store, with
        one ``commit_staged_now`` each; then the requests whose blob did not fail, in
        one transaction.  One (ok, result or Failure) per request, in order.  Raises
        when the commit itself fails."""
        failed: dict[int, Failure] = {}
        by_store: dict[Any, list[int]] = {}
        for index, request in enumerate(batch):
            if request.before is not None:
                by_store.setdefault(request.before.store, []).append(index)
        for store, indexes in by_store.items():
            outcomes = store.commit_staged_now([batch[index].before for index in indexes])
            for index, error in zip(indexes, outcomes, strict=True):
                if error is not None:
                    failed[index] = Failure(error)
        if not failed:
            return self._run_group(batch)
        rest = [request for index, request in enumerate(batch) if index not in failed]
        ran = iter(self._run_group(rest) if rest else [])
        return [(False, failed[index]) if index in failed else next(ran)
                for index in range(len(batch))]

    @contextlib.contextmanager
    def _group_connection(self) -> Iterator[Connection]:
        """A write connection for a group: from the pool, or, with ``one_writer``, the
        one kept for the process (opened again only once it is closed or
        invalidated)."""
        if not self.one_writer:
            with self.write_engine.connect() as conn:
                conn.execution_options(lightmail_write=True)
                yield conn
            return
        kept = self._kept
        if kept is None or kept.closed or kept.invalidated:
            kept = self._kept = self.write_engine.connect()
            kept.execution_options(lightmail_write=True)
        yield kept

    def _run_group(self, batch: list[GroupedWrite]) -> list[tuple[bool, Any]]:
        with self._group_connection() as conn:
            if self.backend == "sqlite" and not any(r.durable for r in batch):
                # A group of unsynced writes only (write_unsynced): no WAL flush.
                driver = conn.connection.dbapi_connection
                assert driver is not None
                _synchronous(driver, "NORMAL")
                try:
                    return self._run_group_in(conn, batch)
                finally:
                    try:
                        _synchronous(driver, "FULL")
                    except BaseException:
                        # Never hand back a connection that would commit mail
                        # without a flush: the pool drops it and opens a new one.
                        conn.invalidate()
                        raise
            return self._run_group_in(conn, batch)

    def _run_group_in(self, conn: Connection, batch: list[GroupedWrite]
                      ) -> list[tuple[bool, Any]]:
        # First without savepoints (two statements less per request): when every
        # request succeeds, which is nearly always, that is the whole story.  When
        # one fails, the transaction is rolled back whole and the group runs again
        # with a savepoint per request, so that only the failed one is left out.
        # (So a grouped function may run twice: it must act only on the database.)
        failed = None
        with conn.begin() as tx:
            try:
                results = _run_merged(conn, batch)
            except Exception:
                failed = Failure()
                tx.rollback()
        if failed is None:
            return results
        if len(batch) == 1:
            return [(False, failed)]
        results = []
        with conn.begin():
            for request in batch:
                try:
                    with conn.begin_nested():
                        if request.merge:
                            value = request.fn(conn, list(request.args))[0]
                        else:
                            value = request.fn(conn, *request.args, **request.kwargs)
                    results.append((True, value))
                except Exception:
                    results.append((False, Failure()))
        return results

    def sync_now(self) -> None:
        """Make every commit this process can see durable (worker thread): on SQLite,
        fsync the WAL and the database file, for a commit that another process made
        and may not have flushed before it died.  The servers make a commit durable
        before anyone sees it: nothing to do there."""
        if self.backend != "sqlite" or not self.engine.url.database:
            return
        for suffix in ("-wal", ""):
            try:
                fd = os.open(self.engine.url.database + suffix, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # The *_now variants run in the calling thread: for worker threads, start-up
    # code that runs before the reactor, and the command-line tool.
    def read_now(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.engine.connect() as conn:
            with conn.begin():
                return fn(conn, *args, **kwargs)

    def write_now(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.write_engine.connect() as conn:
            conn.execution_options(lightmail_write=True)
            with conn.begin():
                return fn(conn, *args, **kwargs)
