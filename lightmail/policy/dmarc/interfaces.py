"""What the policy chain and the operators' tools ask of DMARC's aggregate reports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from zope.interface import Interface

if TYPE_CHECKING:
    from lightmail.policy.dmarc.check import DMARCResult
    from lightmail.policy.dmarc.reports import ReportRun


class IDMARCReports(Interface):
    """Aggregate reports (RFC 7489 §7.2): results kept per message, sent per policy
    domain to the ``rua`` addresses of its record."""

    def record(result: DMARCResult, source_ip: str, envelope_from: str,
               envelope_to: str = "") -> Deferred[None]:
        """Keep ``result`` (a message's verdict) for the next report to its policy
        domain: ``source_ip`` the client's address, ``envelope_from`` the MAIL FROM
        address or domain ("" for the null sender), ``envelope_to`` the recipient's
        domain.  Nothing is kept when reports are off, or the result has no record
        asking for reports.  Never fails (a failure is logged)."""

    def send_reports() -> Deferred[ReportRun]:
        """Build the reports of every result kept so far, queue them for their
        destinations, and forget those results; fires with what was done."""
