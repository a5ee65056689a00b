"""Listeners: one service per configured endpoint, and what all protocol factories share.

A protocol package registers a builder under its protocol name (``smtp``, ``lmtp``,
``imap``...).  :class:`ListenerService` turns a ``[listener:NAME]`` section into a
listening endpoint once storage is ready, wraps it in TLS for ``tls = implicit`` and
behind a PROXY header for ``proxy_protocol`` (:func:`accepting_factory`), and on
shutdown stops accepting, lets sessions finish their transaction, then closes them.

:class:`TrackingFactory` counts connections in total and per client address, refuses
those over the configured limits with a protocol-specific reply, and drains.
"""

from __future__ import annotations

import importlib
import os
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import (
    IHandshakeListener,
    IListeningPort,
    IProtocolFactory,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.config import ListenerConfig
from lightmail.logs import new_id
from lightmail.metrics.interfaces import IProtocolMeters
from lightmail.metrics.registry import UNCOUNTED
from lightmail.proxyproto.listener import ProxyHeaderFactory, ProxyTrust, proxy_trust
from lightmail.telemetry import NO_SESSION, SessionTrace
from lightmail.transcripts import NO_TRANSCRIPT, SessionTranscript

if TYPE_CHECKING:
    from lightmail.service import Services
    from lightmail.tls import ServerTLS

ProtocolBuilder = Callable[[ListenerConfig, "Services"], IProtocolFactory]

# Protocol name -> "module:function" that builds its factory; imported on use so that
# a deployment without IMAP never imports the IMAP code.
_BUILDERS: dict[str, str | ProtocolBuilder] = {}


#: How long a session runs the commands one read brought (pipelined NOOPs, errors,
#: anything answered at once) before the rest waits for the next reactor turn: 60 KB
#: of them held the reactor for 50 to 80 ms, and under IMAP's COMPRESS one read can
#: inflate to megabytes (found by tests/fuzzing; issue 17's bound is 50 ms).
INPUT_SLICE = 0.010


#: Why a connection is refused (``kind``, and the label of the metric).
CONNECTIONS, SHUTTING_DOWN, MEMORY, CLIENT_ERRORS = (
    "connections", "shutting_down", "memory", "client_errors")


class Refusal(NamedTuple):
    """Why a connection is refused: the sentence, and its kind."""

    text: str
    kind: str


#: What :meth:`TrackingFactory.screen` answers.
Screened = Union[Refusal, None, "defer.Deferred[Optional[Refusal]]"]


def register_protocol(name: str, builder: str | ProtocolBuilder) -> None:
    """Make ``protocol = name`` usable in listener sections (also for embedders)."""
    _BUILDERS[name] = builder


def available_protocols() -> list[str]:
    return sorted(_BUILDERS)


def builder_for(name: str) -> ProtocolBuilder:
    builder = _BUILDERS[name]
    if isinstance(builder, str):
        module, _, attr = builder.partition(":")
        builder = getattr(importlib.import_module(module), attr)
        _BUILDERS[name] = builder
    return builder  # type: ignore[return-value]


@implementer(IHandshakeListener)
class TrackedProtocol(Protocol):
    """Base for LightMail protocols: registers with its factory, supports draining,
    and counts its TLS handshakes (implicit TLS and STARTTLS both end in
    ``handshakeCompleted``, called by Twisted's TLS layer)."""

    factory: TrackingFactory
    #: A command waiting for its turn under a per-session command rate (IMAP, POP3:
    #: lightmail.policy.limits.throttle), or None.
    _rate_wait: Any = None

    def _stop_rate_wait(self) -> bool:
        """Forget the command waiting for its turn (the session ends): True if one
        was."""
        waiting, self._rate_wait = self._rate_wait, None
        if waiting is None:
            return False
        if waiting.active():
            waiting.cancel()
        return True

    peer_host: str = ""
    #: The session has logged in (TrackingFactory.logged_in).
    logged_in: bool = False
    #: Its transcript, when [transcript] chose it (lightmail/transcripts/).
    transcript: SessionTranscript = NO_TRANSCRIPT
    #: Its span, when [telemetry] traces (lightmail/telemetry/).
    trace: SessionTrace = NO_SESSION
    _conn_id: str = ""

    @property
    def conn_id(self) -> str:
        """The connection's id (``conn=`` in the log, the transcript's name)."""
        if not self._conn_id:
            self._conn_id = new_id()
        return self._conn_id

    #: Error replies whose spending ([limits] client_errors) is not answered yet (the
    #: bucket is in Redis): the session runs no further command until it is, so that
    #: it closes at the error that empties the bucket, however fast the client.
    errors_pending: int = 0
    _errors_held: bool = False

    def spend_error(self) -> None:
        """An error reply this protocol counts against its address's failed commands
        ([limits] client_errors)."""
        self.errors_pending += 1
        self.factory.failed_command(self).addCallback(self._error_spent)
        if self.errors_pending:
            self._errors_held = True            # answered later: input waits

    def _error_spent(self, sentence: Optional[str]) -> None:
        self.errors_pending -= 1
        if sentence is not None:
            self.close_for_errors(sentence)
        elif not self.errors_pending and self._errors_held:
            self._errors_held = False
            self.resume_input()

    def close_for_errors(self, sentence: str) -> None:
        """The address has failed too many commands: say ``sentence`` and close."""
        if self.transport is not None:
            self.transport.loseConnection()

    def resume_input(self) -> None:
        """Run the commands that waited for the error's spending."""

    def handshakeCompleted(self) -> None:
        # ISSLTransport's getHandle: pyOpenSSL's Connection, handshake done.
        transport: Any = ISSLTransport(self.transport)
        self.factory.meters.tls(transport.getHandle().get_protocol_version_name())

    def drain(self) -> None:
        """Finish the transaction in progress, then close (server shutting down).

        Protocols override this to say goodbye in their own words (SMTP 421, IMAP BYE).
        """
        if self.transport is not None:
            self.transport.loseConnection()


class ConnectionLimits:
    """Connections in total, per client address, and not logged in, against their
    limits.

    One per listener: in the factory itself, or, with ``[server] workers``, in the
    main process, which admits the connections every worker accepts (so that the
    limits hold across processes)."""

    log = Logger()

    def __init__(self, max_connections: int = 1000, max_per_ip: int = 20,
                 max_unauthenticated: int | None = None) -> None:
        self.set_limits(max_connections, max_per_ip, max_unauthenticated)
        self.total = 0
        self.unauthenticated = 0
        self.per_ip: Counter[str] = Counter()

    def set_limits(self, max_connections: int, max_per_ip: int,
                   max_unauthenticated: int | None = None) -> None:
        """New limits (a reload): the connections open stay counted, and only new ones
        are refused while more than a lower limit are open."""
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.max_unauthenticated = (max_connections if max_unauthenticated is None
                                    else max_unauthenticated)

    def follow(self, listener: ListenerConfig) -> None:
        """Take the limits of ``listener`` (its section, reloaded)."""
        self.set_limits(listener.max_connections, listener.max_connections_per_ip,
                        listener.unauthenticated_limit)

    def admit(self, host: str) -> Optional[str]:
        """Count a connection from ``host``; or the reason it is refused (not counted)."""
        refusal = self.check(host)
        if refusal is None:
            self.add(host)
        return refusal

    def check(self, host: str) -> Optional[str]:
        """Why a connection from ``host`` would be over a limit (None: it is not)."""
        if self.total >= self.max_connections:
            self.log.warn("refused {host}: {count} connections is the limit",
                          host=host, count=self.max_connections)
            return "too many connections"
        if self.unauthenticated >= self.max_unauthenticated:
            self.log.warn("refused {host}: {count} connections not logged in is the "
                          "limit", host=host, count=self.max_unauthenticated)
            return "too many connections not logged in"
        # A Unix socket's clients all look alike ("local"): only the total counts.
        if host != "local" and self.per_ip[host] >= self.max_per_ip:
            self.log.warn("refused {host}: {count} connections from one address is the "
                          "limit", host=host, count=self.max_per_ip)
            return "too many connections from your address"
        return None

    def add(self, host: str) -> None:
        """A new connection: not logged in."""
        self.total += 1
        self.unauthenticated += 1
        self.per_ip[host] += 1

    def logged_in(self) -> None:
        """One of the connections has logged in."""
        self.unauthenticated -= 1

    def release(self, host: str, logged_in: bool = False) -> None:
        self.total -= 1
        if not logged_in:
            self.unauthenticated -= 1
        self.per_ip[host] -= 1
        if self.per_ip[host] <= 0:
            del self.per_ip[host]


class TrackingFactory(Factory):
    """Counts and limits connections, and drains them on shutdown."""

    log = Logger()
    noisy = False    # no "Starting factory" lines: the listener logs what matters

    def __init__(self, max_connections: int = 1000, max_per_ip: int = 20,
                 max_unauthenticated: int | None = None,
                 meters: IProtocolMeters = UNCOUNTED) -> None:
        self.limits = ConnectionLimits(max_connections, max_per_ip, max_unauthenticated)
        #: Connections, sessions, commands... of this listener's protocol.
        self.meters = meters
        #: Told of each login (a worker's: the main process keeps the limits).
        self.on_login: Callable[[TrackedProtocol], None] | None = None
        self.active: set[TrackedProtocol] = set()
        self.draining = False
        self._drained: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        host = getattr(addr, "host", "") or "local"
        if self.draining:
            return self.refuse(addr, "shutting down", SHUTTING_DOWN)
        refusal = self.limits.check(host)
        if refusal is not None:
            return self.refuse(addr, refusal)
        screened = self.screen(host)
        if isinstance(screened, defer.Deferred):
            return Screening(self, addr, host, screened)
        if screened is not None:
            return self.refuse(addr, screened.text, screened.kind)
        return self.tap(self.admitted(addr, host))

    def screen(self, host: str) -> Screened:
        """Why a connection from ``host`` is refused beyond the connection counts (the
        server is short of memory, the address has failed too many commands), or
        None; a Deferred when the answer must be asked for (shared buckets)."""
        return None

    def admitted(self, addr: Any, host: str) -> TrackedProtocol:
        """The protocol of a connection within the limits (counted once it is made)."""
        proto = self.make_protocol(addr)
        proto.factory = self
        proto.peer_host = host
        return proto

    def make_protocol(self, addr: Any) -> TrackedProtocol:
        raise NotImplementedError

    def tap(self, proto: TrackedProtocol) -> Protocol:
        """What the transport talks to: ``proto``, or its transcript's tap in front
        of it (ServiceFactory; the one place a session's octets can be seen)."""
        return proto

    def failed_command(self, proto: TrackedProtocol) -> defer.Deferred[Optional[str]]:
        """A command of ``proto``'s failed (an error reply the protocol counts): None,
        or the sentence to close it with, the client's address having failed too
        many ([limits] client_errors)."""
        return defer.succeed(None)

    def refuse(self, addr: Any, reason: str, kind: str = CONNECTIONS) -> Optional[Protocol]:
        """A protocol that tells the client ``reason`` and hangs up; None just closes.
        ``kind``: why (CONNECTIONS, SHUTTING_DOWN, MEMORY, CLIENT_ERRORS)."""
        self.meters.connection_refused(kind)
        return None

    def connection_made(self, proto: TrackedProtocol) -> None:
        self.active.add(proto)
        self.limits.add(proto.peer_host)
        self.meters.connection_opened()

    def logged_in(self, proto: TrackedProtocol, user: str = "") -> None:
        """``proto``'s session has logged in (as ``user``): it no longer counts
        against max_unauthenticated."""
        proto.transcript.logged_in(user)
        proto.trace.logged_in(user)
        if proto.logged_in or proto not in self.active:
            return
        proto.logged_in = True
        self.limits.logged_in()
        self.meters.session_opened()
        if self.on_login is not None:
            self.on_login(proto)

    def connection_lost(self, proto: TrackedProtocol) -> None:
        if proto in self.active:
            self.active.discard(proto)
            self.limits.release(proto.peer_host, proto.logged_in)
            self.meters.connection_closed()
            if proto.logged_in:
                self.meters.session_closed()
        if self.draining and not self.active:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def drain(self, timeout: float, clock: Any = None) -> defer.Deferred[None]:
        """Ask every session to finish; after ``timeout`` seconds close the rest."""
        self.draining = True
        if not self.active:
            return defer.succeed(None)
        if clock is None:
            from twisted.internet import reactor as clock
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        for proto in list(self.active):
            proto.drain()

        def force() -> None:
            for proto in list(self.active):
                if proto.transport is not None:
                    proto.transport.abortConnection()  # type: ignore[attr-defined]
        timer = clock.callLater(timeout, force)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d


@implementer(IHandshakeListener)
class Handover(Protocol):
    """Holds a new connection until it is known who serves it; then that protocol (a
    session, or a refusal) takes the transport over, with what the client sent
    meanwhile."""

    def __init__(self) -> None:
        self.inner: Optional[Protocol] = None
        self.early: list[bytes] = []
        self.lost = False
        # Implicit TLS: the handshake may end before the answer.
        self.handshake_done = False

    def take_over(self, inner: Optional[Protocol]) -> None:
        assert self.transport is not None
        if inner is None:
            self.transport.loseConnection()
            return
        self.inner = inner
        inner.makeConnection(self.transport)
        if self.handshake_done:
            self.handshakeCompleted()
        early, self.early = self.early, []
        for data in early:
            inner.dataReceived(data)

    def handshakeCompleted(self) -> None:
        """Passed on to the session (it counts TLS versions), once there is one."""
        self.handshake_done = True
        if self.inner is not None and IHandshakeListener.providedBy(self.inner):
            self.inner.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
        else:
            self.early.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost = True
        if self.inner is not None:
            self.inner.connectionLost(reason)
        self.ended()

    def ended(self) -> None:
        """The connection is gone (after the protocol that took it over was told)."""


class Screening(Handover):
    """A connection waiting for :meth:`TrackingFactory.screen`'s answer (a bucket in
    Redis); then its session, or its refusal."""

    log = Logger()

    def __init__(self, factory: TrackingFactory, addr: Any, host: str,
                 answer: defer.Deferred[Optional[Refusal]]) -> None:
        super().__init__()
        self.screening = factory
        self.addr = addr
        self.host = host
        self.answer = answer

    def connectionMade(self) -> None:
        self.answer.addErrback(self._failed).addCallback(self._answered)

    def _failed(self, failure: Failure) -> None:
        # A screen that cannot answer lets the client in (as a limit backend that
        # is down does): the connection counts still hold.
        self.log.failure("screening a connection from {host} failed", failure,
                         host=self.host)

    def _answered(self, refusal: Optional[Refusal]) -> None:
        if self.lost or self.transport is None:
            return
        factory = self.screening
        if refusal is not None:
            self.take_over(factory.refuse(self.addr, refusal.text, refusal.kind))
        elif factory.draining:
            self.take_over(factory.refuse(self.addr, "shutting down", SHUTTING_DOWN))
        else:
            self.take_over(factory.tap(factory.admitted(self.addr, self.host)))


class Refuser(Protocol):
    """Says one line (an SMTP 421, a POP3 -ERR, an IMAP BYE) and hangs up."""

    def __init__(self, line: bytes) -> None:
        self.line = line

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.line)
        self.transport.loseConnection()


