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
from collections.abc import Callable
from typing import Any, cast

from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from lightmail.storage import wire
from lightmail.storage.database import Database, GroupedWrite
from lightmail.storage.interfaces import IBlobStore
from lightmail.storage.sqlwrites import SQLWrites

log = Logger(namespace="lightmail.storage.writer")
STORAGE_ERRORS = tuple(wire.STORAGE_ERRORS)

__all__ = ["run_group", "serve"]

#: Requests in one group at most (as Database._GROUP_MAX).
GROUP_MAX = 200


class WriteRequest:
    """One Write command waiting for its group: its peer, its AMP tag, the operation
    with its arguments, the blob to adopt, whether its commit must be flushed."""

    __slots__ = ("args", "blob", "durable", "op", "peer", "tag")

    def __init__(self, peer: Any, tag: bytes, op: str, args: Any, blob: Any,
                 durable: bool) -> None:
        self.peer = peer
        self.tag = tag
        self.op = op
        self.args = args
        self.blob = blob
        self.durable = durable


class _Peer:
    """One process that sends requests (the main process, or a worker): the AMP
    boxes it sends are read here (lightmail.storage.wire), each Write waits for its
    group, and the answers go back together."""

    def __init__(self, sock: socket.socket, arrived: list[WriteRequest],
                 stats: Callable[[], bytes]) -> None:
        self.sock = sock
        self.stats = stats
        self.arrived = arrived
        self.closed = False        # it will send nothing more
        self.owed = 0              # requests taken and not yet answered
        self.buf = bytearray()
        self.out: list[bytes] = []

    def receive(self) -> bool:
        """Take what has arrived; False once the other end has closed."""
        open_ = True
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                open_ = False
                break
            if not data:
                open_ = False
                break
            self.buf += data
        for box in wire.read_boxes(self.buf):
            if wire.is_stats(box):
                self.out.append(wire.stats_answer(box[amp.ASK], self.stats()))
                continue
            try:
                tag, (op, args, blob, durable) = wire.write_request(box)
            except Exception as exc:
                log.failure("a request the writer cannot read", Failure(exc))
                asked = box.get(amp.ASK)
                if asked is not None:
                    self.out.append(wire.write_error(asked, exc))
                continue
            self.arrived.append(WriteRequest(self, tag, op, args, blob, durable))
            self.owed += 1
        return open_

    def answer(self, request: WriteRequest, ok: bool, value: Any) -> None:
        if ok:
            self.out.append(wire.write_answer(request.tag, value))
            return
        error = cast(BaseException, value.value if isinstance(value, Failure) else value)
        if not isinstance(error, STORAGE_ERRORS):
            log.failure("write operation {op} failed", value, op=request.op)
        self.out.append(wire.write_error(request.tag, error))

    def flush(self) -> None:
        out, self.out = b"".join(self.out), []
        if out:
            try:
                self.sock.sendall(out)
            except OSError:
                pass                # that process is gone: nobody waits for these


def serve(sock: socket.socket, db: Database, blobs: IBlobStore, writes: SQLWrites,
          listener: socket.socket | None = None) -> None:
    """Answer requests, a group at a time, from the main process (``sock``) and from
    the workers that connect to ``listener``, until the main process closes its end
    (what it sent before that is still answered); the requests of every process that
    arrived meanwhile go in one group."""
    selector = selectors.DefaultSelector()
    pending: list[WriteRequest] = []
    stats = db.metrics.snapshot
    main_peer = _Peer(sock, pending, stats)
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
                selector.register(conn, selectors.EVENT_READ, _Peer(conn, pending, stats))
                continue
            still_open = peer.receive()
            peer.flush()            # requests it could not read are answered at once
            if not still_open:
                peer.closed = True
                selector.unregister(peer.sock)
                _close_if_done(peer, main_peer)
        batch, pending[:] = pending[:GROUP_MAX], pending[GROUP_MAX:]
        if not batch:
            continue
        peers = set()
        for request, (ok, value) in zip(batch, run_group(batch, db, blobs, writes),
                                        strict=True):
            request.peer.answer(request, ok, value)
            request.peer.owed -= 1
            peers.add(request.peer)
        for peer in peers:
            peer.flush()
            _close_if_done(peer, main_peer)


def _close_if_done(peer: _Peer, main_peer: _Peer) -> None:
    if peer.closed and not peer.owed and peer is not main_peer:
        peer.sock.close()


def run_group(batch: list[WriteRequest], db: Database, blobs: IBlobStore,
              writes: SQLWrites) -> list[tuple[bool, Any]]:
    """One group: the requests' blobs made durable together, their operations in one
    transaction; (ok, (result, changes) or Failure) for each request, in order."""
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
    db.metrics.group_committed(len(requests))
    try:
        outcomes = db.commit_group_now(requests)
    except Exception:                   # the commit itself failed
        outcomes = [(False, Failure())] * len(requests)
    ran = iter(outcomes)
    return [(False, refused[index]) if index in refused else next(ran)
            for index in range(len(batch))]
