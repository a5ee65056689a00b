"""Verifying external destinations (RFC 7489 §7.1): a domain may not have its
reports sent to just anyone.

A ``rua`` address whose domain has another organizational domain than the policy
domain receives reports only if that other domain agrees: a TXT record at
``<policy domain>._report._dmarc.<destination domain>`` that starts with
``v=DMARC1``.  No such record, or a lookup that fails, and nothing is sent there
(a report is not worth a retry queue of its own: the next run asks again).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightmail.dns import DNSError, IResolver, NoSuchDomain
from lightmail.policy.dmarc.orgdomain import PublicSuffixes
from lightmail.policy.dmarc.record import is_dmarc_record


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


async def check_destination(resolver: IResolver, suffixes: PublicSuffixes,
                            policy_domain: str, destination: str) -> Verdict:
    """Whether reports about ``policy_domain`` may go to the domain ``destination``."""
    policy_domain = policy_domain.lower().rstrip(".")
    destination = destination.lower().rstrip(".")
    if suffixes.organizational_domain(destination) == \
            suffixes.organizational_domain(policy_domain):
        return Verdict(True, "same organizational domain")
    name = f"{policy_domain}._report._dmarc.{destination}"
    try:
        answers = await resolver.txt_records(name)
    except NoSuchDomain:
        answers = []
    except DNSError as exc:
        return Verdict(False, f"{name}: {exc}")
    for raw in answers:
        try:
            if is_dmarc_record(raw.decode("utf-8")):
                return Verdict(True, f"{name} says v=DMARC1")
        except UnicodeDecodeError:
            continue
    return Verdict(False, f"an external destination, and {name} has no v=DMARC1 "
                   "record (RFC 7489 §7.1)")
