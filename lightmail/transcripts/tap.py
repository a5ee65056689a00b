"""The tap between a transport and a session, which sessions get one, and where their
transcripts go.

A transcript is a text file per session (``[transcript] directory``), mode 0600 in a
directory of mode 0700, named ``DATE-TIME-LISTENER-CONN.txt`` (CONN is the ``conn=``
of the session's log lines), or, without a directory, log events of the namespace
``lightmail.transcript`` carrying the session's ``conn_id``::

    # LightMail transcript: listener submission (submission), client 127.0.0.1, conn K4TQ9ZBX
    10:00:00.120 S: 220 mx.example.test ESMTP LightMail ready
    10:00:00.131 C: AUTH PLAIN ****

Files are written by a thread of their own (the reactor only hands lines over), and
at most 16 MiB wait for it: beyond that lines are dropped and the file says so.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from lightmail.config import ListenerConfig, TranscriptConfig
from lightmail.transcripts import SessionTranscript
from lightmail.transcripts.scribes import Scribe, scribe_for

#: Lines kept for a session that may turn out to be a chosen user's (until it logs
#: in): beyond that, the earliest are let go.
HELD_LINES = 200
BACKLOG = 16 * 1024 * 1024


class DirectorySink:
    """Appends each session's lines to its file, in a thread of its own."""

    log = Logger()

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.queue: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self.pending = 0
        self.dropped: dict[str, int] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def write(self, name: str, conn: str, text: str) -> None:
        with self.lock:
            if self.pending + len(text) > BACKLOG:
                self.dropped[name] = self.dropped.get(name, 0) + 1
                return
            self.pending += len(text)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="lightmail-transcripts")
                self.thread.start()
        self.queue.put((name, text))

    def _run(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch: dict[str, list[str]] = {}
            while item is not None:
                batch.setdefault(item[0], []).append(item[1])
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            for name, texts in batch.items():
                with self.lock:
                    self.pending -= sum(map(len, texts))
                    lost = self.dropped.pop(name, 0)
                if lost:
                    texts.append(f"[{lost} writes dropped: transcripts came faster than "
                                 "the disk took them]\n")
                self._append(name, "".join(texts))
            if item is None:
                return

    def _append(self, name: str, text: str) -> None:
        try:
            fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                         0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as out:
                out.write(text)
        except OSError as exc:
            self.log.error("transcript {name} not written: {error}", name=name,
                           error=str(exc))


_transcript_log = Logger(namespace="lightmail.transcript")


class LogSink:
    """Each line as a log event of its session."""

    def write(self, name: str, conn: str, text: str) -> None:
        for line in text.splitlines():
            _transcript_log.info("transcript: {line}", line=line, conn_id=conn)


Sink = DirectorySink | LogSink


@implementer(IHandshakeListener)
class TranscriptProtocol(Protocol, SessionTranscript):
    """Between the transport and a session: the session's transport is this object,
    which passes everything on, and records what crosses."""

    def __init__(self, inner: Any, scribe: Scribe, sink: Sink, listener: ListenerConfig,
                 held: bool, users: frozenset[str]) -> None:
        self.inner = inner
        inner.transcript = self
        self.scribe = scribe
        self.sink = sink
        self.listener = listener
        self.users = users
        # held: kept in memory until a chosen user logs in (else forgotten).
        self.held: list[str] | None = [] if held else None
        self.recording = True
        self.inflaters: dict[str, Any] = {}
        self.name = ""

    # -- the transport's side -----------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        started = time.time()
        conn = self.inner.conn_id
        self.name = (time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
                     + f"-{self.listener.name}-{conn}.txt")
        self._emit([f"# LightMail transcript: listener {self.listener.name} "
                    f"({self.listener.protocol}), client {self.inner.peer_host}, "
                    f"conn {conn}, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"], stamp=False)
        self.inner.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        self._record("C", data)
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.inner.connectionLost(reason)
        self._emit([f"-- closed: {reason.getErrorMessage()}"])

    def handshakeCompleted(self) -> None:
        self._emit(["-- TLS handshake done"])
        if IHandshakeListener.providedBy(self.inner):
            self.inner.handshakeCompleted()

    # -- the session's transport --------------------------------------------------

    def write(self, data: bytes) -> None:
        self._record("S", data)
        assert self.transport is not None
        self.transport.write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def startTLS(self, context: Any, normal: bool = True) -> None:
        self.transport.startTLS(context, normal)  # type: ignore[union-attr]
        # Now an ISSLTransport, as the transport under it.
        directlyProvides(self, providedBy(self.transport))
        self._emit(["-- STARTTLS: TLS from here"])

    def __getattr__(self, name: str) -> Any:
        # Everything else a session asks of its transport (getPeer, loseConnection,
        # registerProducer, getHandle, ...) is the real transport's.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__.get("transport"), name)

    # -- SessionTranscript --------------------------------------------------------

    def logged_in(self, user: str) -> None:
        if self.held is None:
            self._emit([f"-- logged in as {user}"])
            return
        held, self.held = self.held, None
        if user.lower() in self.users:
            self.sink.write(self.name, self.inner.conn_id, "".join(held))
            self._emit([f"-- logged in as {user}"])
        else:
            self.recording = False       # not a chosen user: nothing kept

    def deflating(self) -> None:
        self._emit(["-- COMPRESS=DEFLATE: shown inflated from here"])
        self.inflaters = {"C": zlib.decompressobj(-15), "S": zlib.decompressobj(-15)}

    # -- recording ----------------------------------------------------------------

    def _record(self, who: str, data: bytes) -> None:
        if not self.recording:
            return
        inflater = self.inflaters.get(who)
        if inflater is not None:
            try:
                data = inflater.decompress(data)
            except zlib.error:
                self._emit(["-- compressed data the transcript cannot read: stopped"])
                self.recording = False
                return
        lines = self.scribe.client(data) if who == "C" else self.scribe.server(data)
        self._emit(lines)

    def _emit(self, lines: list[str], stamp: bool = True) -> None:
        if not self.recording or not lines:
            return
        now = time.time()
        prefix = (time.strftime("%H:%M:%S", time.localtime(now))
                  + f".{int(now % 1 * 1000):03d} ") if stamp else ""
        text = "".join(f"{prefix}{line}\n" for line in lines)
        if self.held is not None:
            self.held.append(text)
            del self.held[:-HELD_LINES]
        else:
            self.sink.write(self.name, self.inner.conn_id, text)


class Transcripts:
    """Which sessions get a transcript: a listener's, a client address's, a user's."""

    def __init__(self, config: TranscriptConfig, sink: Sink) -> None:
        self.config = config
        self.sink = sink
        self.listeners = frozenset(config.listeners)
        self.networks = [ipaddress.ip_network(net, strict=False) for net in config.clients]
        self.users = frozenset(user.lower() for user in config.users)

    def wrap(self, proto: Any, listener: ListenerConfig) -> Protocol:
        chosen = listener.name in self.listeners or self._client_chosen(proto.peer_host)
        if not chosen and not self.users:
            return proto                  # nothing to record
        return TranscriptProtocol(proto, scribe_for(listener.protocol,
                                                    self.config.body_octets),
                                  self.sink, listener, held=not chosen, users=self.users)

    def _client_chosen(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False                  # a Unix socket's client
        return any(address in network for network in self.networks)


class NoTranscripts:
    """No session gets one (``[transcript]`` chooses none)."""

    def wrap(self, proto: Any, listener: ListenerConfig) -> Protocol:
        return proto  # type: ignore[no-any-return]


def make_transcripts(config: TranscriptConfig) -> Transcripts | NoTranscripts:
    if not (config.listeners or config.clients or config.users):
        return NoTranscripts()
    sink: Sink = DirectorySink(config.directory) if config.directory else LogSink()
    return Transcripts(config, sink)
