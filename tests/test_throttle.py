"""Per-session command rates (``[limits] imap_commands``, ``pop3_commands``) and failed
commands per client address (``client_errors``), with imaplib, poplib and smtplib
against an in-process LightMail, and across two servers sharing the Redis at
127.0.0.1:6379 (database 9, emptied by the tests)."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import REDIS
from inprocess import in_thread, start
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from lightmail.policy.limits import LazyRedis, LocalBuckets
from lightmail.policy.limits.throttle import CommandRate

LISTENERS = ("[directory]\nauth_over_plaintext = yes\nlogin_max_delay = 0s\n"
             "lockout_after = 0\naccount_lockout_after = 0\n"
             "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
             "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n")


@pytest.fixture
def rate_events() -> Iterator[list[dict[str, Any]]]:
    """The log's event=rate_limited events while the test runs."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("event") == "rate_limited":
            seen.append(event)
    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


# --- the reckoning -----------------------------------------------------------------------

def test_a_burst_then_one_command_each_interval() -> None:
    now = [100.0]
    rate = CommandRate("imap_commands", 3, 3.0, overrun=10, clock=lambda: now[0])
    assert [rate.delay() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rate.delay() == pytest.approx(1.0)        # due a second from now
    now[0] += 1.0                                    # (the session waited it)
    assert rate.delay() == pytest.approx(1.0)
    now[0] += 1.0
    now[0] += 10.0                                   # a pause: the burst is back
    assert [rate.delay() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert not rate.far_over()


def test_a_client_at_twice_the_rate_is_slowed_and_never_closed() -> None:
    now = [0.0]
    rate = CommandRate("pop3_commands", 10, 1.0, overrun=10, clock=lambda: now[0])
    for _ in range(2000):                # 20 commands a second wanted, for 100 s
        now[0] += rate.delay() + 0.05
        assert not rate.far_over()
    assert rate.slowed > 1000


def test_a_pipelining_client_far_over_is_found_out() -> None:
    now = [0.0]
    rate = CommandRate("imap_commands", 10, 1.0, overrun=10, clock=lambda: now[0])
    closed_after = None
    for n in range(1, 1000):             # each command asked for at once
        now[0] += rate.delay() + 0.0001
        if rate.far_over():
            closed_after = n
            break
    # Ten times the rate for longer than a period: about 10 x 10 commands.
    assert closed_after is not None and 90 <= closed_after <= 110, closed_after
    assert now[0] == pytest.approx(9.0, abs=0.5)     # after 9 s of being slowed


def test_local_buckets_peek_without_taking() -> None:
    now = [0.0]
    buckets = LocalBuckets(clock=lambda: now[0])
    assert buckets.peek_now("k", 1.0, 2) == 0.0       # never used: full
    buckets.take_now("k", 1.0, 2)
    buckets.take_now("k", 1.0, 2)
    assert buckets.peek_now("k", 1.0, 2) == pytest.approx(1.0)
    assert buckets.peek_now("k", 1.0, 2) == pytest.approx(1.0)    # nothing taken
    now[0] += 1.0
    assert buckets.peek_now("k", 1.0, 2) == 0.0


# --- command rates on a running LightMail ----------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_imap_session_over_its_rate_is_slowed_then_closed(
        tmp_path: Path, rate_events: list[dict[str, Any]]) -> Any:
    server = yield start(tmp_path, extra=LISTENERS + "[limits]\nimap_commands = 10/1s\n"
                         "command_overrun = 3\n")
    port = server.ports["imap"]
    try:
        def slowed() -> float:
            imap = imaplib.IMAP4("127.0.0.1", port, timeout=20)
            imap.login("bob@example.test", "bob-secret")      # the 1st command
            started = time.monotonic()
            for _ in range(19):                              # 9 more in the burst,
                assert imap.noop()[0] == "OK"                # then 10 at 0.1 s each
            elapsed = time.monotonic() - started
            imap.logout()
            return elapsed
        elapsed = yield in_thread(slowed)
        assert 0.8 <= elapsed < 3.0, elapsed
        assert [e["action"] for e in rate_events] == ["slowed"]     # one, not ten
        assert rate_events[0]["limit"] == "imap_commands"

        def flood() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.recv(1024)                               # the greeting
                sock.sendall(b"".join(b"n%d NOOP\r\n" % n for n in range(200)))
                lines = b""
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return lines.splitlines()
                    lines += data
        lines = yield in_thread(flood)
        # Three times the rate for longer than a period: about 30 answered, at
        # most 10 a second, then BYE naming the limit.
        answered = [line for line in lines if line.endswith(b" OK NOOP completed")]
        assert 20 <= len(answered) <= 40, lines
        assert lines[-1] == (b"* BYE [LIMIT] Too many commands: at most 10 per second "
                             b"in one session")
        assert [e["action"] for e in rate_events] == ["slowed", "slowed", "closed"]
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_pop3_session_over_its_rate_is_slowed_then_closed(tmp_path: Path) -> Any:
    server = yield start(tmp_path, extra=LISTENERS + "[limits]\npop3_commands = 5/1s\n"
                         "command_overrun = 4\n")
    port = server.ports["pop3"]
    try:
        def slowed() -> tuple[float, bytes]:
            pop = poplib.POP3("127.0.0.1", port, timeout=20)
            started = time.monotonic()
            pop.user("bob@example.test")
            pop.pass_("bob-secret")
            for _ in range(8):                   # 10 commands: 5, then 5 at 0.2 s
                pop.noop()
            elapsed = time.monotonic() - started
            return elapsed, pop.quit()
        elapsed, bye = yield in_thread(slowed)
        assert 0.8 <= elapsed < 3.0, elapsed
        assert bye.startswith(b"+OK")

        def flood() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.recv(1024)
                sock.sendall(b"NOOP\r\n" * 100)
                lines = b""
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return lines.splitlines()
                    lines += data
        lines = yield in_thread(flood)
        # Four times the rate for longer than a period: about 20 answered.
        assert 15 <= lines.count(b"+OK") <= 25, lines
        assert lines[-1] == (b"-ERR [SYS/TEMP] Too many commands: at most 5 per second "
                             b"in one session")
    finally:
        yield server.stop()


# --- failed commands per client address ------------------------------------------------------

def smtp_errors(port: int, count: int) -> list[tuple[int, bytes]]:
    answers = []
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=20)
    try:
        for _ in range(count):
            answers.append(smtp.docmd("BOGUS"))
    except smtplib.SMTPServerDisconnected:
        answers.append((0, b"<closed>"))
    finally:
        smtp.close()
    return answers


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        data = b""
        while not data.endswith(b"\n"):
            more = sock.recv(1024)
            if not more:
                break
            data += more
        return data.rstrip(b"\r\n")


