"""The chain itself: runs a listener's checks in order at each step, then writes the
Authentication-Results header field (see the package's docstring)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from lightmail.policy.inbound.authresults import ResultClause
from lightmail.policy.inbound.edits import apply_edits, field_name, has_fields, header_fields
from lightmail.policy.inbound.findings import Findings, IInboundCheck, Message
from lightmail.storage.interfaces import IBlobStore, IBlobWriter, IStagedBlob

# Which checks there are, in the order they run whatever order a listener lists them:
# DMARC weighs what SPF, DKIM and ARC found; at RCPT TO, a client refused for good
# (reverse, dnsbl: 5xx) is told so before greylisting asks it to come back (4xx);
# the content scanners come after the cheaper checks (each is a round trip to a
# scanner they may spare); milters come last, as Postfix runs smtpd_milters after
# its own restrictions.
CHECK_ORDER = ("access", "limits", "spf", "reverse", "dnsbl", "greylist", "dkim", "arc",
               "dmarc", "antivirus", "spam", "milter")
_FIELD_START = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)
_AUTHSERV_ID = re.compile(rb"^\s*(?:\([^()]*\)\s*)*([^\s;()]+)")
_UNSAFE = re.compile(r"[^\x20-\x7e]")
log = Logger(namespace="lightmail.policy")


class InboundPolicy:
    """One listener's chain.  ``checks`` run in the order given; ``authserv_id``
    gives the name our Authentication-Results fields carry (a callable: a reload may
    change it)."""

    def __init__(self, checks: Sequence[IInboundCheck], blobs: IBlobStore,
                 authserv_id: Callable[[], str]) -> None:
        self.checks = tuple(checks)
        self.blobs = blobs
        self.authserv_id = authserv_id
        self._declared_verdicts = _field_names(
            name for check in self.checks for name in check.verdict_fields)

    def verdict_fields(self, findings: Findings) -> frozenset[bytes]:
        """The names (lower-case) of the fields that say what our checks found: those
        the listener's checks declare, and any a check wrote this time."""
        if not findings.added_headers:
            return self._declared_verdicts
        return self._declared_verdicts | _field_names(
            field.split(":", 1)[0] for field in findings.added_headers)

    def connect(self, session: Any) -> Deferred[Any]:
        """None to greet the client, or the Reply (421) of the first check that
        refuses the connection."""
        findings = Findings()
        return self._first_refusal(lambda check: check.connect(session, findings))

    def mail(self, session: Any, tx: Any) -> Deferred[Any]:
        """None, or the Reply of the first check that refuses the transaction."""
        return self._first_refusal(lambda check: check.mail(session, tx, tx.findings))

    def rcpt(self, session: Any, tx: Any, address: str) -> Deferred[Any]:
        """None, or the Reply of the first check that refuses this recipient."""
        return self._first_refusal(
            lambda check: check.rcpt(session, tx, address, tx.findings))

    def _first_refusal(self, step: Callable[[IInboundCheck], Deferred[Any]],
                       start: int = 0) -> Deferred[Any]:
        """``step`` of each check from ``start`` on, one after the other, until one
        answers with a Reply.  Most answer at once (lists and buckets in memory,
        cached DNS answers): those are taken in this loop, and only a check still
        at work makes the rest wait for it (an inlineCallbacks generator costs
        more than the abuse checks' own work)."""
        for index in range(start, len(self.checks)):
            answer = step(self.checks[index])
            got: list[Any] = []
            answer.addCallback(got.append)      # at once when it has answered
            if not got:
                return answer.addCallback(self._after, got, step, index + 1)
            if got[0] is not None:
                return defer.succeed(got[0])
        return defer.succeed(None)

    def _after(self, _: object, got: list[Any],
               step: Callable[[IInboundCheck], Deferred[Any]], start: int) -> Any:
        """A check that was at work has answered (``got[0]``): its Reply, or on."""
        return got[0] if got[0] is not None else self._first_refusal(step, start)

    def session_ended(self, session: Any) -> None:
        """The SMTP session is over: each check lets go of what it kept for it."""
        for check in self.checks:
            check.session_ended(session)

    def content(self, session: Any, tx: Any, staged: IStagedBlob) -> Deferred[Any]:
        """(None or the refusing Reply, the staged blob to queue).  The blob is a new
        one when an Authentication-Results field was written (and the checks' header
        edits and new body made, in the same copy); the one given is then discarded,
        and when the checks refuse, the caller discards what it gets."""
        if not self.checks:
            return defer.succeed((None, staged))
        message = Message(self.blobs, staged)
        checked = self._first_refusal(
            lambda check: check.content(session, tx, message, tx.findings))

        def then(reply: Any) -> Any:
            if reply is not None:
                return reply, staged
            return self._rewritten(session, tx, message, staged)
        return checked.addCallback(then)

    def _rewritten(self, session: Any, tx: Any, message: Message,
                   staged: IStagedBlob) -> Deferred[Any]:
        """(None, the blob to queue): the message with the checks' results and edits,
        or ``staged`` itself when there is nothing to add or remove.  Callbacks
        rather than a generator: a small message's content is at hand, and so is
        each step's answer until the new blob is staged."""
        findings = tx.findings
        results = [entry for check in self.checks for entry in check.results(findings)]
        # Fields from outside that claim our checks' verdicts (a spammer's own
        # "X-Spam-Flag: NO") go, as the Authentication-Results fields that claim our
        # authserv-id do; those of checks this listener does not run stay.
        ours = self.verdict_fields(findings)

        def decide(headers: bytes) -> Any:
            forged = has_fields(headers, ours)
            if (not results and not findings.added_headers and not findings.header_edits
                    and findings.body is None and not forged):
                return None, staged           # nothing to say (limits alone, say)
            return message.content().addCallback(rewrite, forged)

        def rewrite(data: bytes, forged: bool) -> Deferred[Any]:
            if forged:
                _log_forged(session, tx, message.headers, ours)
            data = apply_edits(data, findings.header_edits, findings.body, remove=ours)
            rewritten = with_authentication_results(data, self.authserv_id(), results,
                                                    findings.added_headers)
            writer = self.blobs.writer()
            try:
                written = write_in_slices(writer, rewritten)
            except BaseException:
                writer.abort()    # its temporary file; the caller discards ``staged``
                raise

            def failed(failure: Failure) -> Failure:
                writer.abort()
                return failure
            return written.addCallback(lambda _: writer.stage()).addCallbacks(
                replaced, failed)

        def replaced(fresh: IStagedBlob) -> tuple[None, IStagedBlob]:
            staged.discard()
            return None, fresh
        return message.header_block().addCallback(decide)


