"""What the outbound MTA tells TLS reporting: one :class:`TLSResult` per TLS
negotiation (or per policy failure that stopped one), through :class:`ITLSReports`."""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import Interface, implementer

#: RFC 8460 §4.3: policy types.
STS, TLSA, NO_POLICY = "sts", "tlsa", "no-policy-found"
#: What a successful session counts as (not a result type of the RFC: a failure's is).
SUCCESS = "success"
#: RFC 8460 §4.3.2: the result types of failures.
RESULT_TYPES = frozenset({
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
})


@dataclass(frozen=True)
class ReportPolicy:
    """The policy a session was held to, as a report names it (RFC 8460 §4.4)."""

    type: str                           # STS, TLSA or NO_POLICY
    strings: tuple[str, ...] = ()       # the policy's text: STS lines, TLSA records
    mx_hosts: tuple[str, ...] = ()      # STS: the mx patterns; TLSA: the MX host


@dataclass(frozen=True)
class TLSResult:
    """One session's outcome (or one policy failure) for a policy domain's report."""

    policy_domain: str
    policy: ReportPolicy
    result_type: str                    # SUCCESS or one of RESULT_TYPES
    sending_ip: str = ""
    receiving_mx: str = ""
    receiving_ip: str = ""
    reason: str = ""                    # failure-reason-code: a short text


class ITLSReports(Interface):
    """Where the outbound MTA records TLS outcomes for TLS-RPT."""

    def record(result: TLSResult) -> None:
        """Count ``result`` for today's report of its policy domain.  Returns at
        once; never fails (a count that cannot be stored is logged and lost)."""


@implementer(ITLSReports)
class NoTLSReports:
    """``[tlsrpt] enabled = no``: nothing is recorded."""

    def record(self, result: TLSResult) -> None:
        pass
