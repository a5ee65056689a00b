"""DNS blocklists (RFC 5782): lists of client addresses (DNSBL) and of domain names
(RHSBL: the sender's domain, the HELO name), looked up through the cached resolver.

A zone is written as Postfix's postscreen_dnsbl_sites has it, so that a Postfix
admin's lines carry over::

    zen.spamhaus.org=127.0.0.[2..11]*3, bl.spamcop.net*2, list.dnswl.org=127.0.[0..255].[1..3]*-5

* ``=PATTERN``: only answers that match count; each of the four octets is a
  number, ``[N..M]`` (a range) or ``[N;M;...]`` (a list, of numbers or ranges);
* ``&MASK``: only answers with one of the mask's bits set count
  (``bl.example&0.0.0.2``);
* ``*WEIGHT``: what a listing adds to the score (1 when not given; a negative
  weight makes an allowlist that takes from it).

Without a filter every answer in 127.0.0.0/8 counts, except 127.255.255.0/24: the
answers several lists (Spamhaus among them) give when they refuse to serve the
querier (a public resolver, too many queries), which would otherwise list
everyone.  Such an answer is logged.

A query is the client's address reversed (IPv4: ``4.3.2.1.zone``; IPv6: its 32
nibbles reversed, RFC 5782 §2.4) or the domain name (§2.2) below the zone, for A
records.  NXDOMAIN or no A record: not listed.  A timeout or a server failure is
logged and counts as not listed: a list that cannot be asked never refuses mail.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.address import client_ip
from lightmail.dns import DNSError, IResolver

log = Logger(namespace="lightmail.dnsbl")
T = TypeVar("T")

_ZONE = re.compile(r"(?P<zone>[^=&*\s]+?)(?:(?P<op>[=&])(?P<filter>[^*\s]+))?"
                   r"(?:\*(?P<weight>[+-]?\d+))?")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_REFUSED = ipaddress.ip_network("127.255.255.0/24")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


class ZoneError(ValueError):
    """A zone written wrong; the text says how."""


@dataclass(frozen=True)
class Zone:
    """One list: its DNS zone, which answers count, and its weight."""

    name: str
    #: Per octet, the values that match (None: any); empty: no pattern.
    pattern: tuple[Optional[frozenset[int]], ...] = ()
    mask: Optional[int] = None
    weight: int = 1
    #: As written in the configuration.
    text: str = ""

    def counts(self, answer: str) -> bool:
        """Whether the A record ``answer`` is a listing under this zone's filter."""
        try:
            address = ipaddress.IPv4Address(answer)
        except ValueError:
            return False
        if self.mask is not None:
            return bool(int(address) & self.mask)
        if self.pattern:
            octets = address.packed
            return all(allowed is None or octet in allowed
                       for octet, allowed in zip(octets, self.pattern, strict=True))
        return address in _LOOPBACK and address not in _REFUSED


def parse_zone(text: str) -> Zone:
    """A zone as written (see the module's docstring), or ZoneError."""
    found = _ZONE.fullmatch(text.strip())
    if found is None:
        raise ZoneError(f"expected ZONE[=PATTERN|&MASK][*WEIGHT], got {text!r}")
    name = found.group("zone").lower().rstrip(".")
    if not all(_LABEL.fullmatch(label) for label in name.split(".")) or "." not in name:
        raise ZoneError(f"not a DNS zone: {found.group('zone')!r} in {text!r}")
    weight = int(found.group("weight") or 1)
    op, raw = found.group("op"), found.group("filter")
    if op == "&":
        try:
            return Zone(name, mask=int(ipaddress.IPv4Address(raw)), weight=weight,
                        text=text.strip())
        except ValueError:
            raise ZoneError(f"expected a mask such as 0.0.0.2 after '&', got {raw!r}"
                            ) from None
    pattern: tuple[Optional[frozenset[int]], ...] = ()
    if op == "=":
        pattern = _pattern(raw, text)
    return Zone(name, pattern, weight=weight, text=text.strip())


def _pattern(raw: str, text: str) -> tuple[Optional[frozenset[int]], ...]:
    octet_re = r"(\d+|\[[\d.;]+\])"
    found = re.fullmatch(r"\.".join([octet_re] * 4), raw)
    octets = list(found.groups()) if found else []
    if len(octets) != 4:
        raise ZoneError(f"expected four octets such as 127.0.0.[2..11], got {raw!r} "
                        f"in {text!r}")
    pattern: list[Optional[frozenset[int]]] = []
    for octet in octets:
        if octet.isdigit():
            values = {int(octet)}
        elif octet.startswith("[") and octet.endswith("]"):
            values = set()
            for part in octet[1:-1].split(";"):
                low, dots, high = part.partition("..")
                if not low.isdigit() or (dots and not high.isdigit()):
                    raise ZoneError(f"expected N, [N..M] or [N;M] octets, got {octet!r} "
                                    f"in {text!r}")
                values.update(range(int(low), int(high if dots else low) + 1))
        else:
            raise ZoneError(f"expected N, [N..M] or [N;M] octets, got {octet!r} in "
                            f"{text!r}")
        if any(value > 255 for value in values):
            raise ZoneError(f"an octet is at most 255: {octet!r} in {text!r}")
        pattern.append(frozenset(values) if values != set(range(256)) else None)
    return tuple(pattern)


