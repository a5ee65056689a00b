"""The inbound chain's ``dnsbl`` check: DNS blocklists of the client's address, and
right-hand-side lists of the sender's domain and the HELO name ([dnsbl];
lightmail.policy.dnsbl does the lookups).

The client's lists are asked at connect, without holding back the greeting; the
sender's (and the HELO name's) at MAIL FROM.  The answers are weighed at RCPT TO,
as Postfix's postscreen does with ``postscreen_dnsbl_action = enforce`` and smtpd
with smtpd_delay_reject: each zone that lists something adds its weight, and a
score that reaches ``[dnsbl] threshold`` refuses every recipient with ``550 5.7.1``
naming the lists.  Refusing there rather than at connect lets an allowlisted
sender through and puts the recipient in the log; a client that waits for a 554
greeting would only try again.

What the lists said goes in an ``X-DNSBL`` header field of accepted mail (there is
no Authentication-Results method for it; one the message came with is removed), and
in one log event a transaction (``event=dnsbl``).  Authenticated sessions and
trusted or allowlisted clients and senders are never looked up, or never refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.policy.dnsbl import Listing, Lookups, score
from lightmail.policy.inbound.findings import Findings, InboundCheck, Message
from lightmail.policy.inbound.memo import SessionMemo, Shared
from lightmail.smtp.codes import Reply

log = Logger(namespace="lightmail.dnsbl")
DNSBL_FIELD = "X-DNSBL"
_WHO = {"client": "client [{}]", "helo": "HELO name {}", "sender": "sender domain {}"}


@dataclass
class Asked:
    """The lookups of one session: the client's, and those of the last HELO name and
    sender domain."""

    client: Optional[Shared[list[Listing]]] = None
    helo: Optional[tuple[str, Shared[list[Listing]]]] = None
    sender: Optional[tuple[str, Shared[list[Listing]]]] = None


@dataclass(frozen=True)
class DNSBLResult:
    """What the lists said about a transaction (``findings.dnsbl``)."""

    listings: tuple[Listing, ...]
    score: int
    threshold: int
    refused: bool = False


class DNSBLCheck(InboundCheck):
    name = "dnsbl"
    verdict_fields = (DNSBL_FIELD,)

    def __init__(self, lookups: Lookups, settings: Callable[[], Any]) -> None:
        self.lookups = lookups
        self.settings = settings        # the current [dnsbl] section
        self.asked: SessionMemo[Asked] = SessionMemo()

    def connect(self, session: Any, findings: Findings) -> Deferred[Any]:
        if not findings.allowlisted:
            self._ask_client(session, self.settings())
        return defer.succeed(None)

    def mail(self, session: Any, tx: Any, findings: Findings) -> Deferred[Any]:
        if session.account is not None or findings.allowlisted:
            return defer.succeed(None)
        cfg = self.settings()
        asked = self._ask_client(session, cfg)
        asked.sender = None                 # (the last transaction's)
        if not cfg.rhsbl_zones or not cfg.check_helo:
            asked.helo = None               # (a reload took them away)
        if not cfg.rhsbl_zones:
            return defer.succeed(None)
        domain = tx.mail_from.rpartition("@")[2].lower() if tx.mail_from else ""
        if domain:
            asked.sender = (domain, Shared(self.lookups.domain(
                "sender", domain, cfg.rhsbl_zones, cfg.timeout, session.conn_id)))
        helo = (session.helo or "").lower()
        if cfg.check_helo and helo and (asked.helo is None or asked.helo[0] != helo):
            asked.helo = (helo, Shared(self.lookups.domain(
                "helo", helo, cfg.rhsbl_zones, cfg.timeout, session.conn_id)))
        return defer.succeed(None)

    def rcpt(self, session: Any, tx: Any, address: str,
             findings: Findings) -> Deferred[Any]:
        if session.account is not None or findings.allowlisted:
            return defer.succeed(None)
        if findings.dnsbl is None:
            cfg = self.settings()
            asked = self._ask_client(session, cfg)
            lookups = [one for one in (asked.client, asked.helo and asked.helo[1],
                                       asked.sender and asked.sender[1]) if one]
            if not all(one.done for one in lookups):
                return Deferred.fromCoroutine(
                    self._weigh_later(session, address, findings, cfg, lookups))
            # The answers are there (cached, as on a busy MX): weighed at once,
            # without a coroutine.
            self._weigh(session, address, findings, cfg,
                        [listing for one in lookups for listing in one.result])
        return defer.succeed(_refusal(findings.dnsbl))

    async def _weigh_later(self, session: Any, address: str, findings: Findings, cfg: Any,
                           lookups: list[Shared[list[Listing]]]) -> Optional[Reply]:
        listings: list[Listing] = []
        for shared in lookups:
            listings += await shared.wait()
        if findings.dnsbl is None:
            self._weigh(session, address, findings, cfg, listings)
        return _refusal(findings.dnsbl)

    def _weigh(self, session: Any, address: str, findings: Findings, cfg: Any,
               listings: list[Listing]) -> None:
        """What the lists said, in ``findings.dnsbl`` (and the log when something is
        listed)."""
        total = score(listings)
        result = DNSBLResult(tuple(listings), total, cfg.threshold,
                             refused=bool(listings) and total >= cfg.threshold)
        findings.dnsbl = result
        if listings:
            log.info("{subjects} listed: score {score} of {threshold}{refusing}",
                     subjects=_listed(listings), score=total,
                     threshold=cfg.threshold,
                     refusing=", refused" if result.refused else "",
                     event="dnsbl", peer=session.peer, rcpt=address,
                     zones=[one.zone.name for one in listings],
                     conn_id=session.conn_id)

    def content(self, session: Any, tx: Any, message: Message,
                findings: Findings) -> Deferred[Any]:
        result: Optional[DNSBLResult] = findings.dnsbl
        if result is not None and result.listings:
            findings.add_header(DNSBL_FIELD, header_value(result))
        return defer.succeed(None)

    def session_ended(self, session: Any) -> None:
        self.asked.forget(session)

    def _ask_client(self, session: Any, cfg: Any) -> Asked:
        """The session's lookups, the client's started if it was not (a reload may
        have added zones since the connection was made)."""
        asked = self.asked.get(session) or self.asked.set(session, Asked())
        if asked.client is None and cfg.zones:
            asked.client = Shared(self.lookups.client(session.peer, cfg.zones,
                                                      cfg.timeout, session.conn_id))
        return asked


def _refusal(result: DNSBLResult) -> Optional[Reply]:
    if not result.refused:
        return None
    return Reply(550, "5.7.1", "Service unavailable; " + _blocked(result.listings))


def header_value(result: DNSBLResult) -> str:
    """``score=4 threshold=5; zen.spamhaus.org=127.0.0.4 client=192.0.2.1; ...``"""
    parts = [f"score={result.score} threshold={result.threshold}"]
    parts += [f"{one.zone.name}={','.join(one.answers)} {one.what}={one.subject}"
              for one in result.listings]
    return "; ".join(parts)


def _blocked(listings: tuple[Listing, ...]) -> str:
    """'client [192.0.2.1] blocked using zen.spamhaus.org; sender domain ...'."""
    parts = []
    for what, who in _WHO.items():
        found = [one for one in listings if one.what == what and one.zone.weight > 0]
        if found:
            zones = ", ".join(dict.fromkeys(one.zone.name for one in found))
            parts.append(f"{who.format(found[0].subject)} blocked using {zones}")
    return "; ".join(parts) or "blocked by DNS lists"


def _listed(listings: list[Listing]) -> str:
    return ", ".join(f"{one.what} {one.subject} on {one.zone.name}"
                     f" ({','.join(one.answers)}, weight {one.zone.weight})"
                     for one in listings)
