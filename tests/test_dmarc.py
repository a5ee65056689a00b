"""DMARC verdicts (lightmail/policy/dmarc): records read as RFC 7489 §6.3/§6.6.3 ask,
organizational domains from the Public Suffix List (the package's, and a file of the
administrator's, reloaded), policy discovery through lightmail.dns.Resolver and the
test DNS server (NXDOMAIN, SERVFAIL, timeouts, several and giant records), the
alignment matrix, pct= sampling, local enforcement, the ARC override, the From:
field of §6.6.1, and the [dmarc] configuration.  Aggregate reports are in
tests/test_dmarc_reports.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from dnsserver import DNSServer
from spfzone import ZoneResolver
from twisted.internet import task
from twisted.internet.defer import Deferred

from lightmail.config import ConfigError, DMARCConfig, parse_config
from lightmail.dns import Resolver
from lightmail.policy.dmarc import (
    CHECK_TIME_LIMIT,
    DMARCChecker,
    DMARCResult,
    DMARCSyntaxError,
    OverrideReason,
    ReportURI,
    header_from,
    load_suffixes,
    parse_record,
    read_suffix_list,
)
from lightmail.policy.dmarc.discovery import discover
from lightmail.policy.dmarc.record import is_dmarc_record

SUFFIXES = load_suffixes()
Zone = dict[str, list[Any]]


def fired(d: Deferred[Any]) -> Any:
    done: list[Any] = []
    d.addBoth(done.append)
    assert done, "the check has not finished"
    return done[0]


def checker_for(zone: Zone, random: float = 0.0, **config: Any) -> DMARCChecker:
    return DMARCChecker(ZoneResolver(zone), SUFFIXES, DMARCConfig(**config),
                        random=lambda: random, clock=task.Clock())


def verdict(zone: Zone, from_domain: str, spf: tuple[str, str],
            dkim: Any = (), random: float = 0.0, arc: str | None = None,
            **config: Any) -> DMARCResult:
    result = fired(checker_for(zone, random, **config).check(from_domain, spf, dkim, arc))
    assert isinstance(result, DMARCResult), result
    return result


# -- records ---------------------------------------------------------------------------

def test_a_record_and_its_defaults() -> None:
    record = parse_record("v=DMARC1; p=reject")
    assert (record.p, record.sp, record.np, record.adkim, record.aspf, record.pct,
            record.rua, record.ruf, record.fo, record.rf, record.ri, record.problems) == (
        "reject", None, None, "r", "r", 100, (), (), "0", "afrf", 86400, ())
    record = parse_record("v=DMARC1;p=Quarantine;SP=none;np=reject;adkim=s;aspf=s;pct=20;"
                          "fo=1:D;rf=afrf;ri=3600;rua=mailto:a@example.com;"
                          "ruf=mailto:f@example.com;")
    assert (record.p, record.sp, record.np, record.adkim, record.aspf, record.pct,
            record.fo, record.ri) == ("quarantine", "none", "reject", "s", "s", 20, "1:d",
                                      3600)
    assert record.policy_for(subdomain=False) == "quarantine"
    assert record.policy_for(subdomain=True) == "none"
    assert record.policy_for(subdomain=True, nonexistent=True) == "reject"
    assert parse_record("v=DMARC1; p=reject").policy_for(True, True) == "reject"


@pytest.mark.parametrize("text,is_record", [
    ("v=DMARC1; p=none", True),
    ("V = DMARC1 ;p=none", True),
    ("v=DMARC1", True),
    ("v=dmarc1; p=none", False),          # §6.4: the version's value is case-sensitive
    (" v=DMARC1; p=none", False),
    ("p=none; v=DMARC1", False),          # v= must be first
    ("v=DMARC1p=none", False),
    ("v=DMARC10; p=none", False),
    ("v=spf1 -all", False),
])
def test_which_txt_records_claim_to_be_dmarc(text: str, is_record: bool) -> None:
    assert is_dmarc_record(text) is is_record


def test_malformed_records() -> None:
    # §6.3: unknown tags are ignored; invalid values give way to the defaults
    record = parse_record("v=DMARC1; p=reject; foo=bar; adkim=x; aspf=; pct=101; fo=2; "
                          "ri=-1; rf=%%; junk; p=none")
    assert (record.p, record.adkim, record.aspf, record.pct, record.fo, record.ri,
            record.rf) == ("reject", "r", "r", 100, "0", 86400, "afrf")
    problems = " | ".join(record.problems)
    for what in ("adkim='x'", "aspf=''", "pct='101'", "fo='2'", "ri='-1'", "rf='%%'",
                 "'junk' is not a tag", "p= is given twice"):
        assert what in problems
    assert "foo" not in problems
    assert parse_record("v=DMARC1; p=none; pct=abc").pct == 100
    assert parse_record("v=DMARC1; p=none; pct=0").pct == 0
    # §6.6.3 step 6: no valid p=, and no report URI: no policy at all
    for text in ("v=DMARC1", "v=DMARC1; p=block", "v=DMARC1; p=none; sp=block",
                 "v=DMARC1; sp=reject", "v=DMARC1; p=block; rua=not a uri"):
        with pytest.raises(DMARCSyntaxError):
            parse_record(text)
    with pytest.raises(DMARCSyntaxError):
        parse_record("p=reject")
    # ...with one: read as p=none
    record = parse_record("v=DMARC1; p=block; sp=reject; rua=mailto:r@example.com")
    assert (record.p, record.sp) == ("none", None)
    assert any("read as p=none" in problem for problem in record.problems)
    record = parse_record("v=DMARC1; p=reject; sp=nope; rua=mailto:r@example.com")
    assert (record.p, record.sp) == ("none", None)


def test_report_uris_and_their_size_limits() -> None:
    record = parse_record(
        "v=DMARC1; p=none; rua=mailto:a@example.com!10m, mailto:b@Example.ORG!512,"
        "mailto:c@example.net!2k ,https://reports.example/, not-a-uri, "
        "mailto:d%2Bdmarc@example.com?subject=x!1g; ruf=mailto:f@example.com!1t")
    assert record.rua == (
        ReportURI("mailto:a@example.com", 10 << 20), ReportURI("mailto:b@Example.ORG", 512),
        ReportURI("mailto:c@example.net", 2 << 10), ReportURI("https://reports.example/"),
        ReportURI("mailto:d%2Bdmarc@example.com?subject=x", 1 << 30))
    assert record.ruf == (ReportURI("mailto:f@example.com", 1 << 40),)
    assert [uri.mailto for uri in record.rua] == [
        "a@example.com", "b@example.org", "c@example.net", None, "d+dmarc@example.com"]
    assert any("not-a-uri" in problem for problem in record.problems)
    assert str(record.rua[0]) == f"mailto:a@example.com!{10 << 20}"
    assert ReportURI("mailto:nobody").mailto is None
    assert ReportURI("mailto:a@b.com!x").mailto is None


def test_a_giant_record_is_read() -> None:
    uris = ",".join(f"mailto:r{n}@example.com" for n in range(3000))
    record = parse_record(f"v=DMARC1; p=quarantine; rua={uris}; " + "x=y; " * 3000)
    assert record.p == "quarantine" and len(record.rua) == 3000


# -- organizational domains ---------------------------------------------------------------

@pytest.mark.parametrize("domain,org", [
    ("example.com", "example.com"),
    ("mail.example.com", "example.com"),
    ("A.B.Example.CO.UK.", "example.co.uk"),
    ("co.uk", "co.uk"),                       # a public suffix is its own
    ("com", "com"),
    ("x.y.unknown-tld", "y.unknown-tld"),     # the implicit * rule
    ("alice.github.io", "alice.github.io"),   # the private section counts
    ("xn--caf-dma.fr", "xn--caf-dma.fr"),
])
def test_organizational_domains(domain: str, org: str) -> None:
    assert SUFFIXES.organizational_domain(domain) == org


def test_alignment_modes() -> None:
    assert SUFFIXES.aligned("mail.example.com", "example.com", strict=False)
    assert not SUFFIXES.aligned("mail.example.com", "example.com", strict=True)
    assert SUFFIXES.aligned("Example.COM.", "example.com", strict=True)
    assert not SUFFIXES.aligned("example.co.uk", "other.co.uk", strict=False)
    assert not SUFFIXES.aligned("a.github.io", "b.github.io", strict=False)
    assert not SUFFIXES.aligned("", "example.com", strict=False)


def test_a_suffix_list_file_of_the_administrator(tmp_path: Path) -> None:
    path = tmp_path / "psl.dat"
    path.write_text("// a list of our own\n// ===BEGIN ICANN DOMAINS===\ntest\n"
                    "shared.test\n*.wild.test\n!not.wild.test\n")
    own = load_suffixes(path)
    assert own.source == str(path)
    assert own.organizational_domain("a.b.shared.test") == "b.shared.test"
    assert SUFFIXES.organizational_domain("a.b.shared.test") == "shared.test"
    assert own.organizational_domain("a.b.x.wild.test") == "b.x.wild.test"
    assert own.organizational_domain("a.not.wild.test") == "not.wild.test"
    assert own.organizational_domain("mail.example.com") == "example.com"


@pytest.mark.parametrize("content,message", [
    (None, "cannot read"),
    (b"", "holds no rule"),
    (b"// only comments\n\n// here\n", "holds no rule"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
])
def test_a_suffix_list_file_that_cannot_serve(tmp_path: Path, write_config: Any,
                                              content: bytes | None, message: str) -> None:
    path = tmp_path / "psl.dat"
    if content is not None:
        path.write_bytes(content)
    from lightmail.policy.dmarc import SuffixListError
    with pytest.raises(SuffixListError, match=message):
        read_suffix_list(path)
    # the configuration names it: validation refuses it, naming the line
    from lightmail.config import load_config
    from lightmail.service import validate
    config = write_config(f"[server]\nstate_dir = {tmp_path}\n[dmarc]\n"
                          f"public_suffix_list = {path}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, validators=validate)
    assert caught.value.line == 4 and message in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_a_reload_reads_the_suffix_list_again(tmp_path: Path) -> None:
    """What an administrator's cron job relies on: a new file, then lightmail reload."""
    from lightmail.reload.parts import ServicesPart
    from lightmail.wiring import Role, wire
    path = tmp_path / "psl.dat"
    path.write_text("test\n")
    text = (f"[server]\nstate_dir = {tmp_path}\nhostname = mx.example.net\n"
            f"[dmarc]\npublic_suffix_list = {path}\n")
    config = parse_config(text, str(tmp_path / "lm.conf"))
    services = wire(config, Role.COMMAND)
    assert services.dmarc.suffixes.organizational_domain("a.b.shared.test") == "shared.test"
    path.write_text("test\nshared.test\n")
    switch = await ServicesPart(services).prepare(
        parse_config(text + "enforce = tag\n", str(tmp_path / "lm.conf")))
    assert services.dmarc.suffixes.organizational_domain("a.b.shared.test") == "shared.test"
    switch()
    for suffixes in (services.dmarc.suffixes, services.dmarc_reports.suffixes):
        assert suffixes.organizational_domain("a.b.shared.test") == "b.shared.test"
    assert services.dmarc.enforcement.default == "tag"
    # a list that went bad is refused, and the running one stays
    path.write_text("")
    with pytest.raises(ConfigError, match="holds no rule"):
        await ServicesPart(services).prepare(config)
    assert services.dmarc.suffixes.organizational_domain("a.b.shared.test") == "b.shared.test"


