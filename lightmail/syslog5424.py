"""Log events to syslog, as RFC 5424 messages (``[logging] syslog``).

One event is one message::

    <22>1 2026-11-23T10:00:01.480213Z mx1 lightmail 4242 smtp
        [lightmail@32473 conn="K4TQ9ZBX" msg="1R7KD3QXBN5F2G"] BOM queued ...

PRI is the facility (``syslog_facility``, mail by default) and the event's level;
the structured data element carries the ids a log line shows (connection, message,
user, worker), as parameters a collector can index.  (32473 is the enterprise number
RFC 5612 sets aside for examples: LightMail has none of its own.)

Three transports:

* ``unix:/dev/log`` and ``udp:HOST:PORT``: one datagram per message (RFC 5426), from a
  non-blocking socket.  A receiver that is absent, or whose queue is full, costs a
  dropped message, never a wait: the reactor goes on, and the next message that gets
  through is followed by one that says how many were lost.
* ``tcp:HOST:PORT``: octet-counted frames (RFC 6587 §3.4.1) over a Twisted connection,
  made again after a loss (1 s, doubling to 30 s).  While the receiver does not read,
  messages wait in memory up to 1 MiB, and beyond that are dropped and counted.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import Protocol, ReconnectingClientFactory
from twisted.logger import ILogObserver, LogLevel
from twisted.python import threadable
from zope.interface import implementer

#: RFC 5424 §6.2.1, table 1.
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{n}": 16 + n for n in range(8)},
}
#: RFC 5424 §6.2.1, table 2, from twisted.logger's levels.
SEVERITIES = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4,
              LogLevel.error: 3, LogLevel.critical: 2}
SD_ID = "lightmail@32473"
#: Event fields carried as structured data, and their parameter names.
SD_FIELDS = (("conn_id", "conn"), ("msg_id", "msg"), ("user", "user"),
             ("worker_id", "worker"))
BOM = "\ufeff"
#: Largest datagram sent (a message is cut to fit); receivers take 8 KiB (rsyslog's
#: default maxMessageSize), RFC 5426 asks them for 2 KiB at least.
DATAGRAM_MAX = 8192
FRAME_MAX = 65536
TCP_BACKLOG = 1024 * 1024


@dataclass(frozen=True)
class Target:
    """Where syslog messages go: ``kind`` unix, udp or tcp."""

    kind: str
    address: str            # the socket's path, or the host
    port: int = 0


def parse_target(raw: str) -> Target:
    """``unix:PATH``, ``udp:HOST:PORT`` or ``tcp:HOST:PORT`` (an IPv6 host in
    brackets); ValueError says what is wrong."""
    kind, _, rest = raw.partition(":")
    if kind == "unix":
        if not rest.startswith("/"):
            raise ValueError(f"unix: needs an absolute socket path, got {raw!r}")
        return Target("unix", rest)
    if kind not in ("udp", "tcp"):
        raise ValueError(f"expected unix:PATH, udp:HOST:PORT or tcp:HOST:PORT, got {raw!r}")
    host, _, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected {kind}:HOST:PORT, got {raw!r}")
    return Target(kind, host, int(port))


def _sd_value(value: str) -> str:
    # RFC 5424 §6.3.3: '"', '\' and ']' escaped with a backslash.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_token(text: str, limit: int) -> str:
    """A header field: PRINTUSASCII only, at most ``limit`` characters, '-' if empty."""
    token = "".join(c for c in text if "!" <= c <= "~")[:limit]
    return token or "-"


class Formatter:
    """Events as RFC 5424 messages (bytes) of one host, application and process."""

    def __init__(self, facility: str, app_name: str, text: Callable[[dict[str, Any]], str],
                 hostname: str | None = None) -> None:
        self.facility = FACILITIES[facility]
        self.app_name = _header_token(app_name, 48)
        self.hostname = _header_token(hostname or socket.gethostname(), 255)
        self.text = text

    def __call__(self, event: dict[str, Any], limit: int) -> bytes:
        level = event.get("log_level", LogLevel.info)
        pri = self.facility * 8 + SEVERITIES.get(level, 6)
        when = event.get("log_time", time.time())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
        stamp += f".{int((when % 1) * 1_000_000):06d}Z"
        # MSGID (32 characters at most): the namespace without "lightmail.", which
        # APP-NAME says; the end is kept (the class name is the telling part).
        namespace = (event.get("log_namespace") or "").removeprefix("lightmail.")
        msgid = _header_token(namespace[-32:], 32)
        params = " ".join(f'{name}="{_sd_value(str(event[key]))}"'
                          for key, name in SD_FIELDS if event.get(key))
        sd = f"[{SD_ID} {params}]" if params else "-"
        head = (f"<{pri}>1 {stamp} {self.hostname} {self.app_name} {os.getpid()} "
                f"{msgid} {sd} ").encode("ascii") + BOM.encode()
        body = self.text(event).encode("utf-8", "replace")
        room = limit - len(head)
        if len(body) > room:
            # Cut on a character boundary: MSG must stay valid UTF-8.
            body = body[:room].decode("utf-8", "ignore").encode("utf-8")
        return head + body


@implementer(ILogObserver)
class DatagramSyslog:
    """Sends each event as one datagram; never waits (see the module's docstring)."""

    def __init__(self, target: Target, format: Formatter) -> None:
        self.format = format
        if target.kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.address: Any = target.address
        else:
            info = socket.getaddrinfo(target.address, target.port, type=socket.SOCK_DGRAM)
            family, _, _, _, self.address = info[0]
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.lock = threading.Lock()
        self.dropped = 0
        self.warned = False

    def __call__(self, event: dict[str, Any]) -> None:
        data = self.format(event, DATAGRAM_MAX)
        with self.lock:
            if not self._send(data):
                self.dropped += 1
                return
            if self.dropped:
                lost, self.dropped = self.dropped, 0
                note = dropped_note(lost, "absent or full")
                if not self._send(self.format(note, DATAGRAM_MAX)):
                    self.dropped = lost

    def _send(self, data: bytes) -> bool:
        try:
            self.sock.sendto(data, self.address)
            return True
        except OSError as exc:
            # EAGAIN/ENOBUFS: the receiver's queue is full; ENOENT, ECONNREFUSED: no
            # receiver; anything else is no reason to stop the server either.
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ENOENT,
                                 errno.ECONNREFUSED, errno.EMSGSIZE) and not self.warned:
                # Once (the log cannot report on itself): a stream socket at a
                # datagram target, say.
                self.warned = True
                print(f"lightmail: syslog: {exc}; messages are dropped", file=sys.stderr)
            return False

    def close(self) -> None:
        self.sock.close()


