"""SPF (lightmail/policy/spf) beyond what the RFC 7208 suite covers: the overall time
limit, temporary DNS errors at each step, giant TXT records, include and redirect
loops, the two identities of a session, the fields of a result, bad input; and the
whole path through lightmail.dns.Resolver and the test DNS server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from dnsserver import DNSServer
from spfzone import ZoneResolver
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from lightmail.dns import Resolver
from lightmail.policy.spf import (
    CHECK_TIME_LIMIT,
    RESULTS,
    IdentityResults,
    SPFChecker,
    SPFResult,
)

Zone = dict[str, list[Any]]


def fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (the zone resolver answers at once)."""
    done: list[Any] = []
    d.addBoth(done.append)
    assert done, "the check has not finished"
    return done[0]


def check(zone: Zone, ip: str, sender: str, helo: str = "mail.example.org",
          **options: Any) -> SPFResult:
    checker = SPFChecker(ZoneResolver(zone), clock=task.Clock(), **options)
    domain = sender.rpartition("@")[2]
    result = fired(checker.check_host(ip, domain, sender, helo))
    assert isinstance(result, SPFResult) and result.result in RESULTS, result
    return result


class SlowResolver(ZoneResolver):
    """Each answer comes ``delay`` seconds (of the clock) after the question; with
    ``delay`` None, never."""

    def __init__(self, zone: Zone, clock: task.Clock, delay: float | None) -> None:
        super().__init__(zone)
        self.clock, self.delay = clock, delay

    def txt_records(self, name: str) -> Deferred[list[bytes]]:
        answer = super().txt_records(name)
        if self.delay is None:
            return Deferred()
        later: Deferred[list[bytes]] = Deferred()
        self.clock.callLater(self.delay, lambda: answer.chainDeferred(later))
        return later


def chain(length: int) -> Zone:
    """i1.example.com includes i2..., the last one allows 192.0.2.1."""
    zone: Zone = {f"i{n}.example.com": [{"TXT": f"v=spf1 include:i{n + 1}.example.com -all"}]
                  for n in range(1, length)}
    zone[f"i{length}.example.com"] = [{"TXT": "v=spf1 ip4:192.0.2.1 -all"}]
    return zone


# -- the overall time limit ----------------------------------------------------------------

def test_a_check_that_gets_no_answer_ends_at_the_time_limit() -> None:
    clock = task.Clock()
    checker = SPFChecker(SlowResolver(chain(1), clock, None), clock=clock)
    outcome: list[SPFResult] = []
    checker.check_host("192.0.2.1", "i1.example.com", "a@i1.example.com").addCallback(
        outcome.append)
    clock.advance(CHECK_TIME_LIMIT - 0.1)
    assert outcome == []
    clock.advance(0.2)
    assert [r.result for r in outcome] == ["temperror"]
    assert outcome[0].reason == f"no verdict within {CHECK_TIME_LIMIT:g} s"
    assert CHECK_TIME_LIMIT >= 20          # RFC 7208 §4.6.4: at least 20 seconds


def test_slow_answers_add_up_to_the_time_limit() -> None:
    def run(time_limit: float) -> SPFResult:
        clock = task.Clock()
        checker = SPFChecker(SlowResolver(chain(8), clock, 3.0), clock=clock,
                             time_limit=time_limit)
        outcome: list[SPFResult] = []
        checker.check_host("192.0.2.1", "i1.example.com", "a@i1.example.com").addCallback(
            outcome.append)
        for _ in range(20):                # the answers that were asked for still come
            clock.advance(3.0)
        assert len(outcome) == 1
        return outcome[0]
    # 8 records one after the other, 3 s each: 24 s.
    assert run(20.0).result == "temperror"
    assert run(30.0).result == "pass"


# -- DNS errors -----------------------------------------------------------------------------

