"""The life of a node among several on one database: its row in the nodes table, its
heartbeat, the refusal of a node id another process holds, the hand-back of a dead
node's queue leases, and the drain (SIGTERM, ``lightmail node drain``).

Unit tests run the node store and lightmail.cluster.membership on SQLite,
PostgreSQL and MariaDB with a fake clock; the drain of an SMTP session and of the
queue runner run in-process.  Then real ``twistd lightmail`` nodes on PostgreSQL and
Redis: a node killed with kill -9 while it holds queue leases (its mail stuck at a
slow MX) has them delivered by another node after ``dead_after``, not after the
600 s lease, and nothing twice; and a rolling restart of three nodes behind HAProxy
(each drained with SIGTERM and started again) while clients submit mail without a
pause loses no SMTP session and delivers every message exactly once.  Each node's
log is kept as server.log in its state directory.
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import smtplib
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from conftest import REDIS, StorageStack, empty_database
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from zope.interface import implementer

from lightmail.cluster.membership import Membership, NodeIdInUse
from lightmail.config import ClusterConfig, ConfigError, parse_config
from lightmail.queue.interfaces import DeliveryResult, IDeliveryAgent
from lightmail.queue.runner import QueueRunner
from lightmail.storage import schema
from lightmail.storage.interfaces import (
    BlobRef,
    DurableBlob,
    Envelope,
    QueueItem,
    QueueRecipient,
)
from lightmail.storage.nodestore import SQLNodeStore
from tests.haproxypeer import HAProxy, Pool
from tests.harness import ServerProcess, free_ports, run_cli, stored_messages

MESSAGE = b"From: a@example.org\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"


# -- the node store and the membership, with a fake clock -------------------------------

class Run(Membership):
    """A run of node ``node_id`` as process ``pid`` on ``host``, which records what
    it asks of the server (to stop, to kick its queue runner)."""

    def __init__(self, stack: StorageStack, clock: task.Clock, node_id: str = "a",
                 host: str = "h1", pid: int = 101,
                 alive: Callable[[int], bool] = lambda pid: True) -> None:
        super().__init__(SQLNodeStore(stack.db), ClusterConfig(heartbeat=1.0,
                                                               dead_after=3.0),
                         node_id, lambda: defer.succeed(None), clock=clock, host=host,
                         pid=pid, alive=alive)
        self.stops: list[str] = []
        self.kicks = 0
        self.on_stop_request = self.stops.append
        self.kick = self.kicked

    def kicked(self) -> None:
        self.kicks += 1


def fake_clock() -> task.Clock:
    """A clock a minute behind the real one, moved by hand (the queue claims what is
    due by the real clock: what the fake one hands back is due at once)."""
    clock = task.Clock()
    clock.advance(time.time() - 60)
    return clock


def rows(stack: StorageStack) -> dict[str, Any]:
    with stack.db.engine.connect() as conn:
        return {row.id: row for row in conn.execute(sa.select(schema.nodes))}


def leases(stack: StorageStack) -> list[tuple[int, str, str | None]]:
    r = schema.queue_recipients
    with stack.db.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(   # type: ignore[misc]
            sa.select(r.c.id, r.c.state, r.c.lease_owner).order_by(r.c.id))]


@defer.inlineCallbacks
def queued(stack: StorageStack, count: int, to: str = "x@remote.test") -> Any:
    ref = yield stack.blobs.put(MESSAGE)
    for _ in range(count):
        yield stack.port.enqueue(Envelope("a@example.org", [QueueRecipient(to, "smtp")]),
                                 DurableBlob(ref))


@pytest_twisted.inlineCallbacks
def test_a_beat_is_one_update_and_one_look_for_the_dead(stack: StorageStack) -> None:
    clock = fake_clock()
    node = Run(stack, clock)
    yield node.register()
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "nodes" in statement or "queue_recipients" in statement:
            statements.append(statement.split()[0].upper())
    engines = {stack.db.engine, stack.db.write_engine}
    for engine in engines:
        sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        clock.advance(1)
        beat = yield node.beat()
    finally:
        for engine in engines:
            sa.event.remove(engine, "before_cursor_execute", seen)
    assert beat.outcome == "ok" and beat.taken_over == ()
    assert statements == ["UPDATE", "SELECT"], statements
    [row] = rows(stack).values()
    assert (row.id, row.host, row.pid, row.state) == ("a", "h1", 101, "running")
    assert row.heartbeat == int(clock.seconds() * 1000)


@pytest_twisted.inlineCallbacks
def test_a_node_id_another_process_beats_under_refuses_the_start(
        stack: StorageStack) -> None:
    clock = fake_clock()
    first = Run(stack, clock, host="h1", pid=101)
    yield first.register()
    elsewhere = Run(stack, clock, host="h2", pid=202)
    elsewhere.startService()
    with pytest.raises(NodeIdInUse) as refused:
        yield elsewhere.ready
    assert str(refused.value).startswith(
        "node id 'a' is in use: process 101 on h1 beat 0.0s ago (running), and two "
        "processes with one node id would take each other's queue leases")
    # On the same host: refused while that process lives, taken over once it is gone
    # (kill -9, then a restart well within dead_after).
    with pytest.raises(NodeIdInUse):
        yield Run(stack, clock, host="h1", pid=303, alive=lambda pid: True).register()
    again = Run(stack, clock, host="h1", pid=303, alive=lambda pid: pid != 101)
    yield again.register()
    assert rows(stack)["a"].pid == 303
    # Another host's process, once the holder's heartbeat is older than dead_after.
    clock.advance(2.9)
    with pytest.raises(NodeIdInUse):
        yield Run(stack, clock, host="h2", pid=202).register()
    clock.advance(0.2)
    later = Run(stack, clock, host="h2", pid=202)
    yield later.register()
    # The run that lost its id notices at its next beat and asks to stop.
    beat = yield again.beat()
    assert beat.outcome == "taken"
    assert again.stops == ["node id a taken by another process"]
    # A node stopped in order frees its id at once.
    later.startService()
    yield later.ready
    yield later.stopService()
    assert rows(stack)["a"].state == "stopped"
    yield Run(stack, clock, host="h3", pid=404).register()


@pytest_twisted.inlineCallbacks
def test_a_dead_nodes_leases_are_handed_back_by_one_node(stack: StorageStack) -> None:
    clock = fake_clock()
    yield queued(stack, 3)
    a, b, c = (Run(stack, clock, name, f"h{name}", pid)
               for name, pid in (("a", 1), ("b", 2), ("c", 3)))
    for node in (a, b, c):
        yield node.register()
    held_by_a = yield stack.queue.claim("a", ["smtp"], 2, 600)
    yield stack.queue.claim("b", ["smtp"], 1, 600)
    clock.advance(2)
    for node in (b, c):
        beat = yield node.beat()
        assert beat.taken_over == ()
    clock.advance(2)            # a: silent for 4s; b and c beat 2s ago
    beats = yield defer.gatherResults([b.beat(), c.beat()])
    taken = [found for beat in beats for found in beat.taken_over]
    assert taken == [("a", 2)], beats
    assert b.kicks + c.kicks == 1
    assert rows(stack)["a"].state == "dead"
    r = schema.queue_recipients
    with stack.db.engine.connect() as conn:
        given = conn.execute(sa.select(r).where(
            r.c.id.in_([item.recipient_id for item in held_by_a]))).all()
    assert {(row.state, row.lease_owner, row.lease_until, row.next_attempt, row.attempts)
            for row in given} == {("deferred", None, None, int(clock.seconds() * 1000), 0)}
    assert [(state, owner) for _, state, owner in leases(stack)].count(("active", "b")) == 1
    # Due now for whoever claims next.
    again = yield stack.queue.claim("c", ["smtp"], 10, 600)
    assert sorted(item.recipient_id for item in again) == sorted(
        item.recipient_id for item in held_by_a)
    # a was only slow: its next beat finds it taken for dead, and it runs again.
    beat = yield a.beat()
    assert beat.outcome == "revived"
    assert (rows(stack)["a"].state, rows(stack)["a"].pid) == ("running", 1)
    listed = {node.node_id: node for node in (yield SQLNodeStore(stack.db).nodes())}
    assert {name: (node.state, node.leases) for name, node in listed.items()} == {
        "a": ("running", 0), "b": ("running", 1), "c": ("running", 2)}


@pytest_twisted.inlineCallbacks
def test_a_drain_asked_through_the_database(stack: StorageStack) -> None:
    clock = fake_clock()
    node = Run(stack, clock)
    yield node.register()
    store = SQLNodeStore(stack.db)
    asked = yield store.request_drain("a", int(clock.seconds() * 1000))
    assert asked.state == "running" and asked.drain_requested is not None
    clock.advance(1)
    beat = yield node.beat()
    assert beat.outcome == "drain"
    assert node.stops == ["a drain was requested through the database"]
    # The server then drains: its row says so, and it beats on while it drains.
    yield node.drain()
    assert node.draining and rows(stack)["a"].state == "draining"
    clock.advance(1)
    beat = yield node.beat()
    assert beat.outcome == "ok"
    assert rows(stack)["a"].heartbeat == int(clock.seconds() * 1000)
    assert node.stops == ["a drain was requested through the database"]
    yield node.stopService()
    assert rows(stack)["a"].state == "stopped"
    assert (yield store.request_drain("a", 0)).state == "stopped"   # nothing to drain
    assert (yield store.request_drain("nobody", 0)) is None


@pytest_twisted.inlineCallbacks
def test_a_local_delivery_half_done_by_a_dead_node_is_filed_once(
        stack: StorageStack) -> None:
    """Node a files a message but is taken for dead before... its delivery commits:
    the filing commits, its queue record (owner a) matches nothing, and node b, given
    the recipient, finds the delivery id already filed: one copy."""
    from lightmail.delivery.local import LocalDeliveryAgent
    yield stack.directory.add_domain("example.test")
    user = yield stack.directory.add_user("bob@example.test", None)
    yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    clock = fake_clock()
    a, b = Run(stack, clock, "a", "h1", 1), Run(stack, clock, "b", "h2", 2)
    yield a.register()
    yield b.register()
    yield queued(stack, 1, "bob@example.test")
    r = schema.queue_recipients
    with stack.db.engine.begin() as conn:      # queued as local mail
        conn.execute(r.update().values(transport="local"))
    [item_a] = yield stack.queue.claim("a", ["local"], 10, 600)
    clock.advance(4)
    beat = yield b.beat()
    assert beat.taken_over == (("a", 1),)
    [item_b] = yield stack.queue.claim("b", ["local"], 10, 600)
    filed_by_a = yield LocalDeliveryAgent(stack.directory, stack.port, "a").deliver(item_a)
    assert filed_by_a.status == "delivered"
    assert [(state, owner) for _, state, owner in leases(stack)] == [("active", "b")]
    filed_by_b = yield LocalDeliveryAgent(stack.directory, stack.port, "b").deliver(item_b)
    assert filed_by_b.status == "delivered" and "already filed" in filed_by_b.detail
    inbox = yield stack.mailstore.get_mailbox(user.id, "INBOX")
    assert len((yield stack.mailstore.list_messages(inbox.id))) == 1
    assert leases(stack) == []                  # final: retired


def test_dead_after_must_be_longer_than_the_heartbeat() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("[cluster]\nheartbeat = 10s\ndead_after = 10s\n", "/x/lm.conf")
    assert str(error.value) == (
        "/x/lm.conf:3: [cluster] dead_after: must be longer than heartbeat (10s), got "
        "10s: a live node would be taken for dead between two of its heartbeats")
    assert parse_config("[cluster]\nheartbeat = 2s\n").cluster.node_dead_after == 6.0
    assert parse_config("").cluster.node_dead_after == 30.0


def test_a_node_recovers_its_own_temporary_blobs_and_not_another_nodes(
        tmp_path: Path) -> None:
    """Nodes share the blob directory: the start-up recovery of one must not move what
    another is writing at that moment (it did, and the restarted node failed)."""
    from lightmail.storage.blobs import FilesystemBlobStore
    a = FilesystemBlobStore(tmp_path / "blobs", None, owner="a")
    b = FilesystemBlobStore(tmp_path / "blobs", None, owner="b")
    fd, writing = b.new_tmp_file()
    os.write(fd, b"Subject: being written by b\r\n")
    os.close(fd)
    fd, crashed = a.new_tmp_file()
    os.write(fd, b"Subject: a's, its rename undone by a crash\r\n")
    os.close(fd)
    (a.tmp / "blob-k3j_9x0q.tmp").write_bytes(b"an older LightMail's")
    # blob-TAG-: a tag per node
    assert Path(writing).name[:14] != Path(crashed).name[:14]
    assert a.recover_now() == 2
    assert sorted(path.name for path in a.tmp.iterdir()) == [Path(writing).name]
    assert b.recover_now() == 1


# -- the queue runner's drain -----------------------------------------------------------

@implementer(IDeliveryAgent)
class HeldAgent:
    """A delivery agent whose first delivery starts and waits for the test; the others
    wait for their turn until the drain gives them back."""

    transport = "smtp"

    def __init__(self) -> None:
        self.started: Deferred[Any] = Deferred()
        self.waiting: list[Deferred[Any]] = []
        self.items: list[QueueItem] = []

    def prepare(self, items: list[QueueItem]) -> Deferred[list[QueueItem]]:
        return defer.succeed(items)

    def deliver(self, item: QueueItem) -> Deferred[DeliveryResult]:
        raise NotImplementedError

    def deliver_held(self, item: QueueItem) -> Deferred[Any]:
        self.items.append(item)
        if len(self.items) == 1:
            return self.started
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        return d

    def stop_waiting(self) -> None:
        for d in self.waiting:
            d.callback((DeliveryResult.unstarted(), lambda: None))

    def close(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_a_draining_runner_finishes_what_started_and_hands_back_the_rest(
        sqlite_stack: StorageStack) -> None:
    stack = sqlite_stack
    yield queued(stack, 3)
    agent = HeldAgent()
    runner = QueueRunner(stack.queue, ready=defer.succeed(None), owner="a",
                         poll_interval=3600)
    runner.add_agent(agent)
    runner.startService()
    while len(agent.items) < 3:
        yield task.deferLater(reactor_(), 0.01, lambda: None)
    stopped = runner.stopService()
    assert not stopped.called                  # the started delivery goes on
    agent.started.callback((DeliveryResult.delivered("250 ok"), lambda: None))
    yield stopped
    states = sorted((state, owner) for _, state, owner in leases(stack))
    assert states == [("deferred", None), ("deferred", None)]   # the first: retired
    listed = yield stack.queue.list_recipients()
    assert [row["attempts"] for row in listed] == [0, 0]         # no attempt counted


def reactor_() -> Any:
    from twisted.internet import reactor
    return reactor


@pytest_twisted.inlineCallbacks
def test_the_smtp_agent_gives_back_deliveries_waiting_for_their_turn() -> None:
    from lightmail.delivery.smtp import SMTPDeliveryAgent

    class Gated(SMTPDeliveryAgent):
        # The session itself is beside the point here (test_outbound covers it): a
        # delivery that stays on the wire until the test lets it finish.
        gate: Deferred[Any] = Deferred()

        async def _deliver(self, item: QueueItem, held: Any) -> DeliveryResult:
            await self.gate
            return DeliveryResult.delivered("250 ok")
    agent = Gated(None, None, "mx.test", destination_concurrency=1)  # type: ignore
    items = [QueueItem(recipient_id=n, queue_id="Q", mail_from="a@b.test",
                       recipient=QueueRecipient(f"r{n}@slow.test", "smtp"),
                       blob=BlobRef("0" * 64, 10), attempts=0) for n in range(3)]
    # One on the wire, one waiting to send, one waiting for its outcome's place.
    sending, second, third = (agent.deliver_held(item) for item in items)
    sent: list[Any] = []
    sending.addCallback(sent.append)
    agent.stop_waiting()
    for given in (second, third):
        result, release = yield given
        release()
        assert result.status == "unstarted"
    assert sent == []
    Gated.gate.callback(None)
    [(result, release)] = sent
    release()
    assert result.status == "delivered"
    assert agent.limits == {}                  # every place given back


# -- an SMTP session while the server drains --------------------------------------------

@pytest_twisted.inlineCallbacks
def test_a_draining_smtp_session_may_make_its_first_transaction_only(
        tmp_path: Path) -> None:
    from inprocess import Raw, in_thread, start
    # (Shorter than the server's shutdown_timeout, 2s, after which the rest is cut.)
    server = yield start(tmp_path, "[smtp]\ndrain_idle_timeout = 1.5s\n")
    port = server.ports["mx"]
    done = yield in_thread(Raw, port)          # a transaction before the drain
    for line, code in (("EHLO c", "250"), ("MAIL FROM:<a@example.org>", "250"),
                       ("RCPT TO:<bob@example.test>", "250"), ("DATA", "354"),
                       ("Subject: one\r\n\r\none\r\n.", "250")):
        assert (yield in_thread(done.cmd, line)).startswith(code)
    fresh = yield in_thread(Raw, port)         # has only just connected
    assert (yield in_thread(fresh.cmd, "EHLO c")).startswith("250")
    stopping = server.root.stopService()
    membership = server.parts.membership
    assert membership.draining

    def closed() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        return False
    while not (yield in_thread(closed)):       # the listener closed: sessions drain
        pass

    def first_transaction() -> list[str]:
        return [fresh.cmd(line)[:9] for line in (
            "MAIL FROM:<a@example.org>", "RCPT TO:<bob@example.test>", "DATA",
            "Subject: two\r\n\r\ntwo\r\n.", "NOOP", "MAIL FROM:<a@example.org>")]
    said = yield in_thread(first_transaction)
    assert said == ["250 2.1.0", "250 2.1.5", "354 End d", "250 2.0.0", "250 2.0.0",
                    "421 4.3.2"], said
    # The one that had made its transaction, silent: closed after drain_idle_timeout.
    assert (yield in_thread(done.reply))[0].startswith("421 4.3.2")
    yield stopping
    for client in (done, fresh):
        client.close()
    assert sorted(content.split(b"Subject: ")[1][:3] for _, _, content
                  in stored_messages(tmp_path / "state")) == [b"one", b"two"]


# -- real nodes: kill -9, and a rolling restart behind HAProxy ---------------------------

LOCAL = "ann@lifecycle.test"
REMOTE = "sink@remote.test"
PASSWORD = "lifecycle-secret"
HEARTBEAT, DEAD_AFTER = 0.5, 2.0


class SlowMX:
    """The nodes' relay (their outbound mail goes here): an SMTP server that keeps the
    Message-ID of each message it said 250 to.  While ``gate`` is clear it holds each
    new connection before its greeting (an MX that does not answer yet: the
    deliveries hang, their leases held); ``delay`` slows each answer to DATA."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.received: list[str] = []
        self.held = 0                       # connections waiting at the gate now
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        self.gate.set()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.held += 1
        self.gate.wait()
        with self.lock:
            self.held -= 1
        try:
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b"220 slow.remote.test ESMTP\r\n")
                while line := lines.readline():
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        conn.sendall(b"250-slow.remote.test\r\n250 8BITMIME\r\n")
                    elif verb == b"DATA":
                        conn.sendall(b"354 go ahead\r\n")
                        self._content(conn, lines)
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 ok\r\n")
        except OSError:
            pass                            # the sender went away (kill -9)

    def _content(self, conn: socket.socket, lines: Any) -> None:
        found = ""
        while (line := lines.readline()) not in (b".\r\n", b""):
            match = re.match(rb"Message-ID:\s*(<[^>]+>)", line, re.IGNORECASE)
            if match and not found:
                found = match.group(1).decode()
        time.sleep(self.delay)
        conn.sendall(b"250 2.0.0 ok\r\n")
        with self.lock:                     # said 250: the sender holds it delivered
            self.received.append(found)


