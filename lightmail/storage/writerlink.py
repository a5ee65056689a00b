"""A process's link to the writer process (lightmail.storage.writer).

The main process's link starts the writer process over a socket pair, and starts it
again should it end; with ``listen``, the writer also takes the workers' requests on
a Unix socket of its own.  A worker's link connects to that socket, and again should
the connection drop.  Requests go as AMP's :class:`~lightmail.storage.wire.Write`
commands (their boxes read and written by lightmail.storage.wire); a request not
answered when the writer or the connection goes away fails with :class:`WriterLost`.
``ready``: whether requests can go to the writer now (the write port writes in its
own process otherwise).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from lightmail.processes import ExecStarter, IProcessStarter
from lightmail.storage import wire
from lightmail.storage.interfaces import BlobHandoff
from lightmail.storage.sqlwrites import Outcome

__all__ = ["WriterLink", "WriterLost"]


class WriterLost(Exception):
    """The writer process went away before it answered: the request may or may not
    have committed (as with a crash), and the caller must say so (SMTP: 451)."""


#: Seconds before starting a writer process again after it ended, doubled at each
#: failure in a row, up to RESTART_MAX.  Meanwhile writes run in the server's own
#: process, as without a writer process.
RESTART_MIN = 0.5
RESTART_MAX = 30.0


#: Answers longer than this (octets) are decoded in a thread (see _Link).
DECODE_HERE = 256 * 1024


def _reply_of(box: dict[bytes, bytes]) -> tuple[bytes, bool, Any]:
    """:func:`wire.write_reply`, an answer that cannot be read failing its request."""
    try:
        return wire.write_reply(box)
    except Exception as exc:
        return box.get(amp.ANSWER, b""), False, exc


class _Link(protocol.Protocol):
    """The AMP link to the writer: Write commands out, their answers in
    (lightmail.storage.wire reads and writes the boxes)."""

    def __init__(self, client: WriterLink) -> None:
        self.client = client
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.buf = bytearray()
        self.waiting: dict[bytes, defer.Deferred[Outcome]] = {}
        #: Fires once the answers being decoded in a thread have been told.
        self.behind: defer.Deferred[None] | None = None
        self.stats_waiting: dict[bytes, defer.Deferred[bytes]] = {}
        self.asked = 0

    def connectionMade(self) -> None:
        self.client._linked(self)

    def ask(self, request: tuple[str, Any, Any, bool]) -> defer.Deferred[Outcome]:
        self.asked += 1
        tag = b"%x" % self.asked
        data = wire.write_command(tag, request)     # raises for an undeclared value
        d: defer.Deferred[Outcome] = defer.Deferred()
        self.waiting[tag] = d
        assert self.transport is not None
        self.transport.write(data)
        return d

    def ask_stats(self) -> defer.Deferred[bytes]:
        self.asked += 1
        tag = b"s%x" % self.asked
        d: defer.Deferred[bytes] = defer.Deferred()
        self.stats_waiting[tag] = d
        assert self.transport is not None
        self.transport.write(wire.stats_command(tag))
        return d

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        for box in wire.read_boxes(self.buf):
            snapshot = wire.stats_reply(box)
            if snapshot is not None:
                waiting = self.stats_waiting.pop(box[amp.ANSWER], None)
                if waiting is not None:
                    waiting.callback(snapshot)
                continue
            if self.behind is None and sum(map(len, box.values())) <= DECODE_HERE:
                self._answer(wire.write_reply(box))
            else:
                self._answer_later(box)

    def _answer_later(self, box: dict[bytes, bytes]) -> None:
        """A big answer (a STORE of 300,000 messages: 20 MB, half a second out of
        pickle) is decoded in a thread, and the answers after it wait for it: they
        are told in the order they came, as the changes they announce were made."""
        big = sum(map(len, box.values())) > DECODE_HERE
        decoded = (threads.deferToThread(_reply_of, box) if big
                   else defer.succeed(_reply_of(box)))
        done: defer.Deferred[None] = defer.Deferred()
        previous, self.behind = self.behind, done

        def answer(reply: tuple[bytes, bool, Any]) -> None:
            self._answer(reply)

        def after_previous(_: Any) -> None:
            decoded.addCallback(answer).addErrback(
                lambda failure: self.client.log.failure("answer lost", failure))
            decoded.addBoth(lambda _: done.callback(None))

        def caught_up(_: Any) -> None:
            if self.behind is done:
                self.behind = None
        done.addCallback(caught_up)
        (previous if previous is not None else defer.succeed(None)).addCallback(
            after_previous)

    def _answer(self, reply: tuple[bytes, bool, Any]) -> None:
        tag, ok, value = reply
        d = self.waiting.pop(tag, None)
        if d is None:
            return
        if ok:
            d.callback(value)
        else:
            d.errback(Failure(value))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        stats, self.stats_waiting = self.stats_waiting, {}
        for asked in stats.values():
            asked.errback(WriterLost("the writer process went away"))
        waiting, self.waiting = self.waiting, {}
        for d in waiting.values():
            d.errback(WriterLost("the writer process went away before it answered"))
        self.client._unlinked(self)
        self.lost.callback(None)


class WriterLink:
    """A process's end of the writer process (see the module docstring): the main
    process's (``config_path``), or a worker's (``connect``)."""

    log = Logger()

    def __init__(self, command: list[str] | None = None, *, listen: str | None = None,
                 connect: str | None = None,
                 restarted: Callable[[], None] | None = None,
                 stdin: bytes | None = None,
                 starter: IProcessStarter | None = None) -> None:
        if (command is None) == (connect is None):
            raise ValueError("a WriterLink starts a writer (command) or "
                             "connects to one (connect)")
        #: The arguments of the writer process (lightmail.workers.writer), to which
        #: ``--fd N`` (its end of the socket pair) and ``--listen PATH`` are added.
        self.command = command
        #: What starts it (lightmail.processes): a new interpreter unless said.
        self.starter: IProcessStarter = starter or ExecStarter()
        self.listen = listen
        self.connect = connect
        #: Told each time the writer process ended and is started again (metrics).
        self.restarted = restarted
        #: Written to the writer process's standard input at each start (the text
        #: of the configuration it is to run, whatever its file holds since).
        self.stdin = stdin
        self._link: _Link | None = None
        self._process: Any = None
        self._ended: defer.Deferred[None] | None = None
        self._stopping = False
        self._delay = RESTART_MIN
        self._restart: Any = None

    @property
    def ready(self) -> bool:
        return self._link is not None

    @property
    def pid(self) -> int | None:
        return getattr(self._process, "pid", None)

    def start(self) -> None:
        from twisted.internet import reactor
        self._restart = None
        if self.connect is not None:
            reactor.connectUNIX(  # type: ignore[attr-defined]
                self.connect, _LinkFactory(self), timeout=10)
            return
        assert self.command is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reactor.adoptStreamConnection(  # type: ignore[attr-defined]
            ours.fileno(), socket.AF_UNIX, _LinkFactory(self))
        ours.close()
        fd = 3
        args = [*self.command, "--fd", str(fd)]
        if self.listen is not None:
            args += ["--listen", self.listen]
        self._ended = defer.Deferred()
        self._process = self.starter.start(
            _WriterProcess(self, self._ended), "lightmail.workers.writer", args,
            {fd: theirs.fileno()}, self.stdin or b"")
        theirs.close()
        self.log.info("writer process started (pid {pid})", pid=self._process.pid)

    def stop(self) -> defer.Deferred[None]:
        """Let go of the writer once it has answered what it was sent (call once
        nothing sends any more: the listeners have drained); the main process's
        waits for the writer process to end."""
        self._stopping = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        link = self._link
        if link is not None and link.transport is not None:
            link.transport.loseWriteConnection()  # type: ignore[attr-defined]
        if self.connect is not None:
            return link.lost if link is not None else defer.succeed(None)
        if self._ended is None or self._ended.called:
            return defer.succeed(None)
        from twisted.internet import reactor
        ended = self._ended

        def too_slow() -> None:
            if not ended.called and self._process is not None:
                self.log.warn("writer process did not end: killing it")
                with contextlib.suppress(Exception):
                    self._process.signalProcess("KILL")
        timer = reactor.callLater(30, too_slow)  # type: ignore[attr-defined]

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result
        d: defer.Deferred[None] = defer.Deferred()
        ended.addBoth(done).addBoth(lambda _: d.callback(None))
        return d

    def call(self, op: str, args: tuple[Any, ...], blob: BlobHandoff | None = None,
             durable: bool = True) -> defer.Deferred[Outcome]:
        """Run the write port's operation ``op(conn, *args)`` in the writer's next
        group, its blob (handed over) made durable there first; fires with
        (result, changes) once committed.  ``durable=False``: committed as
        Database.write_unsynced does."""
        link = self._link
        if link is None:
            return defer.fail(WriterLost("the writer process is not running"))
        try:
            d = link.ask((op, args, blob, durable))
        except Exception:
            return defer.fail()     # a value that is no declared record, say
        return d.addCallback(self._answered)

    def snapshot(self) -> defer.Deferred[bytes]:
        """The writer process's metrics (lightmail.metrics.federation's encoding)."""
        link = self._link
        if link is None:
            return defer.fail(WriterLost("the writer process is not running"))
        return link.ask_stats()

    def _answered(self, outcome: Outcome) -> Outcome:
        self._delay = RESTART_MIN          # it works
        return outcome

    def _linked(self, link: _Link) -> None:
        self._link = link
        if self.connect is not None:
            self.log.info("connected to the writer process")

    def _unlinked(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
        if self.connect is not None and not self._stopping:
            self._again("lost the writer process")

    def _again(self, what: str) -> None:
        """Start (or connect) again after the current delay; write here meanwhile."""
        from twisted.internet import reactor
        self.log.warn("{what}; writing in this process until it is there again "
                      "(next try in {delay}s)", what=what, delay=self._delay)
        self._restart = reactor.callLater(  # type: ignore[attr-defined]
            self._delay, self.start)
        self._delay = min(self._delay * 2, RESTART_MAX)

    def _process_ended(self, reason: Failure) -> None:
        if self._link is not None and self._link.transport is not None:
            self._link.transport.loseConnection()
        if not self._stopping:
            if self.restarted is not None:
                self.restarted()
            self._again(f"writer process ended ({reason.getErrorMessage()})")


class _LinkFactory(protocol.ClientFactory):
    """Links to the writer: over the socket pair (adopted), or connecting to it."""

    noisy = False

    def __init__(self, client: WriterLink) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> _Link:
        return _Link(self.client)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.client._stopping:
            self.client._again(f"could not reach the writer process "
                               f"({reason.getErrorMessage()})")


class _WriterProcess(protocol.ProcessProtocol):
    def __init__(self, client: WriterLink, ended: defer.Deferred[None]) -> None:
        self.client = client
        self.ended = ended

    def processEnded(self, reason: Failure) -> None:
        self.client._process_ended(reason)
        self.ended.callback(None)


