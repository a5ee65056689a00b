"""The writer process: grouped writes (blob flush and SQL commit) in a process of their own.

Why a process: a group commit is a chain of short system calls (a blob's write and
rename, a statement's step, the flushes), and in the server's process each of them
gives up Python's GIL and must win it back from the reactor thread, which on a busy
server holds it most of the time.  Measured at 10 SMTP sessions: a group of ~4.5
messages spent 2.7 ms in the blob phase, of which 0.6 ms was CPU and under 1 ms the
flush; the rest was waiting for the GIL.  Here nothing else wants the GIL.

The main process sends requests over a socket pair (``[storage] writer_process``):
a named operation, its arguments, and the blob it refers to when that blob is still
to be made durable (the path of its temporary file and the bytes not yet written
there).  The writer takes every request that has arrived, makes their blobs durable
with one flush and runs their operations in one transaction (``Database``'s group
commit: one request that fails is left out alone), then answers each.  An answer
means committed, as with the group commit in the server's own process.

Frames: a 4-byte big-endian length, then a pickle (the socket pair is private to the
main process and its own child).  Request: ``(id, op, args, blob)``; answer:
``(id, ok, value)`` where ``value`` is the result, or the exception when not ok.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from lightmail.directory.interfaces import Resolution
from lightmail.directory.sql import SQLDirectory
from lightmail.storage.blobs import FilesystemBlobStore, PendingBlob
from lightmail.storage.database import Database, _Request

__all__ = ["WriterClient", "WriterLost", "main", "serve"]

_LENGTH = struct.Struct(">I")
#: Requests in one group at most (as Database._GROUP_MAX).
GROUP_MAX = 200


class WriterLost(Exception):
    """The writer process went away before it answered: the request may or may not
    have committed (as with a crash), and the caller must say so (SMTP: 451)."""


# -- the writer's side ------------------------------------------------------------------

def _unknown(op: str) -> Callable[..., Any]:
    def fail(*_: Any) -> Any:
        raise LookupError(f"the writer process has no operation {op!r}")
    return fail


def _read_frames(sock: socket.socket, buf: bytearray, wait: bool
                 ) -> tuple[list[bytes], bool]:
    """The complete frames in ``buf`` after reading what has arrived (waiting for
    something first when ``wait``), and whether the other end has closed."""
    flags = 0 if wait else socket.MSG_DONTWAIT
    closed = False
    while True:
        try:
            data = sock.recv(1 << 20, flags)
        except BlockingIOError:
            break
        if not data:
            closed = True
            break
        buf += data
        flags = socket.MSG_DONTWAIT       # then take whatever else is there already
    frames = []
    offset = 0
    while len(buf) - offset >= 4:
        (length,) = _LENGTH.unpack_from(buf, offset)
        if len(buf) - offset - 4 < length:
            break
        frames.append(bytes(buf[offset + 4:offset + 4 + length]))
        offset += 4 + length
    del buf[:offset]
    return frames, closed


def _encode(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return _LENGTH.pack(len(data)) + data


def _answer(request_id: int, ok: bool, value: Any) -> bytes:
    if not ok:
        value = value.value if isinstance(value, Failure) else value
    try:
        return _encode((request_id, ok, value))
    except Exception:
        # An exception that does not pickle (a driver's) goes as its text.
        return _encode((request_id, False, RuntimeError(f"{type(value).__name__}: {value}")))


class _Peer:
    """One process that sends requests: the main process, or a worker."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.closed = False        # it will send nothing more
        self.owed = 0              # requests taken and not yet answered


def serve(sock: socket.socket, db: Database, blobs: FilesystemBlobStore,
          ops: dict[str, Callable[..., Any]],
          listener: socket.socket | None = None) -> None:
    """Answer requests, a group at a time, from the main process (``sock``) and from
    the workers that connect to ``listener``, until the main process closes its end
    (what it sent before that is still answered); the requests of every process that
    arrived meanwhile go in one group."""
    selector = selectors.DefaultSelector()
    main_peer = _Peer(sock)
    selector.register(sock, selectors.EVENT_READ, main_peer)
    if listener is not None:
        selector.register(listener, selectors.EVENT_READ, None)
    pending: list[tuple[_Peer, bytes]] = []
    while pending or not main_peer.closed:
        for key, _ in selector.select(0 if pending else None):
            peer = key.data
            if peer is None:
                assert listener is not None
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                selector.register(conn, selectors.EVENT_READ, _Peer(conn))
                continue
            frames, closed = _read_frames(peer.sock, peer.buf, wait=False)
            pending += [(peer, frame) for frame in frames]
            peer.owed += len(frames)
            if closed:
                peer.closed = True
                selector.unregister(peer.sock)
                _close_if_done(peer, main_peer)
        batch, pending = pending[:GROUP_MAX], pending[GROUP_MAX:]
        if not batch:
            continue
        answers = run_group([frame for _, frame in batch], db, blobs, ops)
        to: dict[_Peer, list[bytes]] = {}
        for (peer, _), answer in zip(batch, answers, strict=True):
            to.setdefault(peer, []).append(answer)
        for peer, out in to.items():
            peer.owed -= len(out)
            try:
                peer.sock.sendall(b"".join(out))
            except OSError:
                pass                # that process is gone: nobody waits for these
            _close_if_done(peer, main_peer)


