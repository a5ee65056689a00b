"""Mail address helpers shared by the protocols and the directory.

Lookups are case-insensitive, as in Postfix and Dovecot: local parts and domains are
compared lower-case, and internationalised domains as A-labels (RFC 5890).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Optional, Union


class AddressError(ValueError):
    """Not a usable mail address; the message says why."""


_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
#: RFC 5321 §4.5.3.1.1: the longest local part every server must take.
MAX_LOCAL_PART = 64
#: RFC 5321 §4.5.3.1.3: the longest reverse- or forward-path, its angle brackets
#: included.
MAX_PATH = 256


def normalise_domain(domain: str) -> str:
    """Lower-case A-label form of ``domain``; AddressError if it is not a domain."""
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("[") and domain.endswith("]"):
        return domain  # address literal, RFC 5321 §4.1.3
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise AddressError(f"{domain!r} is not a valid domain name") from None
    labels = ascii_domain.split(".")
    if len(ascii_domain) > 253 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise AddressError(f"{domain!r} is not a valid domain name")
    return ascii_domain


def split_address(address: str, max_local: Optional[int] = MAX_LOCAL_PART
                  ) -> tuple[str, str]:
    """(local part, domain) of ``address``, both normalised for lookups; a local part
    longer than ``max_local`` octets is refused (None: any length)."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise AddressError(f"{address!r} is not of the form local-part@domain")
    if max_local is not None and len(local.encode("utf-8")) > max_local:
        raise AddressError(f"the local part is longer than {max_local} octets "
                           "(RFC 5321 §4.5.3.1.1)")
    if any(ch.isspace() or ord(ch) < 32 for ch in local):
        raise AddressError(f"{address!r} has spaces or control characters")
    return local.lower(), normalise_domain(domain)


def normalise_address(address: str) -> str:
    local, domain = split_address(address)
    return f"{local}@{domain}"


IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


# The inbound checks read a client's address half a dozen times a message (access
# lists, limits, DNSBL queries, greylisting's network), and ipaddress parses in Python:
# the same few clients' addresses are kept parsed (the objects are immutable).
@functools.lru_cache(maxsize=4096)
def client_ip(text: str) -> Optional[IPAddress]:
    """The IP address a client connected from, or None for text that is not one.  An
    IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, a dual-stack socket's way of
    showing an IPv4 client) is its IPv4 address: every check keys on that one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address
