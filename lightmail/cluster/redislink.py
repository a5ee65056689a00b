"""How LightMail reaches a Redis: the one place a connection to one is made.

Every Redis LightMail uses (the cluster's, the rate limits', greylisting's) is reached
the same way, from ``[cluster]``'s link keys (:func:`redis_link`): the ACL user and
password it logs in with (Redis 6 and later: ``AUTH USER PASSWORD``), and TLS: the
server's certificate must chain to ``redis_ca_file`` (or the system's CAs) and name
``redis_server_name`` (or the address's HOST; checked by service_identity through
Twisted's ``optionsForClientTLS``), and a client certificate may be shown.

txredisapi makes the connections (lightmail.cluster.redis); what this module adds to
its protocols (:class:`LinkStart`) is that over TLS a connection's start (AUTH,
SELECT, SUBSCRIBE) waits for the handshake.  txredisapi sends AUTH at once: a
handshake that failed would come out as an AUTH that "lost the connection", after
which txredisapi stops connecting for good, and OpenSSL's reason would be lost.
:class:`LinkWatch` says once why a link fails (a certificate that is not trusted,
a refused password, a refused connection) and once that it works again, and keeps
the reason for ``/readyz``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.config import ClusterConfig

log = Logger(namespace="lightmail.redis")


def parse_address(address: str) -> tuple[str, int, Optional[int]]:
    """HOST:PORT[/DB] (as the configuration checked it): host, port and db."""
    host_port, _, db = address.partition("/")
    host, _, port = host_port.rpartition(":")
    return host.strip("[]"), int(port), int(db) if db else None


@dataclass(frozen=True)
class RedisLink:
    """One Redis: its address (HOST:PORT[/DB]), who LightMail logs in as, and TLS."""

    address: str
    user: str = ""
    password: str = field(default="", repr=False)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]

    @property
    def db(self) -> Optional[int]:
        return parse_address(self.address)[2]

    @property
    def name(self) -> str:
        """The name the server's certificate must carry."""
        return self.server_name or self.host

    def endpoint(self, reactor: Any, timeout: float, watch: LinkWatch) -> Any:
        """A client endpoint to this Redis (TCP, or TLS over it), whose failures to
        connect ``watch`` hears of."""
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        endpoint: Any = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            endpoint = wrapClientTLS(self.tls_options(), endpoint)
        return _WatchedEndpoint(endpoint, watch)

    def tls_options(self) -> Any:
        """Twisted's client TLS options: the server's certificate checked against
        ``ca_file`` (the system's CAs without it) and for ``name``."""
        from twisted.internet import ssl
        trust: Any = None
        if self.ca_file is not None:
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding
            certs = x509.load_pem_x509_certificates(self.ca_file.read_bytes())
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(cert.public_bytes(Encoding.PEM)) for cert in certs])
        client = None
        if self.cert_file is not None and self.key_file is not None:
            client = ssl.PrivateCertificate.loadPEM(
                self.cert_file.read_bytes() + b"\n" + self.key_file.read_bytes())
        return ssl.optionsForClientTLS(self.name, trustRoot=trust,
                                       clientCertificate=client)


def redis_link(cluster: ClusterConfig, address: str) -> RedisLink:
    """The link to the Redis at ``address`` (``[cluster]``'s, ``[limits]``' or
    ``[greylist]``'s): with ``[cluster]``'s user, password and TLS, which are every
    Redis's."""
    return RedisLink(address, user=cluster.redis_user, password=cluster.redis_password,
                     tls=cluster.redis_tls, ca_file=cluster.redis_ca_file,
                     cert_file=cluster.redis_cert_file, key_file=cluster.redis_key_file,
                     server_name=cluster.redis_server_name)


