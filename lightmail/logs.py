"""Logging with twisted.logger: structured events, ids on every line.

Every connection gets a ``conn_id`` and every message a ``msg_id`` (its queue id);
:class:`BoundLogger` adds them to each event it emits, so that one grep finds the whole
story of a connection or a message, as with Postfix's queue ids.

Output is human text by default::

    2026-11-23T10:00:00.123+0000 info [smtp conn=K4TQ9Z msg=1R7KD3QXBN5F2G] queued ...

or one JSON object per line (``[logging] format = json``), and to syslog as RFC 5424
messages as well (``[logging] syslog``, lightmail/syslog5424.py).  Passwords and other
secrets are never put in events.

SIGUSR1 opens the log file again (logrotate's ``postrotate``): :class:`LogOutputs`
does it in each process, :func:`reopen_on_sigusr1` wires the signal.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.internet import defer, threads
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEvent,
)
from twisted.python import threadable
from zope.interface import implementer

from lightmail.config import LoggingConfig

_ID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
ID_FIELDS = ("worker_id", "conn_id", "msg_id", "user")


def new_id(length: int = 8) -> str:
    """A random id for a connection, as short as a log line wants."""
    value = int.from_bytes(os.urandom(8), "big")
    out = []
    for _ in range(length):
        value, digit = divmod(value, len(_ID_ALPHABET))
        out.append(_ID_ALPHABET[digit])
    return "".join(out)


class BoundLogger(Logger):
    """A Logger that adds fixed fields (conn_id, msg_id, ...) to every event."""

    def __init__(self, namespace: str | None = None, source: object = None,
                 observer: ILogObserver | None = None, **fields: Any) -> None:
        super().__init__(namespace=namespace, source=source, observer=observer)
        self.fields = fields

    def bind(self, **fields: Any) -> BoundLogger:
        return BoundLogger(self.namespace, self.source, self.observer,
                           **{**self.fields, **fields})

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        super().emit(level, format, **{**self.fields, **kwargs})


_stamp_cache: tuple[int, str] = (-1, "")


def _stamp(when: float) -> str:
    """Date and time to the second (the same second's lines share one strftime)."""
    global _stamp_cache
    second = int(when)
    if _stamp_cache[0] != second:
        local = time.localtime(second)
        _stamp_cache = (second, time.strftime("%Y-%m-%dT%H:%M:%S", local)
                        + "\0" + time.strftime("%z", local))
    return _stamp_cache[1]


def _format_message(event: dict[str, Any]) -> str:
    # Most events: a plain str.format of their own fields, several times cheaper
    # than twisted.logger's general formatter, which remains for everything else.
    fmt = event.get("log_format")
    if type(fmt) is str and "log_flattened" not in event:
        try:
            return fmt.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators, as
# escapes: what a client sends (a SASL user name, HELO, MAIL FROM, an IMAP ID field, a
# mailbox name) reaches log lines, and a CR, LF or ESC in it would let the client
# write lines of its own into the log, or drive the terminal that shows it.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0))}
_ESCAPES.update({0x0a: "\\n", 0x0d: "\\r", 0x09: "\\t", 0x2028: "\\u2028",
                 0x2029: "\\u2029"})


def escape(text: str) -> str:
    """``text`` on one line, its control characters as escapes."""
    if text.isprintable():
        return text
    return text.translate(_ESCAPES)


def format_text(event: dict[str, Any]) -> str | None:
    text = escape(_format_message(event))
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    stamp, _, zone = _stamp(event["log_time"]).partition("\0")
    millis = int((event["log_time"] % 1) * 1000)
    level = event.get("log_level", LogLevel.info).name
    system = event.get("log_system") or event.get("log_namespace", "-")
    ids = "".join(f" {name.removesuffix('_id')}={escape(str(event[name]))}"
                  for name in ID_FIELDS if event.get(name))
    return f"{stamp}.{millis:03d}{zone} {level} [{system}{ids}] {text}\n"


def format_message_line(event: dict[str, Any]) -> str:
    """The event's text on one line, a failure's traceback included (escaped): what a
    syslog message carries after its header."""
    text = _format_message(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return escape(text)


def _open_output(path: str) -> IO[str]:
    if path == "-":
        return sys.stdout
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, "a", encoding="utf-8", buffering=1)


@implementer(ILogObserver)
class TurnBufferedFileObserver:
    """Writes formatted events to ``stream`` as FileLogObserver does, except that
    the lines of one reactor turn go out together: on the reactor thread, while the
    reactor runs, a line is kept until the end of the turn (``callLater(0)``), so a
    turn that logs fifty deliveries costs one write and one flush, not fifty.
    Warnings and worse, lines from other threads and lines while no reactor runs go
    out at once (after what is kept, so the order holds); what is kept is written
    at shutdown and exit too.  (A ``kill -9`` loses at most the lines of the turn
    it interrupts.)"""

    def __init__(self, stream: IO[str], formatter: Callable[[dict[str, Any]], str | None],
                 path: str | None = None) -> None:
        self.stream = stream
        #: The file ``stream`` was opened from (None: standard output), for reopen().
        self.path = path
        self.formatter = formatter
        self.kept: list[str] = []
        # Re-entrant: a signal handler (twistd's SIGINT, SIGTERM) logs from the main
        # thread, and may run while that thread is in here.
        self.lock = threading.RLock()
        self.scheduled = False
        self.hooked = False
        atexit.register(self.flush)

    def __call__(self, event: dict[str, Any]) -> None:
        text = self.formatter(event)
        if not text:
            return
        reactor = sys.modules.get("twisted.internet.reactor")
        if (reactor is not None and getattr(reactor, "running", False)
                and threadable.isInIOThread()
                and event.get("log_level", LogLevel.info) < LogLevel.warn):
            with self.lock:
                self.kept.append(text)
            if not self.scheduled:
                self.scheduled = True
                if not self.hooked:
                    self.hooked = True
                    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
                        "after", "shutdown", self.flush)
                reactor.callLater(0, self._end_of_turn)  # type: ignore[attr-defined]
            return
        with self.lock:
            self.kept.append(text)
            self._write()

    def _end_of_turn(self) -> None:
        self.scheduled = False
        self.flush()

    def flush(self) -> None:
        with self.lock:
            self._write()

    def reopen(self) -> defer.Deferred[None]:
        """Open ``path`` again, as after logrotate renamed it: opened in a thread
        (opening may wait on the disk), then swapped in; lines until then go to the
        old file, which is closed after its last line.  Should the open fail (the
        directory is gone, permissions), the old file stays in use and the error is
        raised (the caller logs it there)."""
        if self.path is None:
            return defer.succeed(None)
        opened: defer.Deferred[IO[str]] = threads.deferToThread(_open_output, self.path)
        return opened.addCallback(self._swap)

    def _swap(self, stream: IO[str]) -> None:
        with self.lock:
            self._write()
            old, self.stream = self.stream, stream
        old.close()

    def _write(self) -> None:
        if self.kept:
            text = "".join(self.kept)
            self.kept.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass                 # a closed or broken log stream: nothing to do