def _field_names(names: Iterable[str]) -> frozenset[bytes]:
    return frozenset(name.strip().lower().encode("ascii", "replace") for name in names)


def _log_forged(session: Any, tx: Any, headers: bytes, ours: frozenset[bytes]) -> None:
    names = sorted({field_name(field).decode("ascii", "replace")
                    for field in header_fields(headers) if field_name(field) in ours})
    log.info("removed header fields from outside that claim our verdicts: {fields}",
             fields=", ".join(names), conn_id=session.conn_id, msg_id=tx.queue_id)


# The blob writer hashes what it is given on the reactor thread: a large rewritten
# message goes to it a slice at a time, a reactor turn apart (50 MB at once would
# hold the reactor for about 100 ms).
REWRITE_SLICE = 1 << 20


def write_in_slices(writer: IBlobWriter, data: bytes) -> Deferred[Any]:
    """Give ``data`` to ``writer``, REWRITE_SLICE octets a reactor turn."""
    if len(data) <= REWRITE_SLICE:
        writer.write(data)
        return defer.succeed(None)
    view = memoryview(data)

    def slices() -> Iterator[None]:
        for start in range(0, len(data), REWRITE_SLICE):
            writer.write(bytes(view[start:start + REWRITE_SLICE]))
            yield None
    done: Deferred[Any] = task.cooperate(slices()).whenDone()
    return done


def with_authentication_results(message: bytes, authserv_id: str,
                                results: Sequence[ResultClause],
                                added: Sequence[str] = ()) -> bytes:
    """The message with one Authentication-Results field on top (RFC 8601), below
    only the Received field our session wrote (where Postfix puts its milters'),
    and without the fields already there that claim ``authserv_id`` (§5: only we
    may speak for it; a field from outside that does is a forgery); the checks'
    ``added`` fields follow it."""
    header = authentication_results(authserv_id, results)
    header += b"".join(field.encode("ascii", "replace") + b"\r\n" for field in added)
    message = without_our_fields(message, authserv_id)
    first = _FIELD_START.match(message)
    if first is None or first.group(1).lower() != b"received":
        return header + message
    second = _FIELD_START.search(message, first.end())
    end = _header_end(message)
    at = second.start() if second is not None and second.start() < end else end
    return message[:at] + header + message[at:]