class ServiceFactory(TrackingFactory):
    """The factory of one ``[listener:NAME]``: its settings, the services its sessions
    use, the server's name and, for ``tls = starttls``, the TLS context to upgrade
    with.  ``refusal`` is the line a client refused at the connection limits gets."""

    refusal: bytes = b""
    #: The protocol's command verbs (upper case), counted by name in the metrics;
    #: any other counts as "other".
    commands: tuple[str, ...] = ()

    def __init__(self, listener: ListenerConfig, services: Any) -> None:
        super().__init__(listener.max_connections, listener.max_connections_per_ip,
                         listener.unauthenticated_limit,
                         services.metrics.protocol(listener.protocol, self.commands))
        self.listener = listener
        self.services = services
        self.hostname: str = services.config.hostname
        self.tls_context: ServerTLS | None = None
        if listener.tls == "starttls":
            from lightmail.tls import server_context
            self.tls_context = server_context(listener)

    #: Whether its sessions' failed commands count against [limits] client_errors
    #: (not LMTP's: its client is the server's own MTA).
    counts_client_errors = True

    def refuse(self, addr: Any, reason: str, kind: str = CONNECTIONS) -> Optional[Protocol]:
        super().refuse(addr, reason, kind)
        line = self.refusal_line(reason, kind)
        return Refuser(line) if line else None

    def refusal_line(self, reason: str, kind: str) -> bytes:
        """The line a client refused for ``reason`` gets (``kind``: why): the
        protocol's own words; ``refusal`` for the connection counts."""
        return self.refusal

    def screen(self, host: str) -> Screened:
        memory = self.services.memory.refusal()
        if memory is not None:
            return Refusal(memory, MEMORY)
        if not self.counts_client_errors:
            return None
        errors = self.services.client_errors.screen(host)
        if isinstance(errors, defer.Deferred):
            return errors.addCallback(
                lambda text: Refusal(text, CLIENT_ERRORS) if text else None)
        return Refusal(errors, CLIENT_ERRORS) if errors else None

    def failed_command(self, proto: TrackedProtocol) -> defer.Deferred[Optional[str]]:
        if not self.counts_client_errors:
            return defer.succeed(None)
        return self.services.client_errors.failed(proto.peer_host, proto.conn_id)

    def tap(self, proto: TrackedProtocol) -> Protocol:
        return self.services.transcripts.wrap(proto, self.listener)  # type: ignore[no-any-return]

    def connection_made(self, proto: TrackedProtocol) -> None:
        super().connection_made(proto)
        proto.trace = self.services.telemetry.session(
            self.listener.protocol, self.listener.name, proto.peer_host, proto.conn_id)

    def connection_lost(self, proto: TrackedProtocol) -> None:
        proto.trace.end("logged_in" if proto.logged_in else "closed")
        super().connection_lost(proto)

    def reconfigure(self, listener: ListenerConfig, hostname: str) -> None:
        """A reload: sessions that start from now on see ``listener``'s settings and
        the server's name; those already open keep what they started with."""
        self.listener = listener
        self.hostname = hostname


