"""What the content scanners' clients share (clamd's INSTREAM, spamd's SPAMC
protocol): where a scanner listens, and one request-reply exchange over a stream
socket with a deadline.

Both protocols are one request and one reply per connection, the reply ending when
the scanner closes (or, for clamd, at its NUL).  The request is written frame by
frame as the socket takes it (a pull producer), so that a large message is not
copied into Twisted's write buffer at once, and nothing here ever blocks the reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: The most a scanner's reply may hold: they are a line or a few dozen (spamd's
#: SYMBOLS); more is garbage, and reading on would let a broken peer fill memory.
MAX_REPLY = 64 * 1024


class ScannerError(Exception):
    """The scanner could not give an answer (down, too slow, or it said something
    that is not one); the text says which, for the log."""


def parse_address(text: str) -> tuple[str, str, int]:
    """``unix:/path`` or ``tcp:host:port`` (``tcp:[v6]:port``) as (kind, where, port);
    ValueError for anything else."""
    kind, _, rest = text.strip().partition(":")
    if kind == "unix" and rest.startswith("/"):
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return "tcp", host, int(port)
    raise ValueError(f"expected unix:/PATH or tcp:HOST:PORT, got {text!r}")


def endpoint_for(reactor: Any, address: str, timeout: float) -> IStreamClientEndpoint:
    """A client endpoint for a ``unix:``/``tcp:`` scanner address."""
    kind, where, port = parse_address(address)
    if kind == "unix":
        return endpoints.UNIXClientEndpoint(reactor, where, timeout=timeout)
    return endpoints.HostnameEndpoint(reactor, where, port, timeout=timeout)


@implementer(IPullProducer)
class _Frames:
    """Writes the request's pieces one at a time, when the transport asks."""

    def __init__(self, transport: Any, pieces: Iterator[bytes]) -> None:
        self.transport = transport
        self.pieces = pieces

    def resumeProducing(self) -> None:
        piece = next(self.pieces, None)
        if piece is None:
            self.transport.unregisterProducer()
            return
        self.transport.write(piece)

    def stopProducing(self) -> None:
        self.pieces = iter(())


class _Exchange(Protocol):
    """Send the request, collect the reply until the peer closes, or until
    ``complete`` says the reply is whole."""

    transport: Any      # a TCP or Unix connection: producers, abortConnection

    def __init__(self, pieces: Iterator[bytes], complete: Callable[[bytes], bool],
                 done: Deferred[bytes]) -> None:
        self.pieces = pieces
        self.complete = complete
        self.done = done
        self.reply = bytearray()

    def connectionMade(self) -> None:
        self.transport.registerProducer(_Frames(self.transport, self.pieces), False)

    def dataReceived(self, data: bytes) -> None:
        self.reply += data
        if len(self.reply) > MAX_REPLY:
            self._finish(Failure(ScannerError(
                f"the reply is over {MAX_REPLY} octets: not a scanner's")))
        elif self.complete(bytes(self.reply)):
            self._finish(bytes(self.reply))

    def connectionLost(self, reason: Failure = None) -> None:   # type: ignore[assignment]
        # A reply may come before the request is all written (clamd's size limit),
        # and the write then fails: what was said is the answer all the same.
        self._finish(bytes(self.reply))

    def _finish(self, result: bytes | Failure) -> None:
        if not self.done.called:
            self.done.callback(result) if isinstance(result, bytes) \
                else self.done.errback(result)
        if self.transport is not None and self.transport.connected:
            self.transport.loseConnection()


def exchange(reactor: Any, address: str, timeout: float, pieces: Iterator[bytes],
             complete: Callable[[bytes], bool] = lambda reply: False,
             what: str = "scanner") -> Deferred[bytes]:
    """Connect to ``address``, write ``pieces``, and fire with the reply: everything
    the peer said before it closed (or until ``complete``).  ScannerError when it
    cannot be reached or takes longer than ``timeout`` seconds, connecting included.
    """
    done: Deferred[bytes] = Deferred()
    protocol: Optional[_Exchange] = None

    def build() -> _Exchange:
        nonlocal protocol
        protocol = _Exchange(pieces, complete, done)
        return protocol

    connecting = endpoint_for(reactor, address, timeout).connect(
        Factory.forProtocol(build))   # type: ignore[arg-type]

    def not_reached(failure: Failure) -> None:
        if not done.called:
            done.errback(ScannerError(f"cannot reach the {what} at {address}: "
                                      f"{failure.getErrorMessage()}"))
    connecting.addErrback(not_reached)

    def too_slow() -> None:
        if done.called:
            return
        done.errback(ScannerError(f"the {what} at {address} did not answer within "
                                  f"{timeout:g} s"))
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()
        connecting.cancel()
    timer = reactor.callLater(timeout, too_slow)

    def stop_timer(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result
    done.addBoth(stop_timer)
    return done


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """``data`` in slices of ``size`` octets (each copied only as it is written)."""
    for start in range(0, len(data), size):
        yield data[start:start + size]
