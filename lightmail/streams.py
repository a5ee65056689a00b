"""Streaming message content: chunks from the blob store, and dot-stuffing.

POP3 (RFC 1939 §3) and the SMTP client (RFC 5321 §4.5.2) both send stored messages
as dot-terminated text, without ever holding a whole message in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Optional

from twisted.internet import defer

from lightmail.storage.interfaces import IBlobStore

CHUNK = 256 * 1024


async def blob_chunks(blobs: IBlobStore, blob_id: str, size: int,
                      chunk: int = CHUNK) -> AsyncIterator[bytes]:
    """The blob in chunks, each read off the reactor thread."""
    offset = 0
    while offset < size:
        data = await blobs.read_range(blob_id, offset, min(chunk, size - offset))
        if not data:
            break
        offset += len(data)
        yield data


class PushProducer:
    """Flow control for a session that streams to a slow reader (IPushProducer).

    A session registers itself as the transport's producer while it sends; when the
    transport's buffer is full, :meth:`pauseProducing` leaves a Deferred in
    ``_paused`` that the sending loop awaits, fired on resume, or failed with the
    reason when the connection is lost (:meth:`fail_paused`)."""

    _paused: Optional[defer.Deferred[None]] = None

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = defer.Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def fail_paused(self, reason: Any) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.errback(reason)


class DotStuffer:
    """Byte-stuffs lines that begin with a dot, across chunk boundaries."""

    def __init__(self) -> None:
        self.at_line_start = True
        self.last = b"\n"

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self.at_line_start and out.startswith(b"."):
            out = b"." + out
        self.at_line_start = chunk.endswith(b"\n")
        self.last = chunk[-1:]
        return out

    def end(self) -> bytes:
        """The terminator: CRLF . CRLF, with a CRLF first if the content lacks one."""
        return (b"" if self.last == b"\n" else b"\r\n") + b".\r\n"


def dot_stuffed(content: bytes) -> bytes:
    """A whole message dot-stuffed and terminated (CRLF . CRLF), for one write: what
    :class:`DotStuffer` makes of it in one chunk, with one ``bytes.replace``."""
    out = content.replace(b"\n.", b"\n..")
    if out.startswith(b"."):
        out = b"." + out
    return out + (b".\r\n" if not content or content.endswith(b"\n") else b"\r\n.\r\n")
