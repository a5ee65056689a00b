"""ClamAV: a client of clamd's INSTREAM command, and what a verdict does at IMAP
APPEND (the SMTP/LMTP side is the inbound chain's antivirus check,
lightmail.policy.inbound.scanners).

The protocol (clamd(8), "INSTREAM"): the command ``zINSTREAM\\0``, then the content
as chunks, each after its length as 4 octets in network order, then a chunk of
length 0; clamd answers one line ended by NUL (the ``z`` prefix), then closes:

* ``stream: OK``
* ``stream: NAME FOUND``
* ``INSTREAM size limit exceeded. ERROR``: more than clamd's StreamMaxLength;
  clamd closes at once, possibly before the message is all sent
* ``... ERROR`` for anything else that went wrong in clamd.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from lightmail.policy.interfaces import IAppendCheck, IContentScanner, ScanResult
from lightmail.policy.scanclient import ScannerError, chunks, exchange
from lightmail.storage.interfaces import IBlobStore, IStagedBlob

log = Logger(namespace="lightmail.policy")

#: The chunk clamd is sent at a time (clamd reads up to StreamMaxLength in total).
CHUNK = 64 * 1024
SIZE_LIMIT = "INSTREAM size limit exceeded"


def instream(message: bytes) -> Iterator[bytes]:
    """The INSTREAM request for ``message``, piece by piece."""
    yield b"zINSTREAM\0"
    for chunk in chunks(message, CHUNK):
        yield struct.pack(">I", len(chunk)) + chunk
    yield struct.pack(">I", 0)


def parse_reply(reply: bytes) -> ScanResult:
    """clamd's answer as a ScanResult; ScannerError when it is not one."""
    text = reply.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    if not text:
        raise ScannerError("clamd closed the connection without an answer")
    if SIZE_LIMIT in text:
        return ScanResult("unscanned", reason="larger than clamd's StreamMaxLength")
    if text.endswith("ERROR"):
        raise ScannerError(f"clamd: {text[:200]}")
    name, sep, verdict = text.partition(": ")
    if not sep or name != "stream":
        raise ScannerError(f"clamd answered something else: {text[:200]!r}")
    if verdict == "OK":
        return ScanResult("clean")
    if verdict.endswith(" FOUND") and len(verdict) > len(" FOUND"):
        return ScanResult("infected", name=verdict[:-len(" FOUND")].strip()[:200])
    raise ScannerError(f"clamd answered something else: {text[:200]!r}")


@implementer(IContentScanner)
class ClamdScanner:
    """Scans messages with the clamd at ``[antivirus] socket`` (``unix:/path`` or
    ``tcp:host:port``), each scan at most ``timeout`` seconds, connecting included
    (``settings`` gives the current section: a reload changes both)."""

    def __init__(self, reactor: Any, settings: Callable[[], Any]) -> None:
        self.reactor = reactor
        self.settings = settings

    def scan(self, message: bytes) -> Deferred[ScanResult]:
        cfg = self.settings()
        d = exchange(self.reactor, cfg.socket, cfg.timeout, instream(message),
                     complete=lambda reply: b"\0" in reply, what="clamd")
        return d.addCallback(parse_reply)


@implementer(IAppendCheck)
class AppendAntivirus:
    """IMAP APPEND on a listener whose checks include antivirus: an infected message
    is refused; when the scanner gives no answer, ``[antivirus] on_error`` says
    whether the APPEND fails (tempfail: NO [UNAVAILABLE], the client tries again)
    or the message is filed unscanned (accept), logged either way."""

    def __init__(self, scanner: IContentScanner, blobs: IBlobStore,
                 settings: Callable[[], Any]) -> None:
        self.scanner = scanner
        self.blobs = blobs
        self.settings = settings        # the current [antivirus] section

    def check(self, staged: IStagedBlob, conn_id: str) -> Deferred[Optional[str]]:
        return Deferred.fromCoroutine(self._check(staged, conn_id))

    async def _check(self, staged: IStagedBlob, conn_id: str) -> Optional[str]:
        cfg = self.settings()
        size = staged.ref.size
        if size > cfg.max_size:
            log.info("antivirus: APPEND of {size} octets not scanned (over max_size)",
                     size=size, conn_id=conn_id, verdict="unscanned")
            return None
        data = await self.blobs.read_staged(staged)
        try:
            result = await self.scanner.scan(data)
        except ScannerError as exc:
            log.warn("antivirus: APPEND not scanned: {error}", error=str(exc),
                     conn_id=conn_id, verdict="error", action=cfg.on_error)
            if cfg.on_error == "tempfail":
                return ("[UNAVAILABLE] The virus scanner is not available, "
                        "try again later")
            return None
        log.info("antivirus: APPEND {verdict} {virus}", verdict=result.status,
                 virus=result.name or result.reason, conn_id=conn_id)
        if result.status == "infected":
            return f"Message refused: it contains a virus ({result.name})"
        return None


@implementer(IAppendCheck)
class NoAppendCheck:
    """IMAP listeners whose checks do not include antivirus: APPEND files as is."""

    def check(self, staged: IStagedBlob, conn_id: str) -> Deferred[Optional[str]]:
        return defer.succeed(None)


NO_APPEND_CHECK = NoAppendCheck()
