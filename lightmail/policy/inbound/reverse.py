"""The inbound chain's ``reverse`` check: the client's forward-confirmed reverse DNS
name (lightmail.policy.reverse), looked up at connect without holding back the
greeting, logged for every session (``client=NAME[IP] fcrdns=RESULT``, one event
with ``event=client_name``), and written as RFC 8601's ``iprev`` in
Authentication-Results.

With ``[reverse] require`` the check also refuses, at RCPT TO (as Postfix's
reject_unknown_client_hostname under smtpd_delay_reject), with RFC 7372's codes:
``550 5.7.25`` when the name is missing or does not confirm the address, ``450
4.7.25`` when DNS did not answer.  Authenticated sessions and trusted or
allowlisted clients and senders are never refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.policy.inbound.authresults import ResultClause
from lightmail.policy.inbound.findings import Findings, InboundCheck, Message
from lightmail.policy.inbound.memo import SessionMemo, Shared
from lightmail.policy.reverse import ReverseLookup, ReverseResult
from lightmail.smtp.codes import Reply

log = Logger(namespace="lightmail.reverse")


class ReverseCheck(InboundCheck):
    name = "reverse"

    def __init__(self, lookup: ReverseLookup, settings: Callable[[], Any]) -> None:
        self.lookup = lookup
        self.settings = settings        # the current [reverse] section
        self.pending: SessionMemo[Shared[ReverseResult]] = SessionMemo()

    def connect(self, session: Any, findings: Findings) -> Deferred[Any]:
        self._pending(session)
        return defer.succeed(None)

    def rcpt(self, session: Any, tx: Any, address: str,
             findings: Findings) -> Deferred[Any]:
        require = self.settings().require
        if require == "no" or session.account is not None or findings.allowlisted:
            return defer.succeed(None)
        return self._pending(session).wait().addCallback(refusal, require)

    def content(self, session: Any, tx: Any, message: Message,
                findings: Findings) -> Deferred[Any]:
        def keep(result: ReverseResult) -> None:
            findings.iprev = result
        return self._pending(session).wait().addCallback(keep)

    def results(self, findings: Findings) -> list[ResultClause]:
        result: Optional[ReverseResult] = findings.iprev
        if result is None:
            return []
        return [ResultClause(
            "iprev", result.iprev,
            comment=result.name if result.result == "pass" else "",
            properties=(("policy.iprev", result.ip),))]

    def session_ended(self, session: Any) -> None:
        self.pending.forget(session)

    def _pending(self, session: Any) -> Shared[ReverseResult]:
        pending = self.pending.get(session)
        if pending is None:
            d = self.lookup.check(session.peer, self.settings().timeout)

            def say(result: ReverseResult) -> ReverseResult:
                log.info("client={client} fcrdns={fcrdns} ({reason})",
                         client=result.client, fcrdns=result.result,
                         reason=result.reason, event="client_name", peer=result.ip,
                         name=result.name, conn_id=session.conn_id)
                return result
            pending = self.pending.set(session, Shared(d.addCallback(say)))
        return pending


def refusal(result: ReverseResult, require: str) -> Optional[Reply]:
    """The reply ``[reverse] require`` gives a client with this result, if any:
    ``yes`` wants a confirmed name, ``ptr`` only some PTR name."""
    where = f"[{result.ip}]"
    if result.result == "pass":
        return None
    if result.result == "temperror" and (require == "yes" or not result.name):
        return Reply(450, "4.7.25", "Client host rejected: cannot find your hostname, "
                     f"{where}; try again later")
    if result.result == "none":
        return Reply(550, "5.7.25", "Client host rejected: cannot find your reverse "
                     f"hostname, {where}")
    if result.result == "fail" and require == "yes":
        return Reply(550, "5.7.25", f"Client host rejected: your hostname {result.name} "
                     f"does not resolve to {where}")
    return None
