"""DNS blocklists and FCrDNS (lightmail/policy/dnsbl.py, lightmail/policy/reverse.py and
their checks in lightmail/policy/inbound/): zones in postscreen's syntax, weights and
the threshold, IPv4 and IPv6 (nibble) queries, RHSBL of the sender and the HELO name,
timeouts and SERVFAIL that never refuse, and the client's forward-confirmed name, against
the test DNS server (tests/dnsserver.py), through the resolver and on a running
LightMail hit by smtplib (from 127.0.0.1 and ::1)."""

from __future__ import annotations

import gc
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from dnsserver import DNSServer
from inprocess import in_thread, start
from twisted.internet import task
from twisted.logger import globalLogPublisher

from lightmail.config import ConfigError, parse_config
from lightmail.dns import Resolver
from lightmail.policy.dnsbl import Lookups, ZoneError, address_query, domain_query, parse_zone
from lightmail.policy.inbound.dnsbl import DNSBLCheck
from lightmail.policy.inbound.findings import Findings
from lightmail.policy.inbound.memo import SessionMemo
from lightmail.policy.inbound.reverse import refusal
from lightmail.policy.reverse import ReverseLookup, ReverseResult

# RFC 5782 §2.4's example address, and its name under a zone.
V6 = "2001:db8:1:2:3:4:567:89ab"
V6_NAME = "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
LOOPBACK6_NAME = ".".join("1" + "0" * 31)


# --- zones ----------------------------------------------------------------------------------

def test_zones_are_written_as_postscreen_has_them() -> None:
    zen = parse_zone("zen.spamhaus.org=127.0.0.[2..11]*3")
    assert (zen.name, zen.weight) == ("zen.spamhaus.org", 3)
    assert zen.counts("127.0.0.2") and zen.counts("127.0.0.11")
    assert not zen.counts("127.0.0.12") and not zen.counts("127.0.1.2")
    listed = parse_zone("list.dnswl.org=127.0.[0..255].[1;3]*-5")
    assert listed.weight == -5 and listed.counts("127.0.9.3") and not listed.counts("127.0.9.2")
    masked = parse_zone("bits.test&0.0.0.2")
    assert masked.counts("127.0.0.2") and masked.counts("127.0.0.6")
    assert not masked.counts("127.0.0.4")
    plain = parse_zone("BL.Example.")
    assert (plain.name, plain.weight) == ("bl.example", 1)
    assert plain.counts("127.0.0.2") and plain.counts("127.1.2.3")
    # Not loopback, or a list's "you may not ask" answer: not a listing.
    assert not plain.counts("192.0.2.1") and not plain.counts("127.255.255.254")


@pytest.mark.parametrize("text", ["bl", "bl.test=127.0.0", "bl.test=127.0.0.[2..x]",
                                  "bl.test=127.0.0.300", "bl.test*x", "bl.test&mask",
                                  "b l.test", "bl..test"])
def test_bad_zones_say_why(text: str) -> None:
    with pytest.raises(ZoneError):
        parse_zone(text)


def test_zones_in_the_config_and_its_errors_name_the_line() -> None:
    config = parse_config("[dnsbl]\nzones = a.test*2, b.test=127.0.0.[2..3]\n"
                          "rhsbl_zones = dbl.test\nthreshold = 3\n")
    assert [z.name for z in config.dnsbl.zones] == ["a.test", "b.test"]
    assert config.dnsbl.rhsbl_zones[0].name == "dbl.test"
    with pytest.raises(ConfigError, match=r":2: \[dnsbl\] zones: expected four octets"):
        parse_config("[dnsbl]\nzones = b.test=127.0.0\n")


