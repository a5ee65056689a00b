"""The PROXY protocol on LightMail's listeners (lightmail/proxyproto/).

The parser against hand-made headers of both versions, Twisted's own parsers (on
the headers both take) and arbitrary octets; the trust rules and timeouts on an
in-memory transport; then real sockets: a hand-made header to an in-process server,
and a real HAProxy (Debian's, tests/haproxypeer.py) in front of SMTP, IMAP with
STARTTLS and implicit TLS, whose client connects from 127.0.0.2 while HAProxy
connects from 127.0.0.1.
"""

from __future__ import annotations

import imaplib
import ipaddress
import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from zope.interface import implementer

from lightmail.config import ConfigError, ListenerConfig, parse_config
from lightmail.metrics.interfaces import IProtocolMeters
from lightmail.metrics.registry import Uncounted
from lightmail.proxyproto.header import (
    V2_SIGNATURE,
    HeaderError,
    ProxyHeader,
    looks_like_header,
    read_header,
)
from lightmail.proxyproto.listener import PROXY_HEADER, ProxyHeaderFactory, ProxyTrust
from tests.haproxypeer import HAProxy, Route
from tests.inprocess import in_thread, start

BOTH = frozenset({1, 2})
CLIENT = "127.0.0.2"            # the client's source address, through HAProxy


def v2(command: int = 1, family: int = 0x11, block: bytes = b"", version: int = 2) -> bytes:
    return (V2_SIGNATURE + bytes([version << 4 | command, family])
            + len(block).to_bytes(2, "big") + block)