def require_redis() -> None:
    try:
        subprocess.run(["redis-cli", "-n", "9", "ping"], check=True, capture_output=True,
                       timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"no Redis at {REDIS} ({exc}): run `make services` (part of "
                    "`make test`)", pytrace=False)


class Cluster:
    """Nodes on one PostgreSQL database and Redis, each on ports of its own that stay
    the same across its restarts (HAProxy names them); every process started is
    killed at the end, its log kept as server.log in its state directory."""

    def __init__(self, root: Path, database: str, relay: int, notice: str = "0s",
                 concurrency: int = 2) -> None:
        self.root = root
        self.database = database
        self.relay = relay
        self.notice = notice
        self.concurrency = concurrency
        self.prefix = f"lmtest{uuid.uuid4().hex[:8]}:"
        self.ports: dict[str, dict[str, int]] = {}
        self.started: list[ServerProcess] = []

    def config(self, name: str, node_id: str = "") -> Path:
        """Node ``name``'s configuration (made once); ``node_id``: another node's."""
        state = self.root / name
        path = state / "lightmail.conf"
        if path.exists():
            return path
        state.mkdir()
        ports = self.ports[name] = dict(zip(("mx", "imap", "admin"), free_ports(3),
                                            strict=True))
        path.write_text(
            f"[server]\nstate_dir = {state}\nhostname = {name}.lifecycle.test\n"
            f"node_id = {node_id or name}\nshutdown_timeout = 10s\n"
            f"[storage]\nurl = {self.database}\nblob_dir = {self.root / 'blobs'}\n"
            f"[cluster]\nredis = {REDIS}\nprefix = {self.prefix}\nlease = 3s\n"
            f"heartbeat = {HEARTBEAT}s\ndead_after = {DEAD_AFTER}s\n"
            f"drain_notice = {self.notice}\n"
            "[logging]\nlevel = info\n"
            "[directory]\nauth_over_plaintext = yes\n"
            # The clients (and HAProxy) are on loopback: they may relay.
            "[access]\ntrusted_networks = 127.0.0.1/32\n"
            f"[outbound]\nrelay_host = [127.0.0.1]:{self.relay}\n"
            f"destination_concurrency = {self.concurrency}\n"
            f"[admin]\nenabled = yes\nendpoint = tcp:{ports['admin']}:interface=127.0.0.1\n"
            "[listener:mx]\nprotocol = smtp\n"
            f"endpoint = tcp:{ports['mx']}:interface=127.0.0.1\n"
            "[listener:imap]\nprotocol = imap\n"
            f"endpoint = tcp:{ports['imap']}:interface=127.0.0.1\n")
        return path

    def start(self, name: str) -> ServerProcess:
        proc = ServerProcess(self.config(name))
        self.started.append(proc)
        proc.wait_for(r"LightMail ready", timeout=90)
        return proc

    def kill(self) -> None:
        logs: dict[Path, list[str]] = {}
        for proc in self.started:
            proc.kill()
            logs.setdefault(proc.config.parent, []).append(proc.output)
        for state, outputs in logs.items():     # every run of the node, in order
            (state / "server.log").write_text("\n--- restarted ---\n".join(outputs))


