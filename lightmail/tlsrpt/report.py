"""TLS-RPT reports (RFC 8460), pure functions: the ``_smtp._tls`` TXT record (§3), the
JSON report of one policy domain and day (§4), its gzip file name (§5.1) and the
mail that carries it (§5.3)."""

from __future__ import annotations

import gzip
import json
import secrets
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any, Optional

from lightmail.tlsrpt.interfaces import NO_POLICY, SUCCESS, ReportPolicy
from lightmail.tlsrpt.store import Counted

#: RFC 8460 §5.3 and §6.4: the media type of a gzipped JSON report.
MEDIA_TYPE = "application/tlsrpt+gzip"
RECORD_PREFIX = "_smtp._tls."


def report_addresses(records: Iterable[str]) -> Optional[list[str]]:
    """The ``rua`` URIs of a domain's TLS-RPT record (RFC 8460 §3), ``mailto:`` and
    ``https:`` ones; None when there is not exactly one ``v=TLSRPTv1`` record."""
    found = [r for r in records
             if r.strip().split(";", 1)[0].replace(" ", "") == "v=TLSRPTv1"]
    if len(found) != 1:
        return None
    for field in found[0].split(";")[1:]:
        key, _, value = field.strip().partition("=")
        if key.strip() == "rua":
            uris = [u.strip() for u in value.split(",") if u.strip()]
            return [u for u in uris if u.lower().startswith(("mailto:", "https:"))]
    return None


def mailto_address(uri: str) -> Optional[str]:
    """The address of a ``mailto:`` URI (RFC 6068), without its query part."""
    address = urllib.parse.unquote(uri[len("mailto:"):].split("?", 1)[0]).strip()
    local, at, domain = address.rpartition("@")
    if not (local and at and domain) or any(c in address for c in " <>\r\n,"):
        return None
    return address


@dataclass(frozen=True)
class Reporter:
    """Who reports: ``[tlsrpt]`` org_name, contact, from_address, and the submitter
    domain (the From: address's domain)."""

    org_name: str
    contact: str
    from_address: str

    @property
    def submitter(self) -> str:
        return self.from_address.rpartition("@")[2]


def day_range(day: str) -> tuple[datetime, datetime]:
    """The first and last second of a UTC day (``2026-12-10``)."""
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    return start, start + timedelta(days=1) - timedelta(seconds=1)


def new_report_id(day: str, domain: str, reporter: Reporter) -> str:
    return f"{day}.{domain}.{secrets.token_hex(6)}@{reporter.submitter}"


def build_report(rows: list[Counted], day: str, domain: str, reporter: Reporter,
                 report_id: str) -> dict[str, Any]:
    """The JSON report (RFC 8460 §4.4) of one policy domain for one day."""
    start, end = day_range(day)
    policies: dict[ReportPolicy, dict[str, Any]] = {}
    for row in rows:
        result, policy = row.result, row.result.policy
        entry = policies.get(policy)
        if entry is None:
            described: dict[str, Any] = {"policy-type": policy.type,
                                         "policy-domain": domain}
            if policy.type != NO_POLICY:
                described["policy-string"] = list(policy.strings)
                if policy.mx_hosts:
                    described["mx-host"] = list(policy.mx_hosts)
            entry = policies[policy] = {
                "policy": described,
                "summary": {"total-successful-session-count": 0,
                            "total-failure-session-count": 0},
                "failure-details": []}
        if result.result_type == SUCCESS:
            entry["summary"]["total-successful-session-count"] += row.count
            continue
        entry["summary"]["total-failure-session-count"] += row.count
        detail: dict[str, Any] = {"result-type": result.result_type}
        for key, value in (("sending-mta-ip", result.sending_ip),
                           ("receiving-mx-hostname", result.receiving_mx),
                           ("receiving-ip", result.receiving_ip)):
            if value:
                detail[key] = value
        detail["failed-session-count"] = row.count
        if result.reason:
            detail["failure-reason-code"] = result.reason
        entry["failure-details"].append(detail)
    for entry in policies.values():
        if not entry["failure-details"]:
            del entry["failure-details"]
    return {
        "organization-name": reporter.org_name,
        "date-range": {"start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "end-datetime": end.strftime("%Y-%m-%dT%H:%M:%SZ")},
        "contact-info": reporter.contact,
        "report-id": report_id,
        "policies": list(policies.values()),
    }


def compressed(report: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(report, indent=1).encode(), mtime=0)


def file_name(report: dict[str, Any], domain: str, reporter: Reporter) -> str:
    """RFC 8460 §5.1: ``submitter!policy-domain!begin!end.json.gz``, the range in
    Unix seconds."""
    times = [int(datetime.strptime(report["date-range"][key], "%Y-%m-%dT%H:%M:%SZ")
                 .replace(tzinfo=UTC).timestamp())
             for key in ("start-datetime", "end-datetime")]
    return f"{reporter.submitter}!{domain}!{times[0]}!{times[1]}.json.gz"


def report_mail(report: dict[str, Any], data: bytes, domain: str, to: str,
                reporter: Reporter, now: datetime) -> bytes:
    """The mail of RFC 8460 §5.3: ``multipart/report; report-type="tlsrpt"``, a few
    words, and the gzipped report as an attachment."""
    message = EmailMessage(policy=SMTP)
    message["From"] = reporter.from_address
    message["To"] = to
    message["Subject"] = (f"Report Domain: {domain} Submitter: {reporter.submitter} "
                          f"Report-ID: <{report['report-id']}>")
    message["Date"] = format_datetime(now)
    message["Message-ID"] = make_msgid(domain=reporter.submitter)
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = reporter.submitter
    message["Auto-Submitted"] = "auto-generated"          # RFC 3834: no replies
    message.set_content(f"This is an aggregate TLS report (RFC 8460) from "
                        f"{reporter.org_name} for {domain}, "
                        f"{report['date-range']['start-datetime'][:10]}.\n")
    maintype, subtype = MEDIA_TYPE.split("/")
    message.add_attachment(data, maintype=maintype, subtype=subtype,
                           filename=file_name(report, domain, reporter))
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes()
