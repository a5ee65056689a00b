"""One input, one session: fed to a real protocol object inside the reactor, measured.

:func:`play` runs in the reactor thread (the caller, in another thread, waits for it
with ``blockingCallFromThread``).  It builds the session with the listener's factory,
connects it to a ``StringTransport``, and feeds the input's bytes cut into several
``dataReceived`` calls.  After each call it lets the reactor run until the session is
quiet: not ``busy`` (every protocol sets that while storage answers a command); after
the last one it brings the session back to its command state (ends a DATA, a literal,
an IDLE, a SASL exchange: :class:`Adapter.resync`) and sends one probe command, whose
answer shows the session can go on.  Then the connection is lost, and the storage
thread pools are drained so that nothing the session started is still running when
the next input comes.

While it runs, :class:`Meter` times every reactor iteration in CPU time of the reactor
thread (``time.thread_time``: the machine is shared, and a wall clock would count the
time another process had the CPU), and :class:`Failures` collects what Twisted's
logger reports with a failure attached: ``log.failure`` of an internal error, and an
unhandled error in a Deferred.  What the results mean is ``oracle.py``'s business.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from lightmail.imap.parser import parse_command, tag_of
from lightmail.imap.tokens import ParseError
from lightmail.sasl import RESPONSE_LIMIT

# A session that is still busy after this long (wall clock) is hung.
HANG_SECONDS = 20.0
# Fillers the resync sends to end a literal or BDAT chunk, at most (a longer one is
# within the limits by construction: the session waits, as it should).
MAX_FILLER = 1 << 20
PROBE_TAG = "ZZPROBE"
WAITING = "the session waits for the rest of a literal or BDAT chunk"
CORRUPT = "the client corrupted its deflate stream: it may say anything"
MISMATCH = "the client's and the server's COMPRESS state differ"


@dataclass(frozen=True)
class Input:
    """What one session receives.

    ``plain`` goes as it is; ``deflated`` (IMAP only) follows it deflated, as a client
    sends after COMPRESS DEFLATE, with a bit flipped at ``corrupt`` if given; the wire
    bytes are cut at ``cuts`` into separate ``dataReceived`` calls."""

    listener: str
    plain: bytes
    deflated: bytes = b""
    cuts: tuple[int, ...] = ()
    corrupt: int | None = None

    def wire(self, compressor: Any) -> bytes:
        if not self.deflated:
            return self.plain
        packed = bytearray(compressor.compress(self.deflated)
                           + compressor.flush(zlib.Z_SYNC_FLUSH))
        if self.corrupt is not None and packed:
            packed[self.corrupt % len(packed)] ^= 1 << (self.corrupt % 8)
        return self.plain + bytes(packed)

    def chunks(self, wire: bytes) -> list[bytes]:
        points = sorted({cut % (len(wire) + 1) for cut in self.cuts} | {0, len(wire)})
        return [wire[a:b] for a, b in itertools.pairwise(points) if b > a]


@dataclass
class Played:
    """What happened: the output and what the oracle needs to judge it."""

    protocol: str
    output: bytes = b""
    #: What the session took as commands, in order (IMAP: the tags it must answer;
    #: SMTP, LMTP, POP3: the lines).
    dispatched: list[bytes] = field(default_factory=list)
    #: The server closed the connection (transport.loseConnection).
    closed: bool = False
    #: Index in ``dispatched`` the probe would have (None: no probe was sent, and why).
    probe_at: int | None = None
    no_probe: str = ""
    hold: float = 0.0              # longest reactor iteration, CPU seconds
    hold_call: float = 0.0         # longest dataReceived call
    failures: list[str] = field(default_factory=list)
    hung: str = ""
    memory: str = ""
    delayed_calls: int = 0         # left behind after the session ended


def _session_calls() -> int:
    """The reactor's timers, but for the server's own loops (task.LoopingCall: the
    blob garbage collection, every GC_INTERVAL): one of those whose run was in a
    thread when a session began is back on the clock when it ends, and was counted
    as left behind by the session (twice in an hour of inputs)."""
    from twisted.internet import task
    return sum(1 for call in reactor.getDelayedCalls()  # type: ignore[attr-defined]
               if not isinstance(call.func, task.LoopingCall))


class Meter:
    """Times each reactor iteration (``runUntilCurrent``) in thread CPU time."""

    def __init__(self) -> None:
        self.longest = 0.0
        #: Called after each iteration (``settle`` waits with it).
        self.watch: Callable[[], None] | None = None
        self._original: Callable[[], None] | None = None

    def install(self) -> None:
        original = reactor.runUntilCurrent  # type: ignore[attr-defined]
        self._original = original

        def timed() -> None:
            started = time.thread_time()
            try:
                original()
            finally:
                self.longest = max(self.longest, time.thread_time() - started)
            if self.watch is not None:
                self.watch()
        reactor.runUntilCurrent = timed  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        if self._original is not None:
            del reactor.runUntilCurrent  # type: ignore[attr-defined]
            self._original = None


class Failures:
    """Log events that carry a failure: a crash, whatever else the session did."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            text = failure.getTraceback() if isinstance(failure, Failure) else str(failure)
            self.seen.append(f"{event.get('log_format', '')}\n{text}")

    def install(self) -> None:
        globalLogPublisher.addObserver(self)

    def uninstall(self) -> None:
        globalLogPublisher.removeObserver(self)


