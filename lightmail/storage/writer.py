"""The writer process: grouped writes (blob flush and SQL commit) in a process of their own.

Why a process: a group commit is a chain of short system calls (a blob's write and
rename, a statement's step, the flushes), and in the server's process each of them
gives up Python's GIL and must win it back from the reactor thread, which on a busy
server holds it most of the time.  Measured at 10 SMTP sessions: a group of ~4.5
messages spent 2.7 ms in the blob phase, of which 0.6 ms was CPU and under 1 ms the
flush; the rest was waiting for the GIL.  Here nothing else wants the GIL.

The main process and its workers send the write port's operations
(lightmail.storage.writeport.WriterProcessPort) as AMP ``Write`` commands
(lightmail.storage.wire): an operation of lightmail.storage.sqlwrites, its arguments,
and the blob it refers to when that blob is still to be made durable (the path of its
temporary file and the octets not yet written there).  The writer takes every
request that has arrived, makes their blobs durable with one flush and runs their
operations in one transaction (``Database.commit_group_now``: one request that fails
is left out alone), then answers each.  An answer means committed, as with the group
commit in the server's own process.  The writer runs storage operations only: what
they need from the directory comes in the request.

This module is the loop; the process's entry point, which wires its storage as every
LightMail process does, is lightmail.workers.writer.
"""

from __future__ import annotations

import selectors
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.protocols import amp
from twisted.python.failure import Failure

from lightmail.storage.database import Database, GroupedWrite
from lightmail.storage.interfaces import IBlobStore
from lightmail.storage.sqlwrites import SQLWrites
from lightmail.storage.wire import Write

__all__ = ["run_group", "serve"]

#: Requests in one group at most (as Database._GROUP_MAX).
GROUP_MAX = 200


class WriteRequest:
    """One Write command waiting for its group; ``answer`` fires with AMP's response
    (``{"outcome": (result, changes)}``) or fails with the operation's error."""

    __slots__ = ("answer", "args", "blob", "durable", "op", "peer")

    def __init__(self, peer: _Peer, op: str, args: Any, blob: Any, durable: bool) -> None:
        self.peer = peer
        self.op = op
        self.args = args
        self.blob = blob
        self.durable = durable
        self.answer: Deferred[dict[str, Any]] = Deferred()


class _Outbox:
    """The transport AMP writes its answers to: kept until the group is answered."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.data.extend(data)

    def loseConnection(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.data = b"".join(self.data), []
        return data


class _Peer(amp.AMP):
    """One process that sends requests (the main process, or a worker): AMP fed by
    the loop's reads, without a reactor; each Write waits for its group."""

    def __init__(self, sock: socket.socket, arrived: list[WriteRequest]) -> None:
        super().__init__()
        self.sock = sock
        self.arrived = arrived
        self.closed = False        # it will send nothing more
        self.owed = 0              # requests taken and not yet answered
        self.outbox = _Outbox()
        amp.BinaryBoxProtocol.makeConnection(self, self.outbox)  # no log line

    @Write.responder
    def write(self, op: str, args: Any, blob: Any, durable: bool) -> Deferred[Any]:
        request = WriteRequest(self, op, args, blob, durable)
        self.arrived.append(request)
        self.owed += 1
        return request.answer

    def receive(self) -> bool:
        """Take what has arrived; False once the other end has closed."""
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self.dataReceived(data)


def serve(sock: socket.socket, db: Database, blobs: IBlobStore, writes: SQLWrites,
          listener: socket.socket | None = None) -> None:
    """Answer requests, a group at a time, from the main process (``sock``) and from
    the workers that connect to ``listener``, until the main process closes its end
    (what it sent before that is still answered); the requests of every process that
    arrived meanwhile go in one group."""
    selector = selectors.DefaultSelector()
    pending: list[WriteRequest] = []
    main_peer = _Peer(sock, pending)
    selector.register(sock, selectors.EVENT_READ, main_peer)
    if listener is not None:
        selector.register(listener, selectors.EVENT_READ, None)
    while pending or not main_peer.closed:
        for key, _ in selector.select(0 if pending else None):
            peer = key.data
            if peer is None:
                assert listener is not None
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                selector.register(conn, selectors.EVENT_READ, _Peer(conn, pending))
                continue
            if not peer.receive():
                peer.closed = True
                selector.unregister(peer.sock)
                _close_if_done(peer, main_peer)
        batch, pending[:] = pending[:GROUP_MAX], pending[GROUP_MAX:]
        if not batch:
            continue
        run_group(batch, db, blobs, writes)
        for peer in {request.peer for request in batch}:
            peer.owed -= sum(1 for request in batch if request.peer is peer)
            try:
                peer.sock.sendall(peer.outbox.take())
            except OSError:
                pass                # that process is gone: nobody waits for these
            _close_if_done(peer, main_peer)


def _close_if_done(peer: _Peer, main_peer: _Peer) -> None:
    if peer.closed and not peer.owed and peer is not main_peer:
        peer.sock.close()


def run_group(batch: list[WriteRequest], db: Database, blobs: IBlobStore,
              writes: SQLWrites) -> None:
    """One group: the requests' blobs made durable together, their operations in one
    transaction; each request answered (into its peer's outbox), in order."""
    requests = []
    refused: dict[int, Failure] = {}
    for index, request in enumerate(batch):
        try:
            fn = writes.operation(request.op)
        except LookupError:
            refused[index] = Failure()
            continue
        before = None if request.blob is None else blobs.adopt(request.blob)
        requests.append(GroupedWrite(fn, tuple(request.args), {}, None, False, before,
                                     request.durable or db.backend != "sqlite"))
    try:
        outcomes = db.commit_group_now(requests)
    except Exception:                   # the commit itself failed
        outcomes = [(False, Failure())] * len(requests)
    ran = iter(outcomes)
    for index, request in enumerate(batch):
        ok, value = (False, refused[index]) if index in refused else next(ran)
        if ok:
            request.answer.callback({"outcome": value})
        else:
            request.answer.errback(value)
