"""The DMARC verdict on one message (RFC 7489 §3.1, §6.6): the SPF and DKIM results
the policy chain already has, aligned with the From: domain, judged by the domain's
policy, sampled by its ``pct``, then capped by LightMail's own enforcement
(``[dmarc] enforce``, ``domain_actions``).

:class:`DMARCChecker` is made once (lightmail/wiring.py) and shared by every session;
``check()`` returns a Deferred that never fails: DNS trouble is a ``temperror``, a
record that cannot be used a ``permerror``, a check that outlasts the time limit a
``temperror``.  The :class:`DMARCResult` carries what the policy chain acts on
(``disposition``, ``reply``), what Authentication-Results reports, and what an
aggregate report row needs (lightmail/policy/dmarc/reports.py).
"""

from __future__ import annotations

import random as random_module
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lightmail.config import DMARCConfig
from lightmail.dns import IResolver
from lightmail.policy.dmarc.discovery import Discovery, discover
from lightmail.policy.dmarc.headerfrom import HeaderFrom, header_from
from lightmail.policy.dmarc.orgdomain import PublicSuffixes
from lightmail.policy.dmarc.record import DMARCRecord

log = Logger(namespace="lightmail.dmarc")

RESULTS = ("pass", "fail", "none", "temperror", "permerror")
#: The words of the results DMARC is given (RFC 7489 Appendix C's SPFResultType and
#: DKIMResultType); any other word is read as permerror (a result nobody can use).
SPF_RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
DKIM_RESULTS = ("none", "pass", "fail", "policy", "neutral", "temperror", "permerror")
DISPOSITIONS = ("none", "quarantine", "reject")
#: RFC 7489 Appendix C, PolicyOverrideType.
OVERRIDE_TYPES = ("forwarded", "sampled_out", "trusted_forwarder", "mailing_list",
                  "local_policy", "other")
# Each lookup has the resolver's own timeout too; discovery makes 2 lookups at most
# (5 with np=).
CHECK_TIME_LIMIT = 20.0

#: One DKIM signature's result as the chain gives it: (d= domain, result), or
#: (d= domain, result, selector) when the selector is known (for the reports).
DKIMInput = Union[tuple[str, str], tuple[str, str, str]]


@dataclass(frozen=True)
class OverrideReason:
    """Why the disposition is not what the policy asked (RFC 7489 Appendix C)."""

    type: str                   # one of OVERRIDE_TYPES
    comment: str = ""


@dataclass(frozen=True)
class DKIMOutcome:
    """One DKIM signature, as the verifier judged it."""

    domain: str                 # d=
    result: str                 # pass, fail, neutral, temperror, permerror, policy, none
    selector: str = ""          # s=, when known


@dataclass(frozen=True)
class DMARCResult:
    """The verdict on one message."""

    result: str                             # one of RESULTS
    header_from: str                        # the RFC5322.From domain judged
    policy_domain: str = ""                 # where the record was found ('' if none)
    org_domain: str = ""                    # the From: domain's organizational domain
    record: Optional[DMARCRecord] = None    # the record that applied
    requested: str = "none"                 # p, sp or np, as applies
    disposition: str = "none"               # after pct= and local enforcement
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reasons: tuple[OverrideReason, ...] = ()
    spf: tuple[str, str] = ("", "none")     # the SPF identity checked, and its result
    dkim: tuple[DKIMOutcome, ...] = ()
    reason: str = ""                        # a short sentence for logs and comments

    @property
    def reply(self) -> Optional[tuple[int, str, str]]:
        """The SMTP reply (code, enhanced status, text) the message gets instead of
        acceptance: 550 5.7.1 when it is to be rejected, 451 4.7.1 when the verdict
        could not be had for a temporary error (never a silent accept); None
        otherwise (a quarantined message is accepted, into Junk)."""
        if self.disposition == "reject":
            return (550, "5.7.1", f"Message rejected by the DMARC policy of "
                    f"{self.policy_domain} (the From: domain is {self.header_from})")
        if self.result == "temperror":
            return (451, "4.7.1", f"DMARC policy of {self.header_from} not checked: "
                    "temporary DNS error; try again later")
        return None

    @property
    def ar_comment(self) -> str:
        """What an Authentication-Results comment says of the policy, as OpenDMARC
        writes it: ``p=reject dis=quarantine``."""
        if self.record is None:
            return ""
        return f"p={self.requested} dis={self.disposition}"

    @property
    def evaluated_dkim(self) -> str:
        """policy_evaluated/dkim of a report row: pass or fail."""
        return "pass" if self.dkim_aligned else "fail"

    @property
    def evaluated_spf(self) -> str:
        return "pass" if self.spf_aligned else "fail"


