"""What a window of load cost the services that several LightMail nodes share, counted
at each service rather than guessed from LightMail's code (bench/scaling.py).

A :class:`Snapshot` holds, at one moment:

* CPU seconds of every process watched (``/proc/PID/stat``: user and system), by a
  label: each node's main and writer processes, the PostgreSQL backends of the
  benchmark's database, the Redis server, the S3 server;
* PostgreSQL: transactions committed and rolled back and rows written in the
  benchmark's database (``pg_stat_database``), the commits of every other database
  (the machine's other users: a sign of how much the cluster-wide WAL figures are
  theirs), and the WAL's records, bytes, writes and syncs (``pg_stat_wal``, the whole
  cluster: PostgreSQL counts them nowhere else);
* Redis (one that only the benchmark uses): the requests clients sent, by command
  (:class:`RedisMonitor`), and the commands run with their microseconds, those
  that scripts call included (``INFO commandstats``);
* S3: requests by kind, counted by the test server (tests/s3server.py);
* LightMail's metrics summed over the nodes: group commits and the requests in them,
  SQL calls by kind.

``after - before`` is a :class:`Costs`; divided by the messages of the window, it is
what one message cost each service (and a little of what the nodes do anyway: a
window without load, measured too, shows how little).

PostgreSQL (15) reports a backend's counts to ``pg_stat_database`` and ``pg_stat_wal``
at most once a second, at the end of a transaction; what a backend did in its last
second before it fell idle is reported ten seconds later (its idle timeout), or at its
next transaction a second or more after the last report.  A snapshot taken at the
end of a load therefore waits ``SETTLE`` seconds first, so that the window holds
everything the load did (measured: 200 transactions in a second, 164 shown at once,
all 200 after 9.8 s).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SETTLE = 10.5           # s: PostgreSQL's idle backends report their last counts by then
# Processes whose threads come and go (moto's, one a connection): measured
# in ticks, which over a run of hundreds of messages is precise enough.  The others'
# threads last as long as they do (Twisted's pools, a backend's one thread), so the
# sum of their threads' times is the whole, to the nanosecond.
S3_SERVER = "S3 server"     # the label of the S3 server's process
TICKS_ONLY = frozenset({S3_SERVER})
CLK_TCK = os.sysconf("SC_CLK_TCK")

PG_FIELDS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted")
WAL_FIELDS = ("wal_records", "wal_bytes", "wal_write", "wal_sync")
METRIC_LINE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU seconds of one process (its threads that ended included),
    None once it is gone: /proc/PID/stat, in ticks of 10 ms."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK       # utime, stime


def thread_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of the threads a process has now, to the nanosecond
    (/proc/PID/task/*/schedstat): for a process whose threads live as long as it
    does (a PostgreSQL backend, Redis, LightMail's), where one transaction or command
    is far less than a tick; falls back to :func:`cpu_seconds`."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, IndexError, ValueError):
        return cpu_seconds(pid)


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


# --- Redis -----------------------------------------------------------------------------

class PrivateRedis:
    """A redis-server of the benchmark's own on a free port, without persistence: its
    command counts and CPU are the nodes' alone (the machine's Redis serves the tests
    of whoever else runs them)."""

    def __init__(self, port: int) -> None:
        self.port = port
        try:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", "/tmp"],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            raise SystemExit("redis-server is missing: scripts/test-peers.sh installs "
                             "it") from None
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.command("PING") == b"PONG":
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"redis-server did not start on port {port}")
            time.sleep(0.05)

        self.monitor: RedisMonitor | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}/0"

    def watch_requests(self) -> None:
        """Count the requests from here on (MONITOR, see RedisMonitor)."""
        self.monitor = RedisMonitor(self.port)

    def requests(self) -> Counter[str]:
        return self.monitor.counts() if self.monitor else Counter()

    def command(self, *words: str) -> bytes:
        """One command's answer: a simple string, or a bulk string's content."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(resp(*words))
            return read_answer(sock.makefile("rb"))

    def commandstats(self) -> dict[str, tuple[int, int]]:
        """Calls and microseconds of each command so far (``INFO commandstats``)."""
        stats = {}
        for line in self.command("INFO", "commandstats").decode().splitlines():
            if line.startswith("cmdstat_"):
                name, _, values = line[len("cmdstat_"):].partition(":")
                fields = dict(item.split("=") for item in values.split(","))
                stats[name] = (int(fields["calls"]), int(fields["usec"]))
        return stats

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class RedisMonitor:
    """Counts the requests Redis gets, by command, from a MONITOR connection: INFO
    commandstats counts the commands a Lua script calls as well (LightMail's scripts
    call two to seven each), and only MONITOR tells those (``[0 lua]``) from the
    requests clients send.  Redis copies each command to the monitor, which costs it
    some CPU: bench/unitcosts.py measures how much."""

    LINE = re.compile(rb'^\+[\d.]+ \[\d+ (?P<source>[^\]]+)\] "(?P<command>[^"]*)"')

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(resp("MONITOR"))
        self.stream = self.sock.makefile("rb")
        if self.stream.readline() != b"+OK\r\n":
            raise RuntimeError("Redis refused MONITOR")
        self.sock.settimeout(None)
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for line in self.stream:
                match = self.LINE.match(line)
                if match and match["source"] != b"lua":
                    with self.lock:
                        self.seen[match["command"].decode().lower()] += 1
        except (OSError, ValueError):
            pass                    # closed by stop()

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(self.seen)

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


