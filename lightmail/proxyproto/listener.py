"""The PROXY protocol in front of a listener: whom it trusts, and the connection's
first octets.

:class:`ProxyHeaderFactory` is what the listening port is handed (in front of TLS,
for ``tls = implicit``: the header comes before the handshake).  A connection from
``proxy_from`` (the balancers) must begin with a header of a version
``proxy_protocol`` takes, within ``proxy_timeout``; only then is the listener's own
protocol built, for the address the header names, so that the connection limits,
the screening and the session all see the client.  One from anywhere else is served
at once, as it is, and closed should it begin with a header: nobody else may say who
the client is.  A header that is missing, malformed or late closes the connection
with a log line (and ``lightmail_connections_refused{reason="proxy_header"}``);
nothing is written to the balancer, which is no mail client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, Optional, Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from lightmail.address import client_ip
from lightmail.config import ListenerConfig
from lightmail.metrics.interfaces import IProtocolMeters
from lightmail.proxyproto.header import HeaderError, ProxyHeader, looks_like_header, read_header

#: The reason of lightmail_connections_refused for a header refused.
PROXY_HEADER = "proxy_header"

#: proxy_protocol -> the versions it takes.
VERSIONS = {"v1": frozenset({1}), "v2": frozenset({2}), "any": frozenset({1, 2})}


class ProxyTrust:
    """One listener's PROXY settings: the versions, the balancers' networks and the
    time a header may take.  ``follow`` takes a reloaded section's (connections
    already open keep what they started with)."""

    def __init__(self, listener: ListenerConfig) -> None:
        self.follow(listener)

    def follow(self, listener: ListenerConfig) -> None:
        self.listener = listener.name
        self.versions = VERSIONS[listener.proxy_protocol]
        self.networks = [ipaddress.ip_network(net, strict=False)
                         for net in listener.proxy_from]
        self.timeout = listener.proxy_timeout

    def trusts(self, addr: IAddress) -> bool:
        """Whether a connection from ``addr`` comes from a balancer (a Unix socket's
        client has no address, and is not one)."""
        address = client_ip(_host(addr))
        return address is not None and any(address in net for net in self.networks)


def proxy_trust(listener: ListenerConfig) -> Optional[ProxyTrust]:
    """``listener``'s PROXY settings; None when it takes no header."""
    return None if listener.proxy_protocol == "no" else ProxyTrust(listener)


@implementer(IProtocolFactory)
class ProxyHeaderFactory(Factory):
    """Reads the header of the balancers' connections before ``wrapped`` (the
    listener's factory, or its TLS) builds their protocol; the others it hands on at
    once, watching their first octets.  ``meters``: the listener's protocol's."""

    noisy = False

    def __init__(self, wrapped: IProtocolFactory, trust: ProxyTrust,
                 meters: IProtocolMeters, clock: Optional[IReactorTime] = None) -> None:
        self.wrapped = wrapped
        self.trust = trust
        self.meters = meters
        if clock is None:
            from twisted.internet import reactor
            clock = reactor  # type: ignore[assignment]
        self.clock: IReactorTime = clock  # type: ignore[assignment]

    def logPrefix(self) -> str:
        inner = (self.wrapped.logPrefix() if ILoggingContext.providedBy(self.wrapped)
                 else type(self.wrapped).__name__)
        return f"{inner} (PROXY)"

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        if self.trust.trusts(addr):
            return ProxiedConnection(self, addr, None)
        inner = self.wrapped.buildProtocol(addr)
        if inner is None:
            return None
        return ProxiedConnection(self, addr, inner)


