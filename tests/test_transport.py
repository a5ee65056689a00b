"""write_at_once: replies sent straight to the socket, or through Twisted's buffer."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol

from lightmail.transport import write_at_once


class Held(Protocol):
    """A server side that hands its transport to the test."""

    def connectionMade(self) -> None:
        self.factory.connected.callback(self)  # type: ignore[attr-defined]


@defer.inlineCallbacks
def _pair() -> Any:
    """A listening port, a blocking client socket and the server's protocol."""
    factory = Factory.forProtocol(Held)
    factory.connected = defer.Deferred()  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    proto = yield factory.connected
    return port, client, proto


def _close(port: Any, client: socket.socket, proto: Any) -> Any:
    """Close both ends and stop listening (a Deferred)."""
    client.close()
    proto.transport.loseConnection()
    return port.stopListening()


def _read_exactly(client: socket.socket, count: int) -> bytes:
    client.settimeout(5)
    data = b""
    while len(data) < count:
        chunk = client.recv(count - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


@pytest_twisted.inlineCallbacks
def test_a_short_reply_goes_out_without_registering_for_writing() -> None:
    port, client, proto = yield _pair()
    try:
        transport = proto.transport
        write_at_once(transport, b"250 2.0.0 Ok\r\n")
        # Sent already: nothing buffered, the reactor was never asked to write.
        assert transport.dataBuffer == b"" and transport._tempDataLen == 0
        assert transport not in reactor.getWriters()  # type: ignore[attr-defined]
        assert _read_exactly(client, 14) == b"250 2.0.0 Ok\r\n"
    finally:
        yield _close(port, client, proto)


@pytest_twisted.inlineCallbacks
def test_what_the_socket_does_not_take_is_buffered_in_order() -> None:
    port, client, proto = yield _pair()
    try:
        transport = proto.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 20000                       # 5 MB: more than fits
        write_at_once(transport, big)
        assert transport.dataBuffer or transport._tempDataLen   # the rest waits
        write_at_once(transport, b"after")                    # queued behind it
        assert transport._tempDataLen >= 5
        received = yield defer.Deferred.fromCoroutine(_drain(client, len(big) + 5))
        assert received == big + b"after"
    finally:
        yield _close(port, client, proto)


async def _drain(client: socket.socket, count: int) -> bytes:
    """Read ``count`` octets while the reactor runs (it sends the buffered rest)."""
    client.setblocking(False)
    data = b""
    for _ in range(2000):
        try:
            while True:
                chunk = client.recv(1 << 20)
                if not chunk:
                    return data
                data += chunk
        except BlockingIOError:
            pass
        if len(data) >= count:
            return data
        await task.deferLater(reactor, 0.005, lambda: None)
    return data


@pytest_twisted.inlineCallbacks
def test_a_closing_connection_goes_through_twisted() -> None:
    port, client, proto = yield _pair()
    try:
        transport = proto.transport
        transport.loseConnection()
        sent: list[bytes] = []
        original = transport.write
        transport.write = lambda data: (sent.append(data), original(data))
        write_at_once(transport, b"221 Bye\r\n")
        assert sent == [b"221 Bye\r\n"]
    finally:
        yield _close(port, client, proto)


def test_other_transports_get_a_plain_write() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

    transport = Recorder()
    write_at_once(transport, b"+OK\r\n")
    assert transport.written == [b"+OK\r\n"]


@pytest_twisted.inlineCallbacks
def test_behind_a_proxy_header_a_reply_still_goes_straight_out() -> None:
    from lightmail.config import ListenerConfig
    from lightmail.metrics.registry import UNCOUNTED
    from lightmail.proxyproto.header import V2_SIGNATURE
    from lightmail.proxyproto.listener import ProxiedConnection, ProxyHeaderFactory, ProxyTrust
    inner = Factory.forProtocol(Held)
    inner.connected = defer.Deferred()  # type: ignore[attr-defined]
    trust = ProxyTrust(ListenerConfig(name="t", proxy_protocol="v2",
                                      proxy_from=("127.0.0.1",)))
    port = reactor.listenTCP(0, ProxyHeaderFactory(inner, trust, UNCOUNTED),  # type: ignore[attr-defined]
                             interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    client.sendall(V2_SIGNATURE + b"\x20\x00\x00\x00")        # LOCAL
    proto = yield inner.connected
    try:
        assert type(proto.transport) is ProxiedConnection
        socket_transport = proto.transport.transport
        write_at_once(proto.transport, b"220 ready\r\n")
        assert socket_transport.dataBuffer == b"" and socket_transport._tempDataLen == 0
        assert socket_transport not in reactor.getWriters()  # type: ignore[attr-defined]
        assert _read_exactly(client, 11) == b"220 ready\r\n"
    finally:
        yield _close(port, client, proto)
