"""The RFC5322.From domain that DMARC judges (RFC 7489 §6.6.1), from a message's
header block.

§6.6.1 leaves to the receiver what to do with a message whose From: field is not
one address: none at all, several From: fields, one field with several addresses,
an address without a domain.  LightMail does what OpenDMARC (1.4) does:

* by default (OpenDMARC's RequiredHeaders and RejectMultiValueFrom off) such a
  message gets no DMARC verdict: :attr:`HeaderFrom.domain` is None, and the caller
  reports ``dmarc=none``; where there are several From: fields, the first one is
  judged (as OpenDMARC takes the first), and several addresses that share one
  domain are that domain;
* with ``[dmarc] reject_malformed_from = yes`` (both options on) it is rejected:
  :attr:`HeaderFrom.disposition` is ``reject``, and the caller answers
  550 5.7.1 (:attr:`HeaderFrom.reply`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.policy import default as default_policy
from typing import Optional

# A From: field longer than this is not parsed (the address parser is Python; a
# header a few hundred kilobytes long would hold the reactor): it counts as one
# without a domain.
MAX_FROM_LENGTH = 16384

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


@dataclass(frozen=True)
class HeaderFrom:
    """What the From: field gives DMARC."""

    #: The domain to judge (lower case, A-labels), or None: no DMARC verdict.
    domain: Optional[str]
    #: '' (one address), 'no_from', 'several_fields', 'several_domains' or
    #: 'no_domain'.
    problem: str = ""
    #: Every domain found in the From: fields, in order (for the log).
    domains: tuple[str, ...] = ()
    #: 'reject' when the message is to be refused for its From: field; else 'none'.
    disposition: str = "none"

    @property
    def reply(self) -> Optional[tuple[int, str, str]]:
        """The SMTP reply (code, enhanced status, text) that refuses the message, or
        None when it is not refused."""
        if self.disposition != "reject":
            return None
        why = {"no_from": "no From: field", "several_fields": "more than one From: field",
               "several_domains": "a From: field with addresses of different domains",
               "no_domain": "a From: field without a domain"}.get(self.problem, "its From:")
        return (550, "5.7.1", f"Message refused: {why} (RFC 5322 §3.6, RFC 7489 §6.6.1)")


def header_from(header_block: bytes, reject_malformed: bool = False) -> HeaderFrom:
    """The From: domain of the message whose header block (the header fields, up to
    the empty line; what follows it is ignored) is ``header_block``."""
    values = _from_fields(header_block)
    if not values:
        return _judged(None, "no_from", (), reject_malformed)
    fields = [_domains(value) for value in values]
    found = tuple(domain for domains in fields for domain in domains if domain)
    first = fields[0]
    if len(values) > 1:
        # OpenDMARC takes the first From: field when it does not refuse the message.
        domain = first[0] if first and len(set(first)) == 1 and first[0] else None
        return _judged(domain, "several_fields", found, reject_malformed)
    if not first or not all(first):
        return _judged(None, "no_domain", found, reject_malformed)
    if len(set(first)) > 1:
        return _judged(None, "several_domains", found, reject_malformed)
    return HeaderFrom(first[0], "", found)


def _judged(domain: Optional[str], problem: str, found: tuple[str, ...],
            reject_malformed: bool) -> HeaderFrom:
    return HeaderFrom(domain, problem, found, "reject" if reject_malformed else "none")


def _from_fields(block: bytes) -> list[str]:
    """The (unfolded) values of the From: fields of a header block."""
    fields: list[list[bytes]] = []
    current: Optional[list[bytes]] = None
    for line in re.split(rb"\r?\n", block):
        if not line:
            break                           # the end of the header
        if line[:1] in (b" ", b"\t"):
            if current is not None:         # a continuation of the field above
                current.append(line)
            continue
        match = _FIELD.match(line)
        if match and match.group(1).lower() == b"from":
            current = [line[match.end():]]
            fields.append(current)
        else:
            current = None
    return [b"".join(parts).decode("utf-8", "replace").strip() for parts in fields]


# The common forms, read without email.headerregistry's parser (0.4 ms a message):
# local@domain, or a display name without quotes, comments, commas or brackets before
# <local@domain>.  Anything else takes the full parser.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_NAME = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN = re.compile(rf"\s*(?:[^<>@,;:\"()\\\[\]]*<{_ATOM}(?:\.{_ATOM})*@({_NAME})>"
                    rf"|{_ATOM}(?:\.{_ATOM})*@({_NAME}))\s*")


def _domains(value: str) -> list[str]:
    """The domain of each address of a From: field's value ('' for an address that
    has none, or none DMARC can judge)."""
    if len(value) > MAX_FROM_LENGTH:
        return [""]
    plain = _PLAIN.fullmatch(value)
    if plain is not None:
        return [_domain(plain.group(1) or plain.group(2))]
    try:
        header = default_policy.header_factory("from", value)
    except (HeaderParseError, IndexError, ValueError, TypeError):
        return [""]
    addresses = header.addresses     # type: ignore[attr-defined]
    return [_domain(address.domain) for address in addresses] or [""]


def _domain(raw: str) -> str:
    domain = raw.strip().rstrip(".").lower()
    if not domain or domain.startswith("["):     # no domain, or an address literal
        return ""
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return ""
    return domain if _DOMAIN.fullmatch(domain) and len(domain) <= 253 else ""
