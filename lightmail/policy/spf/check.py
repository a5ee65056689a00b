"""check_host() (RFC 7208 §4-§6): a domain's SPF record evaluated for a client's IP
address, its mechanisms in order, include and redirect followed, ``exp=`` read for a
fail, within the limits of §4.6.4 and an overall time limit.

Every lookup goes through :class:`lightmail.dns.IResolver` (threads, a TTL cache), so
nothing here waits on the reactor thread; a check is a chain of Deferreds.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Optional, TypeVar

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lightmail.dns import DNSError, IResolver, NoSuchDomain
from lightmail.policy.spf.macros import (
    IPAddress,
    Subject,
    expand,
    is_domain,
    query_name,
    uses_validated_name,
)
from lightmail.policy.spf.record import (
    MacroString,
    Mechanism,
    Record,
    SPFSyntaxError,
    parse_explanation,
    parse_record,
    select_record,
)

log = Logger()
T = TypeVar("T")

RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
QUALIFIER_RESULTS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}

MAX_DNS_TERMS = 10        # RFC 7208 §4.6.4: include, a, mx, ptr, exists, redirect
MAX_VOID_LOOKUPS = 2      # §4.6.4: lookups that found no such name, or no records
MAX_NAMES = 10            # §4.6.4: MX names per mx mechanism, PTR names per lookup
# §4.6.4: "such a limit SHOULD allow at least 20 seconds".  Each query has the
# resolver's own timeout besides.  To become an option of the policy chain's section.
CHECK_TIME_LIMIT = 20.0
# Used when a fail's record has no usable exp= (§6.2 lets the receiver choose).
DEFAULT_EXPLANATION = "%{o} does not designate %{i} as a permitted sender"
# An explanation goes into an SMTP reply, whose lines hold 512 octets (RFC 5321
# §4.5.3.1.5): a longer one, before or after expansion, is not used.
MAX_EXPLANATION = 1024
# Parsing takes some 15 us a term: a record of up to this many characters is parsed
# on the reactor thread (and the parse kept, for the next check), a bigger one (a TXT
# record may hold 64 KB, tens of milliseconds of parsing) in a thread.
INLINE_PARSE = 4096


@dataclass(frozen=True)
class SPFResult:
    """One check_host() outcome, with what Received-SPF (§9.1) and
    Authentication-Results (RFC 8601) report."""
    result: str                # one of RESULTS
    identity: str              # "mailfrom" or "helo"
    domain: str                # the domain whose policy was asked
    ip: str                    # the client's address (IPv4 for an IPv4-mapped one)
    sender: str                # as checked: "postmaster@..." when it had no local part
    helo: str
    mechanism: str = ""        # the term of the domain's record that matched, as written
    explanation: str = ""      # fail only: the domain's exp= text, or the default one
    reason: str = ""           # a short sentence for logs and header comments


@dataclass(frozen=True)
class IdentityResults:
    """The two identities of a session (RFC 7208 §2.3, §2.4)."""
    helo: Optional[SPFResult]  # None when HELO was not checked
    mail_from: SPFResult

    @property
    def verdict(self) -> SPFResult:
        """The result to act on: a HELO fail is conclusive (§2.3), otherwise the MAIL
        FROM result decides."""
        if self.helo is not None and self.helo.result == "fail":
            return self.helo
        return self.mail_from


class SPFChecker:
    """check_host() for one resolver; made once and shared by every session."""

    def __init__(self, resolver: IResolver, *, clock: Optional[IReactorTime] = None,
                 time_limit: float = CHECK_TIME_LIMIT, receiver: str = "",
                 default_explanation: str = DEFAULT_EXPLANATION) -> None:
        if clock is None:
            from twisted.internet import reactor
            clock = reactor  # type: ignore[assignment]
        assert clock is not None
        self.resolver = resolver
        self.clock = clock
        self.time_limit = time_limit
        self.receiver = receiver
        self.default_explanation = parse_explanation(default_explanation)

    def check_host(self, ip: str, domain: str, sender: str, helo: str = "",
                   identity: str = "mailfrom") -> Deferred[SPFResult]:
        """RFC 7208 §4: ``domain``'s verdict on ``ip`` sending as ``sender``.  Never
        fails: DNS trouble is a temperror, a broken record a permerror, and a check
        that outlasts the time limit a temperror."""
        try:
            address: IPAddress = ipaddress.ip_address(ip)
        except ValueError:
            return defer.succeed(SPFResult("none", identity, domain, ip, sender, helo,
                                           reason=f"{ip!r} is not an IP address"))
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped      # §5: an IPv4-mapped address is IPv4
        local, at, sender_domain = sender.rpartition("@")
        if not at:
            local, sender_domain = "", sender
        # §4.3: a sender without a local part is postmaster at its domain
        subject = Subject(address, f"{local or 'postmaster'}@{sender_domain}", helo,
                          self.receiver)
        evaluation = _Evaluation(self.resolver, subject, int(self.clock.seconds()),
                                 self.default_explanation)
        checking = Deferred.fromCoroutine(evaluation.outcome(domain))
        if not checking.called:     # answered from the DNS cache: no timer to set and cancel
            checking.addTimeout(self.time_limit, self.clock)

        def report(outcome: _Outcome) -> SPFResult:
            return SPFResult(outcome.result, identity, domain, str(address), subject.sender,
                             helo, outcome.mechanism, outcome.explanation, outcome.reason)

        def failed(failure: Failure) -> _Outcome:
            if failure.check(defer.TimeoutError):
                return _Outcome("temperror", f"no verdict within {self.time_limit:g} s")
            log.failure("SPF check of {domain} for {ip} failed", failure,
                        domain=domain, ip=ip)
            return _Outcome("temperror", "internal error")

        return checking.addErrback(failed).addCallback(report)

    def check_identities(self, ip: str, helo: str, mail_from: str,
                         check_helo: bool = True) -> Deferred[IdentityResults]:
        """HELO first when asked (§2.3), then MAIL FROM (§2.4); ``mail_from`` is ""
        for the null reverse-path, and then the MAIL FROM identity is
        postmaster@``helo`` (the HELO check's result is reused when there is one)."""
        # Callbacks rather than a coroutine: answered from the DNS cache (most mail),
        # both checks run at once.
        postmaster = f"postmaster@{helo}"

        def then_mail_from(helo_result: Optional[SPFResult]) -> Any:
            if mail_from:
                domain = mail_from.rpartition("@")[2]
                mail = self.check_host(ip, domain, mail_from, helo, "mailfrom")
            elif helo_result is not None:
                mail = defer.succeed(replace(helo_result, identity="mailfrom"))
            else:
                mail = self.check_host(ip, helo, postmaster, helo, "mailfrom")
            return mail.addCallback(lambda result: IdentityResults(helo_result, result))
        if not check_helo:
            return then_mail_from(None)
        return self.check_host(ip, helo, postmaster, helo, "helo").addCallback(
            then_mail_from)


@dataclass(frozen=True)
class _Outcome:
    result: str
    reason: str
    mechanism: str = ""
    explanation: str = ""


class _Stop(Exception):
    """Ends the whole check (includes and redirects too) with a temperror or a
    permerror."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


class _Evaluation:
    """One check_host() call and the records it leads to: the limits are counted
    across all of them (§4.6.4)."""

    def __init__(self, resolver: IResolver, subject: Subject, now: int,
                 default_explanation: MacroString) -> None:
        self.resolver = resolver
        self.subject = subject
        self.now = now
        self.default_explanation = default_explanation
        self.dns_terms = 0
        self.void_lookups = 0
        self._validated: Optional[list[str]] = None
        self._no_ptr = False

    async def outcome(self, domain: str) -> _Outcome:
        try:
            return await self.check_host(domain, explain=True)
        except _Stop as stop:
            return _Outcome(stop.result, stop.reason)

    async def check_host(self, domain: str, explain: bool) -> _Outcome:
        if not is_domain(domain):              # §4.3
            return _Outcome("none", f"{domain!r} is not a domain name")
        domain = domain[:-1] if domain.endswith(".") else domain
        try:
            records = await self.resolver.txt_records(domain)
        except NoSuchDomain:
            return _Outcome("none", f"{domain} does not exist")
        except DNSError as exc:                # §4.4
            raise _Stop("temperror", f"{domain}'s SPF record: {exc}") from None
        try:
            text = select_record(records)      # §4.5
            if text is None:
                return _Outcome("none", f"{domain} has no SPF record")
            record = await _parse(text)
        except SPFSyntaxError as exc:
            raise _Stop("permerror", f"{domain}: {exc}") from None
        for mechanism in record.mechanisms:    # §4.6.2
            if mechanism.queries_dns:
                self._count_term()
            if await self._matches(mechanism, domain):
                result = QUALIFIER_RESULTS[mechanism.qualifier]
                explanation = ""
                if result == "fail" and explain:
                    explanation = await self._explain(record, domain)
                return _Outcome(result, f"{domain}: {self.subject.ip} matched "
                                f"{mechanism.text}", mechanism.text, explanation)
        if record.redirect is not None:        # §6.1
            self._count_term()
            target = await self._target(record.redirect, domain)
            outcome = await self.check_host(target, explain) if target else None
            if outcome is None or outcome.result == "none":
                raise _Stop("permerror", f"{domain}: redirect to {target or 'nowhere'}, "
                            "which has no SPF record")
            return outcome
        return _Outcome("neutral", f"{domain}: no mechanism matched")   # §4.7

    async def _matches(self, mechanism: Mechanism, domain: str) -> bool:
        kind, ip = mechanism.kind, self.subject.ip
        if kind == "all":
            return True
        if kind in ("ip4", "ip6"):             # §5.6
            network = mechanism.network
            assert network is not None
            return ip.version == network.version and ip in network
        target = await self._target(mechanism.domain, domain)
        if kind == "include":                  # §5.2
            outcome = await self.check_host(target, explain=False) if target else None
            if outcome is None or outcome.result == "none":
                raise _Stop("permerror", f"{domain}: {mechanism.text}: no SPF record there")
            return outcome.result == "pass"
        if target is None:                     # a name no query can be made of
            return False
        if kind == "exists":                   # §5.7: an A lookup, whatever the client
            return bool(await self._lookup(self.resolver.a, target))
        if kind == "a":                        # §5.3
            return self._in_any(await self._addresses(target, void=True), mechanism)
        if kind == "ptr":                      # §5.5
            names = await self._validated_names()
            if self._no_ptr:
                self._count_void(f"{ip}'s PTR")
            target = target.lower()
            return any(name.lower() == target or name.lower().endswith("." + target)
                       for name in names)
        exchanges = await self._lookup(self.resolver.mx, target)       # §5.4
        if len(exchanges) > MAX_NAMES:
            raise _Stop("permerror", f"{domain}: {mechanism.text}: {len(exchanges)} MX "
                        f"records, more than {MAX_NAMES}")
        for _, host in sorted(exchanges):
            if host not in ("", ".") and self._in_any(
                    await self._addresses(host, void=False), mechanism):
                return True
        return False

    def _in_any(self, addresses: list[str], mechanism: Mechanism) -> bool:
        """Whether the client is in the CIDR block around any of the addresses."""
        ip = self.subject.ip
        prefix = mechanism.cidr4 if ip.version == 4 else mechanism.cidr6
        block = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        for text in addresses:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            if address.version == ip.version and address in block:
                return True
        return False

    async def _addresses(self, host: str, void: bool) -> list[str]:
        """A or AAAA, as the client's address is (§5.3)."""
        lookup = self.resolver.a if self.subject.ip.version == 4 else self.resolver.aaaa
        return await self._lookup(lookup, host, void)

    async def _lookup(self, lookup: Callable[[str], Deferred[list[T]]], name: str,
                      void: bool = True) -> list[T]:
        try:
            found = await lookup(name)
        except NoSuchDomain:
            found = []
        except DNSError as exc:
            raise _Stop("temperror", f"DNS: {exc}") from None
        if not found and void:
            self._count_void(name)
        return found

    async def _validated_names(self) -> list[str]:
        """§5.5: the client's names (the first 10 of its PTR records) whose addresses
        include it.  DNS errors here mean no name, not a temperror."""
        if self._validated is None:
            ip = self.subject.ip
            try:
                names = await self.resolver.ptr(str(ip))
                self._no_ptr = not names
            except NoSuchDomain:
                names, self._no_ptr = [], True
            except DNSError:
                names = []
            lookup = self.resolver.a if ip.version == 4 else self.resolver.aaaa
            validated = []
            for name in names[:MAX_NAMES]:
                try:
                    addresses = await lookup(name)
                except DNSError:
                    continue
                if any(_same(ip, address) for address in addresses):
                    validated.append(name)
            self._validated = validated
        return self._validated

    async def _validated_name(self, domain: str) -> str:
        """%{p} (§7.3): the domain itself if validated, else one of its subdomains,
        else any validated name, else "unknown"."""
        names = await self._validated_names()
        lower = domain.lower()
        for name in names:
            if name.lower() == lower:
                return name
        for name in names:
            if name.lower().endswith("." + lower):
                return name
        return names[0] if names else "unknown"

    async def _target(self, spec: Optional[MacroString], domain: str) -> Optional[str]:
        """The name a domain-spec names (the current domain when there is none), or
        None when no query can be made of it."""
        if spec is None:
            return domain
        return query_name(await self._expand(spec, domain))

    async def _expand(self, pieces: MacroString, domain: str) -> str:
        validated = "unknown"
        if uses_validated_name(pieces):
            validated = await self._validated_name(domain)
        return expand(pieces, self.subject, domain, validated, self.now)

    async def _explain(self, record: Record, domain: str) -> str:
        """§6.2: the exp= text, or the default when there is none or anything is wrong
        with it.  Its lookup counts against no limit."""
        if record.exp is not None:
            target = await self._target(record.exp, domain)
            if target is not None:
                try:
                    records = await self.resolver.txt_records(target)
                    if len(records) == 1 and len(records[0]) <= MAX_EXPLANATION:
                        pieces = parse_explanation(records[0].decode("ascii"))
                        text = await self._expand(pieces, domain)
                        if len(text) <= MAX_EXPLANATION:
                            return text
                except (DNSError, UnicodeDecodeError, SPFSyntaxError):
                    pass
        return await self._expand(self.default_explanation, domain)

    def _count_term(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _Stop("permerror", f"more than {MAX_DNS_TERMS} DNS-querying terms")

    def _count_void(self, name: str) -> None:
        self.void_lookups += 1
        if self.void_lookups > MAX_VOID_LOOKUPS:
            raise _Stop("permerror", f"more than {MAX_VOID_LOOKUPS} void lookups "
                        f"(the last: {name})")


async def _parse(text: str) -> Record:
    if len(text) > INLINE_PARSE:
        return await threads.deferToThread(parse_record, text)
    parsed = _parse_small(text)
    if isinstance(parsed, str):
        raise SPFSyntaxError(parsed)
    return parsed


@functools.lru_cache(maxsize=1024)
def _parse_small(text: str) -> Record | str:
    """The record, or what is wrong with it (an exception kept in a cache would grow
    a traceback each time it is raised)."""
    try:
        return parse_record(text)
    except SPFSyntaxError as exc:
        return str(exc)


def _same(ip: IPAddress, text: Any) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False
