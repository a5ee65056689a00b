"""The shared state of several nodes (lightmail/cluster), in one process: each "node" is
a Node with its hub and locks, on the Redis at 127.0.0.1:6379 (database 9 of it, as
conftest's ``redis`` fixture), under a prefix of each test's own.  The nodes as
separate servers are in test_cluster_nodes.py."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import REDIS
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher

from lightmail.cluster.hub import ClusterHub
from lightmail.cluster.locks import ClusterLocks
from lightmail.cluster.node import Node
from lightmail.cluster.redis import LazyRedis, RedisLink
from lightmail.config import ClusterConfig, ConfigError, parse_config
from lightmail.directory.logins import LocalFailureCounts
from lightmail.directory.sharedfailures import SharedFailureCounts
from lightmail.policy.limits import FallingBackBuckets
from lightmail.pop3.maildrop import LockUnavailable, LoginTooSoon, MaildropLocked
from lightmail.storage.interfaces import MISSED, MailboxChange
from lightmail.wiring import Role, make_failure_counts, make_limiter
from tests.harness import wait_until


class Watcher:
    """Stands in for an IMAP session with a mailbox selected."""

    def __init__(self) -> None:
        self.heard: list[MailboxChange] = []
        self.waiting: list[defer.Deferred[None]] = []

    def mailbox_changed(self, change: MailboxChange) -> None:
        self.heard.append(change)
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)

    def next(self, timeout: float = 2.0) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append(d)
        return d.addTimeout(timeout, reactor)


class Cluster:
    """Nodes on one prefix; each started node is stopped at the end."""

    def __init__(self, address: str = REDIS, lease: float = 30.0) -> None:
        self.config = ClusterConfig(redis=address, prefix=f"t{uuid.uuid4().hex[:8]}:",
                                    redis_timeout=0.5, lease=lease)
        self.nodes: list[Node] = []

    async def node(self, name: str, start: bool = True) -> tuple[Node, ClusterHub,
                                                                ClusterLocks]:
        node = Node(self.config, name)
        hub, locks = ClusterHub(node), ClusterLocks(node)
        self.nodes.append(node)
        if start:
            node.startService()
            await wait_until(lambda: node.subscription is not None
                             and node.subscription.listening)
        return node, hub, locks

    async def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                await node.stopService()
            else:
                await node.redis.disconnect()


@pytest.fixture
def cluster(redis: LazyRedis) -> Iterator[Cluster]:
    nodes = Cluster()
    yield nodes
    pytest_twisted.blockon(defer.ensureDeferred(nodes.stop()))


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                                          # nobody listens there
    return int(port)


def appended(mailbox: int, uid: int, modseq: int) -> MailboxChange:
    return MailboxChange(user_id=7, mailbox_id=mailbox, kind="appended", uids=(uid,),
                         modseq=modseq)


# --- mailbox changes ----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_change_reaches_the_other_nodes_sessions_without_its_content(
        cluster: Cluster) -> None:
    _, a, _ = await cluster.node("a")
    _, b, _ = await cluster.node("b")
    on_a, on_b, elsewhere = Watcher(), Watcher(), Watcher()
    a.watch(5, on_a)
    b.watch(5, on_b)
    b.watch(6, elsewhere)
    heard = on_b.next()
    a.mailbox_changed(appended(5, 3, 11))
    assert on_a.heard == [appended(5, 3, 11)]              # this node's: at once
    await heard
    # The other node's session reads the store: no UIDs, no messages, the MODSEQ.
    assert on_b.heard == [MailboxChange(7, 5, "appended", modseq=11)]
    assert elsewhere.heard == []
    await task.deferLater(reactor, 0.2, lambda: None)
    assert on_a.heard == [appended(5, 3, 11)]              # its own is not heard again


@pytest_twisted.ensureDeferred
async def test_other_nodes_changes_reach_the_relays_and_select_sees_them(
        cluster: Cluster) -> None:
    _, a, _ = await cluster.node("a")
    _, b, _ = await cluster.node("b")
    workers = Watcher()
    b.add_relay(workers)
    mark = b.announced
    heard = workers.next()
    a.mailbox_changed(MailboxChange(7, 9, "expunged", uids=(1, 2), modseq=40))
    await heard
    assert workers.heard == [MailboxChange(7, 9, "expunged", modseq=40)]
    # A SELECT that read the mailbox at MODSEQ 39 before it watched knows it missed it.
    assert b.missed_since(mark, 9, 39) and not b.missed_since(mark, 9, 40)


@pytest_twisted.ensureDeferred
async def test_a_subscription_lost_and_back_has_every_selected_mailbox_read_again(
        cluster: Cluster) -> None:
    node, hub, _ = await cluster.node("a")
    one, two = Watcher(), Watcher()
    hub.watch(5, one)
    hub.watch(6, two)
    assert node.subscription is not None
    factory = node.subscription._factory
    for conn in list(factory.pool):                    # the link breaks (no API for it)
        conn.transport.loseConnection()
    await one.next(timeout=15)                          # txredisapi reconnects after ~1 s
    await wait_until(lambda: bool(two.heard))
    assert one.heard == [MailboxChange(0, 5, MISSED)]
    assert two.heard == [MailboxChange(0, 6, MISSED)]
    assert node.subscription.listening


@pytest_twisted.ensureDeferred
async def test_garbage_on_the_channel_is_logged_and_ignored(cluster: Cluster) -> None:
    _, hub, _ = await cluster.node("a")
    watcher = Watcher()
    hub.watch(5, watcher)
    for payload in (b"not json", b"{}", b'{"o": "x", "u": "a", "m": 5, "k": "k", "s": 1}',
                    b"[1, 2]"):
        hub.heard(payload)
    assert watcher.heard == []


# --- \Recent --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_recent_is_claimed_once_across_nodes(cluster: Cluster) -> None:
    _, a, _ = await cluster.node("a")
    _, b, _ = await cluster.node("b")
    on_b = Watcher()
    for mailbox in (5, 8):
        b.watch(mailbox, on_b)

    async def on_a(change: MailboxChange) -> None:
        """A commits ``change``; B's session hears of it (and then asks)."""
        heard = on_b.next()
        a.mailbox_changed(change)
        await heard
    assert await a.claim_recent(5, 4) == 4          # first sight: nothing recent yet
    await on_a(appended(5, 4, 12))                   # UID 4 arrives
    assert await b.peek_recent(5, 5) == 4            # EXAMINE on B sees it recent
    assert await b.claim_recent(5, 5) == 4           # SELECT on B takes it
    assert await a.claim_recent(5, 5) == 5           # not recent for A's session
    await on_a(MailboxChange(7, 8, "created", modseq=1))
    assert await b.claim_recent(8, 3) == 1           # a new mailbox: all of it is new
    await on_a(MailboxChange(7, 8, "deleted"))
    assert await b.peek_recent(8, 1) == 1            # forgotten with the mailbox