class ListenerService(Service):
    """Listens on one endpoint with one protocol factory."""

    log = Logger()

    def __init__(self, config: ListenerConfig, factory: IProtocolFactory,
                 ready: defer.Deferred[Any] | None = None, tls_context: Any = None,
                 shutdown_timeout: float = 30.0,
                 on_failure: Callable[[str], None] | None = None,
                 accept: bool = True) -> None:
        self.listener = config
        # accept=False: listen but leave accepting to worker processes, which inherit
        # the socket (lightmail.workers).
        self.accept = accept
        self.on_failure = on_failure
        self.name = f"listener:{config.name}"
        self.factory = factory
        self.ready = ready
        self.tls_context = tls_context
        self.shutdown_timeout = shutdown_timeout
        #: Whom it takes a PROXY header from (a reload changes them: ListenerPart).
        self.proxy: ProxyTrust | None = proxy_trust(config) if accept else None
        self.port: IListeningPort | None = None
        self.listening: defer.Deferred[IListeningPort] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        ready = self.ready if self.ready is not None else defer.succeed(None)
        ready.addCallback(lambda _: self._listen())
        ready.addErrback(self._not_listening)

    def _listen(self) -> defer.Deferred[IListeningPort] | None:
        if not self.running:
            return None
        from twisted.internet import reactor
        endpoint = endpoints.serverFromString(reactor, self.listener.endpoint)
        factory = self.factory
        if self.accept:
            meters = factory.meters if isinstance(factory, TrackingFactory) else UNCOUNTED
            factory = accepting_factory(self.listener, factory, self.tls_context,
                                        self.proxy, meters)
        d = endpoint.listen(factory)
        d.addCallback(self._listened)
        d.addErrback(self._not_listening)
        return d

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        if not self.accept:
            port.stopReading()  # type: ignore[attr-defined]
        self.log.info("listening: {name} speaks {protocol}{tls} on {address}{who}{proxy}",
                      name=self.listener.name, protocol=self.listener.protocol,
                      tls=" over TLS" if self.listener.tls == "implicit" else "",
                      address=describe_address(port),
                      who="" if self.accept else " (accepted by the workers)",
                      proxy=describe_proxy(self.listener))
        self.listening.callback(port)
        return port

    def _not_listening(self, failure: Any) -> None:
        self.log.critical("listener {name} ({endpoint}) could not start: {error}",
                          name=self.listener.name, endpoint=self.listener.endpoint,
                          error=failure.getErrorMessage())
        if self.on_failure is not None:
            self.on_failure(f"listener {self.listener.name} could not start")
        if not self.listening.called:
            self.listening.errback(failure)
            self.listening.addErrback(lambda f: None)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            yield self.port.stopListening()
            self.log.info("stopped listening: {name}", name=self.listener.name)
            self.port = None
        if isinstance(self.factory, TrackingFactory):
            yield self.factory.drain(self.shutdown_timeout)


