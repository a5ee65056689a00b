"""An IResolver that answers from the zone data of an RFC 7208 test-suite scenario
(the openspf project's YAML), read as pyspf's own test driver reads it:

* ``SPF`` records are served as TXT records too when the name has no ``TXT`` entry
  (the suite writes SPF where it means "the policy, whatever the record type"), and
  ``TXT: NONE`` says the name has no TXT record;
* ``TIMEOUT`` as an entry: a query of a type with no record listed before it times
  out (a TemporaryDNSError, as lightmail.dns.Resolver raises for a timeout); as a
  value (``TXT: TIMEOUT``): queries of that type time out;
* a name not in the data does not exist (NXDOMAIN); a name there without records of
  the type asked answers nothing (NODATA);
* CNAMEs are followed (8 links at most: a loop is a DNS error, as a resolver's
  SERVFAIL would be).

Answers are Deferreds that have already fired.  ``queries`` records every question.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, TypeVar

import dns.reversename
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from lightmail.dns import (
    TLSA,
    Authenticated,
    DNSError,
    IResolver,
    NoSuchDomain,
    TemporaryDNSError,
)

T = TypeVar("T")
Entry = Any                     # "TIMEOUT" or (rtype, value)


@implementer(IResolver)
class ZoneResolver:
    def __init__(self, zonedata: dict[str, list[Any]]) -> None:
        self.zone = {name.lower().rstrip("."): _entries(records or [])
                     for name, records in zonedata.items()}
        self.queries: list[tuple[str, str]] = []

    def records(self, name: str, rtype: str, links: int = 0) -> list[Any]:
        self.queries.append((name, rtype))
        key = name.lower().rstrip(".")
        if any(not label or len(label) > 63 for label in key.split(".")):
            raise NoSuchDomain(f"{name}: not a name DNS can carry")
        if key not in self.zone:
            raise NoSuchDomain(f"{name}: no such domain")
        found: list[Any] = []
        for entry in self.zone[key]:
            if entry == "TIMEOUT":
                if not found:
                    raise TemporaryDNSError(f"{name} {rtype}: timeout")
                break
            kind, value = entry
            if kind == rtype:
                if value == "TIMEOUT":
                    raise TemporaryDNSError(f"{name} {rtype}: timeout")
                found.append(value)
            elif kind == "CNAME" and rtype != "CNAME":
                if links >= 8:
                    raise TemporaryDNSError(f"{name} {rtype}: CNAME loop")
                return self.records(str(value), rtype, links + 1)
        return found

    # -- IResolver -------------------------------------------------------------------

    def txt_records(self, name: str) -> Deferred[list[bytes]]:
        return _answer(lambda: ["".join(strings).encode("utf-8")
                                for strings in self.records(name, "TXT")])

    def txt(self, name: str) -> Deferred[list[str]]:
        def lookup() -> list[str]:
            try:
                return ["".join(strings) for strings in self.records(name, "TXT")]
            except NoSuchDomain:
                return []
        return _answer(lookup)

    def a(self, host: str) -> Deferred[list[str]]:
        return _answer(lambda: [_address(v) for v in self.records(host, "A")])

    def aaaa(self, host: str) -> Deferred[list[str]]:
        return _answer(lambda: [_address(v) for v in self.records(host, "AAAA")])

    def list_entry(self, name: str) -> Deferred[list[str]]:
        d = self.a(name)
        d.addErrback(lambda failure: failure.trap(NoSuchDomain) and [])
        return d

    def addresses(self, host: str) -> Deferred[list[str]]:
        return _answer(lambda: [_address(v) for rtype in ("A", "AAAA")
                                for v in self.records(host, rtype)])

    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        return _answer(lambda: [(int(pref), str(host).rstrip(".") or ".")
                                for pref, host in self.records(domain, "MX")])

    def ptr(self, address: str) -> Deferred[list[str]]:
        name = dns.reversename.from_address(address).to_text(omit_final_dot=True)
        return _answer(lambda: [str(v).rstrip(".") for v in self.records(name, "PTR")])

    # The suite's zones are not signed: nothing is authenticated.

    def mx_authenticated(self, domain: str) -> Deferred[Authenticated[list[tuple[int, str]]]]:
        return self.mx(domain).addCallback(Authenticated, False)

    def addresses_authenticated(self, host: str) -> Deferred[Authenticated[list[str]]]:
        return self.addresses(host).addCallback(Authenticated, False)

    def tlsa(self, name: str) -> Deferred[Authenticated[list[TLSA]]]:
        return defer.succeed(Authenticated([], False))


def _entries(records: list[Any]) -> list[Entry]:
    entries: list[Entry] = []
    generated: list[Entry] = []
    has_txt = False
    for item in records:
        if item == "TIMEOUT":
            entries.append("TIMEOUT")
            continue
        ((kind, value),) = item.items()
        if kind == "TXT":
            has_txt = True
        if value == "NONE":
            continue
        if kind in ("TXT", "SPF") and isinstance(value, str) and value != "TIMEOUT":
            value = [value]                # one character-string
        if kind == "SPF":
            generated.append(("TXT", value))
        entries.append((kind, value))
    return entries + ([] if has_txt else generated)


def _address(value: Any) -> str:
    return str(ipaddress.ip_address(str(value)))


def _answer(lookup: Callable[[], T]) -> Deferred[T]:
    try:
        return defer.succeed(lookup())
    except DNSError as exc:
        return defer.fail(exc)