# -- discovery through the resolver and the test DNS server --------------------------------

GIANT_NOISE = "x" * 30000


@pytest.fixture
def dns_world() -> Iterator[DNSServer]:
    zones = {
        "_dmarc.example.com.": {"TXT": ["v=DMARC1; p=reject; sp=quarantine",
                                        "some other TXT record"]},
        "mail.example.com.": {"A": ["192.0.2.1"]},
        "_dmarc.own.example.com.": {"TXT": ["v=DMARC1; p=none"]},
        "_dmarc.twice.test.": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
        "_dmarc.broken.test.": {"TXT": ["v=DMARC1; p=nonsense"]},
        "_dmarc.servfail.test.": {"TXT": ["v=DMARC1; p=reject"]},
        "_dmarc.silent.test.": {"TXT": ["v=DMARC1; p=reject"]},
        "_dmarc.giant.test.": {"TXT": [GIANT_NOISE, "v=DMARC1; p=reject; rua=" + ",".join(
            f"mailto:r{n}@giant.test" for n in range(1000))]},
        "_dmarc.binary.test.": {"TXT": [b"v=DMARC1; p=reject\xff", "v=DMARC1; p=none"]},
        "_dmarc.np.test.": {"TXT": ["v=DMARC1; p=none; sp=quarantine; np=reject"]},
        "exists.np.test.": {"MX": [(10, "mx.np.test.")]},
        "nodata.np.test.": {"TXT": ["something"]},
        "_dmarc.sub.nxorg.test.": {"TXT": ["v=DMARC1; p=reject"]},
    }
    with DNSServer(zones, ttl=300) as server:
        server.fail("_dmarc.servfail.test.")
        server.drop("_dmarc.silent.test.")
        yield server
    assert not server.errors