def address_query(ip: str, zone: str) -> Optional[str]:
    """The name that lists ``ip`` under ``zone`` (an IPv4-mapped IPv6 address is its
    IPv4 one), or None for what is not an IP address."""
    address = client_ip(ip)
    if address is None:
        return None
    if address.version == 4:
        labels = reversed(str(address).split("."))
    else:
        labels = reversed(address.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone


def domain_query(domain: str, zone: str) -> Optional[str]:
    """The name that lists ``domain`` under ``zone``, or None for a name DNS could
    not carry (an address literal, an empty label, too long)."""
    domain = domain.lower().rstrip(".")
    if not domain or domain.startswith("[") or ".." in domain or domain.startswith("."):
        return None
    name = f"{domain}.{zone}"
    return name if len(name) <= 253 else None


@dataclass(frozen=True)
class Listing:
    """One zone that lists one subject."""

    zone: Zone
    #: What was listed: "client", "sender" or "helo".
    what: str
    #: The address or name that was looked up.
    subject: str
    #: The A records that counted.
    answers: tuple[str, ...]


class Lookups:
    """Asks the zones about an address or a name, all at once, each within
    ``timeout`` seconds; never fails."""

    def __init__(self, resolver: IResolver, clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor
            clock = reactor
        self.resolver = resolver
        self.clock = clock

    def client(self, ip: str, zones: Sequence[Zone], timeout: float,
               conn_id: str = "") -> Deferred[list[Listing]]:
        return self._ask([(zone, address_query(ip, zone.name)) for zone in zones],
                         "client", ip, timeout, conn_id)

    def domain(self, what: str, domain: str, zones: Sequence[Zone], timeout: float,
               conn_id: str = "") -> Deferred[list[Listing]]:
        return self._ask([(zone, domain_query(domain, zone.name)) for zone in zones],
                         what, domain.lower().rstrip("."), timeout, conn_id)

    def _ask(self, queries: list[tuple[Zone, Optional[str]]], what: str, subject: str,
             timeout: float, conn_id: str) -> Deferred[list[Listing]]:
        asked = [self._one(zone, name, what, subject, timeout, conn_id)
                 for zone, name in queries if name is not None]
        return _gathered(asked).addCallback(
            lambda found: [one for one in found if one is not None])

    def _one(self, zone: Zone, name: str, what: str, subject: str, timeout: float,
             conn_id: str) -> Deferred[Optional[Listing]]:
        d = self.resolver.list_entry(name)
        if not d.called:            # a cached answer is there already: no timer
            d.addTimeout(timeout, self.clock)

        def answered(answers: list[str]) -> Optional[Listing]:
            counted = tuple(answer for answer in answers if zone.counts(answer))
            refused = [a for a in answers if ipaddress.ip_address(a) in _REFUSED]
            if refused and not counted:
                log.warn("DNSBL {zone} refuses to answer us ({answers}): it counts as "
                         "not listing {subject}", zone=zone.name,
                         answers=",".join(refused), subject=subject, conn_id=conn_id)
            if not counted:
                return None
            return Listing(zone, what, subject, counted)

        def failed(failure: Any) -> None:
            error = (f"no answer within {timeout:g} s"
                     if failure.check(defer.TimeoutError, defer.CancelledError)
                     else failure.getErrorMessage())
            if not failure.check(DNSError, defer.TimeoutError, defer.CancelledError):
                log.failure("DNSBL lookup of {name} failed", failure, name=name)
            log.info("DNSBL {zone} could not be asked about {subject} ({error}): it "
                     "counts as not listed", zone=zone.name, subject=subject,
                     error=error, event="dnsbl_error", conn_id=conn_id)
            return None
        return d.addCallbacks(answered, failed)


_PENDING = object()


def _gathered(asked: list[Deferred[T]]) -> Deferred[list[T]]:
    """The results of Deferreds that never fail, in their order: gatherResults, but
    without its DeferredList when all of them have fired (cached answers, as a busy
    MX mostly has)."""
    results: list[Any] = [_PENDING] * len(asked)
    for index, d in enumerate(asked):
        d.addCallback(_keep, results, index)
    if any(result is _PENDING for result in results):
        return defer.gatherResults(asked)
    return defer.succeed(results)


def _keep(result: T, results: list[Any], index: int) -> T:
    results[index] = result
    return result


def score(listings: Sequence[Listing]) -> int:
    """The sum of the weights of the zones that list something (a zone listing
    several things counts once for each)."""
    return sum(listing.zone.weight for listing in listings)