def inet(source: str, destination: str, sport: int, dport: int) -> bytes:
    return (ipaddress.ip_address(source).packed + ipaddress.ip_address(destination).packed
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


# -- the header --------------------------------------------------------------------


V1_TCP4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 993\r\n"
V2_TCP4 = v2(block=inet("192.0.2.7", "198.51.100.1", 56324, 25))
V2_TCP6 = v2(family=0x21, block=inet("2001:db8::7", "2001:db8::1", 56324, 993))


@pytest.mark.parametrize("header, source, destination", [
    (V1_TCP4, ("192.0.2.7", 56324), ("198.51.100.1", 25)),
    (V1_TCP6, ("2001:db8::7", 56324), ("2001:db8::1", 993)),
    (V2_TCP4, ("192.0.2.7", 56324), ("198.51.100.1", 25)),
    (V2_TCP6, ("2001:db8::7", 56324), ("2001:db8::1", 993)),
    # TLVs (HAProxy's ALPN, authority, unique id...) are skipped.
    (v2(block=inet("192.0.2.7", "198.51.100.1", 1, 2) + tlv(0x01, b"smtp")
        + tlv(0x05, b"x" * 300)), ("192.0.2.7", 1), ("198.51.100.1", 2)),
    # An IPv4-mapped IPv6 address is its IPv4 address, as the limits key on it.
    (v2(family=0x21, block=inet("::ffff:192.0.2.7", "::ffff:198.51.100.1", 1, 2)),
     ("192.0.2.7", 1), ("198.51.100.1", 2)),
    (b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1 2\r\n", ("192.0.2.7", 1),
     ("2001:db8::1", 2)),
])
def test_headers_of_both_versions_name_the_client(header: bytes, source: tuple[str, int],
                                                  destination: tuple[str, int]) -> None:
    rest = b"EHLO client.example\r\n"
    found = read_header(header + rest, BOTH)
    assert found == ProxyHeader(1 if header.startswith(b"PROXY") else 2, source,
                                destination, len(header))
    version = frozenset({found.version})
    assert read_header(header, version) == found


@pytest.mark.parametrize("header", [
    v2(command=0),                                          # LOCAL: a health check
    v2(command=0, block=inet("192.0.2.7", "198.51.100.1", 1, 2)),   # its block skipped
    v2(family=0x00),                                        # PROXY, UNSPEC
    v2(family=0x31, block=b"/run/client.sock".ljust(216, b"\0")),   # a Unix socket
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN 192.0.2.7 198.51.100.1 1 2\r\n",        # the rest is ignored
])
def test_a_header_that_names_no_client_leaves_the_connections_own(header: bytes) -> None:
    found = read_header(header + b"rest", BOTH)
    assert found is not None and found.source is None and found.length == len(header)


@pytest.mark.parametrize("header", [V1_TCP4, V1_TCP6, V2_TCP4, V2_TCP6,
                                    v2(command=0), b"PROXY UNKNOWN\r\n"])
def test_a_header_split_over_reads_is_read_whole(header: bytes) -> None:
    for cut in range(len(header)):
        assert read_header(header[:cut], BOTH) is None, cut
    assert read_header(header, BOTH) is not None


@pytest.mark.parametrize("header", [V1_TCP4, V1_TCP6, V2_TCP4, V2_TCP6])
def test_it_agrees_with_twisted_parsers_on_the_headers_both_take(header: bytes) -> None:
    ours = read_header(header, BOTH)
    assert ours is not None and ours.source is not None and ours.destination is not None
    if header.startswith(b"PROXY"):
        theirs = V1Parser.parse(header[:-2])
    else:
        theirs = V2Parser.parse(header)
    assert theirs.source is not None and theirs.destination is not None
    for mine, twisted_address in ((ours.source, theirs.source),
                                  (ours.destination, theirs.destination)):
        assert ipaddress.ip_address(mine[0]) == ipaddress.ip_address(twisted_address.host)
        assert mine[1] == twisted_address.port


@pytest.mark.parametrize("data, reason", [
    (b"EHLO client.example\r\n", "no PROXY header"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "no PROXY header"),   # a ClientHello
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 99999\r\n", "bad port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 25\r\n", "bad port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 \xd9\xa3 25\r\n", "not ASCII"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 \xd9\xa3 25\r\n".decode("latin-1")
     .encode("utf-8"), "not ASCII"),
    (b"PROXY TCP4 192.0.2.300 198.51.100.1 1 25\r\n", "bad address"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 1 25\r\n", "bad address"),
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 1 25\r\n", "bad address"),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 25\r\n", "scoped"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n", "malformed"),
    (b"PROXY TCP4  192.0.2.7 198.51.100.1 1 25\r\n", "malformed"),
    (b"PROXY TCP5 192.0.2.7 198.51.100.1 1 25\r\n", "malformed"),
    (b"PROXY " + b"x" * 101 + b"\r\n", "longer than 107"),
    (b"PROXY TCP4 " + b"1" * 200, "longer than 107"),
    (v2(version=1), "version 1 after"),
    (v2(command=2), "unknown command"),
    (v2(family=0x12, block=inet("192.0.2.7", "198.51.100.1", 1, 2)), "datagram"),
    (v2(family=0x41), "unknown family"),
    (v2(family=0x13), "unknown family"),
    (v2(block=inet("192.0.2.7", "198.51.100.1", 1, 2)[:10]), "cut short"),
    (v2(family=0x21, block=inet("192.0.2.7", "198.51.100.1", 1, 2)), "cut short"),
])
def test_what_is_no_header_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(HeaderError, match=reason):
        read_header(data, BOTH)


def test_a_listener_takes_only_the_versions_it_is_set_to() -> None:
    with pytest.raises(HeaderError, match="version 1 PROXY header; this listener takes "
                                          "version 2"):
        read_header(V1_TCP4, frozenset({2}))
    with pytest.raises(HeaderError, match="version 2 PROXY header; this listener takes "
                                          "version 1"):
        read_header(V2_TCP4, frozenset({1}))
    # Not sure yet: a version 2 listener waits for the whole v1 start, and so on.
    assert read_header(b"PROX", frozenset({2})) is None
    assert read_header(V2_SIGNATURE[:5], frozenset({1})) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([b"", V2_SIGNATURE, b"PROXY ",
                                                 b"PROXY TCP4 ", V2_SIGNATURE + b"\x21"]))
def test_any_octets_are_a_header_not_yet_one_or_a_reason(data: bytes, start: bytes) -> None:
    for versions in (BOTH, frozenset({1}), frozenset({2})):
        try:
            found = read_header(start + data, versions)
        except HeaderError as exc:
            assert str(exc)
            continue
        if found is not None:
            assert 0 < found.length <= len(start + data)
            for endpoint in (found.source, found.destination):
                if endpoint is not None:
                    ipaddress.ip_address(endpoint[0])
                    assert 0 <= endpoint[1] <= 65535