class Adapter:
    """What differs between protocols: how to see what the session took as a command,
    how to bring it back to its command state, what it buffers, and the probe."""

    probe = b"NOOP\r\n"

    def instrument(self, proto: Any, dispatched: list[bytes]) -> None:
        for name in ("_command", "_auth_response"):
            original = getattr(proto, name)

            def counted(line: bytes, original: Any = original) -> None:
                dispatched.append(line)
                original(line)
            setattr(proto, name, counted)

    def resync(self, proto: Any) -> bytes | None:
        """Bytes that end whatever the session is in the middle of; b"" when it waits
        for a command; None when it waits, rightly, for more than MAX_FILLER."""
        raise NotImplementedError

    def buffered(self, proto: Any) -> str:
        """Why the session holds more than its limits allow ("" when it does not)."""
        raise NotImplementedError


class SMTPAdapter(Adapter):
    def resync(self, proto: Any) -> bytes | None:
        if proto.mode == "data":
            return b"\r\n.\r\n"
        if proto.mode == "bdat":
            return b"x" * proto.bdat_left if proto.bdat_left <= MAX_FILLER else None
        if proto.mode == "auth":
            return b"*\r\n"
        if proto.buffer or proto.discarding:
            return b"\r\n"
        return b""

    def buffered(self, proto: Any) -> str:
        # A SASL response may be longer than a command line (sasl.RESPONSE_LIMIT).
        limit = max(proto.cfg.max_line_length, RESPONSE_LIMIT) if proto.mode == "auth" \
            else proto.cfg.max_line_length
        if len(proto.buffer) > limit + 2:
            return f"{len(proto.buffer)} octets buffered in {proto.mode} mode (limit {limit})"
        return ""


class POP3Adapter(Adapter):
    def instrument(self, proto: Any, dispatched: list[bytes]) -> None:
        super().instrument(proto, dispatched)
        err = proto.err

        def answered(text: str, counts: bool = True) -> None:
            # A line too long is answered without being taken as a command: it still
            # has its place among the replies the oracle reads in order.
            if text == "Line too long":
                dispatched.append(b"")
            err(text, counts)
        proto.err = answered

    def resync(self, proto: Any) -> bytes | None:
        if proto.sasl is not None or proto.buffer or proto.discarding:
            return b"\r\n" if proto.buffer or proto.discarding else b"*\r\n"
        return b""

    def buffered(self, proto: Any) -> str:
        # A SASL response may be longer than a command line (sasl.RESPONSE_LIMIT).
        limit = max(proto.cfg.max_line_length, RESPONSE_LIMIT) if proto.sasl is not None \
            else proto.cfg.max_line_length
        if len(proto.buffer) > limit + 2:
            return f"{len(proto.buffer)} octets buffered (limit {limit})"
        return ""


class IMAPAdapter(Adapter):
    probe = f"{PROBE_TAG} NOOP\r\n".encode()

    def instrument(self, proto: Any, dispatched: list[bytes]) -> None:
        original = proto._dispatch

        def counted(parts: list[bytes]) -> None:
            # The tag the reply must carry: the command's, or "*" when the session
            # cannot tell it (parser.tag_of).
            try:
                tag = parse_command(parts).tag
            except ParseError:
                tag = tag_of(parts)
            dispatched.append(tag.encode("utf-8", "replace"))
            original(parts)
        proto._dispatch = counted

    def resync(self, proto: Any) -> bytes | None:
        reader = proto.reader
        if reader.discard_left or reader.literal_left:
            left = reader.discard_left or reader.literal_left
            return b"x" * left if left <= MAX_FILLER else None
        if reader.buffer or reader.skip_line or reader.parts:
            return b"\r\n"
        if proto.idling is not None:
            return b"DONE\r\n"
        if proto.sasl is not None:
            return b"*\r\n"
        return b""

    def buffered(self, proto: Any) -> str:
        reader = proto.reader
        if len(reader.buffer) > max(reader.max_line + 2, reader.literal_left):
            return f"{len(reader.buffer)} octets buffered (line limit {reader.max_line})"
        if reader.size > reader.max_command:
            return f"command of {reader.size} octets held (limit {reader.max_command})"
        return ""