@pytest_twisted.ensureDeferred
async def test_discovery_through_the_resolver(dns_world: DNSServer) -> None:
    resolver = Resolver(f"127.0.0.1:{dns_world.port}", timeout=1.5)

    async def found(domain: str) -> tuple[str, str, str]:
        d = await discover(resolver, SUFFIXES, domain)
        return d.outcome, d.policy_domain, d.requested

    assert await found("example.com") == ("found", "example.com", "reject")
    # a subdomain without a record of its own: the organizational domain's sp=
    assert await found("mail.example.com") == ("found", "example.com", "quarantine")
    assert await found("deep.nowhere.example.com") == ("found", "example.com", "quarantine")
    # its own record wins, and the organizational domain is not asked
    dns_world.queries.clear()
    assert await found("own.example.com") == ("found", "own.example.com", "none")
    assert ("_dmarc.example.com.", "TXT") not in dns_world.queries
    # NXDOMAIN at both names: none
    assert await found("nothing.test") == ("none", "", "none")
    # several records: none, and no fallback to the organizational domain
    assert await found("twice.test") == ("none", "", "none")
    assert (await discover(resolver, SUFFIXES, "twice.test")).reason.endswith(
        "no DMARC processing)")
    # a record that is no policy: permerror
    assert await found("broken.test") == ("permerror", "broken.test", "none")
    # SERVFAIL and silence: temperror, never none
    assert (await found("servfail.test"))[0] == "temperror"
    assert (await found("a.servfail.test"))[0] == "temperror"
    assert (await found("silent.test"))[0] == "temperror"
    # a giant TXT beside the record (over TCP), and a giant record
    discovery = await discover(resolver, SUFFIXES, "giant.test")
    assert discovery.outcome == "found" and discovery.record is not None
    assert len(discovery.record.rua) == 1000
    # a record that is not UTF-8 is no record; the other one counts
    assert await found("binary.test") == ("found", "binary.test", "none")
    # RFC 9091 np=: a subdomain that does not exist (NXDOMAIN, or NODATA for A, AAAA
    # and MX) gets np=, one that exists sp=
    assert await found("ghost.np.test") == ("found", "np.test", "reject")
    assert await found("nodata.np.test") == ("found", "np.test", "reject")
    assert await found("exists.np.test") == ("found", "np.test", "quarantine")


