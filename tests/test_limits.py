"""Rate limits (lightmail/policy/limits): token buckets in this process and in the
Redis at 127.0.0.1:6379 (database 9 of it, emptied by the tests), the fallback while
Redis is away (logged once), and the limits check on a running LightMail hit by
smtplib and smtp-source bursts."""

from __future__ import annotations

import smtplib
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from conftest import REDIS
from inprocess import in_thread, start
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from lightmail.cluster.redis import RedisLink
from lightmail.config import parse_config
from lightmail.policy.inbound.findings import Findings
from lightmail.policy.limits import (
    FallingBackBuckets,
    IRateLimiter,
    LazyRedis,
    LocalBuckets,
    RedisBuckets,
)
from lightmail.policy.limits.check import LimitsCheck, network_of
from lightmail.wiring import make_limiter


def test_local_buckets_allow_a_burst_then_the_rate() -> None:
    now = [1000.0]
    buckets = LocalBuckets(clock=lambda: now[0])
    assert [buckets.take_now("k", 1.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take_now("k", 1.0, 3) == pytest.approx(1.0)
    assert buckets.take_now("k", 1.0, 3) == pytest.approx(1.0)   # a refusal costs nothing
    now[0] += 2.5
    assert buckets.take_now("k", 1.0, 3) == 0.0
    assert buckets.take_now("k", 1.0, 3) == 0.0
    assert buckets.take_now("k", 1.0, 3) == pytest.approx(0.5)
    assert buckets.take_now("other", 1.0, 3) == 0.0


def test_local_buckets_are_bounded() -> None:
    buckets = LocalBuckets(max_buckets=10, clock=lambda: 0.0)
    for n in range(100):
        buckets.take_now(f"k{n}", 1.0, 1)
    assert len(buckets._buckets) == 10
    assert buckets.take_now("k0", 1.0, 1) == 0.0          # forgotten: full again


def test_networks_are_the_24_or_the_64() -> None:
    assert network_of("192.0.2.77") == "192.0.2.0/24"
    assert network_of("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"


@pytest_twisted.ensureDeferred
async def test_redis_buckets_are_shared_and_never_overspent(redis: LazyRedis) -> None:
    one, two = RedisBuckets(redis), RedisBuckets(LazyRedis(RedisLink(REDIS)))
    try:
        waits = await defer.gatherResults(
            [(one if n % 2 else two).take("shared", 0.01, 5) for n in range(20)])
        assert sorted(w == 0.0 for w in waits).count(True) == 5
        assert all(w > 0 for w in waits if w)
        assert await one.take("another", 0.01, 5) == 0.0
    finally:
        await two.redis.disconnect()


@pytest_twisted.ensureDeferred
async def test_redis_down_falls_back_and_says_so_once() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()                                       # nobody listens there
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    limiter = FallingBackBuckets(RedisBuckets(LazyRedis(RedisLink(f"127.0.0.1:{port}"))),
                                 LocalBuckets(), timeout=0.3)
    try:
        waits = [await limiter.take("k", 0.01, 2) for _ in range(4)]
    finally:
        globalLogPublisher.removeObserver(events.append)
        await limiter.primary.redis.disconnect()         # type: ignore[attr-defined]
    assert waits[:2] == [0.0, 0.0] and waits[2] > 0      # the local buckets counted
    said = [e for e in events if "does not answer" in str(e.get("log_format", ""))]
    assert len(said) == 1
    unlimited = FallingBackBuckets(RedisBuckets(LazyRedis(RedisLink(f"127.0.0.1:{port}"))), None,
                                   timeout=0.3)
    assert [await unlimited.take("k", 0.01, 1) for _ in range(3)] == [0.0] * 3
    await unlimited.primary.redis.disconnect()           # type: ignore[attr-defined]


def test_the_check_waits_for_a_shared_backend_and_stops_at_the_first_limit() -> None:
    """Buckets in memory answer at once; a shared backend's answer is waited for,
    one limit after the other, and the first limit reached refuses."""
    @implementer(IRateLimiter)
    class Later:
        def __init__(self) -> None:
            self.asked: list[str] = []
            self.answers: list[defer.Deferred[float]] = []

        def take(self, key: str, rate: float, burst: float, cost: float = 1.0) -> Any:
            self.asked.append(key)
            self.answers.append(defer.Deferred())
            return self.answers[-1]

        def peek(self, key: str, rate: float, burst: float, cost: float = 1.0) -> Any:
            return defer.succeed(0.0)
    config = parse_config("[limits]\nclient_messages = 10/1h\nnetwork_messages = 10/1h\n"
                          "sender_domain_messages = 10/1h\n")
    later = Later()
    check = LimitsCheck(later, lambda: config.limits)
    session = SimpleNamespace(peer="192.0.2.7", account=None, conn_id="c1")
    tx = SimpleNamespace(mail_from="ann@sender.test")
    replies: list[Any] = []
    check.mail(session, tx, Findings()).addCallback(replies.append)
    assert later.asked == ["client_messages:192.0.2.7"] and replies == []
    later.answers[0].callback(0.0)
    assert later.asked[-1] == "network_messages:192.0.2.0/24" and replies == []
    later.answers[1].callback(120.0)                        # that one is reached
    assert len(later.asked) == 2
    [reply] = replies
    assert (reply.code, reply.status) == (450, "4.7.1")
    assert reply.text == ("Rate limit reached: at most 10 messages per hour from network "
                          "192.0.2.0/24; try again in 120 s")
    # In memory: all three at once, and on.
    at_once = LimitsCheck(LocalBuckets(), lambda: config.limits)
    answered = at_once.mail(session, tx, Findings())
    assert answered.called
    replies.clear()
    answered.addCallback(replies.append)
    assert replies == [None]


def test_the_backend_is_chosen_from_the_config() -> None:
    assert isinstance(make_limiter(parse_config("")), LocalBuckets)
    chosen = make_limiter(parse_config(f"[limits]\nbackend = redis\nredis = {REDIS}\n"
                                       "redis_down = none\n"))
    assert isinstance(chosen, FallingBackBuckets) and chosen.fallback is None


# --- on a running LightMail -----------------------------------------------------------------

def transaction(port: int, rcpts: list[str], sender: str = "a@sender.test") -> Any:
    def go() -> Any:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo()
            code, text = smtp.mail(sender)
            if code != 250:
                return code, text.decode()
            answers = [smtp.rcpt(rcpt) for rcpt in rcpts]
            refused = [(c, t.decode()) for c, t in answers if c != 250]
            if refused:
                return refused[0]
            smtp.data(b"Subject: limits\r\n\r\nhi\r\n")
            return 250, ""
    return in_thread(go)


@pytest_twisted.inlineCallbacks
def test_message_recipient_and_connection_limits(tmp_path: Path) -> Any:
    server = yield start(tmp_path, extra="[limits]\nclient_messages = 3/1h\n"
                         "recipient_domain_recipients = 2/1d\nclient_connections = 5/1h\n")
    try:
        port = server.ports["mx"]
        assert (yield transaction(port, ["bob@example.test"])) == (250, "")
        code, text = yield transaction(port, ["bob@example.test", "postmaster@example.test"])
        assert code == 450 and text == ("4.7.1 Rate limit reached: at most 2 recipients "
                                        "per day to example.test; try again in 43200 s")
        code, text = yield transaction(port, ["bob@example.test"])
        assert code == 450 and "recipients per day" in text
        code, text = yield transaction(port, ["bob@example.test"])
        assert code == 450 and text.startswith("4.7.1 Rate limit reached: at most 3 "
                                               "messages per hour from client 127.0.0.1")
        # Connections: 5 an hour, counted at connect; 4 were spent above.
        def connect() -> int:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                return int(sock.recv(512)[:3])
        answers = yield defer.gatherResults([in_thread(connect) for _ in range(3)])
        assert sorted(answers) == [220, 421, 421], answers
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_a_burst_from_smtp_source_is_cut_at_the_limit(tmp_path: Path) -> Any:
    server = yield start(tmp_path, extra="[limits]\nclient_messages = 20/1h\n")
    try:
        done = yield in_thread(subprocess.run, [
            # One session: smtp-source gives up at the first refusal, and with several
            # it could end others mid-DATA after their MAIL spent a token.
            "/usr/sbin/smtp-source", "-s", "1", "-m", "30", "-l", "1000", "-f",
            "a@sender.test", "-t", "bob@example.test", f"127.0.0.1:{server.ports['mx']}"],
            capture_output=True, text=True, timeout=120)
        assert "450 4.7.1" in done.stdout + done.stderr or done.returncode != 0
        delivered = yield server.delivered("bob@example.test", 20)
        assert len(delivered) == 20
        more = yield server.inbox("bob@example.test")
        assert len(more) == 20                      # not one more than the limit
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_redis_shares_the_limit_between_two_servers(tmp_path: Path, redis: LazyRedis
                                                    ) -> Any:
    extra = f"[limits]\nclient_messages = 3/1h\nbackend = redis\nredis = {REDIS}\n"
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    first = yield start(first_dir, extra=extra)
    second = yield start(second_dir, extra=extra)
    try:
        answers = []
        for server in (first, second, first, second):
            answers.append((yield transaction(server.ports["mx"], ["bob@example.test"])))
        assert [a[0] for a in answers] == [250, 250, 250, 450]
    finally:
        yield first.stop()
        yield second.stop()