class LogOutputs:
    """Where one process logs: its file (or standard output) and syslog, each behind
    the level filter, as one observer; ``reopen`` opens the file again (SIGUSR1)."""

    def __init__(self, observer: ILogObserver, files: list[TurnBufferedFileObserver]
                 ) -> None:
        self.observer = observer
        self.files = files

    def reopen(self) -> defer.Deferred[Any]:
        return defer.gatherResults([f.reopen() for f in self.files], consumeErrors=True)


def make_outputs(config: LoggingConfig, out: IO[str] | None = None) -> LogOutputs:
    """The outputs ``config`` asks for (level filter, text or JSON, syslog).  The
    configured file (or standard output) gets a turn-buffered observer; a stream
    given as ``out`` (tests, embedding) gets every line at once."""
    if config.format == "json":
        # Plain JSON lines, not RFC 7464 sequences: what log shippers and jq read.
        formatter: Callable[[dict[str, Any]], str | None] = _format_json
    else:
        formatter = format_text
    files: list[TurnBufferedFileObserver] = []
    observers: list[ILogObserver] = []
    if out is not None:
        observers.append(FileLogObserver(out, formatter))
    elif config.file:
        stream = _open_output(config.file)
        files.append(TurnBufferedFileObserver(
            stream, formatter, path=None if config.file == "-" else config.file))
        observers.extend(files)
    if config.syslog:
        from lightmail.syslog5424 import parse_target, syslog_observer
        observers.append(syslog_observer(parse_target(config.syslog),
                                         config.syslog_facility, config.syslog_app_name,
                                         format_message_line))
    predicate = LogLevelFilterPredicate(
        defaultLogLevel=LogLevel.levelWithName(config.level))
    base = observers[0] if len(observers) == 1 else _FanOut(observers)  # none: silent
    return LogOutputs(FilteringLogObserver(base, [predicate]), files)


@implementer(ILogObserver)
class _FanOut:
    def __init__(self, observers: list[ILogObserver]) -> None:
        self.observers = observers

    def __call__(self, event: dict[str, Any]) -> None:
        for observer in self.observers:
            observer(event)


def make_observer(config: LoggingConfig, out: IO[str] | None = None) -> ILogObserver:
    """The one observer of :func:`make_outputs`."""
    return make_outputs(config, out).observer


def reopen_on_sigusr1(reopen: Callable[[], object]) -> None:
    """SIGUSR1 calls ``reopen`` in the reactor's thread, at the end of what it is
    doing (a signal handler may interrupt a log write halfway)."""
    def handler(signum: int, frame: Any) -> None:
        from twisted.internet import reactor
        reactor.callFromThread(reopen)  # type: ignore[attr-defined]
    signal.signal(signal.SIGUSR1, handler)


def _format_json(event: dict[str, Any]) -> str:
    return eventAsJSON(event) + "\n"
