"""Logging in, for SMTP submission, IMAP and POP3 alike: the Portal behind a guard
against password guessing.

A protocol hands :meth:`Logins.login` the credentials its SASL mechanism (or LOGIN,
USER/PASS) made and who is asking.  Failures are counted per client network (the
address, an IPv6 /64) and per account within a window; past a few, each failed
answer is held back longer and longer, and past more the network (or, much later,
the account) is locked out for the window: its tries are refused unchecked, with the
same answer and about the same wait as a wrong password, so that neither a lockout
nor a user's existence shows.  Every failure is logged with address, protocol and
mechanism, never the secret.

The counts are this process's (with worker processes, each counts its own), or with
``[cluster] redis`` those of every process of every node, in Redis
(lightmail.directory.sharedfailures).
"""

from __future__ import annotations

import ipaddress
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from twisted.cred import error
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from lightmail.directory.interfaces import DirectoryUnavailable, IMailAccount


class LoginFailed(error.UnauthorizedLogin):
    """Wrong password, unknown user, disabled account or locked out: one answer."""


class PasswordExpired(LoginFailed):
    """The right password, but it has expired (``lightmail user expire``): IMAP says
    [EXPIRED] (RFC 5530).  Only said to whoever gave the right password."""


class IProtocolPassword(IUsernamePassword):
    """A user name and password with the protocol they are for (app passwords are
    each for some protocols)."""

    protocol = Attribute("smtp, imap or pop3")


@implementer(IProtocolPassword)
class ProtocolPassword(UsernamePassword):
    def __init__(self, username: bytes, password: bytes, protocol: str) -> None:
        super().__init__(username, password)
        self.protocol = protocol


class LoginUnavailable(Exception):
    """The login could not be checked now (the LDAP server is down): a temporary
    failure, which the client is told to try again later (IMAP [UNAVAILABLE], SMTP
    454 4.7.0, POP3 [SYS/TEMP]).  Not counted as a failed guess."""


@dataclass(frozen=True)
class Attempt:
    protocol: str           # smtp, imap, pop3
    mechanism: str          # PLAIN, LOGIN, SCRAM-SHA-256, USER (POP3), LOGIN (IMAP)
    peer: str               # the client's IP address
    username: str


@dataclass(frozen=True)
class GuardSettings:
    window: float = 900.0          # failures older than this are forgotten
    delay_after: int = 3           # failures before answers are held back
    first_delay: float = 1.0       # then doubled at each failure
    max_delay: float = 15.0
    lockout_after: int = 10        # failures from one network: locked for the window
    account_lockout_after: int = 50    # failures on one account from anywhere; 0: never


class IFailureCounts(Interface):
    """Failed logins by key within a window (in this process, or shared)."""

    def count(key: str) -> Deferred[int]:
        """Failures of ``key`` within the window.  Never fails."""

    def add(key: str) -> Deferred[int]:
        """Count one more; the count after it.  Never fails."""

    def clear(key: str) -> None:
        """Forget the failures of ``key`` (after a successful login)."""


@implementer(IFailureCounts)
class LocalFailureCounts:
    """Failure times per key in memory, at most ``keys`` keys (the oldest go)."""

    def __init__(self, window: float, clock: Callable[[], float], keys: int = 100_000,
                 per_key: int = 1000) -> None:
        self.window, self.clock, self.keys, self.per_key = window, clock, keys, per_key
        self.times: dict[str, deque[float]] = {}

    def count(self, key: str) -> Deferred[int]:
        return succeed(self.count_now(key))

    def add(self, key: str) -> Deferred[int]:
        return succeed(self.add_now(key))

    def count_now(self, key: str) -> int:
        times = self.times.get(key)
        if times is None:
            return 0
        horizon = self.clock() - self.window
        while times and times[0] < horizon:
            times.popleft()
        if not times:
            del self.times[key]
            return 0
        return len(times)

    def add_now(self, key: str) -> int:
        times = self.times.pop(key, None) or deque(maxlen=self.per_key)
        times.append(self.clock())
        self.times[key] = times                     # now the newest key
        while len(self.times) > self.keys:
            del self.times[next(iter(self.times))]
        return self.count_now(key)

    def clear(self, key: str) -> None:
        self.times.pop(key, None)