def test_temporary_dns_errors() -> None:
    zone: Zone = {
        "txt.example.com": [{"TXT": "TIMEOUT"}],
        "a.example.com": [{"TXT": "v=spf1 a:host.example.com -all"}],
        "host.example.com": [{"A": "TIMEOUT"}],
        "mx.example.com": [{"TXT": "v=spf1 mx -all"}, {"MX": [10, "host.example.com"]}],
        "inc.example.com": [{"TXT": "v=spf1 include:txt.example.com -all"}],
        "exists.example.com": [{"TXT": "v=spf1 exists:host.example.com -all"}],
        "ptr.example.com": [{"TXT": "v=spf1 ptr -all"}],
        "1.2.0.192.in-addr.arpa": ["TIMEOUT"],
        "exp.example.com": [{"TXT": "v=spf1 -all exp=txt.example.com"}],
    }
    for domain in ("txt", "a", "mx", "inc", "exists"):
        result = check(zone, "192.0.2.1", f"x@{domain}.example.com")
        assert result.result == "temperror", (domain, result)
        assert "timeout" in result.reason, result
    # §5.5: a PTR lookup that fails is a ptr that does not match, not a temperror
    assert check(zone, "192.0.2.1", "x@ptr.example.com").result == "fail"
    # §6.2: a failing exp= lookup leaves the default explanation
    result = check(zone, "192.0.2.1", "x@exp.example.com")
    assert result.result == "fail"
    assert result.explanation == "exp.example.com does not designate 192.0.2.1 as a " \
                                 "permitted sender"


def test_a_name_whose_address_lookup_fails_is_skipped_by_ptr() -> None:
    zone: Zone = {
        "ptr.example.com": [{"TXT": "v=spf1 ptr -all"}],
        "1.2.0.192.in-addr.arpa": [{"PTR": "broken.ptr.example.com"},
                                   {"PTR": "good.ptr.example.com"}],
        "broken.ptr.example.com": [{"A": "TIMEOUT"}],
        "good.ptr.example.com": [{"A": "192.0.2.1"}],
    }
    result = check(zone, "192.0.2.1", "x@ptr.example.com")
    assert (result.result, result.mechanism) == ("pass", "ptr")


