"""DNS for LightMail (the outbound MTA, and the policy checks of incoming mail):
dnspython's resolver, off the reactor thread, cached.

dnspython's stub resolver is synchronous; each query runs in the reactor's thread
pool so the reactor never waits on the network.  Answers are cached for their TTL
(dnspython's thread-safe ``Cache``), negative answers too; a positive answer the cache
holds is given back at once, without the hop to the pool (the inbound checks ask the
same few names for every message of a busy sender).

The lookups of the interface say apart what SPF (RFC 7208 §4.6.4) and the other policy
checks need said apart: a name that does not exist raises :class:`NoSuchDomain`, a name
without records of the type asked answers ``[]``, a server that fails or does not answer
raises :class:`TemporaryDNSError`.  (``txt`` and ``addresses``, the outbound MTA's,
predate that and are kept as they were.)

DNSSEC: LightMail does not validate signatures itself.  Every query sets the AD flag
(RFC 6840 §5.7: "I understand AD"), and a validating resolver (unbound, or
systemd-resolved with ``DNSSEC=yes``) answers with AD set when it validated the
answer.  The ``*_authenticated`` lookups and :meth:`IResolver.tlsa` hand that bit on
with the records (:class:`Authenticated`), for DANE (RFC 7672), which trusts TLSA
records only when they are authenticated.  The AD bit is only worth the path it comes
over: the resolver must be on the same host (or a trusted network).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import dns.exception
import dns.flags
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer

from lightmail.metrics.interfaces import IMetrics
from lightmail.metrics.registry import Metrics

T = TypeVar("T")
#: How many answers Resolver._cached keeps aside at most (then it starts again).
RECENT_SIZE = 10_000


@dataclass(frozen=True)
class Authenticated(Generic[T]):
    """Records, and whether the resolver said it validated them: the AD bit of its
    answer (RFC 4035 §3.2.3; for two lookups, A and AAAA, both answers')."""

    records: T
    authenticated: bool


@dataclass(frozen=True)
class TLSA:
    """A TLSA record (RFC 6698 §2.1): certificate usage, selector, matching type and
    the certificate association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


class DNSError(Exception):
    """A lookup failed."""


class NoSuchDomain(DNSError):
    """NXDOMAIN: the name does not exist (a permanent failure)."""


class TemporaryDNSError(DNSError):
    """SERVFAIL, timeouts, unreachable servers: try again later."""


class IResolver(Interface):
    def mx(domain: str) -> Deferred[list[tuple[int, str]]]:
        """MX records as (preference, exchange) — ``[]`` when the domain has none
        (then implicit MX applies); exchange ``""`` is a null MX (RFC 7505)."""

    def addresses(host: str) -> Deferred[list[str]]:
        """A and AAAA addresses of ``host`` (IPv4 first); ``[]`` when it has none."""

    def txt(name: str) -> Deferred[list[str]]:
        """TXT records of ``name``, each one's strings joined; ``[]`` when none."""

    def txt_records(name: str) -> Deferred[list[bytes]]:
        """TXT records of ``name``, each one's strings joined as they came (no
        decoding: SPF refuses a record that is not ASCII); raises NoSuchDomain."""

    def a(host: str) -> Deferred[list[str]]:
        """IPv4 addresses of ``host``; raises NoSuchDomain."""

    def aaaa(host: str) -> Deferred[list[str]]:
        """IPv6 addresses of ``host``; raises NoSuchDomain."""

    def list_entry(name: str) -> Deferred[list[str]]:
        """The A records of a DNS list's entry (``2.0.0.127.zen.example``): ``[]``
        when the name does not exist, which is how a list says "not listed" (most
        answers an MX gets: no failure is made of them)."""

    def ptr(address: str) -> Deferred[list[str]]:
        """The names of an IP address (PTR records of its in-addr.arpa or ip6.arpa
        name), without the final dot; raises NoSuchDomain."""

    def mx_authenticated(domain: str) -> Deferred[Authenticated[list[tuple[int, str]]]]:
        """:meth:`mx`, with whether the answer (records, or their absence) was
        DNSSEC-validated; raises NoSuchDomain."""

    def addresses_authenticated(host: str) -> Deferred[Authenticated[list[str]]]:
        """:meth:`addresses`, authenticated when both the A and the AAAA answer
        were; raises NoSuchDomain."""

    def tlsa(name: str) -> Deferred[Authenticated[list[TLSA]]]:
        """TLSA records of ``name`` (``_25._tcp.mx.example.com``), ``[]`` when the
        name has none or does not exist, with whether the answer was validated."""


@implementer(IResolver)
class Resolver:
    def __init__(self, servers: str = "", timeout: float = 10.0,
                 metrics: IMetrics | None = None) -> None:
        metrics = metrics if metrics is not None else Metrics()
        # Observed in the lookup's thread (the histogram takes its own lock).
        self._seconds = {rdtype: metrics.dns_timer(rdtype)
                         for rdtype in ("MX", "A", "AAAA", "TXT", "PTR", "TLSA")}
        if servers.strip():
            self.resolver = dns.resolver.Resolver(configure=False)
            nameservers, port = [], 53
            for item in servers.split(","):
                host, _, port_text = item.strip().rpartition(":") if (
                    item.count(":") == 1) else (item.strip(), "", "")
                nameservers.append(host)
                if port_text:
                    port = int(port_text)
            self.resolver.nameservers = nameservers
            self.resolver.port = port
        else:
            self.resolver = dns.resolver.Resolver()
        self.resolver.lifetime = timeout
        self.resolver.cache = dns.resolver.Cache()
        # (name, type): (expiry, records or None for NXDOMAIN), read from the cache
        # lately (see _cached).
        self._recent: dict[tuple[str, str], tuple[float, tuple[Any, ...] | None]] = {}
        # RFC 6840 §5.7: AD in a query asks a validating resolver to say (AD in its
        # answer) whether it validated the answer; others ignore it.
        self.resolver.flags = dns.flags.RD | dns.flags.AD

    def _query(self, name: str | dns.name.Name, rdtype: str) -> list[Any]:
        return self._query_authenticated(name, rdtype)[0]

    def _answer(self, name: str, rdtype: str,
                transform: Callable[[list[Any]], T]) -> Deferred[T]:
        """``transform(records)`` of the answer: at once, on the calling thread, when
        the cache holds one (records, none of the type, or no such name: a busy MX
        asks the same names again and again, and a hop to the thread pool costs far
        more than reading the cache); from a lookup in a thread otherwise."""
        try:
            records = self._cached(name, rdtype)
        except NoSuchDomain as exc:
            return defer.fail(exc)
        if records is not None:
            return defer.succeed(transform(records))
        return threads.deferToThread(lambda: transform(self._query(name, rdtype)))

    def _cached(self, name: str, rdtype: str) -> list[Any] | None:
        """What the cache says, as dnspython's resolve() would read it: the records
        of an unexpired answer ([] for one without records of the type), NoSuchDomain
        for a cached NXDOMAIN, or None (not cached).  dnspython's cache takes its
        own lock, so this thread may read it.

        What it said is also kept aside (``_recent``), by the name as given, until
        the answer expires as the cache would let it: reading dnspython's cache makes
        a ``dns.name.Name`` and hashes it (its labels lowered each time) once or
        twice, which costs more than the rest of a cached lookup, and a busy MX asks
        the same few names (a client's DNSBL entries, a sender's SPF record) for
        each message."""
        key = (name, rdtype)
        recent = self._recent.get(key)
        if recent is not None and recent[0] > time.time():
            if recent[1] is None:
                raise NoSuchDomain(f"{name}: no such domain")
            return list(recent[1])
        try:
            qname = _dns_name(name)
        except dns.exception.DNSException:
            return None               # a name DNS cannot carry: the lookup says so
        cache = self.resolver.cache
        answer = cache.get((qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN))
        if answer is not None:
            records = tuple(answer) if answer.rrset is not None else ()
            self._keep_recent(key, answer.expiration, records)
            return list(records)
        nxdomain = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
        if nxdomain is not None and nxdomain.response.rcode() == dns.rcode.NXDOMAIN:
            self._keep_recent(key, nxdomain.expiration, None)
            raise NoSuchDomain(f"{name}: no such domain")
        return None

    def _keep_recent(self, key: tuple[str, str], expiration: float,
                     records: tuple[Any, ...] | None) -> None:
        if len(self._recent) >= RECENT_SIZE:
            self._recent.clear()      # simplest bound; the cache behind still has them
        self._recent[key] = (expiration, records)

    def _query_authenticated(self, name: str | dns.name.Name,
                             rdtype: str) -> tuple[list[Any], bool]:
        """The records and the AD bit of the answer (cached answers keep theirs)."""
        started = time.perf_counter()
        try:
            answer = self.resolver.resolve(_dns_name(name), rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.name.EmptyLabel, dns.name.LabelTooLong,
                dns.name.NameTooLong, dns.name.IDNAException):
            # A name DNS cannot carry (an empty label, a label over 63 octets, no IDNA
            # form) exists nowhere: as good as NXDOMAIN, not a reason to try again.
            raise NoSuchDomain(f"{name}: no such domain") from None
        except dns.resolver.NoAnswer as exc:
            return [], _ad(exc.kwargs.get("response"))
        except (dns.resolver.NoNameservers, dns.exception.Timeout,
                dns.resolver.LifetimeTimeout) as exc:
            raise TemporaryDNSError(f"{name} {rdtype}: {exc.__class__.__name__}") from None
        except dns.exception.DNSException as exc:
            raise TemporaryDNSError(f"{name} {rdtype}: {exc}") from None
        finally:
            self._seconds[rdtype](time.perf_counter() - started)
        return list(answer), _ad(answer.response)

    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        return self._answer(domain, "MX", lambda records: [
            (r.preference, r.exchange.to_text(omit_final_dot=True)) for r in records])

    def txt(self, name: str) -> Deferred[list[str]]:
        def lookup() -> list[str]:
            try:
                records = self._query(name, "TXT")
            except NoSuchDomain:
                return []
            return [b"".join(r.strings).decode("utf-8", "replace") for r in records]
        return threads.deferToThread(lookup)

    def addresses(self, host: str) -> Deferred[list[str]]:
        def lookup() -> list[str]:
            found: list[str] = []
            error: DNSError | None = None
            for rdtype in ("A", "AAAA"):
                try:
                    found += [r.address for r in self._query(host, rdtype)]
                except NoSuchDomain:
                    raise
                except DNSError as exc:
                    error = exc
            if not found and error is not None:
                raise error
            return found
        return threads.deferToThread(lookup)

    def txt_records(self, name: str) -> Deferred[list[bytes]]:
        return self._answer(name, "TXT",
                            lambda records: [b"".join(r.strings) for r in records])

    def a(self, host: str) -> Deferred[list[str]]:
        return self._answer(host, "A", lambda records: [r.address for r in records])

    def aaaa(self, host: str) -> Deferred[list[str]]:
        return self._answer(host, "AAAA", lambda records: [r.address for r in records])

    def list_entry(self, name: str) -> Deferred[list[str]]:
        try:
            records = self._cached(name, "A")
        except NoSuchDomain:
            return defer.succeed([])
        if records is not None:
            return defer.succeed([r.address for r in records])
        d = self.a(name)
        d.addErrback(lambda failure: failure.trap(NoSuchDomain) and [])
        return d

    def ptr(self, address: str) -> Deferred[list[str]]:
        def lookup() -> list[str]:
            try:
                name = dns.reversename.from_address(address)
            except (ValueError, dns.exception.SyntaxError):
                raise NoSuchDomain(f"{address!r} is not an IP address") from None
            return [r.target.to_text(omit_final_dot=True) for r in self._query(name, "PTR")]
        return threads.deferToThread(lookup)


    def mx_authenticated(self, domain: str) -> Deferred[Authenticated[list[tuple[int, str]]]]:
        def lookup() -> Authenticated[list[tuple[int, str]]]:
            records, ad = self._query_authenticated(domain, "MX")
            return Authenticated([(r.preference, r.exchange.to_text(omit_final_dot=True))
                                  for r in records], ad)
        return threads.deferToThread(lookup)

    def addresses_authenticated(self, host: str) -> Deferred[Authenticated[list[str]]]:
        def lookup() -> Authenticated[list[str]]:
            found: list[str] = []
            authenticated = True
            error: DNSError | None = None
            for rdtype in ("A", "AAAA"):
                try:
                    records, ad = self._query_authenticated(host, rdtype)
                except NoSuchDomain:
                    raise
                except DNSError as exc:
                    # As addresses(): one type failing is no failure when the other
                    # answered; but then nobody vouches for the whole.
                    error, authenticated = exc, False
                    continue
                found += [r.address for r in records]
                authenticated = authenticated and ad
            if not found and error is not None:
                raise error
            return Authenticated(found, authenticated)
        return threads.deferToThread(lookup)

    def tlsa(self, name: str) -> Deferred[Authenticated[list[TLSA]]]:
        def lookup() -> Authenticated[list[TLSA]]:
            try:
                records, ad = self._query_authenticated(name, "TLSA")
            except NoSuchDomain:
                return Authenticated([], False)
            return Authenticated([TLSA(r.usage, r.selector, r.mtype, bytes(r.cert))
                                  for r in records], ad)
        return threads.deferToThread(lookup)


def _ad(response: Any) -> bool:
    """Whether a resolver's answer has the AD (authenticated data) bit."""
    return response is not None and bool(response.flags & dns.flags.AD)


def _dns_name(name: str | dns.name.Name) -> dns.name.Name:
    """A name as the mail gave it: its dots separate labels, a backslash is a character
    like any other (dnspython's ``from_text`` would read zone-file escapes, and a
    sender's local part that SPF's macros put in a name may hold one).  Names that are
    not ASCII go through ``from_text`` for their IDNA form, as before."""
    if isinstance(name, dns.name.Name):
        return name
    if not name.isascii():
        return dns.name.from_text(name)
    if name in ("", "."):
        return dns.name.root
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return dns.name.Name([label.encode("ascii") for label in labels] + [b""])