@pytest_twisted.ensureDeferred
async def test_a_whole_check_through_the_resolver(dns_world: DNSServer) -> None:
    checker = DMARCChecker(Resolver(f"127.0.0.1:{dns_world.port}", timeout=1.5), SUFFIXES,
                           DMARCConfig())
    result = await checker.check("Mail.Example.COM", ("bounce.example.com", "pass"))
    assert (result.result, result.policy_domain, result.spf_aligned) == (
        "pass", "example.com", True)
    result = await checker.check("mail.example.com", ("evil.test", "pass"),
                                 [("evil.test", "pass", "s1")])
    assert (result.result, result.requested, result.disposition, result.reply) == (
        "fail", "quarantine", "quarantine", None)
    result = await checker.check("servfail.test", ("servfail.test", "pass"))
    assert result.result == "temperror"
    assert result.reply is not None and result.reply[:2] == (451, "4.7.1")


# -- the verdict ----------------------------------------------------------------------------

ZONE: Zone = {
    "_dmarc.example.com": [{"TXT": "v=DMARC1; p=reject"}],
    "_dmarc.strict.test": [{"TXT": "v=DMARC1; p=reject; adkim=s; aspf=s"}],
    "_dmarc.none.test": [{"TXT": "v=DMARC1; p=none"}],
    "_dmarc.quarantine.test": [{"TXT": "v=DMARC1; p=quarantine"}],
    "_dmarc.half.test": [{"TXT": "v=DMARC1; p=reject; pct=50"}],
    "_dmarc.zero.test": [{"TXT": "v=DMARC1; p=quarantine; pct=0"}],
    "_dmarc.temp.test": ["TIMEOUT"],
}