def test_a_header_is_told_from_a_clients_first_octets() -> None:
    for header in (V1_TCP4, V1_TCP6, V2_TCP4, b"PROXY UNKNOWN\r\n"):
        assert looks_like_header(header) is True
        assert looks_like_header(header[:5]) is None
    for data in (b"EHLO x\r\n", b"PROXY LOGIN bob secret\r\n", b"a1 LOGIN x y\r\n",
                 b"\x16\x03\x01", b"PROXY\r\n"):
        assert looks_like_header(data) is False


# -- the trust rules, on an in-memory transport --------------------------------------


class Recorder(Protocol):
    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.received: list[bytes] = []
        self.peer: Any = None
        self.lost = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class Recording(Factory):
    def __init__(self, refuse: bool = False) -> None:
        self.built: list[Recorder] = []
        self.refuse = refuse

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        if self.refuse:
            return None
        proto = Recorder(addr)
        self.built.append(proto)
        return proto


@implementer(IProtocolMeters)
class Refusals(Uncounted):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def connection_refused(self, reason: str) -> None:
        self.reasons.append(reason)


def listener(proxy_protocol: str = "v2", proxy_from: tuple[str, ...] = ("10.0.0.0/8",),
             timeout: float = 5.0) -> ListenerConfig:
    return ListenerConfig(name="mx", protocol="smtp", endpoint="tcp:25",
                          proxy_protocol=proxy_protocol, proxy_from=proxy_from,
                          proxy_timeout=timeout)