def _close_if_done(peer: _Peer, main_peer: _Peer) -> None:
    if peer.closed and not peer.owed and peer is not main_peer:
        peer.sock.close()


def run_group(batch: list[bytes], db: Database, blobs: FilesystemBlobStore,
              ops: dict[str, Callable[..., Any]]) -> list[bytes]:
    """One group: the requests' blobs made durable together, their operations in one
    transaction; each request's answer, framed, in order."""
    ids, requests = [], []
    for frame in batch:
        request_id, op, args, blob, durable = pickle.loads(frame)
        before = None if blob is None else PendingBlob.adopt(blobs, *blob)
        ids.append(request_id)
        requests.append(_Request(ops.get(op) or _unknown(op), tuple(args), {},
                                 None, False, before,  # type: ignore[arg-type]
                                 durable or db.backend != "sqlite"))
    try:
        outcomes = db._run_befores_and_group(requests)
    except Exception as exc:            # the commit itself failed
        outcomes = [(False, exc)] * len(requests)
    return [_answer(request_id, ok, value)
            for request_id, (ok, value) in zip(ids, outcomes, strict=True)]


class _RememberingDirectory(SQLDirectory):
    """The directory as the writer reads it: a resolution read in a transaction is
    remembered for ``[directory] resolve_cache_ttl``, as the server's process does for
    RCPT, so that filing a fresh message finds its recipient without a query.  A
    change the server makes reaches this process within that time, as one made by
    the lightmail command reaches the server."""

    def resolve_now(self, conn: Any, address: str) -> Resolution:
        resolution = super().resolve_now(conn, address)
        if self.resolve_cache_ttl:
            self.remember(address, resolution)
        return resolution