@pytest.mark.parametrize("from_domain,spf,dkim,result,spf_aligned,dkim_aligned", [
    # SPF alone: relaxed alignment takes the organizational domain
    ("example.com", ("example.com", "pass"), [], "pass", True, False),
    ("example.com", ("bounces.example.com", "pass"), [], "pass", True, False),
    ("mail.example.com", ("example.com", "pass"), [], "pass", True, False),
    ("example.com", ("example.net", "pass"), [], "fail", False, False),
    ("example.com", ("example.com", "fail"), [], "fail", False, False),
    ("example.com", ("example.com", "softfail"), [], "fail", False, False),
    ("example.com", ("example.com", "neutral"), [], "fail", False, False),
    # DKIM alone; any aligned passing signature does it
    ("example.com", ("", "none"), [("example.com", "pass")], "pass", False, True),
    ("example.com", ("", "none"), [("s.example.com", "pass")], "pass", False, True),
    ("example.com", ("", "none"), [("example.net", "pass"), ("example.com", "fail")],
     "fail", False, False),
    ("example.com", ("", "none"), [("example.net", "pass"), ("EXAMPLE.com", "pass")],
     "pass", False, True),
    ("example.com", ("", "none"), [("example.com", "policy")], "fail", False, False),
    # both
    ("example.com", ("example.com", "pass"), [("example.com", "pass")], "pass", True, True),
    # strict alignment wants the same name
    ("strict.test", ("strict.test", "pass"), [], "pass", True, False),
    ("strict.test", ("mail.strict.test", "pass"), [], "fail", False, False),
    ("strict.test", ("", "none"), [("mail.strict.test", "pass")], "fail", False, False),
    ("strict.test", ("", "none"), [("strict.test", "pass")], "pass", False, True),
    # the policy found at the organizational domain judges a subdomain with its modes
    ("a.strict.test", ("a.strict.test", "pass"), [], "pass", True, False),
    ("a.strict.test", ("strict.test", "pass"), [], "fail", False, False),
])
def test_the_alignment_matrix(from_domain: str, spf: tuple[str, str], dkim: Any,
                              result: str, spf_aligned: bool, dkim_aligned: bool) -> None:
    outcome = verdict(ZONE, from_domain, spf, dkim)
    assert (outcome.result, outcome.spf_aligned, outcome.dkim_aligned) == (
        result, spf_aligned, dkim_aligned)
    assert (outcome.evaluated_spf, outcome.evaluated_dkim) == (
        "pass" if spf_aligned else "fail", "pass" if dkim_aligned else "fail")
    assert outcome.disposition == ("reject" if result == "fail" else "none")


def test_results_without_a_policy() -> None:
    assert verdict(ZONE, "nowhere.test", ("nowhere.test", "fail")).result == "none"
    outcome = verdict(ZONE, "none.test", ("x.test", "fail"))
    assert (outcome.result, outcome.requested, outcome.disposition, outcome.reply) == (
        "fail", "none", "none", None)
    assert outcome.ar_comment == "p=none dis=none"
    temp = verdict(ZONE, "temp.test", ("temp.test", "pass"))
    assert temp.result == "temperror" and temp.reply is not None
    assert temp.reply[0] == 451