# --- sessions per user ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_sessions_per_user_are_counted_across_nodes(cluster: Cluster) -> None:
    _, a, _ = await cluster.node("a")
    _, b, _ = await cluster.node("b")
    assert await a.login(7, 3) and await b.login(7, 3) and await a.login(7, 3)
    assert not await b.login(7, 3)
    assert await b.login(8, 3)                        # another user
    a.logout(7)                                        # not answered: on A's connection
    assert await a.login(7, 3)                         # so asked after it, on A
    assert not await b.login(7, 3)


@pytest_twisted.ensureDeferred
async def test_a_dead_nodes_sessions_expire_and_a_live_ones_are_renewed(
        redis: LazyRedis) -> None:
    cluster = Cluster(lease=0.6)
    try:
        _, live, _ = await cluster.node("live")
        _, dead, _ = await cluster.node("dead", start=False)   # never renews
        assert await live.login(7, 2) and await dead.login(7, 2)
        assert not await live.login(7, 2)
        await task.deferLater(reactor, 1.0, lambda: None)
        assert await live.login(7, 2)                 # the dead node's mark expired
        assert not await live.login(7, 2)             # the live one's was renewed
    finally:
        await cluster.stop()


# --- POP3 locks ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_maildrop_lock_holds_across_nodes(cluster: Cluster) -> None:
    _, _, a = await cluster.node("a")
    _, _, b = await cluster.node("b")
    await a.acquire(7, 0)
    with pytest.raises(MaildropLocked):
        await b.acquire(7, 0)
    with pytest.raises(MaildropLocked):
        await a.acquire(7, 0)
    await b.acquire(8, 0)                              # another user's
    await a.release(7)
    await b.acquire(7, 0)
    await a.release(7)                                 # not A's any more: stays B's
    with pytest.raises(MaildropLocked):
        await a.acquire(7, 0)


