"""The guard against password guessing (``directory/logins.py``): failures counted per
client network and per account, answers held back longer and longer, then a lockout
that answers like a wrong password; tried over IMAP with a burst of bad logins while
another client still logs in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from imapwire import Client
from twisted.cred import error
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from lightmail.directory.logins import (
    Attempt,
    GuardSettings,
    LocalFailureCounts,
    LoginFailed,
    LoginGuard,
    Logins,
    network_of,
)
from tests.inprocess import in_thread, start


def test_failures_are_forgotten_after_the_window() -> None:
    clock = task.Clock()
    counts = LocalFailureCounts(60.0, clock.seconds)
    assert [counts.add_now("k") for _ in range(3)] == [1, 2, 3]
    clock.advance(59)
    assert counts.add_now("k") == 4
    clock.advance(2)                      # the first three are older than the window
    assert counts.count_now("k") == 1
    counts.clear("k")
    assert counts.count_now("k") == 0


def test_networks_are_addresses_or_ipv6_slash_64() -> None:
    assert network_of("192.0.2.7") == "192.0.2.7"
    assert network_of("2001:db8:1:2:3:4:5:6") == network_of("2001:db8:1:2:ffff::1") \
        == "2001:db8:1:2::/64"
    assert network_of("::ffff:192.0.2.7") == "192.0.2.7"


def attempt(peer: str = "192.0.2.1", user: str = "ann@example.test") -> Attempt:
    return Attempt("imap", "PLAIN", peer, user)


def now(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has one already (the local counts answer at once)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert len(out) == 1, "no answer yet"
    return out[0]


def test_delays_grow_then_the_network_is_locked_out() -> None:
    clock = task.Clock()
    guard = LoginGuard(GuardSettings(window=900, delay_after=3, first_delay=1, max_delay=15,
                                     lockout_after=10, account_lockout_after=0),
                       LocalFailureCounts(900, clock.seconds))
    delays = []
    for _ in range(9):
        assert not now(guard.locked(attempt()))
        delays.append(guard.delay(now(guard.failed(attempt()))))
    assert delays[:2] == [0.0, 0.0]
    for delay, expected in zip(delays[2:], [1, 2, 4, 8, 15, 15, 15], strict=True):
        assert expected * 0.9 <= delay <= expected * 1.1          # ±10% jitter
    guard.failed(attempt(user="bob@example.test"))            # the tenth, any account
    assert now(guard.locked(attempt()))
    assert now(guard.locked(attempt(user="carol@example.test")))
    assert not now(guard.locked(attempt(peer="198.51.100.9")))      # another network
    clock.advance(901)
    assert not now(guard.locked(attempt()))


def test_an_account_is_locked_from_everywhere_after_many_failures() -> None:
    clock = task.Clock()
    guard = LoginGuard(GuardSettings(lockout_after=0, account_lockout_after=5),
                       LocalFailureCounts(900, clock.seconds))
    for number in range(5):
        guard.failed(attempt(peer=f"192.0.2.{number}"))
    assert now(guard.locked(attempt(peer="203.0.113.1")))
    assert not now(guard.locked(attempt(user="bob@example.test")))


class Portal:
    """Says yes to one password; counts the checks it is asked for."""

    def __init__(self) -> None:
        self.checks = 0

    def login(self, creds: Any, mind: Any, *interfaces: Any) -> defer.Deferred[Any]:
        self.checks += 1
        if creds == "right":
            return defer.succeed((None, "the account", lambda: None))
        return defer.fail(error.UnauthorizedLogin("no"))


def outcome(d: defer.Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_a_locked_out_attempt_is_refused_unchecked_like_a_wrong_password() -> None:
    clock, portal = task.Clock(), Portal()
    guard = LoginGuard(GuardSettings(delay_after=2, first_delay=1, max_delay=4,
                                     lockout_after=3), LocalFailureCounts(900, clock.seconds))
    logins = Logins(portal, guard, clock=clock)   # type: ignore[arg-type]
    first = outcome(logins.login("wrong", attempt()))
    assert first[0].check(LoginFailed)            # no delay yet
    second = outcome(logins.login("wrong", attempt()))
    assert second == []                           # held back
    clock.advance(1.2)
    assert second[0].check(LoginFailed)
    outcome(logins.login("wrong", attempt()))
    clock.advance(5)
    checks = portal.checks
    locked = outcome(logins.login("right", attempt()))
    assert locked == []                           # the same wait...
    clock.advance(5)
    assert locked[0].check(LoginFailed)           # ...and the same answer
    assert portal.checks == checks                # and no password checked
    assert outcome(logins.login("right", attempt(peer="198.51.100.1"))) == ["the account"]


@pytest_twisted.inlineCallbacks
def test_a_burst_of_bad_imap_logins_locks_its_network_out_while_others_log_in(
        tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    server = yield start(
        tmp_path,
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[directory]\nauth_over_plaintext = yes\nlogin_delay_after = 2\n"
        "login_max_delay = 0.2s\nlockout_after = 6\naccount_lockout_after = 0\n"
        "login_failure_window = 10m\n")
    try:
        yield server.parts.directory.add_user("ann@example.test", "ann-secret")

        def burst() -> dict[str, Any]:
            out: dict[str, Any] = {}
            client = Client(server.ports["imap"])
            answers = [client.cmd("LOGIN", "bob@example.test", f"guess{n}")
                       for n in range(6)]
            out["answers"] = {(a.status, a.code) for a in answers}
            # Locked: the right password gets the answer of a wrong one.
            out["locked"] = client.cmd("LOGIN", "bob@example.test", "bob-secret")
            out["other_user"] = client.cmd("LOGIN", "ann@example.test", "ann-secret")
            # Another network (127.0.0.2 is loopback too) is not locked out.
            elsewhere = Client(server.ports["imap"], source="127.0.0.2")
            out["elsewhere"] = elsewhere.cmd("LOGIN", "ann@example.test", "ann-secret")
            elsewhere.close()
            client.close()
            return out
        out = yield in_thread(burst)
        assert out["answers"] == {("NO", "AUTHENTICATIONFAILED")}
        for key in ("locked", "other_user"):
            assert (out[key].status, out[key].text) == (
                "NO", "[AUTHENTICATIONFAILED] Authentication failed"), out[key]
        assert out["elsewhere"].status == "OK"
        # (That the lockout ends with the window: test_delays_grow_then_... above.)
        failures = [e for e in events if "authentication failed for" in
                    e.get("log_format", "")]
        assert failures and all(e["peer"] == "127.0.0.1" and e["protocol"] == "imap"
                                and e["mechanism"] == "password" for e in failures)
        assert not any("guess" in repr(e) for e in failures)      # never the secret
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield server.stop()



class SlowLogins:
    """A login path that takes longer than the idle timeout (a busy machine)."""

    def __init__(self, logins: Logins, seconds: float) -> None:
        self.logins, self.seconds = logins, seconds

    def login(self, creds: Any, attempt: Attempt) -> defer.Deferred[Any]:
        from twisted.internet import reactor
        return task.deferLater(reactor, self.seconds, self.logins.login, creds, attempt)


@pytest_twisted.inlineCallbacks
def test_a_login_slower_than_the_idle_timeout_is_answered_not_timed_out(
        tmp_path: Path) -> None:
    """The idle timer measures the client: while the server is still answering (a
    password check on a loaded machine), IMAP, POP3 and SMTP do not time out."""
    import poplib
    import smtplib

    server = yield start(
        tmp_path,
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[directory]\nauth_over_plaintext = yes\n"
        "[imap]\nidle_timeout = 1s\n[pop3]\ncommand_timeout = 1s\n[smtp]\ncommand_timeout = 1s\n")
    server.parts.logins = SlowLogins(server.parts.logins, 2.5)     # type: ignore[assignment]
    try:
        def logins() -> dict[str, Any]:
            out = {}
            imap = Client(server.ports["imap"])
            out["imap"] = imap.cmd("LOGIN", "bob@example.test", "bob-secret").status
            imap.close()
            pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=20)
            pop.user("bob@example.test")
            out["pop3"] = pop.pass_("bob-secret")[:3]
            pop.quit()
            with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=20) as smtp:
                smtp.ehlo()
                smtp.starttls()
                smtp.ehlo()
                out["smtp"] = smtp.login("bob@example.test", "bob-secret")[0]
            return out
        assert (yield in_thread(logins)) == {"imap": "OK", "pop3": b"+OK", "smtp": 235}
    finally:
        yield server.stop()