ADAPTERS: dict[str, Adapter] = {
    "smtp": SMTPAdapter(), "submission": SMTPAdapter(), "lmtp": SMTPAdapter(),
    "pop3": POP3Adapter(), "imap": IMAPAdapter(),
}


def protocol_of(listener: str) -> str:
    return listener.split("/")[0]


def wait(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def settle(proto: Any, meter: Meter, limit: float = HANG_SECONDS) -> bool:
    """Let the reactor run until ``proto`` is not busy (False: it still is, at the
    limit).  Looked at after every reactor iteration: storage answers wake the
    reactor (``callFromThread``), so nothing is waited for longer than it takes."""
    if not proto.busy:
        return True
    done: defer.Deferred[bool] = defer.Deferred()

    def answer(quiet: bool) -> None:
        meter.watch = None
        if timer.active():
            timer.cancel()
        # In an iteration of its own: the caller goes on feeding the session, and
        # what that costs is timed as any other iteration.
        reactor.callLater(0, done.callback, quiet)  # type: ignore[attr-defined]

    def look() -> None:
        if not proto.busy:
            answer(True)
    timer = reactor.callLater(limit, answer, False)  # type: ignore[attr-defined]
    meter.watch = look
    return await done


async def drain(pools: list[Any]) -> bool:
    """Wait until every thread of every pool has finished what was queued before:
    each thread takes one job that waits for all the others to have taken theirs."""
    for pool in pools:
        barrier = threading.Barrier(pool.size)
        jobs = [threads.deferToThreadPool(reactor, pool, barrier.wait, HANG_SECONDS)
                for _ in range(pool.size)]
        try:
            await defer.gatherResults(jobs, consumeErrors=True)
        except defer.FirstError:
            return False
    return True


async def play(world: Any, given: Input, meter: Meter, failures: Failures) -> Played:
    """Feed ``given`` to a new session of its listener and report what happened."""
    protocol = protocol_of(given.listener)
    adapter = ADAPTERS[protocol]
    played = Played(protocol)
    await world.counted()
    baseline_calls = _session_calls()
    failures.seen = []
    meter.longest = 0.0
    factory = world.factories[given.listener]
    proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
                                hostAddress=IPv4Address("TCP", "192.0.2.1", 25))
    adapter.instrument(proto, played.dispatched)
    proto.makeConnection(transport)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)

    async def feed(data: bytes) -> bool:
        started = time.thread_time()
        try:
            proto.dataReceived(data)
        except Exception:
            # In a real connection Twisted would log it and drop the connection.
            played.failures.append(f"dataReceived raised\n{traceback.format_exc()}")
            return False
        played.hold_call = max(played.hold_call, time.thread_time() - started)
        if not await settle(proto, meter):
            played.hung = f"still busy {HANG_SECONDS:g}s after {data[:80]!r}"
            return False
        if not transport.disconnecting:     # a closed session's buffer goes with it
            played.memory = played.memory or adapter.buffered(proto)
        return True

    try:
        for chunk in given.chunks(given.wire(compressor)):
            if transport.disconnecting or not await feed(chunk):
                break
        await _resync_and_probe(proto, transport, adapter, given, compressor, played, feed)
    finally:
        played.closed = transport.disconnecting
        played.output = transport.value()
        try:
            proto.connectionLost(Failure(ConnectionError("fuzz input done")))
        except Exception:
            played.failures.append(f"connectionLost raised\n{traceback.format_exc()}")
        if not await drain(world.pools):
            played.hung = played.hung or "a storage thread never finished"
        await wait(0)
        played.delayed_calls = _session_calls() - baseline_calls
        played.hold = meter.longest
        played.failures += failures.seen
    return played


async def _resync_and_probe(proto: Any, transport: StringTransport, adapter: Adapter,
                            given: Input, compressor: Any, played: Played,
                            feed: Callable[[bytes], Any]) -> None:
    if played.hung:
        return
    if given.corrupt is not None:
        played.no_probe = CORRUPT
        return
    client_compressing = bool(given.deflated)
    if client_compressing != (getattr(proto, "compressor", None) is not None):
        played.no_probe = MISMATCH
        return

    def packed(data: bytes) -> bytes:
        if not client_compressing:
            return data
        return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)

    for _ in range(6):
        if transport.disconnecting:
            return
        ending = adapter.resync(proto)
        if ending is None:
            played.no_probe = WAITING
            return
        if not ending:
            break
        if not await feed(packed(ending)):
            return
    else:
        played.no_probe = "the session did not come back to its command state"
        return
    if transport.disconnecting:
        return
    played.probe_at = len(played.dispatched)
    await feed(packed(adapter.probe))