class LinkWatch:
    """What the connections of one pool (or subscription) found out about their link:
    the log says once why it fails and once that it works again; ``trouble`` is the
    reason while it lasts ("" when the last connection worked)."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.trouble = ""

    def failed(self, error: str) -> None:
        if error != self.trouble:
            log.warn("Redis at {address}: {error}", address=self.link.address, error=error)
        self.trouble = error

    def working(self) -> None:
        if self.trouble:
            log.info("Redis at {address}: connected again", address=self.link.address)
        self.trouble = ""


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """An endpoint whose failed connections are told to a LinkWatch (a refused
    connection, a timeout: why a question then waits)."""

    def __init__(self, endpoint: Any, watch: LinkWatch) -> None:
        self.endpoint = endpoint
        self.watch = watch

    def __repr__(self) -> str:
        return f"<Redis at {self.watch.link.address}{' (TLS)' if self.watch.link.tls else ''}>"

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = self.endpoint.connect(factory)

        def failed(failure: Failure) -> Failure:
            self.watch.failed(f"cannot connect: {failure.getErrorMessage()}")
            return failure
        return d.addErrback(failed)


def tls_failure(link: RedisLink, why: Failure) -> str:
    """Why a TLS connection was lost before it could be used (its handshake failed,
    the certificate's name did not match, or the server refused ours), for a
    person."""
    from OpenSSL import SSL
    if why.check(SSL.Error):
        # pyOpenSSL's errors: [(library, function, reason), ...], the last one
        # OpenSSL's verdict ("certificate verify failed"), those before it details.
        args = why.value.args if why.value is not None else ()
        reasons = [str(part[-1]) for part in (args[0] if args else ())
                   if isinstance(part, tuple) and part]
        return f"TLS handshake failed: {reasons[-1] if reasons else why.getErrorMessage()}"
    from service_identity import VerificationError
    if why.check(VerificationError):
        return f"TLS: the server's certificate is not for {link.name!r}"
    return ("the connection closed during the TLS handshake (is this Redis's "
            "tls-port?)")


@implementer(IHandshakeListener)
class LinkStart:
    """Mixed into txredisapi's protocols, before them: over TLS the protocol starts
    (AUTH, SELECT) only once the handshake is done, and a handshake that fails is
    told to the factory's ``link_watch`` with OpenSSL's reason; a connection that is
    ready tells it that the link works."""

    factory: Any
    transport: Any
    _handshaken = False

    def connectionMade(self) -> Any:
        watch: LinkWatch = self.factory.link_watch
        cast(Any, self).whenConnected().addCallback(lambda _: watch.working())
        if watch.link.tls:
            return None                                 # handshakeCompleted starts it
        return cast(Any, super()).connectionMade()

    def handshakeCompleted(self) -> None:
        if self.transport.disconnecting:
            return      # refused after the handshake (the name): connectionLost says why
        self._handshaken = True
        cast(Any, super()).connectionMade()

    def connectionLost(self, why: Failure) -> None:
        from OpenSSL import SSL
        watch: LinkWatch = self.factory.link_watch
        # Before the handshake, or after it: with TLS 1.3 the server's verdict on
        # our client certificate comes after the handshake is done on our side.
        if watch.link.tls and (not self._handshaken or why.check(SSL.Error)):
            watch.failed(tls_failure(watch.link, why))
        cast(Any, super()).connectionLost(why)


class WatchedFactory:
    """Mixed into txredisapi's factories, before them: a refused AUTH or SELECT
    (txredisapi then stops connecting) is told to ``link_watch``."""

    link_watch: LinkWatch

    def connectionError(self, why: str) -> None:
        error = why.removeprefix("Redis error: ")
        # An AUTH whose connection was lost: the loss's reason (TLS) was said.
        if not (error.endswith("Lost connection") and self.link_watch.trouble):
            self.link_watch.failed(error)
        cast(Any, super()).connectionError(why)


def connection_pool(link: RedisLink, poolsize: int, watch: LinkWatch, reactor: Any,
                    timeout: float = 2.0) -> Any:
    """A lazy txredisapi pool of ``poolsize`` connections to ``link`` (its handler:
    questions wait for a connection)."""
    import txredisapi

    class Connection(LinkStart, txredisapi.RedisProtocol):    # type: ignore[misc]
        pass

    class Factory(WatchedFactory, txredisapi.RedisFactory):   # type: ignore[misc]
        protocol = Connection

    factory = Factory(link.address, link.db, poolsize, isLazy=True,
                      password=link.password or None, username=link.user or None,
                      replyTimeout=timeout)
    factory.link_watch = watch
    # Fails (a refused AUTH or SELECT) on a Deferred a lazy pool's user never holds:
    # the watch has said it.
    factory.deferred.addErrback(lambda _: None)
    factory.startConnecting(link.endpoint(reactor, timeout, watch))
    return factory.handler
