"""Shared fixtures: real databases, a started storage stack, free ports.

Storage tests that take the ``db_url`` fixture run on SQLite, PostgreSQL and MariaDB.
The servers are the machine's (``make test`` starts them); each test gets a database
of its own, dropped afterwards.  A server that cannot be reached fails the test with
a message saying so: nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from twisted.python.threadpool import ThreadPool

PG_ADMIN_URL = os.environ.get("LIGHTMAIL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_ADMIN_URL = os.environ.get("LIGHTMAIL_TEST_MARIADB",
                                   "mysql+pymysql://root@127.0.0.1:3306/test")
BACKENDS = ["sqlite", "postgresql", "mariadb"]


def _admin_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        pytest.fail(f"cannot reach the test database at {url} ({exc.orig}); "
                    "run `make services` (part of `make test`) to start it", pytrace=False)
    return engine


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database, on each backend in turn."""
    with empty_database(request.param, tmp_path) as url:
        yield url


@contextlib.contextmanager
def empty_database(backend: str, tmp_path: Path, name: str = "lightmail") -> Iterator[str]:
    """A URL of a new, empty database on ``backend`` (one of BACKENDS), dropped
    afterwards (on SQLite: ``tmp_path/NAME.db``)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / (name + '.db')}"
        return
    name = f"lm_{uuid.uuid4().hex[:12]}"
    admin_url = PG_ADMIN_URL if backend == "postgresql" else MARIADB_ADMIN_URL
    admin = _admin_engine(admin_url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()


class StorageStack:
    """Database, blob store, mail store, queue store and directory, started."""

    def __init__(self, url: str, root: Path) -> None:
        from lightmail.directory.sql import SQLDirectory
        from lightmail.storage import migrate
        from lightmail.storage.blobs import FilesystemBlobStore
        from lightmail.storage.changes import ChangeFeed
        from lightmail.storage.database import Database
        from lightmail.storage.queuestore import SQLQueueStore
        from lightmail.storage.sqlstore import SQLMailStore
        from lightmail.storage.sqlwrites import SQLWrites
        from lightmail.storage.writeport import GroupedWritePort

        self.url = url
        self.db = Database(url, threads=4)
        self.db.start()
        self.io_pool = ThreadPool(minthreads=1, maxthreads=2, name="test-io")
        self.io_pool.start()
        self.blobs = FilesystemBlobStore(root / "blobs", self.io_pool)
        migrate.upgrade(self.db.engine)
        self.feed = ChangeFeed()
        self.queue = SQLQueueStore(self.db, self.blobs)
        self.writes = SQLWrites(self.blobs, self.queue)
        #: The write port, grouped in this process (as a server without a writer
        #: process runs it).
        self.port = GroupedWritePort(self.db, self.writes, self.feed)
        self.mailstore = SQLMailStore(self.db, self.blobs, self.feed, self.port,
                                      self.writes)
        self.directory = SQLDirectory(self.db)

    def close(self) -> None:
        self.io_pool.stop()
        self.db.stop()


@pytest.fixture
def stack(db_url: str, tmp_path: Path) -> Iterator[StorageStack]:
    """A started storage stack on each database backend."""
    s = StorageStack(db_url, tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def sqlite_stack(tmp_path: Path) -> Iterator[StorageStack]:
    """A started storage stack on SQLite only (for protocol tests)."""
    s = StorageStack(f"sqlite:///{tmp_path / 'lightmail.db'}", tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def write_config(tmp_path: Path) -> Any:
    """Write a config file under tmp_path and return its path."""
    def write(text: str, name: str = "lightmail.conf") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


@pytest.fixture
def dns() -> Iterator[Any]:
    """An empty test DNS server (tests/dnsserver.py; records added with ``set``)."""
    from dnsserver import DNSServer
    server = DNSServer({}, ttl=60).start()
    try:
        yield server
    finally:
        server.stop()


#: The Redis of the tests: this machine's, its database 9 (emptied by the fixture).
REDIS = "127.0.0.1:6379/9"


@pytest.fixture
def redis() -> Iterator[Any]:
    """A connection to REDIS, whose database is emptied first; the test fails (never
    skips) when Redis is not running."""
    import socket
    import subprocess

    import pytest_twisted

    from lightmail.cluster.redis import LazyRedis, RedisLink
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError:
        pytest.fail("Redis is not running on 127.0.0.1:6379: `make test` starts it "
                    "(scripts/test-services.sh)", pytrace=False)
    subprocess.run(["redis-cli", "-n", "9", "flushdb"], check=True, capture_output=True)
    connection = LazyRedis(RedisLink(REDIS))
    yield connection
    pytest_twisted.blockon(connection.disconnect())