def accepting_factory(listener: ListenerConfig, factory: IProtocolFactory,
                      implicit_tls: ServerTLS | None, proxy: ProxyTrust | None,
                      meters: IProtocolMeters) -> IProtocolFactory:
    """What the listening port of ``listener`` is handed: ``factory``, behind TLS for
    ``tls = implicit``, and behind the PROXY header's reader for ``proxy_protocol``
    (outermost: the header comes before the TLS handshake).  ``meters`` count the
    connections refused for their header."""
    if listener.tls == "implicit":
        factory = TLSMemoryBIOFactory(implicit_tls, False, factory)  # type: ignore[arg-type]
    if proxy is not None:
        factory = ProxyHeaderFactory(factory, proxy, meters)
    return factory


def describe_proxy(listener: ListenerConfig) -> str:
    """`` (PROXY v2 from 192.0.2.1)`` for the listening line, or nothing."""
    if listener.proxy_protocol == "no":
        return ""
    return (f" (PROXY {listener.proxy_protocol} from "
            f"{', '.join(listener.proxy_from)})")


def describe_address(port: IListeningPort) -> str:
    address: Any = port.getHost()
    if hasattr(address, "port"):
        host = address.host
        return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
    name = getattr(address, "name", address)
    return os.fsdecode(name) if isinstance(name, bytes) else str(name)


# The protocols LightMail ships; embedders add theirs with register_protocol().
register_protocol("smtp", "lightmail.smtp.session:build_mx_factory")
register_protocol("submission", "lightmail.smtp.session:build_submission_factory")
register_protocol("lmtp", "lightmail.lmtp.session:build_lmtp_factory")
register_protocol("pop3", "lightmail.pop3.session:build_pop3_factory")
register_protocol("imap", "lightmail.imap.session:build_imap_factory")