class _Stream(Protocol):
    def __init__(self, owner: StreamSyslog) -> None:
        self.owner = owner

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.owner.connected(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.owner.lost(self)

    def pauseProducing(self) -> None:
        self.owner.paused = True

    def resumeProducing(self) -> None:
        self.owner.paused = False
        self.owner.flush()

    def stopProducing(self) -> None:
        pass


class _Reconnecting(ReconnectingClientFactory):
    maxDelay = 30
    initialDelay = 1.0
    noisy = False

    def __init__(self, owner: StreamSyslog) -> None:
        self.owner = owner

    def buildProtocol(self, addr: Any) -> Protocol:
        self.resetDelay()
        return _Stream(self.owner)


@implementer(ILogObserver)
class StreamSyslog:
    """Octet-counted frames over TCP, written from the reactor thread only."""

    def __init__(self, target: Target, format: Formatter) -> None:
        self.target = target
        self.format = format
        self.pending: deque[bytes] = deque()
        self.pending_size = 0
        self.dropped = 0
        self.proto: _Stream | None = None
        self.paused = False
        self.factory = _Reconnecting(self)
        self.started = False

    def __call__(self, event: dict[str, Any]) -> None:
        message = self.format(event, FRAME_MAX)
        frame = b"%d %s" % (len(message), message)
        reactor = sys.modules.get("twisted.internet.reactor")
        if reactor is None:
            return
        if threadable.isInIOThread():
            self._queue(frame)
        else:
            reactor.callFromThread(self._queue, frame)  # type: ignore[attr-defined]

    def _queue(self, frame: bytes) -> None:
        if not self.started:
            self.started = True
            from twisted.internet import reactor
            reactor.callWhenRunning(  # type: ignore[attr-defined]
                reactor.connectTCP,  # type: ignore[attr-defined]
                self.target.address, self.target.port, self.factory)
        if self.pending_size + len(frame) > TCP_BACKLOG:
            self.dropped += 1
            return
        self.pending.append(frame)
        self.pending_size += len(frame)
        self.flush()

    def flush(self) -> None:
        if self.proto is None or self.proto.transport is None:
            return
        if self.dropped:
            lost, self.dropped = self.dropped, 0
            message = self.format(dropped_note(lost, "absent or slow"), FRAME_MAX)
            self.pending.appendleft(b"%d %s" % (len(message), message))
            self.pending_size += len(self.pending[0])
        while self.pending and not self.paused:
            frame = self.pending.popleft()
            self.pending_size -= len(frame)
            self.proto.transport.write(frame)

    def connected(self, proto: _Stream) -> None:
        self.proto = proto
        self.paused = False
        self.flush()

    def lost(self, proto: _Stream) -> None:
        if self.proto is proto:
            self.proto = None

    def close(self) -> None:
        self.factory.stopTrying()
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.loseConnection()


def syslog_observer(target: Target, facility: str, app_name: str,
                    text: Callable[[dict[str, Any]], str]) -> DatagramSyslog | StreamSyslog:
    format = Formatter(facility, app_name, text)
    if target.kind == "tcp":
        return StreamSyslog(target, format)
    return DatagramSyslog(target, format)


def dropped_note(lost: int, why: str) -> dict[str, Any]:
    """The log event that says how many messages the receiver did not get."""
    return {"log_level": LogLevel.warn, "log_namespace": "lightmail.syslog",
            "log_time": time.time(),
            "log_format": f"{lost} log messages were dropped: the syslog receiver was "
                          f"{why}"}
