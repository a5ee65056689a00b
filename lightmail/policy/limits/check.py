"""The inbound chain's ``limits`` check: token buckets per client address and network,
per authenticated user, per sender domain and per recipient domain ([limits]).

Where each limit is spent:

* at connect: ``client_connections`` (per address);
* at MAIL FROM: ``client_messages`` (address), ``network_messages`` (its /24 or
  /64), ``user_messages`` (the logged-in user), ``sender_domain_messages``;
* at each RCPT TO: ``client_recipients``, ``user_recipients``,
  ``recipient_domain_recipients``.

Client limits apply to sessions that did not log in, user limits to those that did;
trusted and allowlisted clients are not limited.  A refusal is ``450 4.7.1`` (421 at
connect) with a sentence naming the limit and when to try again, and one structured
log event (``event=rate_limited``).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.address import client_ip
from lightmail.policy.inbound.findings import Findings, InboundCheck
from lightmail.policy.limits.buckets import IRateLimiter
from lightmail.smtp.codes import Reply

log = Logger(namespace="lightmail.limits")

# What each limit counts, for the reply's sentence.
WHAT = {"client_connections": ("connections", "from client {}"),
        "client_messages": ("messages", "from client {}"),
        "network_messages": ("messages", "from network {}"),
        "user_messages": ("messages", "from user {}"),
        "sender_domain_messages": ("messages", "from senders at {}"),
        "client_recipients": ("recipients", "from client {}"),
        "user_recipients": ("recipients", "from user {}"),
        "recipient_domain_recipients": ("recipients", "to {}")}


@functools.lru_cache(maxsize=4096)      # twice a message: limits and greylisting
def network_of(ip: str) -> str:
    """The /24 of an IPv4 address, the /64 of an IPv6 one (one customer's usual
    allocation): the key of network limits."""
    address = client_ip(ip)
    if address is None:
        return ip
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class LimitsCheck(InboundCheck):
    name = "limits"

    def __init__(self, limiter: IRateLimiter, settings: Callable[[], Any]) -> None:
        self.limiter = limiter
        self.settings = settings        # the current [limits] section

    def connect(self, session: Any, findings: Findings) -> Deferred[Any]:
        return self._spend(session, findings, [("client_connections", session.peer)],
                           connect=True)

    def mail(self, session: Any, tx: Any, findings: Findings) -> Deferred[Any]:
        wanted: list[tuple[str, str]] = []
        if session.account is not None:
            wanted.append(("user_messages", session.account.user.address.lower()))
        else:
            wanted += [("client_messages", session.peer),
                       ("network_messages", network_of(session.peer))]
        if tx.mail_from:
            wanted.append(("sender_domain_messages",
                           tx.mail_from.rpartition("@")[2].lower()))
        return self._spend(session, findings, wanted)

    def rcpt(self, session: Any, tx: Any, address: str,
             findings: Findings) -> Deferred[Any]:
        wanted = [("user_recipients", session.account.user.address.lower())
                  if session.account is not None else ("client_recipients", session.peer),
                  ("recipient_domain_recipients", address.rpartition("@")[2].lower())]
        return self._spend(session, findings, wanted)

    def _spend(self, session: Any, findings: Findings, wanted: list[tuple[str, str]],
               connect: bool = False) -> Deferred[Any]:
        if findings.allowlisted:
            return defer.succeed(None)
        return self._spend_from(session, self.settings(), wanted, 0, connect)

    def _spend_from(self, session: Any, cfg: Any, wanted: list[tuple[str, str]],
                    start: int, connect: bool) -> Deferred[Any]:
        """Take a token for each limit of ``wanted`` from ``start`` on, until one is
        reached (its Reply).  This process's buckets answer at once, and are taken
        in this loop; a shared backend's answer (Redis) is waited for."""
        for index in range(start, len(wanted)):
            limit, subject = wanted[index]
            rate = getattr(cfg, limit)
            if rate is None:
                continue
            count, period = rate
            taken = self.limiter.take(f"{limit}:{subject}", count / period, count)
            waits: list[float] = []
            taken.addCallback(waits.append)     # at once when it has answered
            if not waits:
                return taken.addCallback(self._after, waits, session, cfg, wanted, index,
                                         connect)
            if waits[0] > 0:
                return defer.succeed(self._reached(session, cfg, limit, subject, waits[0],
                                                   connect))
        return defer.succeed(None)

    def _after(self, _: object, waits: list[float], session: Any, cfg: Any,
               wanted: list[tuple[str, str]], index: int, connect: bool) -> Any:
        """The shared backend answered for ``wanted[index]``: its Reply, or on."""
        if waits[0] > 0:
            limit, subject = wanted[index]
            return self._reached(session, cfg, limit, subject, waits[0], connect)
        return self._spend_from(session, cfg, wanted, index + 1, connect)

    def _reached(self, session: Any, cfg: Any, limit: str, subject: str, wait: float,
                 connect: bool) -> Reply:
        count, period = getattr(cfg, limit)
        what, whose = WHAT[limit]
        log.info("rate limit {limit} reached by {subject}: try again in "
                 "{wait:.0f} s", event="rate_limited", limit=limit,
                 subject=subject, peer=session.peer, wait=wait,
                 conn_id=session.conn_id)
        text = (f"Rate limit reached: at most {count} {what} per "
                f"{period_words(period)} {whose.format(subject)}; try again in "
                f"{max(1, round(wait))} s")
        return Reply(421 if connect else 450, "4.7.0" if connect else "4.7.1", text)


def period_words(seconds: float) -> str:
    """"hour", "10 minutes", "second", "1.5 seconds": the DURATION of N/DURATION."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds % size == 0:
            count = int(seconds // size)
            return unit if count == 1 else f"{count} {unit}s"
    return f"{seconds:g} seconds"