def test_an_aligned_temporary_error_is_temperror_not_fail() -> None:
    outcome = verdict(ZONE, "example.com", ("example.com", "temperror"))
    assert outcome.result == "temperror" and outcome.reply is not None
    outcome = verdict(ZONE, "example.com", ("other.test", "fail"),
                      [("example.com", "temperror")])
    assert outcome.result == "temperror"
    # not aligned: it could not have passed DMARC anyway
    assert verdict(ZONE, "example.com", ("other.test", "temperror")).result == "fail"


def test_pct_sampling_with_an_injected_random_source() -> None:
    failing = ("elsewhere.test", "fail")
    inside = verdict(ZONE, "half.test", failing, random=0.49)
    assert (inside.disposition, inside.reasons) == ("reject", ())
    assert inside.reply is not None and inside.reply[:2] == (550, "5.7.1")
    outside = verdict(ZONE, "half.test", failing, random=0.5)
    # §6.6.4: the next milder policy
    assert (outside.disposition, outside.reasons) == (
        "quarantine", (OverrideReason("sampled_out", "pct=50"),))
    assert outside.reply is None and outside.ar_comment == "p=reject dis=quarantine"
    zero = verdict(ZONE, "zero.test", failing, random=0.0)
    assert (zero.disposition, [r.type for r in zero.reasons]) == ("none", ["sampled_out"])
    # pct=100 never samples out, whatever the source says
    assert verdict(ZONE, "example.com", failing, random=0.999).disposition == "reject"
    # a pass is never sampled
    assert verdict(ZONE, "half.test", ("half.test", "pass"), random=0.9).reasons == ()


def test_local_enforcement() -> None:
    failing = ("elsewhere.test", "fail")
    assert verdict(ZONE, "example.com", failing).disposition == "reject"
    assert verdict(ZONE, "quarantine.test", failing).disposition == "quarantine"
    capped = verdict(ZONE, "example.com", failing, enforce="quarantine")
    assert (capped.result, capped.disposition, capped.reasons) == (
        "fail", "quarantine", (OverrideReason("local_policy", "[dmarc] enforce: quarantine"),))
    assert verdict(ZONE, "quarantine.test", failing, enforce="quarantine").reasons == ()
    tagged = verdict(ZONE, "example.com", failing, enforce="tag")
    assert (tagged.disposition, tagged.reply) == ("none", None)
    # per domain: the From: domain's entry, then the policy domain's
    actions = (("example.com", "tag"), ("mail.example.com", "quarantine"))
    assert verdict(ZONE, "example.com", failing, domain_actions=actions).disposition == "none"
    assert verdict(ZONE, "x.example.com", failing,
                   domain_actions=actions).disposition == "none"
    sub = verdict(ZONE, "mail.example.com", failing, domain_actions=actions)
    assert (sub.disposition, sub.reasons[0].comment) == (
        "quarantine", "[dmarc] domain_actions mail.example.com: quarantine")
    assert verdict(ZONE, "strict.test", failing, enforce="tag",
                   domain_actions=(("strict.test", "reject"),)).disposition == "reject"
    # sampled out, then capped: both reasons
    both = verdict(ZONE, "half.test", failing, random=0.9, enforce="tag")
    assert [r.type for r in both.reasons] == ["sampled_out", "local_policy"]
    assert both.disposition == "none"


def test_a_trusted_arc_sealer_overrides_a_failure() -> None:
    outcome = verdict(ZONE, "example.com", ("list.example.org", "pass"),
                      [("list.example.org", "pass")], arc="sealer.example.org")
    assert (outcome.result, outcome.disposition, outcome.reply) == ("fail", "none", None)
    assert outcome.reasons == (OverrideReason(
        "trusted_forwarder", "ARC chain sealed by sealer.example.org passed"),)
    # a pass needs no override
    passing = verdict(ZONE, "example.com", ("example.com", "pass"), arc="s.example.org")
    assert (passing.result, passing.reasons) == ("pass", ())


