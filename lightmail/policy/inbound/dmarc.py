"""The DMARC check of the inbound chain: an adapter between the evaluator
(lightmail.policy.dmarc) and the chain's content step, run after SPF, DKIM and ARC,
whose findings it weighs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.policy.arc import trusted_pass
from lightmail.policy.dmarc import DMARCChecker, DMARCResult, IDMARCReports
from lightmail.policy.inbound.authresults import ResultClause
from lightmail.policy.inbound.findings import Findings, InboundCheck, Message
from lightmail.smtp.codes import Reply

log = Logger(namespace="lightmail.dmarc")


class DMARCCheck(InboundCheck):
    """RFC 7489 §6.6 once the content is in: the RFC5322.From domain's policy against
    SPF's MAIL FROM (or HELO, for the null sender) result and every DKIM signature,
    with a trusted ARC sealer's word for forwarded mail (``[arc] trusted_sealers``).
    What the verdict does is ``[dmarc]``'s: reject (550 5.7.1), quarantine (filed in
    Junk), or tag only; a temporary DNS error defers the message (451 4.7.1) rather
    than let it in unjudged.  Every verdict whose policy asks for reports is kept for
    the aggregate report (``[dmarc] reports``).  Authenticated sessions and trusted or
    allowlisted clients are not judged."""

    name = "dmarc"

    def __init__(self, checker: DMARCChecker, reports: IDMARCReports,
                 arc_settings: Callable[[], Any]) -> None:
        self.checker = checker
        self.reports = reports
        self.arc_settings = arc_settings       # [arc]: the trusted sealers

    def content(self, session: Any, tx: Any, message: Message,
                findings: Findings) -> Deferred[Any]:
        if session.account is not None or findings.allowlisted or \
                not self.checker.enabled:
            return defer.succeed(None)   # (trusted clients: as OpenDMARC's IgnoreHosts)
        # Callbacks rather than a coroutine: with the sender's policy in the DNS
        # cache, each step's answer is at hand.
        return message.header_block().addCallback(self._judge, session, tx, findings)

    def _judge(self, headers: bytes, session: Any, tx: Any,
               findings: Findings) -> Any:
        author = self.checker.header_from(headers)
        if author.reply is not None:
            return Reply(*author.reply)
        if author.domain is None:
            return None
        findings.header_from = author.domain
        spf = ("", "none")
        if findings.spf is not None:
            checked = findings.spf.mail_from
            spf = (checked.domain, checked.result)
        dkim = [(one.domain, one.result, one.selector) for one in findings.dkim]
        sealer = trusted_pass(findings, self.arc_settings().trusted_sealers)
        checked_now = self.checker.check(author.domain, spf, dkim, arc_override=sealer)
        return checked_now.addCallback(self._act, author.domain, session, tx, findings)

    def _act(self, result: DMARCResult, domain: str, session: Any, tx: Any,
             findings: Findings) -> Optional[Reply]:
        findings.dmarc = result
        recipient = tx.recipients[0].address if tx.recipients else ""
        self.reports.record(result, session.peer, tx.mail_from,
                            recipient.rpartition("@")[2].lower())
        if result.disposition == "quarantine":
            findings.quarantine("Junk", f"DMARC policy of {result.policy_domain}")
        reply = result.reply
        if reply is not None:
            log.info("DMARC {result} for {domain}: {code} {text}", result=result.result,
                     domain=domain, code=reply[0], text=reply[2],
                     conn_id=session.conn_id)
            return Reply(*reply)
        return None

    def results(self, findings: Findings) -> list[ResultClause]:
        result: Optional[DMARCResult] = findings.dmarc
        if result is None:
            return []
        return [ResultClause("dmarc", result.result, comment=result.ar_comment,
                             properties=(("header.from", result.header_from),))]