@pytest_twisted.ensureDeferred
async def test_login_delay_holds_across_nodes(cluster: Cluster) -> None:
    _, _, a = await cluster.node("a")
    _, _, b = await cluster.node("b")
    await a.acquire(7, 0.5)
    await a.release(7)
    with pytest.raises(LoginTooSoon):
        await b.acquire(7, 0.5)
    await task.deferLater(reactor, 0.6, lambda: None)
    await b.acquire(7, 0.5)


@pytest_twisted.ensureDeferred
async def test_a_dead_nodes_lock_expires_and_a_live_ones_is_renewed(
        redis: LazyRedis) -> None:
    cluster = Cluster(lease=0.6)
    try:
        _, _, live = await cluster.node("live")
        _, _, dead = await cluster.node("dead", start=False)
        _, _, other = await cluster.node("other")
        await live.acquire(1, 0)
        await dead.acquire(2, 0)
        await task.deferLater(reactor, 1.0, lambda: None)
        with pytest.raises(MaildropLocked):
            await other.acquire(1, 0)                  # renewed
        await other.acquire(2, 0)                      # expired with its node
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_a_stopping_node_lets_go_of_its_leases(cluster: Cluster) -> None:
    node, hub, a = await cluster.node("a")
    _, b_hub, b = await cluster.node("b")
    await a.acquire(7, 0)
    assert await hub.login(7, 1)
    await node.stopService()
    await b.acquire(7, 0)
    assert await b_hub.login(7, 1)


# --- Redis away ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_without_redis_pop3_is_refused_and_imap_counts_alone() -> None:
    cluster = Cluster(address=f"127.0.0.1:{closed_port()}", lease=3)
    try:
        node, hub, locks = await cluster.node("a", start=False)
        node.startService()
        with pytest.raises(LockUnavailable):
            await locks.acquire(7, 0)
        assert await hub.login(7, 1)                   # counted by this node
        assert not await hub.login(7, 1)
        hub.logout(7)
        assert await hub.login(7, 1)
        assert await hub.claim_recent(5, 9) == 9       # this node's \Recent
        watcher = Watcher()
        hub.watch(5, watcher)
        hub.mailbox_changed(appended(5, 9, 3))         # its sessions hear it all the same
        assert watcher.heard == [appended(5, 9, 3)]
        assert await hub.claim_recent(5, 10) == 9
        assert await node.check() == ("no answer within 0.5s (cannot connect: Connection "
                                      "was refused by other side: 111: Connection refused.)")
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_the_readiness_check_says_ok(cluster: Cluster) -> None:
    node, _, _ = await cluster.node("a")
    assert await node.check() == "ok"


# --- configuration --------------------------------------------------------------------------

def test_the_cluster_section(tmp_path: Path) -> None:
    assert parse_config("").cluster.redis == ""
    secret = tmp_path / "redis.secret"
    secret.write_text("s3cret\n")
    config = parse_config(f"[cluster]\nredis = 10.0.0.5:6379/2\nredis_password_file = "
                          f"{secret}\nprefix = mail1:\nlease = 1m\n")
    assert (config.cluster.redis, config.cluster.redis_password, config.cluster.lease,
            config.cluster.prefix) == ("10.0.0.5:6379/2", "s3cret", 60.0, "mail1:")
    assert "s3cret" not in repr(config)
    for bad, message in (("redis = nowhere", "expected HOST:PORT"),
                         ("prefix = a b", "expected letters"),
                         ("lease = 1s", "at least"),
                         (f"redis_password_file = {secret}", "applies to no Redis"),
                         ("redis = a:1\nredis_user = lm", "needs redis_password_file"),
                         ("redis = a:1\nredis_ca_file = x.pem", "needs redis_tls = yes")):
        with pytest.raises(ConfigError, match=message):
            parse_config(f"[cluster]\n{bad}\n")