def authentication_results(authserv_id: str,
                           results: Sequence[ResultClause]) -> bytes:
    """The field, folded one result a line; ``none`` when there is no result."""
    entries = [_safe(str(entry)) for entry in results] or ["none"]
    text = f"Authentication-Results: {authserv_id};\r\n\t" + ";\r\n\t".join(entries)
    return text.encode("ascii") + b"\r\n"


def without_our_fields(message: bytes, authserv_id: str) -> bytes:
    """Remove the Authentication-Results fields of the header block that name
    ``authserv_id`` (case-insensitively); the message as it was when there are none."""
    end = _header_end(message)
    block = message[:end]
    if b"authentication-results" not in block.lower():
        return message              # most messages: no need to split the block
    starts = [(m.start(), m.group(1).lower()) for m in _FIELD_START.finditer(block)]
    ours = authserv_id.lower().encode("ascii", "replace")
    drop = []
    for index, (start, name) in enumerate(starts):
        if name != b"authentication-results":
            continue
        stop = starts[index + 1][0] if index + 1 < len(starts) else end
        value = block[start + len(name) + 1:stop]
        found = _AUTHSERV_ID.match(value.replace(b"\r\n", b" ").replace(b"\n", b" "))
        if found and found.group(1).lower() == ours:
            drop.append((start, stop))
    if not drop:
        return message
    parts, position = [], 0
    for start, stop in drop:
        parts.append(message[position:start])
        position = stop
    parts.append(message[position:])
    return b"".join(parts)


def _header_end(message: bytes) -> int:
    """Where the header block ends (its blank line's start), or the message's end."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        found = message.find(separator)
        if found >= 0:
            return found + len(separator) // 2
    return len(message)


def _safe(text: str) -> str:
    """A result as header text: printable ASCII only, at most 900 characters (the
    reasons quote what DNS and dkimpy said, which we do not control)."""
    return _UNSAFE.sub("?", text)[:900]


def build_checks(names: Sequence[str], services: Any) -> list[IInboundCheck]:
    """The checks a listener names, built from the services' evaluators, in
    CHECK_ORDER."""
    from lightmail.policy.dnsbl import Lookups
    from lightmail.policy.greylist.check import GreylistCheck
    from lightmail.policy.inbound.arc import ARCCheck
    from lightmail.policy.inbound.checks import AccessCheck, DKIMCheck, SPFCheck
    from lightmail.policy.inbound.dmarc import DMARCCheck
    from lightmail.policy.inbound.dnsbl import DNSBLCheck
    from lightmail.policy.inbound.reverse import ReverseCheck
    from lightmail.policy.inbound.scanners import AntivirusCheck, SpamCheck
    from lightmail.policy.limits.check import LimitsCheck
    from lightmail.policy.milter.check import MilterCheck
    from lightmail.policy.reverse import ReverseLookup

    makers: dict[str, Callable[[], IInboundCheck]] = {
        "access": lambda: AccessCheck(services.access),
        "limits": lambda: LimitsCheck(services.limiter, lambda: services.config.limits),
        "spf": lambda: SPFCheck(services.spf, lambda: services.config.spf),
        "reverse": lambda: ReverseCheck(ReverseLookup(services.resolver),
                                        lambda: services.config.reverse),
        "dnsbl": lambda: DNSBLCheck(Lookups(services.resolver),
                                    lambda: services.config.dnsbl),
        "greylist": lambda: GreylistCheck(services.greylist,
                                          lambda: services.config.greylist),
        "dkim": lambda: DKIMCheck(services.dkim_verifier, lambda: services.config.dkim),
        "arc": lambda: ARCCheck(services.arc_verifier, lambda: services.config.arc,
                                lambda: services.config.dkim),
        "dmarc": lambda: DMARCCheck(services.dmarc, services.dmarc_reports,
                                    lambda: services.config.arc),
        "antivirus": lambda: AntivirusCheck(services.antivirus,
                                            lambda: services.config.antivirus),
        "spam": lambda: SpamCheck(services.spam_scanner, lambda: services.config.spam),
        "milter": lambda: MilterCheck(lambda: services.config),
    }
    return [makers[name]() for name in CHECK_ORDER if name in names]
