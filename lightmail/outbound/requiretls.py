"""REQUIRETLS (RFC 8689): what a message asks of the path it is relayed on.

A message received with ``MAIL FROM:<...> REQUIRETLS`` (``Envelope.requiretls``) is
relayed only (§4.2.1) to a host whose name is vouched for - the MX answer was
DNSSEC-validated (the resolver's AD bit, where ``dane`` applies: outbound/dane.py),
or an MTA-STS policy in ``enforce`` mode names it, or it is a relay host from the
configuration - over STARTTLS with a certificate that verifies (the host's TLSA
records where it has usable ones, else PKIX), to a server that offers REQUIRETLS in
the EHLO after TLS; the parameter then goes on with MAIL FROM.  When no host of the
destination qualifies the message bounces with the RFC's codes: 5.7.30 (REQUIRETLS
support required) or 5.7.10 (encryption needed).  Notices (the null sender) are not
bound (§4.2.1), and an LMTP transport is final delivery (§4.4), not relay.

A message with the header field ``TLS-Required: No`` (§3) and no REQUIRETLS asks the
opposite: sent even where the receiving domain's policy (MTA-STS, DANE) or
``tls = encrypt`` would hold it back - over TLS when offered, its certificate
unchecked, else in clear (§4.2.2); the delivery logs which.  What one delivery asks
of each host is outbound/tlspolicy.py's ``HostTLS``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

# RFC 8689 §5 and the enhanced status code registry (RFC 5248).
REQUIRETLS_NEEDED = "5.7.30"        # the server does not offer REQUIRETLS (or no path)
ENCRYPTION_NEEDED = "5.7.10"        # no TLS, or a certificate that does not verify

# How far into a message the header field is looked for (a header section longer
# than this is not one a sender asking for TLS-Required: No would write).
HEADER_PEEK = 64 * 1024

_TLS_REQUIRED_NO = re.compile(rb"^tls-required[ \t]*:[ \t]*no[ \t]*$", re.I)


@dataclass(frozen=True)
class Refusal:
    """Why a host does not qualify for a REQUIRETLS message: a lasting fact (it said
    so, or its certificate does not verify), unlike a host that could not be
    reached.  When every host of a destination refuses, the message bounces."""

    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.status} {self.text}"


def tls_optional(message: bytes) -> bool:
    """Whether the header section at the start of ``message`` has ``TLS-Required:
    No`` (RFC 8689 §3; folded or not, any case)."""
    end = re.search(rb"\r?\n\r?\n", message)
    head = message[:end.start()] if end else message
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", head)
    return any(_TLS_REQUIRED_NO.match(line.rstrip(b"\r"))
               for line in unfolded.split(b"\n"))


def unvouched(domain: str) -> Refusal:
    return Refusal(REQUIRETLS_NEEDED, f"REQUIRETLS: no MX host of {domain} is vouched "
                   "for by DNSSEC or an MTA-STS policy in enforce mode (RFC 8689 §4.2.1)")


def session_refusal(where: str, tls: str, verified: bool,
                    extensions: Mapping[str, str], why: str = "") -> Optional[Refusal]:
    """Why a negotiated session cannot carry a REQUIRETLS message, or None; ``why``
    a certificate does not verify, when there is more to say than ``tls`` (DANE)."""
    if not tls:
        return Refusal(ENCRYPTION_NEEDED, f"REQUIRETLS: {where} offers no STARTTLS")
    if not verified:
        return Refusal(ENCRYPTION_NEEDED, f"REQUIRETLS: the certificate of {where} "
                       f"does not verify ({why or tls})")
    if "REQUIRETLS" not in extensions:
        return Refusal(REQUIRETLS_NEEDED, f"REQUIRETLS: {where} does not offer REQUIRETLS")
    return None


def bounce_detail(refusals: list[Refusal]) -> str:
    """The detail of the bounce when every host refused: 5.7.30 when one said it
    does not offer REQUIRETLS (or none was vouched for), else 5.7.10."""
    status = (REQUIRETLS_NEEDED if any(r.status == REQUIRETLS_NEEDED for r in refusals)
              else ENCRYPTION_NEEDED)
    return f"{status} " + "; ".join(dict.fromkeys(r.text for r in refusals))