# --- the login guard's failure counts --------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_login_failures_are_counted_across_processes(redis: LazyRedis) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    local_one = LocalFailureCounts(0.8, lambda: 0.0)
    one = SharedFailureCounts(LazyRedis(RedisLink(REDIS)), prefix, 0.8, local_one)
    two = SharedFailureCounts(LazyRedis(RedisLink(REDIS)), prefix, 0.8,
                              LocalFailureCounts(0.8, time.time))
    try:
        assert [await one.add("net:192.0.2.1"), await two.add("net:192.0.2.1"),
                await one.add("net:192.0.2.1")] == [1, 2, 3]
        assert await two.count("net:192.0.2.1") == 3
        assert await two.count("user:ann@example.test") == 0
        await task.deferLater(reactor, 1.0, lambda: None)
        assert await one.count("net:192.0.2.1") == 0           # out of the window
        assert await one.add("net:192.0.2.1") == 1
        two.clear("net:192.0.2.1")
        await wait_until_deferred(lambda: one.count("net:192.0.2.1"), 0)
        assert local_one.times == {}                 # Redis counted, not the process
    finally:
        await one.redis.disconnect()
        await two.redis.disconnect()


async def wait_until_deferred(ask: Callable[[], defer.Deferred[Any]], value: Any) -> None:
    for _ in range(100):
        if await ask() == value:
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"never {value!r}")


@pytest_twisted.ensureDeferred
async def test_login_failures_are_counted_by_the_process_while_redis_is_away() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    counts = SharedFailureCounts(LazyRedis(RedisLink(f"127.0.0.1:{closed_port()}")), "x:", 60,
                                 LocalFailureCounts(60, time.time), timeout=0.2)
    try:
        assert [await counts.add("k") for _ in range(3)] == [1, 2, 3]
        assert await counts.count("k") == 3
        counts.clear("k")
        assert await counts.count("k") == 0
    finally:
        globalLogPublisher.removeObserver(events.append)
        await counts.redis.disconnect()
    said = [e for e in events if "does not answer" in str(e.get("log_format", ""))]
    assert len(said) == 1


def test_the_login_guard_counts_in_redis_where_logins_are_served() -> None:
    alone = parse_config("")
    shared = parse_config(f"[cluster]\nredis = {REDIS}\n")
    assert isinstance(make_failure_counts(alone, Role.SERVER), LocalFailureCounts)
    for role in (Role.SERVER, Role.WORKER):
        assert isinstance(make_failure_counts(shared, role), SharedFailureCounts)
    for role in (Role.WRITER, Role.COMMAND):
        assert isinstance(make_failure_counts(shared, role), LocalFailureCounts)


# --- a Redis that wants a password ------------------------------------------------------------

@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of this test's own, with ``requirepass``: its HOST:PORT."""
    port = closed_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--requirepass", "s3cret", "--save", "", "--appendonly",
                               "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@pytest_twisted.ensureDeferred
async def test_the_password_file_opens_redis_to_the_node_and_the_limits(
        locked_redis: str, tmp_path: Path) -> None:
    secret = tmp_path / "redis.secret"
    secret.write_text("s3cret\n")
    config = parse_config(f"[cluster]\nredis = {locked_redis}/3\nredis_password_file = "
                          f"{secret}\nredis_timeout = 0.5s\n"
                          f"[limits]\nbackend = redis\nredis = {locked_redis}\n")
    node = Node(config.cluster, "a")
    limiter = make_limiter(config)
    assert isinstance(limiter, FallingBackBuckets)
    try:
        assert await node.check() == "ok"
        assert [await limiter.take("k", 0.01, 1) for _ in range(2)][1] > 0
        assert not limiter.backend.down                      # Redis's buckets, not local
    finally:
        await node.redis.disconnect()
        await limiter.primary.redis.disconnect()             # type: ignore[attr-defined]
