"""The access, SPF and DKIM checks of the inbound chain: adapters between the evaluators
(lightmail.policy.spf, lightmail.policy.dkimverify) and the chain's steps."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.policy.access import AccessLists, Snapshot
from lightmail.policy.dkimverify import DKIMVerifier, SignatureResult
from lightmail.policy.inbound.authresults import ResultClause
from lightmail.policy.inbound.findings import Findings, InboundCheck, Message
from lightmail.policy.spf import IdentityResults, SPFChecker, SPFResult
from lightmail.smtp.codes import Reply

log = Logger(namespace="lightmail.policy")


class AccessCheck(InboundCheck):
    """The allow- and blocklists (lightmail.policy.access).  At MAIL FROM, an allowed
    or trusted client, or an allowed sender, marks the transaction allowlisted; at
    each RCPT TO, a blocked client, sender or recipient is refused with 554 5.7.1
    (there rather than at connect or MAIL, as Postfix's smtpd_delay_reject: the log
    then says for whom).  Authenticated sessions are not looked up."""

    name = "access"

    def __init__(self, lists: AccessLists) -> None:
        self.lists = lists

    def connect(self, session: Any, findings: Findings) -> Deferred[Any]:
        def mark(snap: Snapshot) -> None:
            if snap.client(session.peer) in ("trusted", "allow"):
                findings.allowlisted = True
        return self.lists.snapshot().addCallback(mark)

    def mail(self, session: Any, tx: Any, findings: Findings) -> Deferred[Any]:
        if session.account is not None:
            return defer.succeed(None)

        def mark(snap: Snapshot) -> None:
            sender = snap.address("sender", tx.mail_from) if tx.mail_from else None
            if snap.client(session.peer) in ("trusted", "allow") or sender == "allow":
                findings.allowlisted = True
        return self.lists.snapshot().addCallback(mark)

    def rcpt(self, session: Any, tx: Any, address: str,
             findings: Findings) -> Deferred[Any]:
        if session.account is not None:
            return defer.succeed(None)

        def decide(snap: Snapshot) -> Optional[Reply]:
            if snap.client(session.peer) == "block":
                return Reply(554, "5.7.1", f"Client host [{session.peer}] rejected: "
                             "access denied by local policy")
            if tx.mail_from and snap.address("sender", tx.mail_from) == "block":
                return Reply(554, "5.7.1", f"<{tx.mail_from}>: Sender address rejected: "
                             "access denied by local policy")
            if snap.address("recipient", address) == "block":
                return Reply(554, "5.7.1", f"<{address}>: Recipient address rejected: "
                             "access denied by local policy")
            return None
        return self.lists.snapshot().addCallback(decide)


class SPFCheck(InboundCheck):
    """RFC 7208 at MAIL FROM: the HELO identity (when ``[spf] check_helo``), then
    MAIL FROM (postmaster@HELO for the null sender).  What a result does is
    ``[spf]``'s: a fail refuses with 550 5.7.23 and the domain's explanation (or is
    only recorded), a temperror defers with 451 4.7.24 (or is recorded), a permerror
    is recorded (or refused with 550 5.7.24) — RFC 7372's codes.  Authenticated
    sessions are not checked (SPF is about who may send from where, and a user who
    logged in is known), nor allowlisted or trusted clients."""

    name = "spf"

    def __init__(self, checker: SPFChecker, settings: Any) -> None:
        self.checker = checker
        self.settings = settings      # a callable giving the current [spf] section

    def mail(self, session: Any, tx: Any, findings: Findings) -> Deferred[Any]:
        if session.account is not None or findings.allowlisted:
            return defer.succeed(None)
        cfg = self.settings()
        d = self.checker.check_identities(session.peer, session.helo or "",
                                          tx.mail_from, check_helo=cfg.check_helo)

        def act(results: IdentityResults) -> Optional[Reply]:
            findings.spf = results
            return _spf_reply(results.verdict, cfg)
        return d.addCallback(act)

    def results(self, findings: Findings) -> list[ResultClause]:
        spf: Optional[IdentityResults] = findings.spf
        if spf is None:
            return []
        found = []
        if spf.helo is not None:
            found.append(_spf_entry(spf.helo, "helo", spf.helo.helo))
        found.append(_spf_entry(spf.mail_from, "mailfrom", spf.mail_from.sender))
        return found


def _spf_reply(result: SPFResult, cfg: Any) -> Optional[Reply]:
    identity = f"{result.identity} {result.domain}"
    if result.result == "fail" and cfg.fail_action == "reject":
        text = result.explanation or f"SPF: {result.ip} is not allowed to send for {identity}"
        return Reply(550, "5.7.23", _one_line(text))
    if result.result == "temperror" and cfg.temperror_action == "tempfail":
        return Reply(451, "4.7.24", _one_line(
            f"SPF: temporary error checking {identity}: {result.reason}; try again later"))
    if result.result == "permerror" and cfg.permerror_action == "reject":
        return Reply(550, "5.7.24", _one_line(
            f"SPF: the SPF record of {result.domain} is broken: {result.reason}"))
    return None


def _spf_entry(result: SPFResult, identity: str, value: str) -> ResultClause:
    kind = "smtp.helo" if identity == "helo" else "smtp.mailfrom"
    return ResultClause("spf", result.result, reason=result.reason,
                        properties=((kind, value),))


class DKIMCheck(InboundCheck):
    """RFC 6376 §6 on the whole message: every signature verified, each result kept
    for DMARC and Authentication-Results.  A signature that fails never refuses the
    message by itself (§6.3: it is then as if unsigned)."""

    name = "dkim"

    def __init__(self, verifier: DKIMVerifier, settings: Any) -> None:
        self.verifier = verifier
        self.settings = settings      # a callable giving the current [dkim] section

    def content(self, session: Any, tx: Any, message: Message,
                findings: Findings) -> Deferred[Any]:
        cfg = self.settings()

        def verify(data: bytes) -> Deferred[Any]:
            return self.verifier.verify(data, message.headers, cfg.verify_max_signatures,
                                        cfg.verify_min_rsa_bits, cfg.verify_rsa_sha1)

        def keep(results: list[SignatureResult]) -> None:
            findings.dkim = results
        return message.content().addCallback(verify).addCallback(keep)

    def results(self, findings: Findings) -> list[ResultClause]:
        if not findings.dkim:
            return [ResultClause("dkim", "none")]
        return [_dkim_entry(one) for one in findings.dkim]


def _dkim_entry(one: SignatureResult) -> ResultClause:
    properties = tuple((name, value) for name, value in (
        ("header.d", one.domain), ("header.i", one.identity), ("header.s", one.selector),
        ("header.a", one.algorithm), ("header.b", one.b_prefix)) if value)
    return ResultClause("dkim", one.result, reason=one.reason, properties=properties)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]