def test_checks_switched_off() -> None:
    checker = checker_for(ZONE, enabled=False)
    assert not checker.enabled
    outcome = fired(checker.check("example.com", ("x.test", "fail")))
    assert (outcome.result, outcome.disposition) == ("none", "none")
    assert checker.resolver.queries == []       # type: ignore[attr-defined]


def test_a_check_that_gets_no_answer_ends_at_the_time_limit() -> None:
    class Silent(ZoneResolver):
        def txt_records(self, name: str) -> Deferred[list[bytes]]:
            return Deferred()
    clock = task.Clock()
    checker = DMARCChecker(Silent({}), SUFFIXES, DMARCConfig(), clock=clock)
    outcome: list[DMARCResult] = []
    checker.check("example.com", ("example.com", "pass")).addCallback(outcome.append)
    clock.advance(CHECK_TIME_LIMIT - 0.1)
    assert outcome == []
    clock.advance(0.2)
    assert [r.result for r in outcome] == ["temperror"]
    assert outcome[0].reason == f"no verdict within {CHECK_TIME_LIMIT:g} s"


def test_the_check_never_fails() -> None:
    class Broken(ZoneResolver):
        def txt_records(self, name: str) -> Deferred[list[bytes]]:
            raise RuntimeError("a bug")
    checker = DMARCChecker(Broken({}), SUFFIXES, DMARCConfig(), clock=task.Clock())
    outcome = fired(checker.check("example.com", ("example.com", "pass")))
    assert (outcome.result, outcome.reason) == ("temperror", "internal error")


# -- the From: field (§6.6.1) -----------------------------------------------------------

@pytest.mark.parametrize("headers,domain,problem", [
    (b"From: Alice <alice@Example.COM>\r\nTo: b@x.test\r\n\r\nbody", "example.com", ""),
    (b"Subject: x\nFrom: alice@example.com\n", "example.com", ""),
    (b"from:   \"Mallory <m@evil.test>\" <alice@example.com>\r\n", "example.com", ""),
    (b"From: Alice\r\n <alice@\r\n\texample.com>\r\n", "example.com", ""),   # folded
    (b"From: a@example.com, b@example.com\r\n", "example.com", ""),
    (b"From: =?utf-8?q?Caf=C3=A9?= <u@caf\xc3\xa9.fr>\r\n", "xn--caf-dma.fr", ""),
    (b"To: b@x.test\r\nSubject: no from\r\n\r\nFrom: a@example.com\r\n", None, "no_from"),
    (b"From: a@example.com\r\nFrom: b@evil.test\r\n", "example.com", "several_fields"),
    (b"From: a@example.com, b@evil.test\r\n", None, "several_domains"),
    (b"From: undisclosed-recipients:;\r\n", None, "no_domain"),
    (b"From: nobody\r\n", None, "no_domain"),
    (b"From: a@[192.0.2.1]\r\n", None, "no_domain"),
    (b"From: <>\r\n", None, "no_domain"),
    (b"From: a@b@c.example\r\n", None, "no_domain"),
    (b"From: a@" + b"x" * 70 + b".example\r\n", None, "no_domain"),
    (b"From: " + b"a@example.com, " * 2000 + b"\r\n", None, "no_domain"),
    (b"X-From: a@example.com\r\nFromage: b\r\n", None, "no_from"),
])
def test_the_from_domain(headers: bytes, domain: str | None, problem: str) -> None:
    found = header_from(headers)
    assert (found.domain, found.problem, found.disposition, found.reply) == (
        domain, problem, "none", None)
    strict = header_from(headers, reject_malformed=True)
    assert strict.domain == domain and strict.problem == problem
    if problem:
        assert strict.disposition == "reject"
        assert strict.reply is not None and strict.reply[:2] == (550, "5.7.1")
    else:
        assert strict.reply is None


