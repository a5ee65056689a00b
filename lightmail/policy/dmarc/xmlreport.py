"""The aggregate report document (RFC 7489 §7.2, Appendix C): XML, gzip'ed, named
as §7.2.1.1 says.

The elements are those of Appendix C's schema, in its order, with no namespace, as
the reports receivers get in practice carry them (the schema's targetNamespace,
``http://dmarc.org/dmarc-xml/0.1``, cannot be used as printed: its type references
have no prefix, so no validator loads it unchanged; tests/test_dmarc_reports.py
validates against it with that attribute taken out).  Two details the schema's
patterns force: an IPv6 ``source_ip`` is written in full (eight groups: the
schema's pattern has no ``::``), and ``policy_published`` always has ``sp``, ``pct``
and ``fo`` (the schema requires them), with the defaults when the record has none.
"""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightmail.address import client_ip
from lightmail.policy.dmarc.store import GroupedRow

VERSION = "1.0"


@dataclass(frozen=True)
class AggregateReport:
    org_name: str
    email: str                      # the reporter's contact address
    report_id: str
    begin: int                      # seconds since the epoch
    end: int
    policy_domain: str
    published: Mapping[str, Any]    # domain, adkim, aspf, p, sp, pct, fo
    rows: Sequence[GroupedRow]


def report_xml(report: AggregateReport) -> bytes:
    """The report as an XML document (UTF-8)."""
    root = ET.Element("feedback")
    _text(root, "version", VERSION)
    meta = ET.SubElement(root, "report_metadata")
    _text(meta, "org_name", report.org_name)
    _text(meta, "email", report.email)
    _text(meta, "report_id", report.report_id)
    dates = ET.SubElement(meta, "date_range")
    _text(dates, "begin", str(report.begin))
    _text(dates, "end", str(report.end))
    policy = ET.SubElement(root, "policy_published")
    published = report.published
    _text(policy, "domain", report.policy_domain)
    _text(policy, "adkim", str(published.get("adkim", "r")))
    _text(policy, "aspf", str(published.get("aspf", "r")))
    _text(policy, "p", str(published.get("p", "none")))
    _text(policy, "sp", str(published.get("sp") or published.get("p", "none")))
    _text(policy, "pct", str(published.get("pct", 100)))
    _text(policy, "fo", str(published.get("fo", "0")))
    for row in report.rows:
        _record(root, row)
    ET.indent(root)
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True) + b"\n"


def _record(root: ET.Element, row: GroupedRow) -> None:
    record = ET.SubElement(root, "record")
    data = ET.SubElement(record, "row")
    _text(data, "source_ip", _ip(row.source_ip))
    _text(data, "count", str(row.count))
    evaluated = ET.SubElement(data, "policy_evaluated")
    _text(evaluated, "disposition", row.disposition)
    _text(evaluated, "dkim", row.dkim)
    _text(evaluated, "spf", row.spf)
    for kind, comment in row.reasons:
        reason = ET.SubElement(evaluated, "reason")
        _text(reason, "type", kind)
        if comment:
            _text(reason, "comment", comment)
    identifiers = ET.SubElement(record, "identifiers")
    if row.envelope_to:
        _text(identifiers, "envelope_to", row.envelope_to)
    _text(identifiers, "envelope_from", row.envelope_from)
    _text(identifiers, "header_from", row.header_from)
    results = ET.SubElement(record, "auth_results")
    for domain, selector, result in row.dkim_results:
        dkim = ET.SubElement(results, "dkim")
        _text(dkim, "domain", domain)
        if selector:
            _text(dkim, "selector", selector)
        _text(dkim, "result", result)
    spf = ET.SubElement(results, "spf")
    _text(spf, "domain", row.spf_domain)
    _text(spf, "scope", row.spf_scope)
    _text(spf, "result", row.spf_result)


def _text(parent: ET.Element, name: str, text: str) -> None:
    ET.SubElement(parent, name).text = text


def _ip(text: str) -> str:
    address = client_ip(text)
    if address is None:
        return text
    return address.exploded if address.version == 6 else str(address)


def gzipped(document: bytes, mtime: int) -> bytes:
    """The document gzip'ed, its header's time ``mtime`` (the report's end)."""
    return gzip.compress(document, compresslevel=9, mtime=mtime)


def report_filename(receiver: str, policy_domain: str, begin: int, end: int,
                    unique_id: str) -> str:
    """§7.2.1.1: receiver "!" policy-domain "!" begin "!" end "!" unique-id ".xml.gz"
    (the extension as RFC 7489 erratum 7099 corrects the example)."""
    return f"{receiver}!{policy_domain}!{begin}!{end}!{unique_id}.xml.gz"
