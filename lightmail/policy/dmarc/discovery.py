"""Policy discovery (RFC 7489 §6.6.3): the DMARC record that applies to a From:
domain, at ``_dmarc.<From domain>``, else at ``_dmarc.<organizational domain>``.

Every lookup goes through :class:`lightmail.dns.IResolver` (its threads and TTL
cache), whose answers say apart what discovery must: a name that does not exist
(``NoSuchDomain``) and a name without TXT records (``[]``) both mean "no record
here", a server that fails (``TemporaryDNSError``) means temperror, never "none".

* No DMARC record at either name: ``none``.
* More than one at the name where records were found: ``none`` too (§6.6.3 step 5:
  "DMARC processing is not applied"); the organizational domain is not asked then.
* One record that is no policy (no valid ``p=`` and no report URI, §6.6.3 step 6):
  ``permerror`` (RFC 7489 §11.2: a record that cannot be used).
* RFC 9091: when the record came from the organizational domain and has ``np=``,
  whether the From: domain exists at all (NXDOMAIN or NODATA for A, AAAA and MX)
  decides between ``np`` and ``sp``; that costs three more lookups, made only then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lightmail.dns import DNSError, IResolver, NoSuchDomain
from lightmail.policy.dmarc.orgdomain import PublicSuffixes
from lightmail.policy.dmarc.record import (
    DMARCRecord,
    DMARCSyntaxError,
    is_dmarc_record,
    parse_record,
)


@dataclass(frozen=True)
class Discovery:
    """Where the policy was found, and what it says."""

    outcome: str                        # found, none, temperror, permerror
    from_domain: str
    org_domain: str
    policy_domain: str = ""             # where the record was found
    record: Optional[DMARCRecord] = None
    #: RFC 9091: the From: domain does not exist (asked only when it matters).
    nonexistent: bool = False
    reason: str = ""

    @property
    def subdomain(self) -> bool:
        """The policy came from the organizational domain, not the From: domain."""
        return self.policy_domain != self.from_domain

    @property
    def requested(self) -> str:
        """The policy that applies to the From: domain (p, sp or np)."""
        if self.record is None:
            return "none"
        return self.record.policy_for(self.subdomain, self.nonexistent)


class _Stop(Exception):
    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome, self.reason = outcome, reason


async def discover(resolver: IResolver, suffixes: PublicSuffixes,
                   from_domain: str) -> Discovery:
    """The policy of ``from_domain`` (lower case, A-labels).  Never raises."""
    from_domain = from_domain.lower().rstrip(".")
    org_domain = suffixes.organizational_domain(from_domain)
    try:
        names = [from_domain] if org_domain == from_domain else [from_domain, org_domain]
        for name in names:
            text = await _record_at(resolver, name)
            if text is None:
                continue
            try:
                record = parse_record(text)
            except DMARCSyntaxError as exc:
                return Discovery("permerror", from_domain, org_domain, name,
                                 reason=f"_dmarc.{name}: {exc}")
            nonexistent = False
            if name != from_domain and record.np is not None:
                nonexistent = not await _exists(resolver, from_domain)
            return Discovery("found", from_domain, org_domain, name, record, nonexistent,
                             f"policy of {name}")
    except _Stop as stop:
        return Discovery(stop.outcome, from_domain, org_domain, reason=stop.reason)
    return Discovery("none", from_domain, org_domain,
                     reason=f"no DMARC record for {from_domain}")


async def _record_at(resolver: IResolver, domain: str) -> Optional[str]:
    """The one DMARC record at ``_dmarc.<domain>``, or None when there is none.
    Raises _Stop for a temporary error or several records."""
    name = f"_dmarc.{domain}"
    try:
        answers = await resolver.txt_records(name)
    except NoSuchDomain:
        return None
    except DNSError as exc:
        raise _Stop("temperror", f"{name}: {exc}") from None
    records = []
    for raw in answers:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue                    # not text: not a DMARC record
        if is_dmarc_record(text):
            records.append(text)
    if len(records) > 1:
        raise _Stop("none", f"{name} has {len(records)} DMARC records (RFC 7489 "
                    "§6.6.3: no DMARC processing)")
    return records[0] if records else None


async def _exists(resolver: IResolver, domain: str) -> bool:
    """RFC 9091 §2.1: a domain that answers NXDOMAIN or NODATA for A, AAAA and MX does
    not exist.  A lookup that fails counts as existing (np= is not applied on a
    guess)."""
    for lookup in (resolver.a, resolver.aaaa, resolver.mx):
        try:
            if await lookup(domain):     # type: ignore[operator]
                return True
        except NoSuchDomain:
            return False                 # NXDOMAIN for one type is NXDOMAIN for all
        except DNSError:
            return True
    return False