def network_of(peer: str) -> str:
    """The key of a client's network: its IPv4 address, or its IPv6 /64."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if address.version == 6 and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address.ipv4_mapped or address) if address.version == 6 else str(address)


class LoginGuard:
    def __init__(self, settings: GuardSettings, counts: IFailureCounts) -> None:
        self.settings = settings
        self.counts = counts

    def _keys(self, attempt: Attempt) -> tuple[str, str]:
        return "net:" + network_of(attempt.peer), "user:" + attempt.username.lower()

    def locked(self, attempt: Attempt) -> Deferred[bool]:
        net, user = self._keys(attempt)
        s = self.settings
        asked = []
        if s.lockout_after > 0:
            asked.append(self.counts.count(net).addCallback(
                lambda count: count >= s.lockout_after))
        if s.account_lockout_after > 0:
            asked.append(self.counts.count(user).addCallback(
                lambda count: count >= s.account_lockout_after))
        if not asked:
            return succeed(False)
        return gatherResults(asked).addCallback(any)

    def failed(self, attempt: Attempt) -> Deferred[int]:
        """Count a failure; the larger of the two counts after it."""
        net, user = self._keys(attempt)
        return gatherResults([self.counts.add(net), self.counts.add(user)]).addCallback(max)

    def succeeded(self, attempt: Attempt) -> None:
        net, user = self._keys(attempt)
        self.counts.clear(net)
        self.counts.clear(user)

    def delay(self, failures: int) -> float:
        """How long to hold back the answer to the ``failures``-th failure."""
        s = self.settings
        if failures < s.delay_after:
            return 0.0
        base = min(s.first_delay * 2 ** (failures - s.delay_after), s.max_delay)
        # A little jitter, so that a refused lockout (no password checked) and a
        # checked wrong password take times that cannot be told apart.
        return base * random.uniform(0.9, 1.1)


class Logins:
    log = Logger()

    def __init__(self, portal: Portal, guard: LoginGuard, recorder: Any = None,
                 clock: Optional[IReactorTime] = None) -> None:
        # recorder: record_login(user, peer, protocol) -> Deferred (the directory).
        self.portal = portal
        self.guard = guard
        self.recorder = recorder
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock: IReactorTime = clock  # type: ignore[assignment]

    def login(self, creds: Any, attempt: Attempt) -> Deferred[Any]:
        """The IMailAccount of ``creds``, or a LoginFailed failure."""
        def check(locked: bool) -> Deferred[Any]:
            if locked:
                return fail(LoginFailed("locked out"))
            if IUsernamePassword.providedBy(creds):
                # The protocol goes with a password: app passwords are scoped by it.
                return self.portal.login(
                    ProtocolPassword(creds.username, creds.password, attempt.protocol),
                    None, IMailAccount)
            return self.portal.login(creds, None, IMailAccount)
        d = self.guard.locked(attempt).addCallback(check)
        return d.addCallbacks(self._succeeded, self._failed,
                              callbackArgs=(attempt,), errbackArgs=(attempt,))

    def _succeeded(self, result: Any, attempt: Attempt) -> Any:
        self.guard.succeeded(attempt)
        account = result[1]
        if self.recorder is not None:
            self.recorder.record_login(account.user, attempt.peer, attempt.protocol) \
                .addErrback(lambda failure: self.log.failure(
                    "could not note the login of {user}", failure, user=account.user.address))
        return account

    def _failed(self, failure: Failure, attempt: Attempt) -> Deferred[Any]:
        if failure.check(DirectoryUnavailable):
            self.log.warn("authentication of {user} from {peer} ({protocol} {mechanism}) "
                          "could not be checked: {error}", user=attempt.username,
                          peer=attempt.peer, protocol=attempt.protocol,
                          mechanism=attempt.mechanism, error=failure.getErrorMessage())
            return fail(LoginUnavailable("authentication temporarily unavailable"))
        failure.trap(error.UnauthorizedLogin, error.UnhandledCredentials)
        if failure.check(PasswordExpired):
            self.guard.succeeded(attempt)          # the password was right
            self.log.info("{user} gave an expired password ({protocol} from {peer})",
                          user=attempt.username, protocol=attempt.protocol,
                          peer=attempt.peer)
            return fail(failure)
        return self.guard.failed(attempt).addCallback(self._refuse, attempt)

    def _refuse(self, failures: int, attempt: Attempt) -> Deferred[Any]:
        wait = self.guard.delay(failures)
        self.log.warn("authentication failed for {user} from {peer} ({protocol} "
                      "{mechanism}; {failures} failures lately{held})",
                      user=attempt.username, peer=attempt.peer, protocol=attempt.protocol,
                      mechanism=attempt.mechanism, failures=failures,
                      held=f", answered after {wait:.1f}s" if wait else "")

        def refuse() -> None:
            raise LoginFailed("authentication failed")
        if not wait:
            return fail(LoginFailed("authentication failed"))
        return deferLater(self.clock, wait, refuse)