@pytest_twisted.inlineCallbacks
def test_failed_commands_across_sessions_and_protocols(tmp_path: Path) -> Any:
    server = yield start(tmp_path, extra=LISTENERS + "[limits]\nclient_errors = 6/6s\n")
    ports = server.ports
    try:
        # Failed logins are the login guard's: they spend nothing here.
        def bad_logins() -> list[bytes]:
            pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=20)
            out = []
            for _ in range(3):
                pop.user("bob@example.test")
                try:
                    pop.pass_("wrong")
                except poplib.error_proto as exc:
                    out.append(exc.args[0])
            pop.quit()
            return out
        assert (yield in_thread(bad_logins)) == [b"-ERR [AUTH] Authentication failed"] * 3

        # 4 errors in an SMTP session, 2 in an IMAP one: the bucket's 6.
        answers = yield in_thread(smtp_errors, ports["mx"], 4)
        assert [code for code, _ in answers] == [500] * 4

        def imap_errors() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", ports["imap"]), timeout=20) as sock:
                file = sock.makefile("rb")
                file.readline()                              # the greeting
                sock.sendall(b"a BOGUS\r\nb BOGUS\r\nc BOGUS\r\n")
                return [line.rstrip(b"\r\n") for line in file]
        lines = yield in_thread(imap_errors)
        # The 7th error is answered, then BYE naming the limit.
        assert lines == [b"a BAD Unknown command BOGUS", b"b BAD Unknown command BOGUS",
                         b"c BAD Unknown command BOGUS",
                         b"* BYE [LIMIT] Too many failed commands: at most 6 per 6 "
                         b"seconds from client 127.0.0.1; try again in 1 s"], lines

        # New connections from the address are refused at connect, in each protocol.
        answers = yield defer.gatherResults([
            in_thread(greeting, ports[name]) for name in ("mx", "imap", "pop3")])
        assert answers[0].startswith(b"421 4.7.0 mx.example.test Too many failed "
                                     b"commands: at most 6 per 6 seconds from client "
                                     b"127.0.0.1; try again in 1 s")
        assert answers[1].startswith(b"* BYE [UNAVAILABLE] Too many failed commands")
        assert answers[2].startswith(b"-ERR [SYS/TEMP] Too many failed commands")
        refused = server.parts.metrics.exposition()
        text = (yield refused).decode()
        assert 'lightmail_connections_refused_total{protocol="imap",reason=' \
               '"client_errors"} 1.0' in text

        # Until the bucket has a token again (one a second).
        yield in_thread(time.sleep, 1.2)
        assert (yield in_thread(greeting, ports["mx"])).startswith(b"220 ")
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_failed_commands_are_shared_through_redis(tmp_path: Path,
                                                  redis: LazyRedis) -> Any:
    extra = (LISTENERS + f"[limits]\nclient_errors = 3/1h\nbackend = redis\n"
             f"redis = {REDIS}\n")
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    first = yield start(first_dir, extra=extra)
    second = yield start(second_dir, extra=extra)
    try:
        # The 4th error is answered, then 421 (the session waits for Redis's word on
        # each error before it reads the next command); smtplib reads the 421 as the
        # answer to its 5th.
        answers = yield in_thread(smtp_errors, first.ports["mx"], 8)
        assert [code for code, _ in answers] == [500] * 4 + [421, 0], answers
        assert b"Too many failed commands: at most 3 per hour" in answers[-2][1]
        # The other server has not seen an error from the address: it asks Redis at
        # connect, and refuses.
        assert (yield in_thread(greeting, second.ports["pop3"])).startswith(
            b"-ERR [SYS/TEMP] Too many failed commands: at most 3 per hour from client "
            b"127.0.0.1; try again in ")
        assert (yield in_thread(greeting, second.ports["mx"])).startswith(b"421 4.7.0 ")
    finally:
        yield first.stop()
        yield second.stop()