def _operations(config: Any, db: Database, blobs: FilesystemBlobStore
                ) -> dict[str, Callable[..., Any]]:
    from lightmail.delivery.local import LocalDeliveryAgent
    from lightmail.storage.queuestore import SQLQueueStore
    from lightmail.storage.sqlstore import SQLMailStore
    mailstore = SQLMailStore(db, blobs)
    queue = SQLQueueStore(db, blobs)
    directory = _RememberingDirectory(
        db, recipient_delimiter=config.directory.recipient_delimiter,
        default_quota=config.directory.default_quota,
        resolve_cache_ttl=config.directory.resolve_cache_ttl)
    agent = LocalDeliveryAgent(directory, mailstore, queue, config.node_id)
    return {
        "file_all": agent._file_all_now,
        "file_one": agent._file_now,
        "enqueue": queue.enqueue_now,
        "append": mailstore.append_now,
        "set_flags": mailstore.set_flags_now,
        "expunge": mailstore.expunge_now,
        "copy": mailstore.copy_now,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LightMail's writer process")
    parser.add_argument("--config", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--listen", help="a Unix socket for the workers to connect to")
    args = parser.parse_args(argv)
    # The main process decides when this one ends (by closing the socket, once what
    # it sent is answered); a Ctrl-C or SIGTERM to the process group is for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from lightmail.config import load_config
    config = load_config(args.config)
    sock = socket.socket(fileno=args.fd)
    listener = None
    if args.listen:
        # In a directory of the main process's own (mode 0700): only this user's
        # processes can reach it, as with the socket pair.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.listen)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.listen)
        os.chmod(args.listen, 0o600)
        listener.listen(64)
    db = Database(config.database_url, threads=1)
    blobs = FilesystemBlobStore(config.blob_dir, None, sync=config.storage.blob_sync)
    try:
        serve(sock, db, blobs, _operations(config, db, blobs), listener)
    finally:
        db.stop()
        if args.listen:
            with contextlib.suppress(OSError):
                os.unlink(args.listen)
    return 0


# -- the main process's side ------------------------------------------------------------

#: Seconds before starting a writer process again after it ended, doubled at each
#: failure in a row, up to RESTART_MAX.  Meanwhile writes run in the server's own
#: process, as without a writer process.
RESTART_MIN = 0.5
RESTART_MAX = 30.0


class _Link(Int32StringReceiver):
    MAX_LENGTH = 1 << 30

    def __init__(self, client: WriterClient) -> None:
        self.client = client
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.client._linked(self)

    def stringReceived(self, data: bytes) -> None:
        self.client._answered(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.client._unlinked(self)
        self.lost.callback(None)


class WriterClient:
    """A process's end of the writer process.  The main process's (``config_path``)
    starts the writer, and starts it again should it end; with ``listen``, the
    writer also takes requests from the workers there.  A worker's (``connect``)
    connects to that socket, and again should the connection drop.  Requests not
    answered when the writer or the connection goes away fail with
    :class:`WriterLost`.  ``ready``: whether requests can go to the writer now
    (otherwise the caller writes in its own process)."""

    log = Logger()

    def __init__(self, config_path: str | None = None, *, listen: str | None = None,
                 connect: str | None = None) -> None:
        if (config_path is None) == (connect is None):
            raise ValueError("a WriterClient starts a writer (config_path) or "
                             "connects to one (connect)")
        self.config_path = config_path
        self.listen = listen
        self.connect = connect
        self._link: _Link | None = None
        self._waiting: dict[int, defer.Deferred[Any]] = {}
        self._next_id = 0
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
        assert self.config_path is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reactor.adoptStreamConnection(  # type: ignore[attr-defined]
            ours.fileno(), socket.AF_UNIX, _LinkFactory(self))
        ours.close()
        fd = 3
        args = [sys.executable, "-m", "lightmail.storage.writer", "--config",
                self.config_path, "--fd", str(fd)]
        if self.listen is not None:
            args += ["--listen", self.listen]
        self._ended = defer.Deferred()
        self._process = reactor.spawnProcess(  # type: ignore[attr-defined]
            _WriterProcess(self, self._ended), sys.executable, args,
            env=dict(os.environ), childFDs={0: "w", 1: 1, 2: 2, fd: theirs.fileno()})
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

    def call(self, op: str, args: tuple[Any, ...], pending: Any = None,
             durable: bool = True) -> defer.Deferred[Any]:
        """Run the writer's operation ``op(conn, *args)`` in its next group, and fire
        with its result once committed; with ``pending`` (a PendingBlob of this
        process), that blob is made durable there first, in the same group.
        ``durable=False``: committed as Database.write_unsynced does."""
        link = self._link
        if link is None:
            return defer.fail(WriterLost("the writer process is not running"))
        try:
            blob = pending.detach() if pending is not None else None
        except Exception:
            return defer.fail()     # a blob discarded before its commit, say
        self._next_id += 1
        request_id = self._next_id
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting[request_id] = d
        link.sendString(pickle.dumps((request_id, op, args, blob, durable), protocol=5))
        return d

    def _answered(self, data: bytes) -> None:
        request_id, ok, value = pickle.loads(data)
        d = self._waiting.pop(request_id, None)
        if d is None:
            return
        self._delay = RESTART_MIN          # it works
        if ok:
            d.callback(value)
        else:
            d.errback(Failure(value))

    def _linked(self, link: _Link) -> None:
        self._link = link
        if self.connect is not None:
            self.log.info("connected to the writer process")

    def _unlinked(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(WriterLost("the writer process went away before it answered"))
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
            self._again(f"writer process ended ({reason.getErrorMessage()})")


class _LinkFactory(protocol.ClientFactory):
    """Links to the writer: over the socket pair (adopted), or connecting to it."""

    noisy = False

    def __init__(self, client: WriterClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> _Link:
        return _Link(self.client)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.client._stopping:
            self.client._again(f"could not reach the writer process "
                               f"({reason.getErrorMessage()})")


class _WriterProcess(protocol.ProcessProtocol):
    def __init__(self, client: WriterClient, ended: defer.Deferred[None]) -> None:
        self.client = client
        self.ended = ended

    def processEnded(self, reason: Failure) -> None:
        self.client._process_ended(reason)
        self.ended.callback(None)


if __name__ == "__main__":
    sys.exit(main())
