"""Macro expansion (RFC 7208 §7): the values of the macro letters for one check, the
transformers (parts, reversal, delimiters), URL escaping for upper-case letters, and
how an expanded domain name is made fit for a query (§7.3: a trailing dot dropped,
labels taken off the left until it is 253 characters at most).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Union
from urllib.parse import quote

from lightmail.policy.spf.record import Macro, MacroString

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True)
class Subject:
    """What one check is about: the macro values that do not depend on the record."""
    ip: IPAddress              # an IPv4-mapped IPv6 address is already its IPv4 address
    sender: str                # local-part@domain, "postmaster" when it had no local part
    helo: str
    receiver: str              # %{r}: this host's name, "unknown" when not given

    @property
    def local_part(self) -> str:
        return self.sender.rpartition("@")[0]

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2]

    def value(self, letter: str, domain: str, validated: str, now: int) -> str:
        """%{letter}, untransformed (§7.3)."""
        ip = self.ip
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local_part
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            if ip.version == 4:
                return str(ip)
            # dot-format nibbles, meant for %{ir}; upper case as the RFC 7208 test
            # suite expects (DNS does not mind the case).
            return ".".join(ip.exploded.replace(":", "").upper())
        if letter == "p":
            return validated
        if letter == "v":
            return "in-addr" if ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(ip)
        if letter == "r":
            return self.receiver or "unknown"
        if letter == "t":
            return str(now)
        raise ValueError(f"no macro letter {letter!r}")   # the parser lets none through


def uses_validated_name(pieces: MacroString) -> bool:
    """Whether expanding needs %{p}, the one letter that costs DNS lookups."""
    return any(isinstance(piece, Macro) and piece.letter == "p" for piece in pieces)


def expand(pieces: MacroString, subject: Subject, domain: str, validated: str = "unknown",
           now: int = 0) -> str:
    out: list[str] = []
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
        else:
            out.append(_transform(subject.value(piece.letter, domain, validated, now), piece))
    return "".join(out)


def _transform(value: str, macro: Macro) -> str:
    parts = re.split("[" + re.escape(macro.delimiters or ".") + "]", value)
    if macro.reverse:
        parts.reverse()
    if macro.digits:
        parts = parts[-macro.digits:]
    text = ".".join(parts)
    # §7.3: upper-case letters are URL-escaped: everything but unreserved characters
    return quote(text, safe="") if macro.escape else text


def query_name(expanded: str) -> Optional[str]:
    """The name to look up for an expanded domain-spec, or None when no query can be
    made of it (an empty label, one over 63 octets): such a name exists nowhere."""
    name = expanded[:-1] if expanded.endswith(".") else expanded
    if len(name) > 253:
        # the first dot from which 253 characters at most are left (a record can
        # expand to megabytes: no label-by-label loop)
        cut = name.find(".", len(name) - 254)
        if cut < 0:
            return None
        name = name[cut + 1:]
    if not name:
        return None
    if any(not label or len(label.encode("utf-8")) > 63 for label in name.split(".")):
        return None
    return name


def is_domain(name: str) -> bool:
    """§4.3: a domain check_host() can start from: well formed, more than one label,
    not an address literal."""
    name = name[:-1] if name.endswith(".") else name
    return (len(name) <= 253 and query_name(name) == name and "." in name
            and not name.startswith("["))