class Rig:
    """A ProxyHeaderFactory over a recording factory, a clock and its log."""

    def __init__(self, proxy_protocol: str = "v2", refuse: bool = False) -> None:
        self.inner = Recording(refuse)
        self.meters = Refusals()
        self.clock = Clock()
        self.trust = ProxyTrust(listener(proxy_protocol))
        self.factory = ProxyHeaderFactory(self.inner, self.trust, self.meters, self.clock)

    def connect(self, host: str = "10.0.0.5") -> tuple[Any, StringTransport]:
        addr = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 40000)
        proto = self.factory.buildProtocol(addr)
        assert proto is not None
        transport = StringTransport(hostAddress=IPv4Address("TCP", "10.0.0.1", 25),
                                    peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport


def refusals(events: list[dict[str, Any]]) -> list[str]:
    """The warnings of connections closed for their header."""
    return [formatEvent(event) for event in events
            if event.get("log_namespace", "").startswith("lightmail.proxyproto")
            and event.get("log_level") == LogLevel.warn]


def test_a_balancers_header_names_the_client_even_in_pieces() -> None:
    rig = Rig()
    proto, transport = rig.connect()
    data = V2_TCP4 + b"EHLO client.example\r\n"
    for octet in range(len(V2_TCP4) - 1):
        proto.dataReceived(data[octet:octet + 1])
        assert rig.inner.built == []            # no session before the whole header
    proto.dataReceived(data[len(V2_TCP4) - 1:])
    (session,) = rig.inner.built
    assert session.addr == IPv4Address("TCP", "192.0.2.7", 56324)
    assert session.peer == session.addr and proto.getPeer() == session.addr
    assert proto.getHost() == IPv4Address("TCP", "198.51.100.1", 25)
    assert b"".join(session.received) == b"EHLO client.example\r\n"
    proto.dataReceived(b"QUIT\r\n")
    assert session.received[-1] == b"QUIT\r\n"
    proto.write(b"221 bye\r\n")
    assert transport.value() == b"221 bye\r\n"
    proto.connectionLost(None)
    assert session.lost and not rig.clock.getDelayedCalls()


def test_a_health_check_keeps_the_balancers_own_address() -> None:
    rig = Rig("any")
    proto, _ = rig.connect()
    proto.dataReceived(v2(command=0))
    proto.dataReceived(b"QUIT\r\n")
    (session,) = rig.inner.built
    assert session.addr == IPv4Address("TCP", "10.0.0.5", 40000)
    assert proto.getHost() == IPv4Address("TCP", "10.0.0.1", 25)
    proto, _ = rig.connect()
    proto.dataReceived(b"PROXY UNKNOWN\r\n")
    assert rig.inner.built[1].addr == IPv4Address("TCP", "10.0.0.5", 40000)


@pytest.mark.parametrize("data, reason", [
    (b"EHLO client.example\r\n", "no PROXY header"),        # a client, not the balancer
    (V1_TCP4, "this listener takes version 2"),
    (v2(family=0x21, block=b"short"), "cut short"),
])
def test_a_balancers_connection_without_a_good_header_is_closed(data: bytes,
                                                                reason: str) -> None:
    rig = Rig()
    with capturedLogs() as events:
        proto, transport = rig.connect()
        proto.dataReceived(data)
        proto.dataReceived(b"more")             # after the refusal: ignored
    assert transport.disconnecting and transport.value() == b""
    assert rig.inner.built == [] and rig.meters.reasons == [PROXY_HEADER]
    (line,) = refusals(events)
    assert "10.0.0.5" in line and "mx" in line and reason in line


def test_a_balancers_connection_that_says_nothing_is_timed_out() -> None:
    rig = Rig()
    with capturedLogs() as events:
        proto, transport = rig.connect()
        rig.clock.advance(4.9)
        assert not transport.disconnecting
        proto.dataReceived(V2_TCP4[:10])        # a part is not enough
        rig.clock.advance(0.2)
    assert transport.disconnecting and rig.inner.built == []
    (line,) = refusals(events)
    assert "no PROXY header within 5s (10 octets of one)" in line


def test_a_balancers_check_that_closes_at_once_is_no_warning() -> None:
    rig = Rig()
    with capturedLogs() as events:
        proto, _ = rig.connect()
        proto.connectionLost(None)
    assert refusals(events) == [] and not rig.clock.getDelayedCalls()
    assert rig.meters.reasons == []


def test_anyone_else_is_served_at_once_as_themselves() -> None:
    rig = Rig()
    proto, _ = rig.connect("192.0.2.99")
    (session,) = rig.inner.built                # no waiting for a header
    assert session.addr == IPv4Address("TCP", "192.0.2.99", 40000)
    proto.dataReceived(b"PROX")                 # not yet told from a header...
    assert session.received == []
    proto.dataReceived(b"Y\r\n")                # ...now it is: passed on whole
    proto.dataReceived(b"EHLO x\r\n")
    assert session.received == [b"PROXY\r\n", b"EHLO x\r\n"]
    proto, _ = rig.connect("192.0.2.99")
    proto.dataReceived(b"PROXY LOGIN bob secret\r\n")   # an IMAP tag, no header
    assert rig.inner.built[1].received == [b"PROXY LOGIN bob secret\r\n"]
    assert not rig.clock.getDelayedCalls()


@pytest.mark.parametrize("pieces", [[V1_TCP4], [b"PRO", b"XY TC", b"P4 192"],
                                    [V2_TCP4], [V2_SIGNATURE[:3], V2_SIGNATURE[3:]]])
def test_a_header_from_anyone_else_closes_the_connection(pieces: list[bytes]) -> None:
    rig = Rig()
    with capturedLogs() as events:
        proto, transport = rig.connect("192.0.2.99")
        for piece in pieces:
            proto.dataReceived(piece)
    (session,) = rig.inner.built
    assert transport.disconnecting and session.received == []
    (line,) = refusals(events)
    assert "192.0.2.99" in line and "not in proxy_from" in line
    assert rig.meters.reasons == [PROXY_HEADER]


def test_trust_is_by_network_and_follows_a_reload() -> None:
    trust = ProxyTrust(listener(proxy_from=("10.0.0.0/8", "2001:db8::/32")))
    assert trust.trusts(IPv4Address("TCP", "10.1.2.3", 1))
    assert trust.trusts(IPv6Address("TCP", "::ffff:10.1.2.3", 1))
    assert trust.trusts(IPv6Address("TCP", "2001:db8::5", 1))
    assert not trust.trusts(IPv4Address("TCP", "192.0.2.1", 1))
    trust.follow(listener(proxy_from=("192.0.2.1",), timeout=1.0))
    assert trust.trusts(IPv4Address("TCP", "192.0.2.1", 1)) and trust.timeout == 1.0
    assert not trust.trusts(IPv4Address("TCP", "10.1.2.3", 1))


def test_the_listener_may_refuse_the_client_the_header_names() -> None:
    rig = Rig(refuse=True)
    proto, transport = rig.connect()
    proto.dataReceived(V2_TCP4)
    assert transport.disconnecting


@pytest_twisted.inlineCallbacks
def test_a_reload_changes_the_balancers_and_the_timeout_not_the_version(
        tmp_path: Path) -> Any:
    from lightmail.reload.parts import ListenerPart
    from lightmail.reload.settle import settle
    path = tmp_path / "lightmail.conf"
    text = ("[listener:mx]\nprotocol = smtp\nendpoint = tcp:2525\nproxy_protocol = v2\n"
            "proxy_from = 192.0.2.1\n")
    started = parse_config(text, str(path))
    text = text.replace("192.0.2.1", "192.0.2.2").replace("v2", "any") + "proxy_timeout = 1s\n"
    path.write_text(text)
    settled = settle(started, parse_config(text, str(path)))
    (mx,) = settled.config.listeners
    assert (mx.proxy_protocol, mx.proxy_from, mx.proxy_timeout) == ("v2", ("192.0.2.2",), 1.0)
    assert settled.restart == (f"{path}:4: [listener:mx] proxy_protocol: needs a restart",)
    trust = ProxyTrust(started.listeners[0])
    switch = yield ListenerPart("mx", proxy=trust).prepare(settled.config)
    switch()
    assert trust.trusts(IPv4Address("TCP", "192.0.2.2", 1))
    assert not trust.trusts(IPv4Address("TCP", "192.0.2.1", 1))
    assert (trust.versions, trust.timeout) == (frozenset({2}), 1.0)


@pytest.mark.parametrize("lines, message", [
    ("proxy_protocol = v2\n", "needs 'proxy_from'"),
    ("proxy_from = 127.0.0.1\n", "proxy_protocol = no"),
    ("proxy_protocol = v3\nproxy_from = 127.0.0.1\n", "expected one of no, v1, v2, any"),
    ("proxy_protocol = v2\nproxy_from = balancer.example\n", "not an IP address"),
])
def test_the_settings_are_checked(lines: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config("[listener:mx]\nprotocol = smtp\nendpoint = tcp:25\n" + lines)


def test_the_settings_are_read_and_not_for_a_unix_socket() -> None:
    with pytest.raises(ConfigError, match="Unix socket"):
        parse_config("[listener:lmtp]\nprotocol = lmtp\nendpoint = unix:/run/l.sock\n"
                     "proxy_protocol = v1\nproxy_from = 127.0.0.1\n")
    config = parse_config("[listener:mx]\nprotocol = smtp\nendpoint = tcp:25\n"
                          "proxy_protocol = any\nproxy_from = 192.0.2.1, 2001:db8::/32\n"
                          "proxy_timeout = 2s\n")
    (mx,) = config.listeners
    assert (mx.proxy_protocol, mx.proxy_from, mx.proxy_timeout) == (
        "any", ("192.0.2.1", "2001:db8::/32"), 2.0)


# -- real sockets ------------------------------------------------------------------


def proxied_listeners(tmp: Path, timeout: str = "5s") -> str:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    tls = f"tls_cert = {cert}\ntls_key = {key}\n"
    proxy = f"proxy_from = 127.0.0.1\nproxy_timeout = {timeout}\n"
    return ("[access]\nrefresh = 0s\n"
            "[listener:proxied_mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
            "proxy_protocol = v2\n" + proxy +
            "[listener:proxied_imap]\nprotocol = imap\n"
            "endpoint = tcp:0:interface=127.0.0.1\ntls = starttls\n" + tls +
            "proxy_protocol = v2\n" + proxy +
            "[listener:proxied_submissions]\nprotocol = submission\n"
            "endpoint = tcp:0:interface=127.0.0.1\ntls = implicit\n" + tls +
            "proxy_protocol = any\n" + proxy)


def raw_session(port: int, source: str, first: bytes, *lines: bytes) -> list[bytes]:
    """Connect from ``source``, send ``first`` at once, then each line after the
    server's last reply; what the server said, up to its close."""
    with socket.create_connection(("127.0.0.1", port), timeout=20,
                                  source_address=(source, 0)) as sock:
        sock.sendall(first)
        replies = []
        for line in (None, *lines):
            if line is not None:
                sock.sendall(line)
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    replies.append(data + b"<closed>")
                    return replies
                data += chunk
            replies.append(data)
        return replies


@pytest_twisted.inlineCallbacks
def test_a_hand_made_header_names_the_client_on_a_real_socket(tmp_path: Path) -> Any:
    server = yield start(tmp_path, extra=proxied_listeners(tmp_path, "500ms"))
    try:
        port = server.ports["proxied_mx"]
        for client in ("192.0.2.7", "2001:db8::7"):
            family = 0x11 if ":" not in client else 0x21
            header = v2(family=family, block=inet(client, client, 40000, 25))
            replies = yield in_thread(
                raw_session, port, "127.0.0.1", header, b"EHLO client.example\r\n",
                b"MAIL FROM:<a@client.example>\r\n", b"RCPT TO:<bob@example.test>\r\n",
                b"DATA\r\n", b"Subject: via\r\n\r\nhi\r\n.\r\n", b"QUIT\r\n")
            assert replies[0].startswith(b"220 ") and replies[-2].startswith(b"250 "), \
                replies
        stored = yield server.delivered("bob@example.test", 2)
        received = sorted(message.split(b"\r\n\t")[0] for message in stored)
        assert received == [b"Received: from client.example ([192.0.2.7])",
                            b"Received: from client.example ([2001:db8::7])"]
        # From the balancer's address: a header or nothing (no greeting either).
        replies = yield in_thread(raw_session, port, "127.0.0.1", b"EHLO x\r\n")
        assert replies == [b"<closed>"]
        started = time.monotonic()
        replies = yield in_thread(raw_session, port, "127.0.0.1", b"")
        assert replies == [b"<closed>"] and time.monotonic() - started < 5
        # From anywhere else: served as itself, and closed should it send a header.
        replies = yield in_thread(raw_session, port, "127.0.0.3", b"",
                                  b"PROXY TCP4 192.0.2.8 192.0.2.8 1 25\r\n",
                                  b"EHLO x\r\n")
        assert replies[0].startswith(b"220 ") and replies[1:] == [b"<closed>"]
        replies = yield in_thread(raw_session, port, "127.0.0.3", b"", b"EHLO x\r\n")
        assert replies[0].startswith(b"220 ") and replies[1].startswith(b"250")
    finally:
        yield server.stop()


class SourcedIMAP(imaplib.IMAP4):
    """imaplib from a source address of its choosing."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self.source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout: Optional[float]) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


def send_through(port: int, source: str, login: bool = False) -> Any:
    """A message to bob from ``source`` through ``port`` (SMTP_SSL with AUTH when
    ``login``): smtplib's answer, or the (code, text) of a refused recipient."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    where = dict(host="127.0.0.1", port=port, timeout=30, source_address=(source, 0),
                 local_hostname="client.example")
    smtp = smtplib.SMTP_SSL(context=context, **where) if login else smtplib.SMTP(**where)
    with smtp:
        if login:
            smtp.login("bob@example.test", "bob-secret")
        try:
            sender = "bob@example.test" if login else "a@client.example"
            return smtp.sendmail(sender, ["bob@example.test"],
                                 b"Subject: through HAProxy\r\n\r\nhi\r\n")
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients["bob@example.test"]
            return code, text.decode()


def imap_login(port: int, source: str) -> tuple[str, str]:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    imap = SourcedIMAP("127.0.0.1", port, source)
    try:
        imap.starttls(context)
        status, _ = imap.login("bob@example.test", "bob-secret")
        selected, _ = imap.select("INBOX")
        return status, selected
    finally:
        imap.logout()


def wait_until(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest_twisted.inlineCallbacks
def test_through_haproxy_the_session_sees_the_client_not_the_balancer(
        tmp_path: Path) -> Any:
    server = yield start(tmp_path, extra=proxied_listeners(tmp_path))
    routes = {
        # HAProxy's SMTP health check (option smtpchk) sends a LOCAL header.
        "smtp": Route(server.ports["proxied_mx"], "send-proxy-v2 check inter 200ms",
                      "option smtpchk HELO haproxy.test"),
        "imap": Route(server.ports["proxied_imap"], "send-proxy-v2"),
        "submissions": Route(server.ports["proxied_submissions"], "send-proxy"),   # v1
    }
    try:
        with HAProxy(routes) as haproxy, capturedLogs() as events:
            assert (yield in_thread(send_through, haproxy.ports["smtp"], CLIENT)) == {}
            assert (yield in_thread(send_through, haproxy.ports["submissions"], CLIENT,
                                    login=True)) == {}
            stored = yield server.delivered("bob@example.test", 2)
            received = sorted(message.split(b";")[0] for message in stored)
            assert received[0].startswith(b"Received: from client.example ([127.0.0.2])"
                                          b"\r\n\tby mx.example.test (LightMail) with ESMTP ")
            assert received[1].startswith(b"Received: from client.example ([127.0.0.2])"
                                          b"\r\n\tby mx.example.test (LightMail) with "
                                          b"ESMTPSA "), received
            # The access lists see the client too.
            yield server.parts.access.add("block", "client", CLIENT)
            code, text = yield in_thread(send_through, haproxy.ports["smtp"], CLIENT)
            assert code == 554 and "Client host [127.0.0.2] rejected" in text
            yield server.parts.access.remove("block", "client", CLIENT)
            assert (yield in_thread(imap_login, haproxy.ports["imap"], CLIENT)) == \
                ("OK", "OK")
            health = yield in_thread(
                wait_until, lambda: haproxy.server("smtp")["check_status"] == "L7OK")
            assert health, haproxy.server("smtp")
        connects = {(event["listener"], event["peer"]) for event in events
                    if event.get("log_format", "").startswith("connect from")}
        # The health checks (LOCAL) come as the balancer itself, and only they.
        assert connects == {("proxied_mx", CLIENT), ("proxied_imap", CLIENT),
                            ("proxied_submissions", CLIENT), ("proxied_mx", "127.0.0.1")}
        assert any("names no client" in event.get("log_format", "")
                   and event["listener"] == "proxied_mx" for event in events)
        assert refusals(events) == []
        # STARTTLS and implicit TLS over the header: nothing failed on the way.
        assert [formatEvent(event) for event in events if "log_failure" in event] == []
    finally:
        yield server.stop()


def first_line(port: int, source: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20,
                                    source_address=(source, 0))
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return sock, data


def test_with_workers_the_main_process_counts_the_client_not_the_balancer(
        write_config: Any, tmp_path: Path) -> None:
    """[server] workers: a worker reads the header, and the main process admits the
    client it names under max_connections_per_ip (one here): a second connection of
    127.0.0.2 is refused, one of 127.0.0.3 is not, through the same HAProxy."""
    from tests.harness import ServerProcess, run_cli
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.workers.test\nworkers = 1\n"
        "[logging]\nlevel = info\n[directory]\nauth_over_plaintext = yes\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "max_connections_per_ip = 1\nproxy_protocol = v2\nproxy_from = 127.0.0.1\n")
    run_cli(config, "domain", "add", "workers.test")
    run_cli(config, "user", "add", "ann@workers.test", "--password-stdin",
            stdin="worker-secret\n")
    server = ServerProcess(config)
    held: list[socket.socket] = []
    try:
        port = server.ports(expected=1)["imap"]
        server.wait_for(r"listening: imap speaks imap on .* \(PROXY v2 from 127\.0\.0\.1\)")
        with HAProxy({"imap": Route(port, "send-proxy-v2")}) as haproxy:
            front = haproxy.ports["imap"]
            imap = SourcedIMAP("127.0.0.1", front, CLIENT)
            assert imap.login("ann@workers.test", "worker-secret")[0] == "OK"
            sock, line = first_line(front, CLIENT)      # its second: over the limit
            held.append(sock)
            assert line.startswith(b"* BYE [UNAVAILABLE] Too many connections"), line
            sock, line = first_line(front, "127.0.0.3")  # another client: its first
            held.append(sock)
            assert line.startswith(b"* OK "), line
            imap.logout()
        server.wait_for(r"worker=0 conn=\w+\] connect from 127\.0\.0\.2 to imap")
        server.wait_for(r"worker=0 conn=\w+\] connect from 127\.0\.0\.3 to imap")
        assert "connect from 127.0.0.1" not in server.output
        assert "PROXY) starting on" in server.output     # the worker's port
    finally:
        for sock in held:
            sock.close()
        server.kill()