def resp(*words: str) -> bytes:
    """A command in RESP, Redis' protocol."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def read_answer(stream: Any) -> bytes:
    line = stream.readline()
    if line[:1] == b"$":
        size = int(line[1:])
        return bytes(stream.read(size + 2)[:-2]) if size >= 0 else b""
    if line[:1] in (b"+", b":"):
        return bytes(line[1:].rstrip(b"\r\n"))
    raise RuntimeError(f"Redis answered {line!r}")


# --- snapshots -------------------------------------------------------------------------

@dataclass
class Snapshot:
    at: float                               # time.monotonic()
    cpu: dict[tuple[str, int], float]       # (label, pid) -> CPU seconds
    pg: dict[str, int]
    other_commits: dict[str, int]           # database -> commits
    wal: dict[str, int]
    redis: dict[str, tuple[int, int]]
    redis_requests: Counter[str]
    s3: Counter[str]
    metrics: Counter[str]


@dataclass
class Costs:
    """What a window of ``seconds`` cost: counts (name -> number) and CPU seconds by
    label."""

    counts: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def per(self, units: float) -> Costs:
        return Costs({name: value / units for name, value in self.counts.items()},
                     {name: value / units for name, value in self.cpu.items()},
                     self.seconds / units)

    def less_idle_cpu(self, idle: Costs) -> Costs:
        """These costs with the CPU that the processes use anyway (``idle``: a window
        without load) over as long taken out: what the load itself cost.  Redis' and
        the nodes' timers cost a few milliseconds a second, which at 40 messages a
        second would be a third of Redis' share.  The counts are left as they are
        (what the nodes do idle is a transaction or two a second: a little of every
        window, and printed beside it)."""
        rate = 1 / idle.seconds if idle.seconds else 0.0
        return Costs(dict(self.counts), {
            label: max(0.0, seconds - idle.cpu.get(label, 0.0) * rate * self.seconds)
            for label, seconds in self.cpu.items()}, self.seconds)


class Watch:
    """Takes snapshots of one benchmark's services.  ``processes`` names the processes
    to watch at each snapshot (label -> pids: nodes start and stop between windows);
    ``metrics`` gives each node's ``/metrics`` text."""

    def __init__(self, admin: Any, database: str, redis: PrivateRedis,
                 s3_requests: Callable[[], Counter[str]],
                 processes: Callable[[], dict[str, list[int]]],
                 metrics: Callable[[], Iterable[str]]) -> None:
        self.admin = admin              # psycopg connection to another database
        self.database = database
        self.redis = redis
        self.s3_requests = s3_requests
        self.processes = processes
        self.metrics = metrics

    def backends(self) -> list[int]:
        """The PostgreSQL backends serving the benchmark's database now."""
        rows = self.admin.execute("select pid from pg_stat_activity where datname = %s",
                                  (self.database,)).fetchall()
        return [int(row[0]) for row in rows]

    def snapshot(self, settle: float = SETTLE) -> Snapshot:
        time.sleep(settle)
        at = time.monotonic()
        cpu = {}
        labelled = {**self.processes(), "postgres backends": self.backends()}
        for label, pids in labelled.items():
            measure = cpu_seconds if label in TICKS_ONLY else thread_cpu_seconds
            for pid in pids:
                seconds = measure(pid)
                if seconds is not None:
                    cpu[(label, pid)] = seconds
        self.admin.execute("select pg_stat_clear_snapshot()")
        row = self.admin.execute(
            f"select {', '.join(PG_FIELDS)} from pg_stat_database where datname = %s",
            (self.database,)).fetchone()
        others = self.admin.execute(
            "select datname, xact_commit from pg_stat_database "
            "where datname is not null and datname <> %s", (self.database,)).fetchall()
        wal = self.admin.execute(f"select {', '.join(WAL_FIELDS)} from pg_stat_wal"
                                 ).fetchone()
        return Snapshot(at, cpu, dict(zip(PG_FIELDS, map(int, row), strict=True)),
                        {name: int(commits) for name, commits in others},
                        dict(zip(WAL_FIELDS, map(int, wal), strict=True)),
                        self.redis.commandstats(), self.redis.requests(),
                        self.s3_requests(),
                        sum((metric_counts(text) for text in self.metrics()), Counter()))


