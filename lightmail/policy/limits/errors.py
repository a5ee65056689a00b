"""Failed commands per client address, across its sessions and protocols
(``[limits] client_errors``): the defence against a client that reconnects each time
a session's own ``max_errors`` closes it.

Every error reply a session counts spends a token of the address's bucket in the
services' limiter (so with ``backend = redis`` every process and node spends the
same one).  What counts as an error is each protocol's to say (see
docs/operations.rst): SMTP's 5xx and 421 replies but not those to AUTH, IMAP's BAD,
POP3's -ERR to a bad command but not to a failed login: the login guard
(lightmail/directory/logins.py) already counts failed logins per address and
account, and the two would otherwise shut a client out twice for one mistake.

When the bucket is empty the session is closed (421 4.7.0, ``* BYE``, ``-ERR
[SYS/TEMP]``, each naming the limit) and :meth:`ClientErrors.screen` refuses new
connections from the address, without spending, until a token is back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.policy.limits.buckets import IRateLimiter
from lightmail.policy.limits.check import period_words

log = Logger(namespace="lightmail.limits")

#: What :meth:`ClientErrors.screen` answers: a refusal's text, None, or a Deferred
#: of one of them (when the buckets are elsewhere: Redis).
Screened = Union[Optional[str], Deferred[Optional[str]]]


class ClientErrors:
    """Spends and checks the ``client_errors`` bucket of each client address."""

    def __init__(self, limiter: IRateLimiter, settings: Callable[[], Any]) -> None:
        self.limiter = limiter
        self.settings = settings            # the current [limits] section

    def failed(self, peer: str, conn_id: str = "") -> Deferred[Optional[str]]:
        """A command from ``peer`` failed: None, or (the bucket being empty) the
        sentence to close the session with."""
        rate = self.settings().client_errors
        if rate is None or peer == "local":
            return defer.succeed(None)
        count, period = rate

        def spent(wait: float) -> Optional[str]:
            if wait <= 0:
                return None
            log.info("rate limit client_errors reached by {subject}: closing the "
                     "session; new connections refused for {wait:.0f} s",
                     event="rate_limited", limit="client_errors", subject=peer, peer=peer,
                     wait=wait, conn_id=conn_id)
            return _sentence(count, period, peer, wait)
        return self.limiter.take(_key(peer), count / period, count).addCallback(spent)

    def screen(self, peer: str) -> Screened:
        """Why a new connection from ``peer`` is refused (its bucket is empty), or
        None; at once when the buckets are in this process."""
        rate = self.settings().client_errors
        if rate is None or peer == "local":
            return None
        count, period = rate

        def peeked(wait: float) -> Optional[str]:
            if wait <= 0:
                return None
            log.info("refused {subject}: rate limit client_errors, {wait:.0f} s to go",
                     event="rate_limited", limit="client_errors", subject=peer,
                     peer=peer, wait=wait)
            return _sentence(count, period, peer, wait)
        d = self.limiter.peek(_key(peer), count / period, count).addCallback(peeked)
        # Buckets in this process answer at once: the caller need not wait (nor wrap
        # the connection) for them.
        answered: list[Optional[str]] = []

        def keep(refusal: Optional[str]) -> Optional[str]:
            answered.append(refusal)
            return refusal
        d.addCallback(keep)
        return answered[0] if answered else d


def _key(peer: str) -> str:
    return f"client_errors:{peer}"


def _sentence(count: int, period: float, peer: str, wait: float) -> str:
    return (f"Too many failed commands: at most {count} per {period_words(period)} "
            f"from client {peer}; try again in {max(1, round(wait))} s")
