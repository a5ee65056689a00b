"""Logging with twisted.logger: structured events, ids on every line.

Every connection gets a ``conn_id`` and every message a ``msg_id`` (its queue id);
:class:`BoundLogger` adds them to each event it emits, so that one grep finds the whole
story of a connection or a message, as with Postfix's queue ids.

Output is human text by default::

    2026-11-23T10:00:00.123+0000 info [smtp conn=K4TQ9Z msg=1R7KD3QXBN5F2G] queued ...

or one JSON object per line (``[logging] format = json``).  Passwords and other secrets
are never put in events.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    jsonFileLogObserver,
)

from lightmail.config import LoggingConfig

_ID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
ID_FIELDS = ("conn_id", "msg_id", "user")


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


def format_text(event: dict[str, Any]) -> str | None:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(event["log_time"]))
    millis = int((event["log_time"] % 1) * 1000)
    zone = time.strftime("%z", time.localtime(event["log_time"]))
    level = event.get("log_level", LogLevel.info).name
    system = event.get("log_system") or event.get("log_namespace", "-")
    ids = "".join(f" {name.removesuffix('_id')}={event[name]}"
                  for name in ID_FIELDS if event.get(name))
    return f"{stamp}.{millis:03d}{zone} {level} [{system}{ids}] {text}\n"


def _open_output(path: str) -> IO[str]:
    if path == "-":
        return sys.stdout
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, "a", encoding="utf-8", buffering=1)


def make_observer(config: LoggingConfig, out: IO[str] | None = None) -> ILogObserver:
    """The log observer that ``config`` asks for (level filter, text or JSON)."""
    stream = out if out is not None else _open_output(config.file)
    if config.format == "json":
        # Plain JSON lines, not RFC 7464 sequences: what log shippers and jq read.
        base: ILogObserver = jsonFileLogObserver(stream, recordSeparator="")
    else:
        base = FileLogObserver(stream, format_text)
    predicate = LogLevelFilterPredicate(
        defaultLogLevel=LogLevel.levelWithName(config.level))
    return FilteringLogObserver(base, [predicate])