def test_a_resolver_that_breaks_gives_a_temperror_and_a_log_line() -> None:
    class Broken(ZoneResolver):
        def txt_records(self, name: str) -> Deferred[list[bytes]]:
            return defer.fail(RuntimeError("resolver bug"))
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        result = fired(SPFChecker(Broken({}), clock=task.Clock()).check_host(
            "192.0.2.1", "example.com", "a@example.com"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (result.result, result.reason) == ("temperror", "internal error")
    assert any(e.get("log_failure") and e["log_failure"].check(RuntimeError)
               for e in events)


# -- giant records --------------------------------------------------------------------------

GIANT = "v=spf1 " + " ".join(f"ip4:10.{i // 256}.{i % 256}.0/24" for i in range(3000))


async def check_async(zone: Zone, ip: str, sender: str, resolver: Any = None) -> SPFResult:
    """For records parsed in a thread: the reactor has to run."""
    checker = SPFChecker(resolver or ZoneResolver(zone))
    return await checker.check_host(ip, sender.rpartition("@")[2], sender, "helo.test")


@pytest_twisted.ensureDeferred
async def test_giant_txt_records(monkeypatch: pytest.MonkeyPatch) -> None:
    zone: Zone = {
        "big.example.com": [{"TXT": GIANT + " ip4:192.0.2.1 -all"}],
        "bad.example.com": [{"TXT": GIANT + " ip4:192.0.2.1 -all ip4:10.0.0.300"}],
        "noise.example.com": [{"TXT": "\u00e9" * 60000}, {"TXT": "v=spf1 ip4:192.0.2.1 -all"},
                              {"TXT": "v=spf2.0 " + "x" * 60000}],
        "lookups.example.com": [{"TXT": "v=spf1 " + "a:n.example.com " * 3000 + "-all"}],
        "n.example.com": [{"A": "198.51.100.1"}],
    }
    # Parsing a record this size takes tens of milliseconds: not on the reactor thread.
    # (The parser is wrapped to see where it runs: nothing public tells.)
    from lightmail.policy.spf import check as check_module
    parsed_in: list[str] = []

    def parse_record(text: str) -> Any:
        parsed_in.append(threading.current_thread().name)
        return real_parse(text)
    real_parse = check_module.parse_record
    monkeypatch.setattr(check_module, "parse_record", parse_record)
    result = await check_async(zone, "192.0.2.1", "x@big.example.com")
    assert (result.result, result.mechanism) == ("pass", "ip4:192.0.2.1")
    assert parsed_in and threading.main_thread().name not in parsed_in
    assert (await check_async(zone, "10.11.183.9", "x@big.example.com")).result == "pass"
    # the whole record is read before anything is evaluated (§4.6)
    result = await check_async(zone, "192.0.2.1", "x@bad.example.com")
    assert result.result == "permerror" and "10.0.0.300" in result.reason
    # other TXT records, however big or binary, are not SPF's business (§4.5)
    assert (await check_async(zone, "192.0.2.1", "x@noise.example.com")).result == "pass"
    # 3000 DNS-querying terms: the 11th ends the check, after 10 lookups
    resolver = ZoneResolver(zone)
    result = await check_async(zone, "192.0.2.1", "x@lookups.example.com", resolver)
    assert result.result == "permerror"
    assert result.reason == "more than 10 DNS-querying terms"
    assert resolver.queries.count(("n.example.com", "A")) == 10


@pytest_twisted.ensureDeferred
async def test_giant_expansions() -> None:
    sender = "a" * 20 + "@" + "b" * 40 + ".example.com"
    zone: Zone = {
        # some 110 KB of name, cut to its last 253 characters at most (§7.3)
        "huge.example.com": [{"TXT": "v=spf1 exists:" + "%{s}." * 1500 + "example.com -all "
                                     "exp=why.example.com"}],
        "why.example.com": [{"TXT": "%{s} " * 50}],           # 3.7 KB once expanded
    }
    resolver = ZoneResolver(zone)
    result = await SPFChecker(resolver).check_host("192.0.2.1", "huge.example.com", sender)
    assert result.result == "fail"
    name, rtype = resolver.queries[1]
    assert rtype == "A" and 240 < len(name) <= 253 and name.endswith("example.com.example.com")
    # an explanation too long for a reply is not used
    assert result.explanation == f"{sender.rpartition('@')[2]} does not designate " \
                                 "192.0.2.1 as a permitted sender"


# -- loops ----------------------------------------------------------------------------------

@pytest.mark.parametrize("zone", [
    {"loop.example.com": [{"TXT": "v=spf1 include:loop.example.com -all"}]},
    {"loop.example.com": [{"TXT": "v=spf1 include:other.example.com -all"}],
     "other.example.com": [{"TXT": "v=spf1 include:loop.example.com ~all"}]},
    {"loop.example.com": [{"TXT": "v=spf1 include:other.example.com -all"}],
     "other.example.com": [{"TXT": "v=spf1 redirect=loop.example.com"}]},
    {"loop.example.com": [{"TXT": "v=spf1 redirect=%{d}"}]},
], ids=["self-include", "include-cycle", "include-redirect-cycle", "macro-redirect"])
def test_include_and_redirect_loops_end_in_permerror(zone: Zone) -> None:
    resolver = ZoneResolver(zone)
    result = fired(SPFChecker(resolver, clock=task.Clock()).check_host(
        "192.0.2.1", "loop.example.com", "x@loop.example.com"))
    assert result.result == "permerror"
    assert result.reason == "more than 10 DNS-querying terms"
    assert len(resolver.queries) == 11      # the first record and one per term allowed


def test_a_chain_of_includes_stops_at_the_limit() -> None:
    assert check(chain(11), "192.0.2.1", "x@i1.example.com").result == "pass"
    result = check(chain(12), "192.0.2.1", "x@i1.example.com")
    assert (result.result, result.reason) == ("permerror", "more than 10 DNS-querying terms")


# -- the identities of a session ------------------------------------------------------------

IDENTITIES: Zone = {
    "mail.example.org": [{"TXT": "v=spf1 a -all"}, {"A": "192.0.2.1"}],
    "example.org": [{"TXT": "v=spf1 ip4:198.51.100.0/24 -all"}],
}


def test_helo_first_then_mail_from() -> None:
    resolver = ZoneResolver(IDENTITIES)
    checker = SPFChecker(resolver, clock=task.Clock())
    both: IdentityResults = fired(checker.check_identities(
        "192.0.2.1", "mail.example.org", "someone@example.org"))
    assert both.helo is not None
    assert (both.helo.identity, both.helo.domain, both.helo.result) == (
        "helo", "mail.example.org", "pass")
    assert both.helo.sender == "postmaster@mail.example.org"
    assert (both.mail_from.identity, both.mail_from.domain, both.mail_from.result) == (
        "mailfrom", "example.org", "fail")
    assert both.verdict is both.mail_from
    assert [q for q in resolver.queries if q[1] == "TXT"] == [
        ("mail.example.org", "TXT"), ("example.org", "TXT")]
    # A HELO fail is conclusive (§2.3)
    both = fired(checker.check_identities("198.51.100.7", "mail.example.org",
                                          "someone@example.org"))
    assert (both.helo.result, both.mail_from.result) == ("fail", "pass")
    assert both.verdict is both.helo


def test_the_null_sender_is_postmaster_at_the_helo_domain() -> None:
    resolver = ZoneResolver(IDENTITIES)
    checker = SPFChecker(resolver, clock=task.Clock())
    both = fired(checker.check_identities("192.0.2.1", "mail.example.org", ""))
    assert both.helo is not None and both.helo.result == "pass"
    assert (both.mail_from.identity, both.mail_from.sender, both.mail_from.result) == (
        "mailfrom", "postmaster@mail.example.org", "pass")
    assert resolver.queries.count(("mail.example.org", "TXT")) == 1    # asked once
    alone = fired(checker.check_identities("192.0.2.1", "mail.example.org", "",
                                           check_helo=False))
    assert alone.helo is None and alone.mail_from.result == "pass"
    # a HELO that is no domain name gives none, asking nothing
    asked = len(resolver.queries)
    for helo in ("[192.0.2.1]", "localhost", ""):
        both = fired(checker.check_identities("192.0.2.1", helo, ""))
        assert both.helo is not None and both.helo.result == "none", helo
        assert both.mail_from.result == "none"
    assert len(resolver.queries) == asked


# -- results and input ----------------------------------------------------------------------

def test_what_a_result_says() -> None:
    zone: Zone = {
        "example.com": [{"TXT": "v=spf1 include:_spf.example.com ~all exp=why.example.com"}],
        "_spf.example.com": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
        "why.example.com": [{"TXT": "%{c} is not %{o}'s (asked by %{r} at %{t})."}],
        "strict.example.com": [{"TXT": "v=spf1 -include:_spf.example.com ?all "
                                       "exp=why.example.com"}],
    }
    clock = task.Clock()
    clock.advance(1700000000)
    checker = SPFChecker(ZoneResolver(zone), clock=clock, receiver="mx.example.net")
    passed = fired(checker.check_host("192.0.2.5", "example.com", "a@example.com", "helo.test"))
    assert passed == SPFResult("pass", "mailfrom", "example.com", "192.0.2.5", "a@example.com",
                               "helo.test", "include:_spf.example.com", "",
                               "example.com: 192.0.2.5 matched include:_spf.example.com")
    softfail = fired(checker.check_host("::ffff:198.51.100.1", "example.com", "a@example.com"))
    assert (softfail.result, softfail.mechanism, softfail.ip) == ("softfail", "~all",
                                                                   "198.51.100.1")
    assert softfail.explanation == ""                 # only a fail has one
    failed = fired(checker.check_host("192.0.2.5", "strict.example.com",
                                      "a@strict.example.com"))
    assert (failed.result, failed.mechanism) == ("fail", "-include:_spf.example.com")
    assert failed.explanation == ("192.0.2.5 is not strict.example.com's (asked by "
                                  "mx.example.net at 1700000000).")
    # a domain with its final dot; a sender without a local part
    bare = fired(checker.check_host("198.51.100.1", "_spf.example.com.", "@_spf.example.com"))
    assert (bare.result, bare.sender) == ("fail", "postmaster@_spf.example.com")


def test_bad_input_gets_an_answer() -> None:
    checker = SPFChecker(ZoneResolver({}), clock=task.Clock())
    for ip, domain in (("not an address", "example.com"), ("192.0.2.1", ""),
                       ("192.0.2.1", "a..example.com"), ("192.0.2.1", "x" * 64 + ".com"),
                       ("192.0.2.1", "com"), ("192.0.2.1", "[192.0.2.1]")):
        result = fired(checker.check_host(ip, domain, f"a@{domain}"))
        assert result.result == "none", (ip, domain)
        assert result.reason


@pytest_twisted.ensureDeferred
async def test_macros_beyond_the_suite() -> None:
    zone: Zone = {
        "example.com": [{"TXT": "v=spf1 exists:%{L}.%{d99999999999999}.q.example.com "
                                "exists:%{l1r+}.%{o2}.r.example.com -all"}],
        "f%C3%BC%2Bx.example.com.q.example.com": [{"A": "127.0.0.2"}],
        "a.example.com.r.example.com": [{"A": "127.0.0.2"}],
    }
    # URL escaping of a UTF-8 local part; more parts asked than there are
    assert check(zone, "192.0.2.1", "f\u00fc+x@example.com").mechanism.startswith(
        "exists:%{L}")
    # "+" as a delimiter, reversed, the rightmost part kept (a); %{o2}
    assert check(zone, "192.0.2.1", "a+b@example.com").mechanism.startswith(
        "exists:%{l1r+}")
    assert check(zone, "192.0.2.1", "c@example.com").result == "fail"
    # thousands of digits in a macro are no trouble
    digits: Zone = {"example.com": [{"TXT": "v=spf1 a:%{d" + "9" * 5000 + "} -all"}]}
    assert (await check_async(digits, "192.0.2.1", "a@example.com")).result == "fail"


def test_void_lookups_are_those_of_the_terms() -> None:
    # the MX hosts without addresses are not void lookups of their own
    zone: Zone = {
        "example.com": [{"TXT": "v=spf1 mx a:none1.example.com a:none2.example.com "
                                "ip4:192.0.2.1 -all"},
                        {"MX": [10, "dead1.example.com"]}, {"MX": [20, "dead2.example.com"]},
                        {"MX": [30, "dead3.example.com"]}],
        "three.example.com": [{"TXT": "v=spf1 a:none1.example.com exists:none2.example.com "
                                      "ptr ip4:192.0.2.1 -all"}],
    }
    assert check(zone, "192.0.2.1", "a@example.com").result == "pass"
    result = check(zone, "192.0.2.1", "a@three.example.com")
    assert result.result == "permerror" and "void lookups" in result.reason


# -- through the resolver, against a DNS server ----------------------------------------------

@pytest.fixture
def dns_world() -> Iterator[DNSServer]:
    zones: dict[str, dict[str, list[Any]]] = {
        "example.test.": {"TXT": ["v=spf1 a:mail.example.test ptr:example.test "
                                  "include:giant.test -all exp=why.example.test"]},
        "mail.example.test.": {"A": ["192.0.2.10"], "AAAA": ["2001:db8::10"]},
        "why.example.test.": {"TXT": ["%{i} may not send for %{d}"]},
        "11.2.0.192.in-addr.arpa.": {"PTR": ["relay.example.test."]},
        "relay.example.test.": {"A": ["192.0.2.11"]},
        "giant.test.": {"TXT": [GIANT + " ip4:192.0.2.12 -all"]},
        "broken.test.": {"TXT": ["v=spf1 a:servfail.test -all"]},
        "servfail.test.": {"A": ["192.0.2.1"]},
        "silent.test.": {"TXT": ["v=spf1 -all"]},
    }
    with DNSServer(zones, ttl=300) as server:
        server.fail("servfail.test.")
        server.drop("silent.test.")
        yield server
    assert not server.errors


@pytest_twisted.ensureDeferred
async def test_through_the_resolver(dns_world: DNSServer) -> None:
    checker = SPFChecker(Resolver(f"127.0.0.1:{dns_world.port}", timeout=1.5))

    async def result(ip: str, domain: str) -> tuple[str, str]:
        found = await checker.check_host(ip, domain, f"someone@{domain}", "helo.test")
        return found.result, found.mechanism
    assert await result("192.0.2.10", "example.test") == ("pass", "a:mail.example.test")
    assert await result("2001:db8::10", "example.test") == ("pass", "a:mail.example.test")
    assert await result("192.0.2.11", "example.test") == ("pass", "ptr:example.test")
    assert await result("192.0.2.12", "example.test") == ("pass", "include:giant.test")
    failed = await checker.check_host("192.0.2.99", "example.test", "x@example.test")
    assert (failed.result, failed.explanation) == ("fail",
                                                   "192.0.2.99 may not send for example.test")
    assert (await result("192.0.2.1", "broken.test"))[0] == "temperror"
    assert (await result("192.0.2.1", "silent.test"))[0] == "temperror"
    assert (await result("192.0.2.1", "nowhere.test"))[0] == "none"