@implementer(IHandshakeListener, ITransport)
class ProxiedConnection(Protocol):
    """One connection: its header read (from a balancer: ``inner`` None until then),
    or its first octets watched (from anyone else: ``inner`` given); then the
    transport of ``inner``, whose getPeer is the client the header named."""

    log = Logger()

    def __init__(self, factory: ProxyHeaderFactory, addr: IAddress,
                 inner: Optional[IProtocol]) -> None:
        self.proxy = factory
        self.trust = factory.trust
        #: The connection's own peer (the balancer's address, or the client's).
        self.addr = addr
        #: The client's: the header's source, or ``addr``.
        self.client: IAddress = addr
        self.destination: Optional[IAddress] = None
        self.inner = inner
        #: What came before the header was whole (or, from anyone else, before its
        #: first octets told it was no header); None once it is settled.
        self.pending: Optional[bytearray] = bytearray()
        self.timer: Optional[IDelayedCall] = None
        self.refused = False

    # -- the socket's side -------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        # The protocol above sees what the socket provides (ITCPTransport, ISystemHandle).
        directlyProvides(self, providedBy(transport))
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        if self.inner is None:
            self.timer = self.proxy.clock.callLater(self.trust.timeout, self._late)
        else:
            self.inner.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        if self.pending is None:
            if self.inner is not None:
                self.inner.dataReceived(data)
            return
        if self.refused:
            return
        self.pending += data
        if self.inner is None:
            self._read_header()
        else:
            self._watch()

    def _read_header(self) -> None:
        assert self.pending is not None
        try:
            header = read_header(self.pending, self.trust.versions)
        except HeaderError as exc:
            self._refuse(str(exc))
            return
        if header is None:
            return
        rest = bytes(self.pending[header.length:])
        self.pending = None
        self._stop_timer()
        self._name_client(header)
        inner = self.proxy.wrapped.buildProtocol(self.client)
        if inner is None:
            # The listener refused the client without a word (its limits).
            assert self.transport is not None
            self.transport.loseConnection()
            return
        self.inner = inner
        inner.makeConnection(self)
        if rest:
            inner.dataReceived(rest)

    def _name_client(self, header: ProxyHeader) -> None:
        if header.source is None:
            self.log.debug("PROXY v{version} header from {peer} on {listener} names no "
                           "client (a health check): its own address stands",
                           version=header.version, peer=_host(self.addr),
                           listener=self.trust.listener)
            return
        self.client = _address(*header.source)
        if header.destination is not None:
            self.destination = _address(*header.destination)
        self.log.debug("PROXY v{version}: client {client} through {peer} on {listener}",
                       version=header.version, client=header.source[0],
                       peer=_host(self.addr), listener=self.trust.listener)

    def _watch(self) -> None:
        assert self.pending is not None and self.inner is not None
        verdict = looks_like_header(self.pending)
        if verdict is None:
            return
        if verdict:
            self._refuse("a PROXY header from an address not in proxy_from")
            return
        early, self.pending = bytes(self.pending), None
        self.inner.dataReceived(early)

    def _late(self) -> None:
        self.timer = None
        received = len(self.pending or b"")
        self._refuse(f"no PROXY header within {self.trust.timeout:g}s"
                     + (f" ({received} octets of one)" if received else ""))

    def _refuse(self, reason: str) -> None:
        self.refused = True
        self._stop_timer()
        self.log.warn("connection from {peer} on {listener} closed: {reason}",
                      peer=_host(self.addr), listener=self.trust.listener, reason=reason)
        self.proxy.meters.connection_refused(PROXY_HEADER)
        if self.transport is not None:
            self.transport.loseConnection()

    def _stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self.timer is not None and not self.pending and self.inner is None:
            # Closed before a single octet: a balancer's plain TCP check (HAProxy's
            # ``check`` without check-send-proxy) says nothing worth a warning.
            self.log.debug("connection from {peer} on {listener} closed before its "
                           "PROXY header", peer=_host(self.addr),
                           listener=self.trust.listener)
        self._stop_timer()
        if self.inner is not None:
            self.inner.connectionLost(reason)

    def handshakeCompleted(self) -> None:
        # STARTTLS: the TLS layer Twisted puts under this one tells it, for the
        # session above.
        if self.inner is not None and IHandshakeListener.providedBy(self.inner):
            self.inner.handshakeCompleted()

    # -- the transport of the protocol above -------------------------------------

    def getPeer(self) -> IAddress:
        return self.client

    def getHost(self) -> IAddress:
        if self.destination is not None:
            return self.destination
        assert self.transport is not None
        return self.transport.getHost()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        assert self.transport is not None
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def startTLS(self, context: Any, normal: bool = True) -> None:
        assert self.transport is not None
        self.transport.startTLS(context, normal)  # type: ignore[attr-defined]
        # Now an ISSLTransport, as the socket under it.
        directlyProvides(self, providedBy(self.transport))

    def __getattr__(self, name: str) -> Any:
        # The rest of what the protocol above asks of its transport (abortConnection,
        # registerProducer, pauseProducing, setTcpNoDelay, getHandle...) is the
        # socket's.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__.get("transport"), name)


def _host(addr: IAddress) -> str:
    """The address ``addr`` names, or "local" (a Unix socket's client), as
    lightmail.listeners.TrackingFactory has it."""
    return addr.host if isinstance(addr, (IPv4Address, IPv6Address)) else "local"


def _address(host: str, port: int) -> Union[IPv4Address, IPv6Address]:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)
