"""Each shared service's operation measured alone, on the benchmark's own peers, so that
bench/scaling.py's counts per message can be turned into a model (docs/scaling.rst):

* PostgreSQL: a read round trip (``SELECT 1``), and a durable write transaction of
  the shape of a filing (``UPDATE ... RETURNING`` of a counter row, as the UID is
  allocated, an ``INSERT`` of a message-like row and an upsert of a reference
  count, then ``COMMIT``, which waits for the WAL's fsync), one client after the
  other and from ``CONCURRENT`` connections at once (each on a row of its own, as
  deliveries to different mailboxes are), with the backend's CPU a transaction;
* Redis: a ``PING`` round trip and the server's CPU a command;
* S3, through LightMail's own client (lightmail.storage.s3client): a PUT, a HEAD and
  a GET of 4 KB, with this process's CPU (signing, hashing, HTTP) and the S3
  server's a request.

Times are wall-clock medians of one operation after another; the CPU figures are
totals over the run divided by the operations.
"""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from counters import PrivateRedis, cpu_seconds, read_answer, resp, thread_cpu_seconds

CONCURRENT = 8
# Keys of the results that bench/scaling.py's model uses.
PG_RATE = f"pg filings/s from {CONCURRENT} connections"
REDIS_CPU = "redis server CPU us a command"
REDIS_CPU_MONITORED = "redis server CPU us a command, MONITOR on"


def timed(operation: Callable[[int], Any], count: int) -> list[float]:
    """Seconds of each of ``count`` calls, one after the other."""
    times = []
    for index in range(count):
        started = time.perf_counter()
        operation(index)
        times.append(time.perf_counter() - started)
    return times


def ms(seconds: float) -> float:
    return round(1000 * seconds, 3)


# --- PostgreSQL ------------------------------------------------------------------------

SCHEMA = (
    "create table scaling_boxes (id int primary key, next_uid bigint not null)",
    "create table scaling_messages (id bigserial primary key, box int not null, "
    "uid bigint not null, blob text not null, size int not null, flags text not null, "
    "received timestamptz not null default now())",
    "create table scaling_refs (blob text primary key, refs int not null)",
)
FILING = (
    "update scaling_boxes set next_uid = next_uid + 1 where id = %(box)s "
    "returning next_uid",
    "insert into scaling_messages (box, uid, blob, size, flags) "
    "values (%(box)s, %(uid)s, %(blob)s, 4096, '')",
    "insert into scaling_refs (blob, refs) values (%(blob)s, 1) "
    "on conflict (blob) do update set refs = scaling_refs.refs + 1",
)


def file_once(conn: Any, box: int, index: int) -> None:
    """One filing-shaped transaction on ``box``, committed (durably: the server's
    synchronous_commit is left as it is, on by default)."""
    blob = hashlib.sha256(b"%d.%d" % (box, index)).hexdigest()
    with conn.transaction():
        uid = conn.execute(FILING[0], {"box": box}).fetchone()[0]
        conn.execute(FILING[1], {"box": box, "uid": uid, "blob": blob})
        conn.execute(FILING[2], {"blob": blob})


def postgres_costs(url: str, count: int) -> dict[str, float]:
    import psycopg
    conn = psycopg.connect(url, autocommit=True)
    try:
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute("insert into scaling_boxes select g, 1 from generate_series(0, %s) g",
                     (CONCURRENT,))
        backend = int(conn.execute("select pg_backend_pid()").fetchone()[0])
        reads = timed(lambda _: conn.execute("select 1").fetchone(), count)
        cpu = thread_cpu_seconds(backend) or 0.0
        writes = timed(lambda index: file_once(conn, 0, index), count)
        write_cpu = (thread_cpu_seconds(backend) or 0.0) - cpu
        concurrent = concurrent_filings(url, count)
        for table in ("scaling_boxes", "scaling_messages", "scaling_refs"):
            conn.execute(f"drop table {table}")
    finally:
        conn.close()
    return {"pg read round trip ms": ms(statistics.median(reads)),
            "pg filing transaction ms": ms(statistics.median(writes)),
            "pg backend CPU ms a filing": ms(write_cpu / count),
            PG_RATE: round(concurrent, 1)}


def concurrent_filings(url: str, count: int) -> float:
    """Filings a second from CONCURRENT connections at once, each on its own row."""
    import psycopg
    conns = [psycopg.connect(url, autocommit=True) for _ in range(CONCURRENT)]
    barrier = threading.Barrier(CONCURRENT + 1)

    def run(box: int) -> None:
        barrier.wait()
        for index in range(count):
            file_once(conns[box - 1], box, count + index)

    threads = [threading.Thread(target=run, args=(box,)) for box in range(1, CONCURRENT + 1)]
    try:
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        return CONCURRENT * count / (time.perf_counter() - started)
    finally:
        for conn in conns:
            conn.close()


# --- Redis -----------------------------------------------------------------------------

def redis_costs(redis: PrivateRedis, count: int) -> dict[str, float]:
    """PING round trips, and Redis' CPU a command with and without the MONITOR
    connection that bench/scaling.py keeps open to count requests (closed here)."""
    out = {}
    with socket.create_connection(("127.0.0.1", redis.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = sock.makefile("rb")
        ping = resp("PING")

        def one(_: int) -> None:
            sock.sendall(ping)
            read_answer(stream)

        for monitored in (True, False):
            if monitored and redis.monitor is None:
                redis.watch_requests()
            if not monitored and redis.monitor is not None:
                redis.monitor.stop()
                redis.monitor = None
            cpu = thread_cpu_seconds(redis.proc.pid) or 0.0
            times = timed(one, count)
            used = (thread_cpu_seconds(redis.proc.pid) or 0.0) - cpu
            out[REDIS_CPU_MONITORED if monitored else REDIS_CPU] = round(
                1e6 * used / count, 1)
    out["redis round trip ms"] = ms(statistics.median(times))
    return out


# --- S3 --------------------------------------------------------------------------------

def s3_costs(s3: Any, count: int, size: int = 4096) -> dict[str, float]:
    """PUT, HEAD and GET of ``size`` octets through LightMail's S3 client against
    ``s3`` (tests/s3server.py's S3Server or SeaweedFS)."""
    from lightmail.config import parse_config
    from lightmail.storage.s3client import S3Client
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(f"[server]\nstate_dir = {tmp}\n[storage]\nblob_backend = s3\n"
                              + s3.config(Path(tmp), timeout="30s"), str(Path(tmp) / "c"))
    client = S3Client(config.s3, 4)
    bodies = [os.urandom(16) + b"x" * (size - 16) for _ in range(count)]
    keys = [f"unit/{hashlib.sha256(body).hexdigest()}" for body in bodies]
    out: dict[str, float] = {}
    steps: tuple[tuple[str, Callable[[int], Any]], ...] = (
        ("PUT", lambda i: client.put(keys[i], bodies[i], hashlib.sha256(bodies[i]).digest())),
        ("HEAD", lambda i: client.modified(keys[i])),
        ("GET", lambda i: client.get(keys[i])))
    for name, step in steps:
        step(0)                                     # a connection made, code loaded
        server = cpu_seconds(s3.process.pid) or 0.0
        mine = time.thread_time()
        times = timed(step, count)
        out[f"s3 {name} ms"] = ms(statistics.median(times))
        out[f"s3 client CPU ms a {name}"] = ms((time.thread_time() - mine) / count)
        out[f"s3 server CPU ms a {name}"] = ms(
            ((cpu_seconds(s3.process.pid) or 0.0) - server) / count)
    for key in keys:
        client.delete(key)
    return out
