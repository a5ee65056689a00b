"""SpamAssassin's spamd: a client of the SPAMC/SPAMD protocol (spamd's
PROTOCOL document, version 1.5), the second spam backend behind ISpamScanner.

Scanning is ``SYMBOLS``: the request line, ``Content-length`` and ``User``, a blank
line and the message; spamd answers ``SPAMD/1.1 0 EX_OK``, a ``Spam: True ; 15.0 /
5.0`` header, a blank line and the names of the rules that hit, then closes.
Learning is ``TELL`` with ``Message-class: spam|ham`` and ``Set: local`` (spamd must
run with ``--allow-tell``).  spamd has no actions of its own: a spam becomes
rspamd's "add header", or "reject" from ``[spam] reject_score`` up.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from lightmail.policy.interfaces import ISpamScanner, SpamRequest, SpamVerdict
from lightmail.policy.scanclient import ScannerError, chunks, exchange

_STATUS = re.compile(rb"^SPAMD/\d+\.\d+ +(\d+) +(.*)$")
_SPAM = re.compile(r"^(True|False|Yes|No) ; (-?[\d.]+) / (-?[\d.]+)$", re.IGNORECASE)
_SAFE = re.compile(r"[^\x21-\x7e]")


def request(command: str, message: bytes, headers: dict[str, str]) -> Iterator[bytes]:
    """A SPAMC request, piece by piece."""
    lines = [f"{command} SPAMC/1.5", f"Content-length: {len(message)}"]
    lines += [f"{name}: {value}" for name, value in headers.items() if value]
    yield ("\r\n".join(lines) + "\r\n\r\n").encode("ascii", "replace")
    yield from chunks(message)


def parse_reply(reply: bytes) -> tuple[dict[str, str], bytes]:
    """spamd's headers (lower-case names) and body; ScannerError for an error or
    anything that is not a reply."""
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = _STATUS.match(lines[0]) if lines and lines[0] else None
    if status is None:
        raise ScannerError(f"spamd answered something else: {reply[:200]!r}")
    if status.group(1) != b"0":
        raise ScannerError("spamd: " + status.group(2).decode("utf-8", "replace")[:200])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.decode("utf-8", "replace").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers, body


@implementer(ISpamScanner)
class SpamdClient:
    """Talks to the spamd at ``[spam] socket`` (``unix:/path`` or
    ``tcp:host:port``); ``settings`` gives the current section."""

    name = "spamd"

    def __init__(self, reactor: Any, settings: Callable[[], Any]) -> None:
        self.reactor = reactor
        self.settings = settings

    def check(self, message: bytes, request_: SpamRequest) -> Deferred[SpamVerdict]:
        cfg = self.settings()
        user = _SAFE.sub("", request_.user)[:200]
        d = exchange(self.reactor, cfg.socket, cfg.timeout,
                     request("SYMBOLS", message, {"User": user}), what="spamd")
        return d.addCallback(self._verdict, cfg.reject_score)

    def _verdict(self, reply: bytes, reject_score: float) -> SpamVerdict:
        headers, body = parse_reply(reply)
        spam = _SPAM.match(headers.get("spam", ""))
        if spam is None:
            raise ScannerError(f"spamd's answer has no Spam header: {reply[:200]!r}")
        is_spam = spam.group(1).lower() in ("true", "yes")
        score, required = float(spam.group(2)), float(spam.group(3))
        action = "no action"
        if is_spam:
            action = "reject" if score >= reject_score else "add header"
        symbols = tuple(name.strip() for name in body.decode("ascii", "replace").split(",")
                        if name.strip())
        return SpamVerdict(action=action, score=score, required_score=required,
                           symbols=symbols)

    def learn(self, kind: str, message: bytes, user: str) -> Deferred[None]:
        cfg = self.settings()
        headers = {"Message-class": kind, "Set": "local", "User": _SAFE.sub("", user)[:200]}
        d = exchange(self.reactor, cfg.socket, cfg.timeout,
                     request("TELL", message, headers), what="spamd")

        def taken(reply: bytes) -> None:
            parse_reply(reply)      # 0 EX_OK: taken (or known already); else raises
        return d.addCallback(taken)