def test_the_checker_judges_the_from_field_by_its_configuration() -> None:
    headers = b"From: a@example.com\r\nFrom: b@example.com\r\n"
    assert checker_for(ZONE).header_from(headers).disposition == "none"
    assert checker_for(ZONE, reject_malformed_from=True).header_from(
        headers).disposition == "reject"


# -- configuration -------------------------------------------------------------------------

def test_the_dmarc_section(tmp_path: Path) -> None:
    config = parse_config("[dmarc]\nenforce = Quarantine\ndomain_actions = "
                          "Example.COM:tag, bank.example:REJECT\n  café.example:quarantine\n"
                          "reports = yes\nreport_interval = 6h\n"
                          "report_from = DMARC@Example.NET\n", str(tmp_path / "lm.conf"))
    dmarc = config.dmarc
    assert dmarc.enforce == "quarantine" and dmarc.reports and dmarc.report_interval == 21600
    assert dmarc.domain_actions == (("example.com", "tag"), ("bank.example", "reject"),
                                    ("xn--caf-dma.example", "quarantine"))
    assert dmarc.report_from == "dmarc@example.net"
    defaults = DMARCConfig()
    assert (defaults.enabled, defaults.enforce, defaults.reports, defaults.report_interval,
            defaults.public_suffix_list, defaults.reject_malformed_from) == (
        True, "reject", False, 86400.0, None, False)
    for bad, message in [("enforce = drop", "expected one of"),
                         ("domain_actions = example.com", "DOMAIN:ACTION"),
                         ("domain_actions = example.com:drop", "DOMAIN:ACTION"),
                         ("domain_actions = -bad-:tag", "a domain name"),
                         ("domain_actions = a.test:tag, A.test:reject", "given twice"),
                         ("report_interval = 10s", "at least"),
                         ("report_from = not an address", "not an email address")]:
        with pytest.raises(ConfigError, match=message):
            parse_config(f"[dmarc]\n{bad}\n", str(tmp_path / "lm.conf"))


def test_what_the_chain_gives_is_read_with_care() -> None:
    # a U-label From: domain, words in capitals, and a word no RFC knows
    zone: Zone = {"_dmarc.xn--caf-dma.example": [{"TXT": "v=DMARC1; p=reject"}]}
    outcome = verdict(zone, "Café.example.", ("CAFÉ.example", "PASS"),
                      [("xn--caf-dma.example", "Invalid", "s1")])
    assert (outcome.result, outcome.header_from, outcome.spf) == (
        "pass", "xn--caf-dma.example", ("xn--caf-dma.example", "pass"))
    assert outcome.dkim[0].result == "permerror"
    # no domain at all: nothing to look up
    for bad in ("", "not a domain", "a..b", "x" * 300):
        checker = checker_for(ZONE)
        result = fired(checker.check(bad, ("example.com", "pass")))
        assert result.result == "none"
        assert checker.resolver.queries == []      # type: ignore[attr-defined]


@pytest.mark.parametrize("value", [
    "Sender <sender@client.test>", "ann@sender.example", "  Ann Example <ann@Sender.Example>  ",
    "=?utf-8?q?J=C3=B6rg?= <j@example.org>", "a.b+c@x-y.example", "<ann@example.com>",
    "Ann <ann@Sender.Example.>", "Bob <bob@[192.0.2.1]>", '"Quoted, Name" <q@example.com>',
    "a@b.com, c@d.com", "Ann (comment) <ann@example.com>", "ann@example.com (Ann)",
    "no at sign", "Ann <ann@example.com", "x@y@z.com", "Über <u@exämple.com>",
    "a..b@example.com", "Ann <ann@example.com> extra", "a@-bad-.example", "a@b..example"])
def test_the_plain_from_forms_read_as_the_full_parser_reads_them(value: str) -> None:
    """The fast path for plain From: values gives what email.headerregistry gives."""
    from email.policy import default

    from lightmail.policy.dmarc.headerfrom import _domain, _domains
    try:
        addresses = default.header_factory("from", value).addresses
        expected = [_domain(address.domain) for address in addresses] or [""]
    except Exception:
        expected = [""]
    assert _domains(value) == expected