def message(message_id: str, to: list[str]) -> bytes:
    return (f"From: sender@lifecycle.test\r\nTo: {', '.join(to)}\r\n"
            f"Subject: lifecycle\r\nMessage-ID: {message_id}\r\n\r\nbody\r\n").encode()


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds it took for ``check`` to hold; fails with ``what`` after ``timeout``."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - began


def queue_rows(engine: sa.Engine) -> list[tuple[str, str | None]]:
    r = schema.queue_recipients
    with engine.connect() as conn:
        return [(row.state, row.lease_owner)
                for row in conn.execute(sa.select(r.c.state, r.c.lease_owner))]


def api(port: int, method: str, path: str, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def postgres_cluster(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    require_redis()
    with empty_database("postgresql", tmp_path) as database:
        yield database, tmp_path


def test_a_killed_nodes_leases_go_to_another_after_dead_after_and_nothing_twice(
        postgres_cluster: tuple[str, Path]) -> None:
    database, root = postgres_cluster
    mx = SlowMX()
    mx.gate.clear()                             # the MX does not answer yet
    cluster = Cluster(root, database, mx.port)
    engine = sa.create_engine(database, poolclass=sa.pool.NullPool)
    try:
        a = cluster.start("a")
        sent = [f"<held-{n}@lifecycle.test>" for n in range(6)]
        with smtplib.SMTP("127.0.0.1", cluster.ports["a"]["mx"], timeout=30) as smtp:
            for message_id in sent:
                smtp.sendmail("sender@lifecycle.test", [REMOTE],
                              message(message_id, [REMOTE]))
        # a holds every lease: two deliveries at the MX's door, four waiting their turn.
        wait_until("a leasing the six", lambda: queue_rows(engine) == [("active", "a")] * 6
                   and mx.held == 2, 30)
        b = cluster.start("b")
        assert queue_rows(engine) == [("active", "a")] * 6    # leased for 600s: not b's
        # A second process as node a is refused while a beats (it would take a's
        # leases back at its start).
        twin = ServerProcess(cluster.config("a-twin", node_id="a"))
        cluster.started.append(twin)
        assert twin.proc.wait(60) == 1
        assert re.search(rf"LightMail cannot run: node id 'a' is in use: process "
                         rf"{a.proc.pid} on \S+ beat [\d.]+s ago \(running\)", twin.output)
        assert queue_rows(engine) == [("active", "a")] * 6
        a.kill()                                # kill -9: it lets go of nothing
        mx.gate.set()
        took = wait_until("the six delivered", lambda: len(mx.received) == 6, 30)
        b.wait_for(r"node a is dead \(no heartbeat for 2s\): 6 queue leases handed back")
        print(f"a's 6 leases delivered by b {took:.2f}s after kill -9 (heartbeat "
              f"{HEARTBEAT}s, dead_after {DEAD_AFTER}s; the lease is 600s)")
        assert DEAD_AFTER - HEARTBEAT - 0.5 < took < DEAD_AFTER + 10
        time.sleep(1.0)                         # anything sent twice would be here now
        assert Counter(mx.received) == Counter(sent)
        assert queue_rows(engine) == []
        # What the administrator sees: the command, and the admin API.
        listed = run_cli(b.config, "node", "list")
        assert re.search(r"^a\t\S+\tpid \d+\tdead\theartbeat [\d.]+s ago\tleases=0\t",
                         listed, re.MULTILINE), listed
        assert re.search(r"^b\t\S+\tpid \d+\trunning\t", listed, re.MULTILINE), listed
        token = run_cli(b.config, "token", "add", "ops", "--scope", "write").splitlines()[-1]
        admin = cluster.ports["b"]["admin"]
        status, nodes = api(admin, "GET", "/api/v1/nodes", token)
        assert status == 200
        assert {node["node_id"]: node["state"] for node in nodes} == {"a": "dead",
                                                                      "b": "running"}
        assert api(admin, "POST", "/api/v1/nodes/a/drain", token)[0] == 409
        assert api(admin, "POST", "/api/v1/nodes/nobody/drain", token)[0] == 404
        # b drains when asked through the database, and its process ends.
        said = run_cli(b.config, "node", "drain", "b", "--wait", "--timeout", "60")
        assert said.splitlines()[-1] == "b: stopped", said
        assert b.proc.wait(30) == 0
        b.wait_for(r"a drain was requested through the database: draining and stopping")
        assert "handed back" not in b.output.split("draining and stopping")[1]
    finally:
        cluster.kill()
        mx.close()
        engine.dispose()


class Submitter(threading.Thread):
    """Submits mail through HAProxy without a pause, a session a message; keeps the
    Message-IDs of those that got their 250 and every failed session."""

    def __init__(self, number: int, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.number, self.port, self.stop = number, port, stop
        self.accepted: list[tuple[str, list[str]]] = []
        self.failures: list[str] = []

    def run(self) -> None:
        count = 0
        while not self.stop.is_set():
            message_id = f"<r{self.number}-{count}@lifecycle.test>"
            # Every fifth also goes out: through the queue, to the relay.
            to = [LOCAL, REMOTE] if count % 5 == 0 else [LOCAL]
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
                    smtp.sendmail("sender@lifecycle.test", to, message(message_id, to))
                self.accepted.append((message_id, to))
            except (OSError, smtplib.SMTPException) as exc:
                self.failures.append(f"{message_id}: {exc!r}")
            count += 1
            time.sleep(0.1)


def imap_message_ids(port: int) -> Counter[str]:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        imap.login(LOCAL, PASSWORD)
        typ, data = imap.select("INBOX")
        assert typ == "OK", data
        if int(data[0]) == 0:
            return Counter()
        typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK", data
        return Counter(match.group(0).decode() for part in data if isinstance(part, tuple)
                       for match in [re.search(rb"<[^>]+>", part[1])] if match)
    finally:
        imap.logout()


def test_a_rolling_restart_behind_haproxy_loses_no_session_and_no_message(
        postgres_cluster: tuple[str, Path]) -> None:
    database, root = postgres_cluster
    began = time.monotonic()
    # A relay slow enough, and one delivery to it at a time, for a node to hold
    # deliveries waiting for their turn when it drains (it hands them back).
    mx = SlowMX(delay=0.6)
    # HAProxy checks /readyz every 200ms and takes a node out after two failures:
    # a second of notice is ample.
    cluster = Cluster(root, database, mx.port, notice="1s", concurrency=1)
    engine = sa.create_engine(database, poolclass=sa.pool.NullPool)
    names = ("n1", "n2", "n3")
    try:
        nodes = {"n1": cluster.start("n1")}
        config = nodes["n1"].config
        run_cli(config, "domain", "add", "lifecycle.test")
        run_cli(config, "user", "add", LOCAL, "--password-stdin", stdin=PASSWORD + "\n")
        # Its INBOX made now, at its first login: two nodes that both find it missing
        # and make it at once collide (one delivery then waits for its retry).
        assert imap_message_ids(cluster.ports["n1"]["imap"]) == Counter()
        for name in names[1:]:
            nodes[name] = cluster.start(name)
        pool = Pool({name: (cluster.ports[name]["mx"],
                            f"check port {cluster.ports[name]['admin']}")
                     for name in names},
                    backend="option redispatch\nretries 3\noption httpchk GET /readyz\n"
                            "default-server inter 200ms fall 2 rise 2")
        with HAProxy({"smtp": pool}) as haproxy:
            def up(name: str) -> bool:
                return haproxy.server("smtp", name)["status"] == "UP"
            wait_until("every node up in HAProxy", lambda: all(map(up, names)), 30)
            stop = threading.Event()
            submitters = [Submitter(number, haproxy.ports["smtp"], stop)
                          for number in range(3)]
            for submitter in submitters:
                submitter.start()
            time.sleep(1.0)
            for name in names:
                drained = time.monotonic()
                code = nodes[name].terminate(timeout=60)        # SIGTERM: drain
                drain = time.monotonic() - drained
                assert code in (0, -15), nodes[name].output
                log = nodes[name].output
                assert "draining: the listeners close in 1s" in log
                handed = re.findall(r"handed back (\d+) deliveries not started", log)
                nodes[name] = cluster.start(name)
                back = wait_until(f"{name} up again", lambda name=name: up(name), 30)
                print(f"{name}: drained in {drain:.1f}s (1s of notice), up in HAProxy "
                      f"{back:.1f}s after its start; deliveries handed back: "
                      f"{handed or 'none'}")
            time.sleep(1.0)
            stop.set()
            for submitter in submitters:
                submitter.join(60)
        accepted = [one for submitter in submitters for one in submitter.accepted]
        failures = [one for submitter in submitters for one in submitter.failures]
        emptied = wait_until("the queue empty", lambda: queue_rows(engine) == [], 30)
        filed = imap_message_ids(cluster.ports["n1"]["imap"])
        relayed = Counter(mx.received)
        print(f"{len(accepted)} messages accepted through HAProxy during the rolling "
              f"restart ({sum(len(to) > 1 for _, to in accepted)} relayed too), "
              f"{len(failures)} sessions failed; the queue empty {emptied:.1f}s after "
              f"the last; {time.monotonic() - began:.0f}s in all")
        assert failures == []
        assert filed == Counter(message_id for message_id, _ in accepted)
        assert relayed == Counter(message_id for message_id, to in accepted
                                  if REMOTE in to)
    finally:
        cluster.kill()
        mx.close()
        engine.dispose()
