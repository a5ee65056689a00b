"""rspamd: a client of its HTTP protocol (rspamd's "protocol" documentation).

Scanning: ``POST /checkv2`` to the normal worker (port 11333), the message as the
body and what the MTA knows as request headers (``Ip``, ``Helo``, ``From``, one
``Rcpt`` per recipient, ``Queue-Id``, ``User`` when authenticated, ``Hostname``);
the answer is JSON: ``action``, ``score``, ``required_score``, ``symbols`` and
``messages.smtp_message``.  Learning: ``POST /learnspam`` or ``/learnham`` to the
controller worker (port 11334), ``Password`` when it has one; an answer of 208
("already learned") is a lesson taken.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from lightmail.policy.interfaces import ISpamScanner, SpamRequest, SpamVerdict
from lightmail.policy.scanclient import ScannerError

log = Logger(namespace="lightmail.policy")

ACTIONS = ("reject", "soft reject", "rewrite subject", "add header", "greylist",
           "no action")
MAX_BODY = 1024 * 1024
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _value(text: str) -> bytes:
    """A request header's value: no line breaks or controls, however odd the input."""
    return _UNSAFE.sub("?", text)[:998].encode("utf-8", "replace")


def parse_answer(body: bytes) -> SpamVerdict:
    """The JSON answer of /checkv2; ScannerError when it is not one."""
    try:
        answer = json.loads(body)
        action = str(answer["action"]).lower()
        score = float(answer["score"])
        required = float(answer.get("required_score", 0.0))
    except (ValueError, KeyError, TypeError) as exc:
        raise ScannerError(f"rspamd answered something else ({exc}): {body[:200]!r}") from None
    if action not in ACTIONS:
        raise ScannerError(f"rspamd answered an unknown action {action!r}")
    symbols = answer.get("symbols") or {}
    messages = answer.get("messages") or {}
    return SpamVerdict(action=action, score=score, required_score=required,
                       symbols=tuple(sorted(symbols)) if isinstance(symbols, dict) else (),
                       message=str(messages.get("smtp_message", ""))
                       if isinstance(messages, dict) else "")


@implementer(ISpamScanner)
class RspamdClient:
    """Talks to rspamd at ``[spam] url`` (the normal worker) and ``controller_url``
    (for learning), each request at most ``timeout`` seconds (``settings`` gives the
    current section: a reload changes them)."""

    name = "rspamd"

    def __init__(self, reactor: Any, settings: Callable[[], Any]) -> None:
        self.reactor = reactor
        self.settings = settings
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 8
        self.agent = Agent(reactor, pool=pool)

    def check(self, message: bytes, request: SpamRequest) -> Deferred[SpamVerdict]:
        headers = Headers()
        for name, value in (("Ip", request.client_address), ("Helo", request.helo),
                            ("From", request.mail_from), ("Queue-Id", request.queue_id),
                            ("User", request.user), ("Hostname", request.hostname)):
            if value:
                headers.setRawHeaders(name, [_value(value)])
        if request.recipients:
            headers.setRawHeaders("Rcpt", [_value(rcpt) for rcpt in request.recipients])
        d = self._post(f"{self.settings().url}/checkv2", message, headers)
        return d.addCallback(lambda answer: parse_answer(answer[1]))

    def learn(self, kind: str, message: bytes, user: str) -> Deferred[None]:
        cfg = self.settings()
        headers = Headers()
        if cfg.password:
            headers.setRawHeaders("Password", [_value(cfg.password)])
        if user:
            headers.setRawHeaders("Deliver-To", [_value(user)])
        d = self._post(f"{cfg.controller_url}/learn{kind}", message, headers)

        def taken(answer: tuple[int, bytes]) -> None:
            code, body = answer
            if code == 208:         # already learned as that: nothing to do
                return
            if code != 200 or not _succeeded(body):
                raise ScannerError(f"rspamd did not learn {kind}: {code} "
                                   f"{body[:200].decode('utf-8', 'replace')}")
        return d.addCallback(taken)

    def _post(self, url: str, body: bytes, headers: Headers) -> Deferred[tuple[int, bytes]]:
        timeout = self.settings().timeout
        d: Deferred[Any] = self.agent.request(b"POST", url.encode("ascii"), headers,
                               FileBodyProducer(BytesIO(body)))

        def read(response: Any) -> Deferred[tuple[int, bytes]]:
            code = response.code
            reading: Deferred[bytes] = Deferred()
            response.deliverBody(_Body(reading))
            if code not in (200, 208) and not url.endswith(("/learnspam", "/learnham")):
                return reading.addCallback(lambda text: _failed(url, code, text))
            return reading.addCallback(lambda text: (code, text))
        d.addCallback(read)
        d.addTimeout(timeout, self.reactor)

        def unreachable(failure: Failure) -> tuple[int, bytes]:
            if isinstance(failure.value, ScannerError):
                raise failure.value
            if failure.check(TimeoutError):
                raise ScannerError(f"rspamd at {url} did not answer within "
                                   f"{timeout:g} s")
            raise ScannerError(f"cannot reach rspamd at {url}: "
                               f"{failure.getErrorMessage() or type(failure.value).__name__}")
        return d.addErrback(unreachable)


def _succeeded(body: bytes) -> bool:
    """Whether a learning answer says {"success": true}."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("success") is True


class _Body(Protocol):
    """Collects a response's body, at most MAX_BODY octets (rspamd's answers are a
    few kilobytes: more is not rspamd)."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_BODY:
            if not self.done.called:
                self.done.errback(ScannerError(f"rspamd's answer is over {MAX_BODY} octets"))
            self.transport.stopProducing()      # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:   # type: ignore[assignment]
        if self.done.called:
            return
        if reason is not None and not reason.check(ResponseDone):
            self.done.errback(ScannerError(
                f"rspamd's answer was cut short: {reason.getErrorMessage()}"))
        else:
            self.done.callback(b"".join(self.parts))


def _failed(url: str, code: int, text: bytes) -> tuple[int, bytes]:
    raise ScannerError(f"rspamd at {url} answered {code}: "
                       f"{text[:200].decode('utf-8', 'replace')}")

