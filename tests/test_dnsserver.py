"""The test DNS server (tests/dnsserver.py), queried with dnspython's resolver and query."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
from dnsserver import DNSServer

ZONES: dict[str, dict[str, list[Any]]] = {
    "example.test.": {"MX": [(10, "mx1.example.test."), (20, "mx2.example.test.")]},
    "mx1.example.test.": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "mx2.example.test": {"A": ["127.0.0.2", "127.0.0.3"]},
    "nullmx.test.": {"MX": [(0, ".")]},
    "txt.test.": {"TXT": ["v=spf1 -all"]},
    "long.txt.test.": {"TXT": ["v=DKIM1; k=rsa; p=" + "A" * 400, ("one", "two")]},
    "alias.example.test.": {"CNAME": ["mx1.example.test."]},
    "alias2.example.test.": {"CNAME": ["alias.example.test."]},
    "away.example.test.": {"CNAME": ["mail.elsewhere.invalid."]},
    "dangling.example.test.": {"CNAME": ["missing.example.test."]},
    "loop1.example.test.": {"CNAME": ["loop2.example.test."]},
    "loop2.example.test.": {"CNAME": ["loop1.example.test."]},
    "_submission._tcp.example.test.": {"SRV": ["0 1 587 mx1.example.test."]},
    "a.b.deep.test.": {"A": ["127.0.0.9"]},
}


@pytest.fixture
def server() -> Iterator[DNSServer]:
    with DNSServer(ZONES, ttl=300) as running:
        yield running
    assert not running.errors


@pytest.fixture
def resolver(server: DNSServer) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port
    resolver.lifetime = 3
    return resolver


def ask(server: DNSServer, name: str, rtype: str, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rtype)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=3)
    return dns.query.udp(query, "127.0.0.1", port=server.port, timeout=3)


def texts(answer: dns.resolver.Answer) -> list[str]:
    return sorted(rdata.to_text() for rdata in answer)


# -- records ---------------------------------------------------------------------------------

def test_a_and_aaaa(resolver: dns.resolver.Resolver) -> None:
    answer = resolver.resolve("mx1.example.test.", "A")
    assert texts(answer) == ["127.0.0.1"]
    assert answer.rrset is not None and answer.rrset.ttl == 300
    assert texts(resolver.resolve("mx1.example.test", "AAAA")) == ["::1"]
    assert texts(resolver.resolve("MX2.Example.Test.", "A")) == ["127.0.0.2", "127.0.0.3"]


def test_mx_and_null_mx(resolver: dns.resolver.Resolver) -> None:
    answer = resolver.resolve("example.test.", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in answer) == [
        (10, "mx1.example.test."), (20, "mx2.example.test.")]
    null = list(resolver.resolve("nullmx.test.", "MX"))
    assert len(null) == 1
    assert null[0].preference == 0 and null[0].exchange == dns.name.root


def test_txt(resolver: dns.resolver.Resolver) -> None:
    answer = list(resolver.resolve("txt.test.", "TXT"))
    assert [r.strings for r in answer] == [(b"v=spf1 -all",)]
    long = {tuple(r.strings) for r in resolver.resolve("long.txt.test.", "TXT")}
    assert (b"one", b"two") in long
    dkim = next(s for s in long if s != (b"one", b"two"))
    assert [len(part) for part in dkim] == [255, 418 - 255]
    assert b"".join(dkim) == b"v=DKIM1; k=rsa; p=" + b"A" * 400


def test_cname_itself_and_followed(server: DNSServer, resolver: dns.resolver.Resolver) -> None:
    cname = resolver.resolve("alias.example.test.", "CNAME")
    assert texts(cname) == ["mx1.example.test."]
    answer = resolver.resolve("alias2.example.test.", "A")
    assert texts(answer) == ["127.0.0.1"]
    assert answer.canonical_name.to_text() == "mx1.example.test."
    response = ask(server, "alias2.example.test.", "AAAA")
    assert [(r.name.to_text(), dns.rdatatype.to_text(r.rdtype)) for r in response.answer] == [
        ("alias2.example.test.", "CNAME"), ("alias.example.test.", "CNAME"),
        ("mx1.example.test.", "AAAA")]
    # The chain leaves the server's data: only the CNAME, for the client to go on.
    away = ask(server, "away.example.test.", "A")
    assert away.rcode() == dns.rcode.NOERROR and len(away.answer) == 1
    # The chain ends at a missing name of ours: NXDOMAIN (RFC 6604), with the CNAME.
    dangling = ask(server, "dangling.example.test.", "A")
    assert dangling.rcode() == dns.rcode.NXDOMAIN and len(dangling.answer) == 1
    assert ask(server, "loop1.example.test.", "A").rcode() == dns.rcode.SERVFAIL


def test_other_types_from_text(resolver: dns.resolver.Resolver) -> None:
    srv = list(resolver.resolve("_submission._tcp.example.test.", "SRV"))
    assert [(r.port, r.target.to_text()) for r in srv] == [(587, "mx1.example.test.")]


def test_authoritative_flag(server: DNSServer) -> None:
    for name, rtype in [("example.test.", "MX"), ("nope.test.", "A"), ("txt.test.", "A")]:
        assert ask(server, name, rtype).flags & dns.flags.AA


# -- negative answers --------------------------------------------------------------------------

def test_nxdomain_with_soa(server: DNSServer, resolver: dns.resolver.Resolver) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("nope.example.test.", "A")
    response = ask(server, "nope.example.test.", "A")
    assert response.rcode() == dns.rcode.NXDOMAIN and not response.answer
    [soa] = response.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name.to_text() == "example.test."
    assert soa.ttl == 300 and soa[0].minimum == 300
    assert ask(server, "nope.test.", "A").authority[0].name.to_text() == "test."


def test_nodata_with_soa(server: DNSServer, resolver: dns.resolver.Resolver) -> None:
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("mx1.example.test.", "MX")
    response = ask(server, "txt.test.", "A")
    assert response.rcode() == dns.rcode.NOERROR and not response.answer
    assert [r.rdtype for r in response.authority] == [dns.rdatatype.SOA]
    # An empty non-terminal exists: NODATA, not NXDOMAIN.
    assert ask(server, "b.deep.test.", "A").rcode() == dns.rcode.NOERROR
    assert ask(server, "c.b.deep.test.", "A").rcode() == dns.rcode.NXDOMAIN


def test_negative_answers_are_cached(server: DNSServer, resolver: dns.resolver.Resolver) -> None:
    resolver.cache = dns.resolver.Cache()
    for _ in range(2):
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve("nope.example.test.", "A")
        with pytest.raises(dns.resolver.NoAnswer):
            resolver.resolve("mx1.example.test.", "MX")
        resolver.resolve("example.test.", "MX")
    assert server.queries == [("nope.example.test.", "A"), ("mx1.example.test.", "MX"),
                              ("example.test.", "MX")]


def test_negative_ttl_and_given_soa() -> None:
    zones = {"zone.test.": {"SOA": ["ns.zone.test. admin.zone.test. 7 1 1 1 42"]},
             "a.sub.zone.test.": {"A": ["127.0.0.1"]}}
    with DNSServer(zones, negative_ttl=5) as server:
        soa = ask(server, "x.sub.zone.test.", "A").authority[0]
        assert soa.name.to_text() == "zone.test." and soa[0].serial == 7
        with DNSServer({"a.test.": {"A": ["127.0.0.1"]}}, negative_ttl=5) as other:
            made = ask(other, "a.test.", "MX").authority[0]
            assert made.ttl == 5 and made[0].minimum == 5


# -- changes while running ----------------------------------------------------------------------

def test_servfail_and_other_rcodes(server: DNSServer, resolver: dns.resolver.Resolver) -> None:
    server.fail("example.test.")
    response = ask(server, "example.test.", "MX")
    assert response.rcode() == dns.rcode.SERVFAIL and not response.answer
    with pytest.raises(dns.resolver.NoNameservers):
        resolver.resolve("example.test.", "MX")
    assert ask(server, "mx1.example.test.", "A").rcode() == dns.rcode.NOERROR
    server.fail("example.test", "REFUSED")
    assert ask(server, "example.test.", "A").rcode() == dns.rcode.REFUSED
    server.fail("example.test.", dns.rcode.NXDOMAIN)
    assert ask(server, "example.test.", "MX").rcode() == dns.rcode.NXDOMAIN
    server.fail("example.test.", None)
    assert len(resolver.resolve("example.test.", "MX")) == 2


def test_set_and_remove(server: DNSServer, resolver: dns.resolver.Resolver) -> None:
    server.set("mx1.example.test.", "A", ["192.0.2.7"])
    assert texts(resolver.resolve("mx1.example.test.", "A")) == ["192.0.2.7"]
    server.set("new.test", "MX", ["5 mx1.example.test."], ttl=30)
    answer = resolver.resolve("new.test.", "MX")
    assert texts(answer) == ["5 mx1.example.test."]
    assert answer.rrset is not None and answer.rrset.ttl == 30
    server.set("mx1.example.test.", "A", [])
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("mx1.example.test.", "A")
    server.remove("mx1.example.test.")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("mx1.example.test.", "AAAA")


def test_queries_are_recorded(server: DNSServer, resolver: dns.resolver.Resolver) -> None:
    resolver.resolve("Example.TEST", "MX")
    ask(server, "txt.test.", "TXT", tcp=True)
    assert server.queries == [("example.test.", "MX"), ("txt.test.", "TXT")]


def test_drop_leaves_the_client_waiting(server: DNSServer) -> None:
    server.drop("txt.test.")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(dns.message.make_query("txt.test.", "TXT"), "127.0.0.1",
                      port=server.port, timeout=0.3)
    server.drop("txt.test.", False)
    assert ask(server, "txt.test.", "TXT").answer


def test_garbage_gets_formerr(server: DNSServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 10, ("127.0.0.1", server.port))
        reply = sock.recv(512)
    assert reply[:2] == b"\x12\x34" and reply[2] & 0x80 and reply[3] & 0x0F == dns.rcode.FORMERR


# -- TCP ----------------------------------------------------------------------------------------

def test_tcp_queries(server: DNSServer) -> None:
    response = ask(server, "example.test.", "MX", tcp=True)
    assert response.flags & dns.flags.AA
    assert sorted(r.to_text() for r in response.answer[0]) == [
        "10 mx1.example.test.", "20 mx2.example.test."]
    assert ask(server, "nope.test.", "A", tcp=True).rcode() == dns.rcode.NXDOMAIN
    server.fail("txt.test.")
    assert ask(server, "txt.test.", "TXT", tcp=True).rcode() == dns.rcode.SERVFAIL


def test_tcp_several_queries_on_one_connection(server: DNSServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
        for name in ["mx1.example.test.", "mx2.example.test."]:
            query = dns.message.make_query(name, "A")
            dns.query.send_tcp(sock, query)
            response, _ = dns.query.receive_tcp(sock)
            assert response.id == query.id and response.answer[0].name.to_text() == name


def test_big_answer_is_truncated_over_udp_and_complete_over_tcp(
        server: DNSServer, resolver: dns.resolver.Resolver) -> None:
    server.set("big.test.", "TXT", [f"record {n:03} " + "x" * 60 for n in range(40)])
    query = dns.message.make_query("big.test.", "TXT")
    truncated = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=3,
                              ignore_trailing=True, raise_on_truncation=False)
    assert truncated.flags & dns.flags.TC and not truncated.answer
    assert len(resolver.resolve("big.test.", "TXT")) == 40      # retried over TCP
    assert len(ask(server, "big.test.", "TXT", tcp=True).answer[0]) == 40


# -- start and stop -----------------------------------------------------------------------------

def test_udp_and_tcp_share_the_port(server: DNSServer) -> None:
    udp, tcp = server.sockets
    assert udp.type == socket.SOCK_DGRAM and tcp.type == socket.SOCK_STREAM
    assert udp.getsockname() == tcp.getsockname() == ("127.0.0.1", server.port)


def test_stop_ends_threads_and_closes_sockets() -> None:
    server = DNSServer(ZONES).start()
    port = server.port
    assert ask(server, "txt.test.", "TXT").answer
    # A client that keeps its TCP connection open does not hold stop() up.
    idle = socket.create_connection(("127.0.0.1", port), timeout=3)
    dns.query.send_tcp(idle, dns.message.make_query("txt.test.", "TXT"))
    dns.query.receive_tcp(idle)
    threads, sockets = server.threads, server.sockets
    assert len(threads) == 3 and all(t.is_alive() for t in threads)
    server.stop()
    assert not any(t.is_alive() for t in server.threads + threads)
    assert all(s.fileno() == -1 for s in sockets)
    assert idle.recv(1) == b""      # the server closed its end
    idle.close()
    server.stop()                   # a second stop does nothing
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))      # the port is free again
    with pytest.raises(RuntimeError):
        server.start()
