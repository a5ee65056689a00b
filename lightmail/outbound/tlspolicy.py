"""The TLS one delivery asks of each host, from DANE (outbound/dane.py), MTA-STS
(outbound/mtasts.py), the transport's ``tls`` and the message (REQUIRETLS and
``TLS-Required: No``, RFC 8689, outbound/requiretls.py); and how each session's
outcome is judged and reported (TLS-RPT, RFC 8460).

DANE wins (RFC 8461 §2: MTA-STS must not override a failing DANE validation): a host
with usable, authenticated TLSA records is held to them alone, whatever the domain's
MTA-STS policy says of it; the domain's other hosts keep the MTA-STS policy (those
whose TLSA records are all unusable too: they have TLS required by DANE, and a valid
certificate by the policy).  A REQUIRETLS message asks for an authenticated
certificate of every host: the TLSA match where DANE applies, PKIX elsewhere
(RFC 8689 §4.2.1).  ``TLS-Required: No`` sets DANE, MTA-STS and ``tls = encrypt``
aside (§4.2.2): such a delivery's sessions are not held to the domain's policy, so
they are not reported under it either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lightmail.outbound.client import ClientSession
from lightmail.outbound.dane import ENCRYPT, FAILED, MATCH, HostDANE, verify
from lightmail.outbound.mtasts import Policy
from lightmail.tlsrpt.interfaces import NO_POLICY, STS, SUCCESS, TLSA, ReportPolicy


@dataclass(frozen=True)
class HostTLS:
    """What one delivery asks of the TLS with one host: DANE's demands, MTA-STS's
    (``sts``: the policy, enforced or testing), the transport's STARTTLS policy
    (``tls``: may, encrypt, none), the message's REQUIRETLS; the policy its outcomes
    are reported under (``report``; None: not reported: relay hosts, LMTP, ``tls =
    none``, ``TLS-Required: No``); and when ``TLS-Required: No`` set a demand aside,
    which (``relaxed``, for the log: "DANE", "MTA-STS (enforce)", "tls = encrypt")."""

    dane: HostDANE
    sts: Optional[Policy] = None
    report: Optional[ReportPolicy] = None
    policy_domain: str = ""
    tls: str = "may"
    requiretls: bool = False
    relaxed: str = ""

    @property
    def pkix(self) -> bool:
        """A certificate the roots trust, valid for the host name: MTA-STS enforce or
        REQUIRETLS asks for it, unless TLSA records to match decide instead."""
        return ((self.requiretls or (self.sts is not None and self.sts.mode == "enforce"))
                and self.dane.state != MATCH)

    @property
    def tls_required(self) -> bool:
        return (self.pkix or self.dane.tls_required or self.requiretls
                or self.tls == "encrypt")

    @property
    def starttls(self) -> str:
        """The STARTTLS policy a new session opens with."""
        return "encrypt" if self.tls_required else self.tls


def host_tls(domain: str, dane: HostDANE, sts: Optional[Policy], reported: bool,
             tls: str = "may", requiretls: bool = False,
             relaxed: bool = False) -> HostTLS:
    """The host's TLS and report policy: TLSA when DANE applies to it, else the
    MTA-STS policy when there is one in force, else none; ``relaxed`` (the message
    has ``TLS-Required: No``): none of them, and STARTTLS only when offered."""
    if sts is not None and sts.mode == "none":
        sts = None
    if relaxed:
        aside = ("DANE" if dane.tls_required or dane.state == FAILED
                 else "MTA-STS (enforce)" if sts is not None and sts.mode == "enforce"
                 else "tls = encrypt" if tls == "encrypt" else "")
        return HostTLS(HostDANE(dane.host), policy_domain=domain,
                       tls="may" if tls == "encrypt" else tls, relaxed=aside)
    if dane.state in (MATCH, ENCRYPT):
        report = ReportPolicy(TLSA, tuple(str(r) for r in dane.published), (dane.host,))
        if dane.state == MATCH:
            sts = None
    elif sts is not None:
        report = sts_report_policy(sts)
    else:
        report = ReportPolicy(NO_POLICY)
    return HostTLS(dane, sts, report if reported else None, domain, tls, requiretls)


def sts_report_policy(policy: Policy) -> ReportPolicy:
    """An MTA-STS policy as a report names it: its lines (RFC 8460 §4.4)."""
    lines = ("version: STSv1", f"mode: {policy.mode}",
             *(f"mx: {mx}" for mx in policy.mx), f"max_age: {policy.max_age}")
    return ReportPolicy(STS, lines, tuple(policy.mx))


@dataclass(frozen=True)
class Judgement:
    """A negotiated session's outcome: its result type (SUCCESS or RFC 8460's), why,
    and whether the mail may go over it (``refuse``: not)."""

    result_type: str = SUCCESS
    reason: str = ""
    refuse: bool = False
    details: dict[str, str] = field(default_factory=dict)


def judge(session: ClientSession, tls: HostTLS) -> Judgement:
    """Hold an opened session to the host's demands; a DANE match is noted on the
    session (``session.dane``).  A certificate the roots do not trust counts as a
    failure where MTA-STS or REQUIRETLS looked at it (refused where they require it);
    whether the server offers REQUIRETLS is no TLS matter (the agent checks it)."""
    dane = tls.dane
    if dane.state == MATCH:
        verdict = verify(session.peer_certificates(), dane.records, (dane.host,))
        if not verdict.ok:
            return Judgement(verdict.result_type, verdict.reason, refuse=True)
        session.dane = verdict.how
        session.tls = f"{session.tls.split(' (')[0]} ({verdict.how} verified)"
        return Judgement()
    if not session.tls:
        return Judgement("starttls-not-supported", "STARTTLS " + session.starttls)
    if (tls.sts is not None or tls.pkix) and not session.verified:
        kind = ("certificate-host-mismatch" if "VerificationError" in session.tls
                else "certificate-expired" if "expired" in session.tls
                else "certificate-not-trusted")
        return Judgement(kind, session.tls, refuse=tls.pkix)
    if dane.state == ENCRYPT:
        # §2.2: encrypted, but nothing to authenticate against: the records' fault.
        return Judgement("tlsa-invalid", dane.detail)
    return Judgement()


def reusable(session: ClientSession, tls: HostTLS) -> bool:
    """Whether an idle session (judged when it was opened, for whatever host policy
    was in force then) meets the host's demands now."""
    if tls.dane.records and not session.dane:
        return False
    if tls.tls_required and not session.tls:
        return False
    if tls.requiretls and "REQUIRETLS" not in session.extensions:
        return False
    return not (tls.pkix and not session.verified)


def failed_negotiation(session: ClientSession) -> Optional[Judgement]:
    """Why a session that failed to open failed, when it was TLS's fault."""
    if session.starttls in ("not offered", "refused"):
        return Judgement("starttls-not-supported", f"STARTTLS {session.starttls}")
    if session.starttls == "negotiating":
        return Judgement("validation-failure", "TLS handshake failed")
    return None
