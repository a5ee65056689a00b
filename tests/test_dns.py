"""LightMail's resolver (lightmail/dns.py) against the test DNS server: the lookups
the policy checks use (A and AAAA apart, PTR, TXT as bytes), NXDOMAIN told from
NODATA, server failures and timeouts as temporary errors, names DNS cannot carry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from dnsserver import DNSServer
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from lightmail.dns import IResolver, NoSuchDomain, Resolver, TemporaryDNSError

GIANT = b"v=spf1 " + b" ".join(b"ip4:10.%d.%d.0/24" % divmod(i, 256) for i in range(2000))
ZONES: dict[str, dict[str, list[Any]]] = {
    "host.test.": {"A": ["192.0.2.1", "192.0.2.2"], "AAAA": ["2001:db8::1"],
                   "TXT": ["v=spf1 -all", ("v=spf1 ", "ip4:192.0.2.1", " -all")],
                   "MX": [(10, "host.test.")]},
    "v4only.test.": {"A": ["192.0.2.9"]},
    "1.2.0.192.in-addr.arpa.": {"PTR": ["host.test.", "other.test."]},
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.":
        {"PTR": ["host.test."]},
    "latin.test.": {"TXT": [b"v=spf1 \xe9 -all"]},
    "giant.test.": {"TXT": [GIANT, "unrelated"]},
    r"back\\slash.test.": {"A": ["192.0.2.7"]},    # one label: "back\slash"
    "servfail.test.": {"A": ["192.0.2.8"]},
    "dropped.test.": {"A": ["192.0.2.8"]},
}


@pytest.fixture
def server() -> Iterator[DNSServer]:
    with DNSServer(ZONES, ttl=300) as running:
        running.fail("servfail.test.")
        running.drop("dropped.test.")
        yield running
    assert not running.errors


@pytest.fixture
def resolver(server: DNSServer) -> Resolver:
    return Resolver(f"127.0.0.1:{server.port}", timeout=1.5)


async def _failure(d: Deferred[Any]) -> BaseException:
    try:
        await d
    except Exception as exc:
        return exc
    raise AssertionError("the lookup did not fail")


@pytest_twisted.ensureDeferred
async def test_addresses_names_and_texts(resolver: Resolver) -> None:
    assert verifyObject(IResolver, resolver)
    assert sorted(await resolver.a("host.test")) == ["192.0.2.1", "192.0.2.2"]
    assert await resolver.aaaa("host.test.") == ["2001:db8::1"]
    assert sorted(await resolver.ptr("192.0.2.1")) == ["host.test", "other.test"]
    assert await resolver.ptr("2001:db8::1") == ["host.test"]
    assert await resolver.ptr("::ffff:192.0.2.1") != []      # the IPv4 name
    assert sorted(await resolver.txt_records("host.test")) == [
        b"v=spf1 -all", b"v=spf1 ip4:192.0.2.1 -all"]         # strings joined as sent
    assert await resolver.txt_records("latin.test") == [b"v=spf1 \xe9 -all"]
    assert await resolver.mx("host.test") == [(10, "host.test")]
    # A backslash is a character of the name, not a zone-file escape.
    assert await resolver.a("back\\slash.test") == ["192.0.2.7"]


@pytest_twisted.ensureDeferred
async def test_no_such_name_is_told_from_no_records(resolver: Resolver,
                                                    server: DNSServer) -> None:
    assert await resolver.aaaa("v4only.test") == []           # NODATA
    assert await resolver.txt_records("v4only.test") == []
    for lookup in (resolver.a, resolver.aaaa, resolver.txt_records, resolver.mx):
        assert isinstance(await _failure(lookup("missing.test")), NoSuchDomain)
    assert isinstance(await _failure(resolver.ptr("192.0.2.99")), NoSuchDomain)
    assert isinstance(await _failure(resolver.ptr("not an address")), NoSuchDomain)
    # Names no query can carry exist nowhere, and are not asked.
    asked = len(server.queries)
    for name in ("a..b.test", "x" * 64 + ".test", ("a" * 60 + ".") * 5 + "test"):
        assert isinstance(await _failure(resolver.a(name)), NoSuchDomain), name
    assert len(server.queries) == asked
    # The outbound MTA's lookups keep their meaning: no TXT record is [].
    assert await resolver.txt("missing.test") == []


@pytest_twisted.ensureDeferred
async def test_a_list_entry_that_does_not_exist_is_not_listed(resolver: Resolver,
                                                              server: DNSServer) -> None:
    """list_entry (the DNSBL lookups): NXDOMAIN is [] (asked, then from the cache, at
    once), an entry its addresses; a failure of the server stays a failure."""
    assert sorted(await resolver.list_entry("host.test")) == ["192.0.2.1", "192.0.2.2"]
    assert await resolver.list_entry("missing.test") == []
    asked = len(server.queries)
    again = resolver.list_entry("missing.test")
    assert again.called and again.result == []         # the cached NXDOMAIN, no failure
    again.addCallback(lambda _: None)
    assert len(server.queries) == asked
    assert isinstance(await _failure(resolver.list_entry("servfail.test")),
                      TemporaryDNSError)


@pytest_twisted.ensureDeferred
async def test_failures_and_timeouts_are_temporary(resolver: Resolver) -> None:
    for lookup in (resolver.a, resolver.txt_records):
        error = await _failure(lookup("servfail.test"))
        assert isinstance(error, TemporaryDNSError), error
    error = await _failure(resolver.aaaa("dropped.test"))
    assert isinstance(error, TemporaryDNSError) and "Timeout" in str(error), error


@pytest_twisted.ensureDeferred
async def test_a_giant_txt_record_comes_whole_over_tcp(resolver: Resolver,
                                                       server: DNSServer) -> None:
    assert len(GIANT) > 30000
    records = await resolver.txt_records("giant.test")
    assert sorted(records) == sorted([GIANT, b"unrelated"])


@pytest_twisted.ensureDeferred
async def test_cached_positive_answers_come_back_at_once_until_their_ttl_ends() -> None:
    """A cached answer needs no hop to the thread pool (the Deferred has fired when
    it is returned), a negative one (NXDOMAIN, NODATA) neither; one whose TTL has run
    out is looked up again in a thread."""
    import time

    with DNSServer({"cached.test.": {"TXT": ["v=spf1 -all"], "A": ["192.0.2.1"]}},
                   ttl=1) as server:
        resolver = Resolver(f"127.0.0.1:{server.port}", timeout=2)
        first = resolver.txt_records("cached.test")
        assert not first.called                       # a miss: looked up in a thread
        assert await first == [b"v=spf1 -all"]
        again = resolver.txt_records("cached.test")
        assert again.called and await again == [b"v=spf1 -all"]
        assert await resolver.a("cached.test") == ["192.0.2.1"]
        assert resolver.a("cached.test").called
        missing = resolver.txt_records("nowhere.test")
        assert not missing.called
        with pytest.raises(NoSuchDomain):
            await missing
        # Negative answers are cached too, and come back at once the same way.
        for _ in range(2):                  # (the second from what _cached kept aside)
            again_missing = resolver.txt_records("nowhere.test")
            assert again_missing.called
            with pytest.raises(NoSuchDomain):
                await again_missing
        assert await resolver.a("cached.test") == ["192.0.2.1"]   # kept aside too
        assert await resolver.aaaa("cached.test") == []          # NODATA
        nodata = resolver.aaaa("cached.test")
        assert nodata.called and await nodata == []
        server.set("cached.test.", "TXT", ["v=spf1 +all"])
        time.sleep(1.2)                               # the TTL of 1 s runs out
        later = resolver.txt_records("cached.test")
        assert not later.called
        assert await later == [b"v=spf1 +all"]