class Enforcement:
    """``[dmarc] enforce`` and ``domain_actions``: the strongest action LightMail takes
    on a failing message, by domain."""

    def __init__(self, default: str = "reject",
                 domains: Sequence[tuple[str, str]] = ()) -> None:
        self.default = default
        self.domains = dict(domains)

    @classmethod
    def from_config(cls, config: DMARCConfig) -> Enforcement:
        return cls(config.enforce, config.domain_actions)

    def action_for(self, header_from: str, policy_domain: str) -> tuple[str, str]:
        """(action, where it comes from): the From: domain's entry, else the policy
        domain's, else the default."""
        for domain in (header_from, policy_domain):
            if domain and domain in self.domains:
                return self.domains[domain], f"domain_actions {domain}"
        return self.default, "enforce"


_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


def _a_label(domain: str) -> str:
    """A domain as DNS knows it: lower case, A-labels, no final dot ('' if it has
    none)."""
    domain = domain.strip().lower().rstrip(".")
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return ""


def _word(result: str, words: tuple[str, ...]) -> str:
    result = result.strip().lower()
    return result if result in words else "permerror"


#: What each action lets a disposition be, at most.
_CAPS = {"reject": "reject", "quarantine": "quarantine", "tag": "none"}
_MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


class DMARCChecker:
    """The DMARC verdict for one resolver and Public Suffix List."""

    def __init__(self, resolver: IResolver, suffixes: PublicSuffixes,
                 config: DMARCConfig, *, random: Callable[[], float] = random_module.random,
                 clock: Optional[IReactorTime] = None,
                 time_limit: float = CHECK_TIME_LIMIT) -> None:
        if clock is None:
            from twisted.internet import reactor
            clock = reactor  # type: ignore[assignment]
        assert clock is not None
        self.resolver = resolver
        self.suffixes = suffixes
        self.clock = clock
        self.time_limit = time_limit
        #: pct= sampling: a message is in the sample when random() * 100 < pct.
        self.random = random
        self.use(config)

    def use(self, config: DMARCConfig, suffixes: Optional[PublicSuffixes] = None) -> None:
        """Take a new configuration (and Public Suffix List): a reload."""
        self.config = config
        self.enforcement = Enforcement.from_config(config)
        if suffixes is not None:
            self.suffixes = suffixes

    @property
    def enabled(self) -> bool:
        """``[dmarc] enabled``: when no, check() answers ``none`` without a lookup,
        and the chain adds no dmarc= result."""
        return self.config.enabled

    def header_from(self, header_block: bytes) -> HeaderFrom:
        """The From: domain to check, from the message's header block (RFC 7489
        §6.6.1; lightmail/policy/dmarc/headerfrom.py), judged by ``[dmarc]
        reject_malformed_from``."""
        return header_from(header_block, self.config.reject_malformed_from)

    def check(self, header_from_domain: str, spf: tuple[str, str],
              dkim: Sequence[DKIMInput] = (),
              arc_override: Optional[str] = None) -> Deferred[DMARCResult]:
        """The verdict on a message from ``header_from_domain``.

        ``spf``: (domain, result) of the SPF MAIL FROM identity, or of the HELO
        identity for the null sender (RFC 7489 §4.1), the result one of SPF's words.
        ``dkim``: one (d= domain, result[, selector]) per signature.
        ``arc_override``: the domain of a trusted ARC sealer that says this forwarded
        message passed before it was forwarded: a failing message is then not acted
        on (disposition none, reason trusted_forwarder, RFC 8617 §7.2.1)."""
        domain = _a_label(header_from_domain)
        outcomes = tuple(DKIMOutcome(_a_label(item[0]), _word(item[1], DKIM_RESULTS),
                                     item[2] if len(item) > 2 else "")  # type: ignore[misc]
                         for item in dkim)
        spf_in = (_a_label(spf[0]), _word(spf[1], SPF_RESULTS))
        if not self.enabled:
            return defer.succeed(DMARCResult("none", domain, spf=spf_in, dkim=outcomes,
                                             reason="DMARC is off ([dmarc] enabled = no)"))
        if not _DOMAIN.fullmatch(domain):
            return defer.succeed(DMARCResult(
                "none", domain, spf=spf_in, dkim=outcomes,
                reason=f"{header_from_domain!r} is not a domain DMARC can judge"))
        checking = Deferred.fromCoroutine(self._check(domain, spf_in, outcomes,
                                                      arc_override))
        if not checking.called:     # answered from the DNS cache: no timer to set and cancel
            checking.addTimeout(self.time_limit, self.clock)

        def failed(failure: Failure) -> DMARCResult:
            if failure.check(defer.TimeoutError):
                reason = f"no verdict within {self.time_limit:g} s"
            else:
                log.failure("DMARC check of {domain} failed", failure, domain=domain)
                reason = "internal error"
            return DMARCResult("temperror", domain, spf=spf_in, dkim=outcomes,
                               reason=reason)
        return checking.addErrback(failed)

    async def _check(self, domain: str, spf: tuple[str, str],
                     dkim: tuple[DKIMOutcome, ...],
                     arc_override: Optional[str]) -> DMARCResult:
        found = await discover(self.resolver, self.suffixes, domain)
        if found.outcome != "found" or found.record is None:
            return DMARCResult(found.outcome, domain, found.policy_domain,
                               found.org_domain, spf=spf, dkim=dkim, reason=found.reason)
        return self.judge(found, spf, dkim, arc_override)

    def judge(self, found: Discovery, spf: tuple[str, str],
              dkim: tuple[DKIMOutcome, ...], arc_override: Optional[str]) -> DMARCResult:
        """The verdict once the policy is known (no I/O)."""
        record = found.record
        assert record is not None
        domain = found.from_domain
        spf_is_aligned = self.suffixes.aligned(spf[0], domain, record.aspf == "s")
        spf_aligned = spf[1] == "pass" and spf_is_aligned
        dkim_aligned = any(
            outcome.result == "pass"
            and self.suffixes.aligned(outcome.domain, domain, record.adkim == "s")
            for outcome in dkim)
        requested = found.requested

        def verdict(result: str, disposition: str = "none",
                    reasons: tuple[OverrideReason, ...] = (), reason: str = "") -> DMARCResult:
            return DMARCResult(result, domain, found.policy_domain, found.org_domain,
                               record, requested, disposition, spf_aligned, dkim_aligned,
                               reasons, spf, dkim, reason)

        if spf_aligned or dkim_aligned:
            how = " and ".join(name for name, aligned in (("SPF", spf_aligned),
                                                          ("DKIM", dkim_aligned)) if aligned)
            return verdict("pass", reason=f"aligned {how} pass for {domain}")
        # An aligned identifier that could not be checked for a temporary error may
        # yet pass: temperror, not fail (as DMARCbis §4.8 has it).
        if (spf[1] == "temperror" and spf_is_aligned) or any(
                outcome.result == "temperror"
                and self.suffixes.aligned(outcome.domain, domain, record.adkim == "s")
                for outcome in dkim):
            return verdict("temperror", reason=f"an aligned identifier of {domain} had a "
                           "temporary error")
        reason = f"no aligned SPF or DKIM pass for {domain}"
        if requested == "none":
            return verdict("fail", reason=reason)
        if arc_override:
            return verdict("fail", "none", (OverrideReason(
                "trusted_forwarder", f"ARC chain sealed by {arc_override} passed"),),
                reason)
        disposition, reasons = requested, []
        # §6.6.4: a message left out of the pct= sample gets the next milder policy.
        if record.pct < 100 and not self.random() * 100 < record.pct:
            disposition = _MILDER[requested]
            reasons.append(OverrideReason("sampled_out", f"pct={record.pct}"))
        action, source = self.enforcement.action_for(domain, found.policy_domain)
        capped = _CAPS[action]
        if DISPOSITIONS.index(capped) < DISPOSITIONS.index(disposition):
            disposition = capped
            reasons.append(OverrideReason("local_policy", f"[dmarc] {source}: {action}"))
        return verdict("fail", disposition, tuple(reasons), reason)