def test_query_names() -> None:
    assert address_query("192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert address_query("::ffff:192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert address_query(V6, "ugly.example.com") == V6_NAME + ".ugly.example.com"
    assert address_query("not an address", "bl.test") is None
    assert domain_query("Spam.Example.", "dbl.test") == "spam.example.dbl.test"
    assert domain_query("[192.0.2.1]", "dbl.test") is None
    assert domain_query("a..b", "dbl.test") is None


# --- through the resolver ---------------------------------------------------------------

@pytest.fixture
def dns() -> Iterator[DNSServer]:
    zones: dict[str, dict[str, list[Any]]] = {
        "2.2.0.192.bl.test.": {"A": ["127.0.0.2"], "TXT": ["listed"]},
        "2.2.0.192.weak.test.": {"A": ["127.0.0.4"]},
        "3.2.0.192.bl.test.": {"A": ["127.0.0.99"]},           # outside the filter
        "4.2.0.192.bl.test.": {"A": ["127.255.255.254"]},      # "you may not ask"
        V6_NAME + ".bl.test.": {"A": ["127.0.0.3"]},
        "spam.example.dbl.test.": {"A": ["127.0.1.2"]},
        "bad-helo.example.dbl.test.": {"A": ["127.0.1.3"]},
        "2.2.0.192.silent.test.": {"A": ["127.0.0.2"]},
        "2.2.0.192.broken.test.": {"A": ["127.0.0.2"]},
        # FCrDNS
        "10.2.0.192.in-addr.arpa.": {"PTR": ["mail.good.test."]},
        "mail.good.test.": {"A": ["192.0.2.10"]},
        "11.2.0.192.in-addr.arpa.": {"PTR": ["liar.test.", "other.test."]},
        "liar.test.": {"A": ["192.0.2.99"]},
        "other.test.": {"A": ["192.0.2.98"]},
        "12.2.0.192.in-addr.arpa.": {"PTR": ["slow.test."]},
        "slow.test.": {"A": ["192.0.2.12"]},
        "13.2.0.192.in-addr.arpa.": {"PTR": ["nowhere.test."]},
        V6_NAME + ".ip6.arpa.": {"PTR": ["v6.good.test."]},
        "v6.good.test.": {"AAAA": [V6]},
        # A running server's clients: 127.0.0.1 and ::1.
        "1.0.0.127.in-addr.arpa.": {"PTR": ["client.good.test."]},
        "client.good.test.": {"A": ["127.0.0.1"]},
        LOOPBACK6_NAME + ".ip6.arpa.": {"PTR": ["client6.test."]},
        "client6.test.": {"AAAA": ["::1"]},
    }
    with DNSServer(zones, ttl=300) as server:
        server.drop("2.2.0.192.silent.test.")
        server.fail("2.2.0.192.broken.test.")
        server.drop("slow.test.")
        yield server
    assert not server.errors


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def zones(text: str) -> Any:
    return parse_config(f"[dnsbl]\nzones = {text}\n").dnsbl.zones


@pytest_twisted.ensureDeferred
async def test_lookups_through_the_resolver(dns: DNSServer,
                                            events: list[dict[str, Any]]) -> None:
    lookups = Lookups(Resolver(f"127.0.0.1:{dns.port}", timeout=3))
    both = zones("bl.test=127.0.0.[2..11]*2, weak.test")
    found = await lookups.client("192.0.2.2", both, 1.0)
    assert sorted((one.zone.name, one.answers) for one in found) == [
        ("bl.test", ("127.0.0.2",)), ("weak.test", ("127.0.0.4",))]
    assert await lookups.client("192.0.2.3", both, 1.0) == []      # filtered out
    assert await lookups.client("192.0.2.4", zones("bl.test"), 1.0) == []
    assert any("refuses to answer" in str(e.get("log_format")) for e in events)
    assert await lookups.client("192.0.2.77", both, 1.0) == []     # NXDOMAIN
    [v6] = await lookups.client(V6, both, 1.0)
    assert (v6.zone.name, v6.subject, v6.answers) == ("bl.test", V6, ("127.0.0.3",))
    [rhs] = await lookups.domain("sender", "Spam.Example", zones("dbl.test"), 1.0)
    assert (rhs.what, rhs.subject, rhs.answers) == ("sender", "spam.example",
                                                    ("127.0.1.2",))
    # A zone that does not answer, or fails: not listed, and said.
    assert await lookups.client("192.0.2.2", zones("silent.test, broken.test"), 0.5) == []
    said = [e for e in events if e.get("event") == "dnsbl_error"]
    assert {e["zone"] for e in said} == {"silent.test", "broken.test"}
    assert any("no answer within 0.5 s" in e["error"] for e in said)


@dataclass
class Session:
    """What the dnsbl check reads of an SMTP session."""

    peer: str
    helo: str = "client.sender.test"
    account: Any = None
    conn_id: str = "c1"


@pytest_twisted.ensureDeferred
async def test_cached_answers_are_weighed_at_once(dns: DNSServer) -> None:
    """With the answers cached, as a busy MX has them: no timer for a lookup, and
    the check weighs them at RCPT TO without waiting, to the same verdict."""
    clock = task.Clock()
    lookups = Lookups(Resolver(f"127.0.0.1:{dns.port}", timeout=3), clock)
    both = zones("bl.test=127.0.0.[2..11]*2, weak.test")
    first = lookups.client("192.0.2.2", both, 1.0)
    assert not first.called and len(clock.getDelayedCalls()) == 2   # under timeouts
    found = await first
    assert len(found) == 2 and not clock.getDelayedCalls()
    again = lookups.client("192.0.2.2", both, 1.0)
    assert again.called and not clock.getDelayedCalls()
    assert await again == found
    config = parse_config("[dnsbl]\nzones = bl.test=127.0.0.[2..11]*2, weak.test\n"
                          "rhsbl_zones = dbl.test\nthreshold = 4\n")
    check = DNSBLCheck(lookups, lambda: config.dnsbl)

    async def session(sender: str) -> tuple[Any, Any]:
        one = Session("192.0.2.2")
        assert await check.connect(one, Findings()) is None
        tx, findings = SimpleNamespace(mail_from=sender), Findings()
        assert await check.mail(one, tx, findings) is None
        reply = check.rcpt(one, tx, "bob@example.test", findings)
        at_once = reply.called
        refused = await reply
        check.session_ended(one)
        return at_once, refused and (refused.code, findings.dnsbl.score)
    # The sender's domain is asked at MAIL FROM: not cached yet, RCPT TO waits.
    assert await session("ann@spam.example") == (False, (550, 4))
    assert await session("ann@spam.example") == (True, (550, 4))
    assert await session("ann@spam.example") == (True, (550, 4))
    assert len(check.asked) == 0


@pytest_twisted.ensureDeferred
async def test_forward_confirmed_reverse_dns(dns: DNSServer) -> None:
    lookup = ReverseLookup(Resolver(f"127.0.0.1:{dns.port}", timeout=3))

    async def check(ip: str) -> ReverseResult:
        return await lookup.check(ip, 0.5)
    good = await check("192.0.2.10")
    assert (good.result, good.name, good.client, good.iprev) == (
        "pass", "mail.good.test", "mail.good.test[192.0.2.10]", "pass")
    assert (await check("::ffff:192.0.2.10")).result == "pass"
    liar = await check("192.0.2.11")
    assert (liar.result, liar.name, liar.client) == ("fail", "liar.test",  # sorted
                                                     "unknown[192.0.2.11]")
    assert "do not resolve to 192.0.2.11" in liar.reason
    assert (await check("192.0.2.13")).result == "fail"           # the name is NXDOMAIN
    none = await check("192.0.2.77")
    assert (none.result, none.iprev) == ("none", "fail")
    slow = await check("192.0.2.12")
    assert (slow.result, slow.name) == ("temperror", "slow.test")
    v6 = await check(V6)
    assert (v6.result, v6.name) == ("pass", "v6.good.test")


def test_what_require_refuses() -> None:
    def code(result: str, require: str, name: str = "x.test") -> Any:
        reply = refusal(ReverseResult(result, "192.0.2.1", name), require)
        return reply and (reply.code, reply.status)
    assert code("pass", "yes") is None
    assert code("fail", "yes") == (550, "5.7.25")
    assert code("fail", "ptr") is None                  # a name, unconfirmed: enough
    assert code("none", "ptr") == (550, "5.7.25")
    assert code("temperror", "yes") == (450, "4.7.25")
    assert code("temperror", "ptr") is None             # the PTR answered
    assert code("temperror", "ptr", name="") == (450, "4.7.25")


# --- on a running LightMail ---------------------------------------------------------------

def server_for(tmp_path: Path, dns: DNSServer, extra: str = "") -> Any:
    return start(tmp_path, extra=f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n"
                 "[spf]\ntime_limit = 5s\n" + extra)


def send(port: int, sender: str = "ann@sender.test", helo: str = "client.sender.test",
         host: str = "127.0.0.1") -> Any:
    def go() -> Any:
        with smtplib.SMTP(host, port, timeout=30, local_hostname=helo) as smtp:
            try:
                smtp.sendmail(sender, ["bob@example.test"],
                              b"Subject: lists\r\n\r\nhello\r\n")
                return 250, ""
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients["bob@example.test"]
                return code, text.decode()
    return in_thread(go)


def header_of(message: bytes, name: str) -> list[str]:
    header = message.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n\t", " ")
    return [line.split(":", 1)[1].strip() for line in header.split("\r\n")
            if line.lower().startswith(name.lower() + ":")]


def listed_client(dns: DNSServer, zone: str, answer: str = "127.0.0.2") -> None:
    dns.set(f"1.0.0.127.{zone}", "A", [answer])
    dns.set(f"{LOOPBACK6_NAME}.{zone}", "A", [answer])


@pytest_twisted.inlineCallbacks
def test_weights_add_up_to_the_threshold(tmp_path: Path, dns: DNSServer,
                                         events: list[dict[str, Any]]) -> Any:
    listed_client(dns, "heavy.test")
    listed_client(dns, "weak.test", "127.0.0.4")
    listed_client(dns, "friendly.test", "127.0.0.2")
    server = yield server_for(tmp_path, dns, "[dnsbl]\nzones = heavy.test*2, "
                              "weak.test=127.0.0.[2..11], friendly.test*-1, unlisted.test\n"
                              "threshold = 3\n")
    try:
        # 2 + 1 - 1 = 2: under the threshold, accepted and marked.
        assert (yield send(server.ports["mx"])) == (250, "")
        [message] = yield server.delivered("bob@example.test", 1)
        [value] = header_of(message, "X-DNSBL")
        assert value.startswith("score=2 threshold=3; ")
        assert "heavy.test=127.0.0.2 client=127.0.0.1" in value
        assert "friendly.test=127.0.0.2 client=127.0.0.1" in value
        [said] = [e for e in events if e.get("event") == "dnsbl"]
        assert said["score"] == 2 and said["rcpt"] == "bob@example.test"
    finally:
        yield server.stop()
    dns.set("1.0.0.127.friendly.test", "A", [])              # 2 + 1 = 3
    (tmp_path / "again").mkdir()
    server = yield server_for(tmp_path / "again", dns, "[dnsbl]\nzones = heavy.test*2, "
                              "weak.test=127.0.0.[2..11], friendly.test*-1\nthreshold = 3\n")
    try:
        code, text = yield send(server.ports["mx"])
        assert (code, text) == (550, "5.7.1 Service unavailable; client [127.0.0.1] "
                                "blocked using heavy.test, weak.test")
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_timeouts_and_servfail_never_refuse(tmp_path: Path, dns: DNSServer,
                                            events: list[dict[str, Any]]) -> Any:
    listed_client(dns, "silent.test")
    listed_client(dns, "broken.test")
    dns.drop("1.0.0.127.silent.test.")
    dns.fail("1.0.0.127.broken.test.")
    server = yield server_for(tmp_path, dns, "[dnsbl]\nzones = silent.test, broken.test\n"
                              "timeout = 0.5s\n")
    try:
        assert (yield send(server.ports["mx"])) == (250, "")
        [message] = yield server.delivered("bob@example.test", 1)
        assert header_of(message, "X-DNSBL") == []
        assert {e["zone"] for e in events if e.get("event") == "dnsbl_error"} == {
            "silent.test", "broken.test"}
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_rhsbl_of_the_sender_and_the_helo_name(tmp_path: Path, dns: DNSServer) -> Any:
    server = yield server_for(tmp_path, dns, "[dnsbl]\nrhsbl_zones = dbl.test*2\n"
                              "threshold = 2\ncheck_helo = yes\n")
    try:
        port = server.ports["mx"]
        code, text = yield send(port, sender="ann@Spam.Example")
        assert (code, text) == (550, "5.7.1 Service unavailable; sender domain "
                                "spam.example blocked using dbl.test")
        code, text = yield send(port, helo="bad-helo.example")
        assert (code, text) == (550, "5.7.1 Service unavailable; HELO name "
                                "bad-helo.example blocked using dbl.test")
        assert (yield send(port)) == (250, "")
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_ipv6_clients_and_allowlisted_senders(tmp_path: Path, dns: DNSServer) -> Any:
    listed_client(dns, "bl.test")
    server = yield server_for(
        tmp_path, dns, "[dnsbl]\nzones = bl.test\n"
        "[listener:v6]\nprotocol = smtp\nendpoint = tcp6:0:interface=\\:\\:1\n")
    try:
        for name, host in (("mx", "127.0.0.1"), ("v6", "::1")):
            code, text = yield send(server.ports[name], host=host)
            assert (code, text) == (550, "5.7.1 Service unavailable; client "
                                    f"[{host}] blocked using bl.test")
        yield server.parts.access.add("allow", "sender", "friend@sender.test")
        assert (yield send(server.ports["v6"], sender="friend@sender.test",
                           host="::1")) == (250, "")
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_the_client_name_is_logged_and_required(tmp_path: Path, dns: DNSServer,
                                                events: list[dict[str, Any]]) -> Any:
    checks = "checks = access spf reverse dkim\n"
    server = yield server_for(
        tmp_path, dns, "[reverse]\nrequire = yes\ntimeout = 1s\n"
        "[listener:plain]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        + checks + "[listener:v6]\nprotocol = smtp\n"
        "endpoint = tcp6:0:interface=\\:\\:1\n" + checks)
    try:
        assert (yield send(server.ports["plain"])) == (250, "")
        [message] = yield server.delivered("bob@example.test", 1)
        [results] = header_of(message, "Authentication-Results")
        assert "iprev=pass (client.good.test) policy.iprev=127.0.0.1" in results
        named = [e for e in events if e.get("event") == "client_name"]
        assert named[0]["client"] == "client.good.test[127.0.0.1]"
        assert named[0]["fcrdns"] == "pass"
        # ::1's name does not resolve back (client6.test has no AAAA of it).
        dns.set("client6.test.", "AAAA", ["2001:db8::1"])
        code, text = yield send(server.ports["v6"], host="::1")
        assert (code, text) == (550, "5.7.25 Client host rejected: your hostname "
                                "client6.test does not resolve to [::1]")
        assert any(e.get("client") == "unknown[::1]" and e.get("fcrdns") == "fail"
                   for e in events)
        # DNS that does not answer: come back later.
        dns.drop(f"{LOOPBACK6_NAME}.ip6.arpa.")
        server.parts.resolver.resolver.cache.flush()         # type: ignore[attr-defined]
        code, text = yield send(server.ports["v6"], host="::1")
        assert (code, text) == (450, "4.7.25 Client host rejected: cannot find your "
                                "hostname, [::1]; try again later")
    finally:
        yield server.stop()


def test_what_a_check_keeps_goes_with_the_session() -> None:
    class Session:
        pass
    memo: SessionMemo[str] = SessionMemo()
    one, two = Session(), Session()
    memo.set(one, "a")
    memo.set(one, "b")
    memo.set(two, "c")
    assert (memo.get(one), memo.get(two), len(memo)) == ("b", "c", 2)
    del one
    gc.collect()
    assert len(memo) == 1 and memo.get(two) == "c"
    memo.forget(two)                                  # the chain's session_ended
    assert memo.get(two) is None and len(memo) == 0