def metric_counts(text: str) -> Counter[str]:
    """The counts bench/scaling.py reports from one node's ``/metrics``: group commits
    (``groups``), the requests in them (``grouped``) and SQL calls by kind."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match is None:
            continue
        name, labels, value = match["name"], match["labels"] or "", float(match["value"])
        if name == "lightmail_group_commit_size_count":
            counts["groups"] += value
        elif name == "lightmail_group_commit_size_sum":
            counts["grouped"] += value
        elif name == "lightmail_sql_seconds_count":
            kind = re.search(r'kind="([^"]*)"', labels)
            counts[f"sql {kind[1] if kind else '?'}"] += value
    return counts


def difference(before: Snapshot, after: Snapshot) -> Costs:
    """What happened between two snapshots.  A process seen only at the end counts
    from zero (it started in the window); one gone by the end is not counted."""
    cpu: Counter[str] = Counter()
    for (label, pid), seconds in after.cpu.items():
        cpu[label] += seconds - before.cpu.get((label, pid), 0.0)
    counts: dict[str, float] = {}
    for name in PG_FIELDS:
        counts[f"pg {name}"] = after.pg[name] - before.pg[name]
    # Other databases come and go (the tests make one each): those of both ends.
    counts["pg other databases' commits"] = sum(
        max(0, commits - before.other_commits[name])
        for name, commits in after.other_commits.items() if name in before.other_commits)
    for name in WAL_FIELDS:
        counts[f"pg cluster {name}"] = after.wal[name] - before.wal[name]
    redis_calls = redis_usec = 0
    for command, (calls, usec) in after.redis.items():
        if command == "info":           # the snapshots' own
            continue
        was_calls, was_usec = before.redis.get(command, (0, 0))
        redis_calls += calls - was_calls
        redis_usec += usec - was_usec
    counts["redis commands, scripts' included"] = redis_calls
    counts["redis usec"] = redis_usec
    requests = after.redis_requests - before.redis_requests
    requests.pop("info", None)
    for command, number in requests.items():
        counts[f"redis {command}"] = number
    counts["redis requests"] = sum(requests.values())
    s3 = after.s3 - before.s3
    for kind, number in s3.items():
        counts[f"s3 {kind}"] = number
    counts["s3 requests"] = sum(s3.values())
    for name, value in (after.metrics - before.metrics).items():
        counts[name] = value
    return Costs(counts, dict(cpu), after.at - before.at)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return str(answer.read().decode())
