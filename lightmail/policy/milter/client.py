"""One connection to a milter, from the MTA's side: the packets of lightmail.policy.
milter.wire over a Twisted protocol, a command at a time, each answer awaited with
a time limit."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from lightmail.policy.milter import wire
from lightmail.policy.milter.wire import Edit, Negotiated, ProtocolError, Verdict

#: Which end-of-message edits each negotiated action allows.
_EDIT_ACTIONS = {
    wire.ADDHEADER: wire.ACT_ADDHDRS, wire.INSHEADER: wire.ACT_ADDHDRS,
    wire.CHGHEADER: wire.ACT_CHGHDRS, wire.REPLBODY: wire.ACT_CHGBODY,
    wire.ADDRCPT: wire.ACT_ADDRCPT, wire.ADDRCPT_PAR: wire.ACT_ADDRCPT_PAR,
    wire.DELRCPT: wire.ACT_DELRCPT, wire.CHGFROM: wire.ACT_CHGFROM,
    wire.QUARANTINE: wire.ACT_QUARANTINE,
}
#: The steps a milter may ask not to be told about.
_SKIPPED = {wire.CONNECT: wire.P_NOCONNECT, wire.HELO: wire.P_NOHELO,
            wire.MAIL: wire.P_NOMAIL, wire.RCPT: wire.P_NORCPT, wire.HEADER: wire.P_NOHDRS,
            wire.EOH: wire.P_NOEOH, wire.BODY: wire.P_NOBODY, wire.DATA: wire.P_NODATA}


class MilterUnavailable(Exception):
    """The milter could not be reached, went away, or took too long."""


def endpoint_for(socket: str, reactor: Any, timeout: float) -> IStreamClientEndpoint:
    """``unix:PATH`` or ``inet:HOST:PORT`` (as config.parse_milter_socket left it)."""
    kind, _, rest = socket.partition(":")
    if kind == "unix":
        return UNIXClientEndpoint(reactor, rest, timeout=timeout)
    host, _, port = rest.rpartition(":")
    return HostnameEndpoint(reactor, host.strip("[]"), int(port), timeout=timeout)


class MilterProtocol(Protocol):
    """The connection: packets out as they are sent, packets in queued until asked
    for (:meth:`next_packet`)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.reader = wire.PacketReader()
        self.packets: deque[tuple[bytes, bytes]] = deque()
        self.waiting: Optional[Deferred[tuple[bytes, bytes]]] = None
        self.lost: Optional[Failure] = None

    def dataReceived(self, data: bytes) -> None:
        if self.lost is not None:
            return
        try:
            self.packets.extend(self.reader.feed(data))
        except ProtocolError as exc:
            self.lost = Failure(exc)
            self.transport.abortConnection()  # type: ignore[union-attr]
        self._wake()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self.lost is None:
            self.lost = Failure(MilterUnavailable(
                f"the milter closed the connection ({reason.getErrorMessage()})"))
        self._wake()

    def _wake(self) -> None:
        waiting = self.waiting
        if waiting is None or (not self.packets and self.lost is None):
            return
        self.waiting = None
        if self.packets:
            waiting.callback(self.packets.popleft())
        else:
            assert self.lost is not None
            waiting.errback(self.lost)

    def send(self, data: bytes) -> None:
        if self.lost is not None:
            raise MilterUnavailable(self.lost.getErrorMessage())
        self.transport.write(data)  # type: ignore[union-attr]

    def next_packet(self, timeout: float) -> Deferred[tuple[bytes, bytes]]:
        """The milter's next packet; MilterUnavailable after ``timeout`` seconds."""
        if self.packets:
            return defer.succeed(self.packets.popleft())
        if self.lost is not None:
            return defer.fail(self.lost)

        def forget(_: Deferred[Any]) -> None:
            self.waiting = None
        d: Deferred[tuple[bytes, bytes]] = Deferred(forget)
        self.waiting = d

        def late(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError):
                self.close()
                return Failure(MilterUnavailable(f"no answer in {timeout:g}s"))
            return failure
        return d.addTimeout(timeout, self.clock).addErrback(late)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class MilterClient:
    """The conversation with one milter: negotiation, then the commands of a
    session.  Each command's ``macros`` are sent before it (those the milter asked
    for at that stage when it gave a list).  Steps the milter asked not to see are
    not sent, answers it said it would not give are not awaited: both count as
    continue."""

    def __init__(self, protocol: MilterProtocol, command_timeout: float,
                 eom_timeout: float) -> None:
        self.protocol = protocol
        self.command_timeout = command_timeout
        self.eom_timeout = eom_timeout
        self.negotiated = Negotiated(wire.VERSION, 0, 0)

    @classmethod
    async def open(cls, socket: str, reactor: Any, connect_timeout: float,
                   command_timeout: float, eom_timeout: float) -> MilterClient:
        """Connect and negotiate, both within ``connect_timeout`` (as Postfix's
        milter_connect_timeout: a name to resolve is part of it)."""
        endpoint = endpoint_for(socket, reactor, connect_timeout)
        connecting = connectProtocol(endpoint, MilterProtocol(reactor))
        try:
            protocol = await connecting.addTimeout(connect_timeout, reactor)
        except Exception as exc:
            raise MilterUnavailable(f"cannot connect to {socket}: "
                                    f"{exc or type(exc).__name__}") from None
        client = cls(protocol, command_timeout, eom_timeout)
        try:
            protocol.send(wire.offer())
            command, data = await protocol.next_packet(connect_timeout)
            client.negotiated = wire.read_negotiation(command, data)
        except BaseException:
            protocol.close()
            raise
        return client

    def skips(self, command: bytes) -> bool:
        """Whether the milter asked not to be sent this step (DATA: versions before 4
        do not know it)."""
        if command == wire.DATA and self.negotiated.version < 4:
            return True
        flag = _SKIPPED.get(command, 0)
        return bool(flag) and self.negotiated.wants(flag)

    def _send(self, command: bytes, data: bytes,
              macros: Sequence[tuple[str, str]] = ()) -> None:
        stage = wire.STAGE_OF.get(command)
        wanted = self.negotiated.macros.get(stage) if stage is not None else None
        if wanted is not None:
            macros = [(name, value) for name, value in macros if name in wanted]
        if macros:
            self.protocol.send(wire.macro_packet(command, macros))
        self.protocol.send(wire.packet(command, data))

    async def command(self, command: bytes, data: bytes,
                      macros: Sequence[tuple[str, str]] = ()) -> Verdict:
        """Send one step; the milter's verdict (skip only for BODY, and only when we
        offered it)."""
        if self.skips(command):
            return wire.CONTINUED
        self._send(command, data, macros)
        flag = wire.NO_REPLY.get(command, 0)
        if flag and self.negotiated.version >= wire.VERSION and self.negotiated.wants(flag):
            return wire.CONTINUED
        while True:
            answer, payload = await self.protocol.next_packet(self.command_timeout)
            if answer == wire.PROGRESS:
                continue                # the milter is working: the clock starts again
            verdict = wire.read_verdict(answer, payload)
            if verdict.kind == "skip" and not (
                    command == wire.BODY and self.negotiated.wants(wire.P_SKIP)):
                raise ProtocolError("skip, which is only an answer to a body chunk")
            return verdict

    async def end_of_message(self, macros: Sequence[tuple[str, str]] = ()
                             ) -> tuple[Verdict, list[Edit]]:
        """EOB: the verdict and the edits that came before it (each one an action the
        milter negotiated)."""
        self._send(wire.EOB, b"", macros)
        edits: list[Edit] = []
        while True:
            answer, payload = await self.protocol.next_packet(self.eom_timeout)
            if answer == wire.PROGRESS:
                continue
            if answer in wire.VERDICTS:
                verdict = wire.read_verdict(answer, payload)
                if verdict.kind == "skip":
                    raise ProtocolError("skip at end of message")
                return verdict, edits
            edit = wire.read_edit(answer, payload)
            if not self.negotiated.may(_EDIT_ACTIONS[edit.command]):
                raise ProtocolError(f"edit {edit.command!r}, an action it did not "
                                    "negotiate")
            edits.append(edit)
            if len(edits) > 10000:
                raise ProtocolError("more than 10000 edits")

    def abort(self) -> None:
        """The transaction is over (no answer is expected)."""
        self.protocol.send(wire.packet(wire.ABORT))

    def quit(self) -> None:
        """The session is over: say so, and close."""
        if self.protocol.lost is None:
            self.protocol.send(wire.packet(wire.QUIT))
            self.protocol.transport.loseConnection()  # type: ignore[union-attr]

    def close(self) -> None:
        self.protocol.close()
