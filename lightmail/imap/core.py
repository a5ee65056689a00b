"""The IMAP session's machinery: reading commands, running one at a time, writing
responses (batched, with flow control), states and limits, and telling the client of
changes to its selected mailbox.  Commands live in layers above it: ``mailboxes.py``
(authenticated state), ``messages.py`` (selected state) and ``session.py`` (any
state and authentication), each a subclass of the one before."""

from __future__ import annotations

import calendar
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail import sasl
from lightmail.imap.fetch import SYSTEM_FLAGS
from lightmail.imap.hub import MailboxHub
from lightmail.imap.parser import (
    Command,
    CommandReader,
    Inflater,
    LineTooLong,
    LiteralTooBig,
    Part,
    StreamedLiteral,
    parse_command,
    streamed_literals,
    tag_of,
)
from lightmail.imap.search import MAX_NUMBER64
from lightmail.imap.selected import STEP, SelectedMailbox, Steps, Updates
from lightmail.imap.sequence import formatting_sequence
from lightmail.imap.tokens import (
    ParseError,
    astring,
)
from lightmail.listeners import INPUT_SLICE, TrackedProtocol
from lightmail.logs import BoundLogger
from lightmail.policy.limits.throttle import command_rate
from lightmail.storage.interfaces import (
    MessageInfo,
    NoSuchMailbox,
)
from lightmail.streams import PushProducer
from lightmail.transport import write_at_once

NOT_AUTHENTICATED, AUTHENTICATED, SELECTED, LOGOUT = (
    "not authenticated", "authenticated", "selected", "logout")
ANY = (NOT_AUTHENTICATED, AUTHENTICATED, SELECTED)
AUTHED = (AUTHENTICATED, SELECTED)

FLAG_RE = re.compile(r"^\\?[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|~]+$")
DATE_TIME = re.compile(
    r"^\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$")
MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)}
# Commands that walk a whole mailbox hand the reactor back every so many messages, so
# that FETCH 1:* on 100,000 messages does not stall every other session.
BATCH = 500


def breathe() -> defer.Deferred[None]:
    """A Deferred that fires on the next reactor turn."""
    from twisted.internet import reactor
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0, d.callback, None)  # type: ignore[attr-defined]
    return d


flags_of = attrgetter("flags")

T = TypeVar("T")


async def sliced(steps: Generator[None, None, T]) -> T:
    """Run ``steps`` (a generator whose every step is a few milliseconds of work over
    messages: selected.STEP) to its end, handing the reactor back once the reactor's
    turn has run for INPUT_SLICE, as input does (listeners.INPUT_SLICE).  Work in
    proportion to a mailbox (taking in a COPY of 300,000 messages, telling their
    EXPUNGEs) held it for seconds in one go."""
    _Turn.deadline()            # (the turn's share counts from here, if it is the first)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        if time.monotonic() > _Turn.deadline():
            await breathe()


class _Turn:
    """When this reactor turn's share of stepped work ends: one deadline for every
    ``sliced`` of the turn (a command runs several one after another, and each with
    a slice of its own held the reactor for several slices), forgotten at the next
    turn."""

    end = 0.0
    marked = False

    @classmethod
    def deadline(cls) -> float:
        if not cls.marked:
            from twisted.internet import reactor
            cls.marked = True
            cls.end = time.monotonic() + INPUT_SLICE
            reactor.callLater(0, cls.over)  # type: ignore[attr-defined]
        return cls.end

    @classmethod
    def over(cls) -> None:
        cls.marked = False


def mapping(fn: Callable[[Any], T], items: list[Any]) -> Generator[None, None, list[T]]:
    """``list(map(fn, items))`` in steps (``sliced``)."""
    out: list[T] = []
    for start in range(0, len(items), 4 * STEP):
        out.extend(map(fn, items[start:start + 4 * STEP]))
        yield
    return out

# Output collected before a transport write (see SessionCore.write).
OUTPUT_CHUNK = 64 * 1024

# command -> (states it is allowed in, handler method)
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {}


class No(Exception):
    """Answer the command NO with this text (it may start with a response code)."""


class Bad(Exception):
    """Answer the command BAD with this text."""


@dataclass
class Reply:
    status: str
    text: str


def ok(text: str) -> Reply:
    return Reply("OK", text)


@implementer(IPushProducer)
class SessionCore(TrackedProtocol, TimeoutMixin, PushProducer):
    factory: IMAPFactory

    def __init__(self, factory: IMAPFactory) -> None:
        self.cfg = factory.services.config.imap
        self.state = NOT_AUTHENTICATED
        # Until login, small: nobody holds memory here without a password.
        small = self.cfg.max_login_input
        self.reader = CommandReader(min(small, self.cfg.max_line_length),
                                    min(small, self.cfg.max_literal), 2 * small)
        self._login_deadline: Any = None
        self.busy = False
        self.closing = False
        self.tls = factory.listener.tls == "implicit"
        self.errors = 0
        self.account: Any = None
        self.user: Any = None
        self.selected: Optional[SelectedMailbox] = None
        self.enabled: set[str] = set()
        self.idling: Optional[str] = None           # the IDLE command's tag
        self.sasl: Optional[tuple[str, sasl.Exchange]] = None
        self.saved_search: Optional[list[int]] = None   # SEARCHRES, as UIDs
        self.compressor: Any = None
        self.inflater: Optional[Inflater] = None    # COMPRESS=DEFLATE input
        self._taking = False                        # take_input() is running
        self._input_paused = False                  # the transport is not read
        self._waiting_for_blobs = False             # for a streamed literal's writer
        self._slice_end = 0.0                       # when it hands the reactor back
        self._out: Optional[list[bytes]] = None     # collecting a command's output
        self._out_size = 0
        self._logged_in = False
        limits = factory.services.config.limits
        # [limits] imap_commands: the command waiting for its turn (see _at_rate).
        self.rate = command_rate("imap_commands", limits.imap_commands,
                                 limits.command_overrun)
        self._rate_wait: Any = None

    @property
    def hub(self) -> MailboxHub:
        return self.factory.hub

    @property
    def store(self) -> Any:
        return self.factory.services.mailstore

    @property
    def utf8(self) -> bool:
        return "UTF8=ACCEPT" in self.enabled or "IMAP4REV2" in self.enabled

    @property
    def rev2(self) -> bool:
        return "IMAP4REV2" in self.enabled

    # -- connection -----------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connection_made(self)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        self.log = BoundLogger(namespace="lightmail.imap", conn_id=self.conn_id)
        self.log.info("connect from {peer} to {listener}", peer=self.peer_host,
                      listener=self.factory.listener.name)
        self.setTimeout(self.cfg.idle_timeout)
        self._login_deadline = self.callLater(self.cfg.login_timeout, self._login_too_slow)
        self.untagged(f"OK [CAPABILITY {' '.join(self.capabilities())}] "
                      f"{self.factory.hostname} IMAP LightMail ready")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.setTimeout(None)
        self._stop_rate_wait()
        self._logged_in_now()
        self.closing = True
        self.reader.reset()         # a literal half streamed leaves no temporary blob
        self.fail_paused(reason)
        self._unselect()
        if self._logged_in:
            self._logged_in = False
            self.hub.logout(self.user.id)
        self.factory.connection_lost(self)
        self.log.info("disconnect from {peer}", peer=self.peer_host)

    def timeoutConnection(self) -> None:
        if self.busy and self.idling is None and self.sasl is None:
            # The server is still answering the last command (a slow disk, a
            # password check on a busy machine): that is not the client idling.
            self.resetTimeout()
            return
        self.log.info("autologout after {seconds}s idle", seconds=self.cfg.idle_timeout)
        self.close_with("* BYE Autologout; idle for too long")

    def _login_too_slow(self) -> None:
        self._login_deadline = None
        if self.state == NOT_AUTHENTICATED and not self.closing:
            self.log.info("no login within {seconds}s from {peer}",
                          seconds=self.cfg.login_timeout, peer=self.peer_host)
            self.close_with("* BYE Autologout; log in sooner")

    def _logged_in_now(self) -> None:
        """Login done (or the session gone): the login deadline goes, the input
        limits become those of a user's session, and APPEND's message streams to the
        blob store rather than sitting in memory."""
        deadline, self._login_deadline = self._login_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        self.reader.max_line = self.cfg.max_line_length
        self.reader.max_literal = self.cfg.max_literal
        self.reader.max_command = self.cfg.max_literal + self.cfg.max_line_length
        self.reader.stream_appends(self.store.blobs)

    def drain(self) -> None:
        if not self.busy or self._stop_rate_wait():
            self.close_with("* BYE Server shutting down")
        else:
            self.closing_after = True

    closing_after = False

    # -- output ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closing:
            return
        out = self._out
        if out is not None:
            # While a command runs its responses are collected and written at its end
            # (or every OUTPUT_CHUNK octets): one transport write (and one DEFLATE
            # flush) per command instead of one per response line.
            out.append(data)
            self._out_size += len(data)
            if self._out_size >= OUTPUT_CHUNK:
                self.flush()
            return
        if self.compressor is not None:
            data = self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
        write_at_once(self.transport, data)

    def flush(self) -> None:
        """Write what the running command has collected."""
        out = self._out
        if not out:
            return
        data = b"".join(out)
        out.clear()
        self._out_size = 0
        if self.transport is None:
            return
        if self.compressor is not None:
            data = self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
        write_at_once(self.transport, data)

    def untagged(self, text: str | bytes) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else text
        self.write(b"* " + data + b"\r\n")

    def tagged(self, tag: str, status: str, text: str) -> None:
        self.write(f"{tag} {status} {text}\r\n".encode())

    def close_with(self, line: str) -> None:
        self.write(line.encode("utf-8") + b"\r\n")
        self.flush()
        self.closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    # -- input ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimeout()
        if self.inflater is not None:
            self.inflater.feed(data)
        else:
            self.reader.buffer += data
        self.take_input()

    def take_input(self) -> None:
        """Run the commands the input holds, until one is busy or more must come.

        Also called when a command is done; a command done at once (inside
        :meth:`process`) returns to the loop below instead, else a thousand
        pipelined NOOPs would nest a thousand calls deep."""
        if self._taking:
            return
        self._taking = True
        self._slice_end = time.monotonic() + INPUT_SLICE
        try:
            self.process()
            self._inflate_and_process()
        finally:
            self._taking = False
        self._regulate_input()

    def _regulate_input(self) -> None:
        """Read the connection only while its input can be taken: not while a
        command runs and the input behind it (LITERAL+ lets a client pipeline a
        whole message) already fills the reader's room, nor while a streamed
        literal's blob writer is behind.  So what a session holds of its input stays
        a few chunks, whatever the client sends."""
        if self.transport is None or self.closing:
            return
        behind = self.reader.behind()
        if behind and not self._waiting_for_blobs:
            self._waiting_for_blobs = True
            self.reader.caught_up().addBoth(self._blobs_caught_up)
        compressed = self.inflater.pending() if self.inflater is not None else 0
        full = (behind or self.reader.room() <= 0 or compressed > Inflater.STEP
                or self._rate_wait is not None)
        if full != self._input_paused:
            self._input_paused = full
            if full:
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _blobs_caught_up(self, _: Any) -> None:
        self._waiting_for_blobs = False
        if not self.closing:
            self.take_input()

    def _take_turn(self) -> None:
        """Input has run the commands it holds for INPUT_SLICE: the rest waits for the
        next reactor turn (busy until then), as FETCH breathes between batches."""
        from twisted.internet import reactor
        self.busy = True
        reactor.callLater(0, self._done, None)  # type: ignore[attr-defined]

    def _inflate_and_process(self) -> None:
        """Under COMPRESS, inflate only what the reader has room for, process it,
        and go on: a deflate bomb is refused by the line and literal limits without
        ever being held inflated.  While a command is busy the rest waits compressed
        (``_done`` comes back to it)."""
        while (self.inflater is not None and not self.busy and not self.closing
               and not self.errors_pending):
            try:
                data = self.inflater.inflate(self.reader.room())
            except zlib.error:
                self.close_with("* BYE Compression error")
                return
            if not data:
                return
            self.reader.buffer += data
            self.process()

    def process(self) -> None:
        while not self.busy and not self.closing and not self.errors_pending:
            if time.monotonic() > self._slice_end:
                self._take_turn()
                return
            try:
                if self.idling is not None or self.sasl is not None:
                    line = self.reader.take_line()
                    if line is None:
                        return
                    if self.idling is not None:
                        self._idle_line(line)
                    else:
                        self._sasl_line(line)
                    continue
                kind, value = self.reader.next()
            except LineTooLong:
                self.untagged("BAD Command line too long")
                self._error()
                continue
            except LiteralTooBig as exc:
                self._literal_too_big(exc)
                continue
            if kind == "wait":
                return
            if kind == "continue":
                self.write(b"+ Ready for literal data\r\n")
                continue
            if self.rate is not None and not self._at_rate(value):
                return
            self._dispatch(value)

    # -- [limits] imap_commands -------------------------------------------------------

    def _at_rate(self, parts: list[Part]) -> bool:
        """True: the command runs now.  False: it waits for its turn (the connection
        is not read meanwhile: _regulate_input), or the session, far over its rate,
        is closed (lightmail/policy/limits/throttle.py)."""
        assert self.rate is not None
        wait = self.rate.delay()
        if self.rate.far_over():
            self.rate.tell(self.log, self.peer_host, closing=True)
            _discard(streamed_literals(parts))
            self.close_with(f"* BYE [LIMIT] {self.rate.sentence()}")
            return False
        if wait <= 0:
            return True
        self.rate.tell(self.log, self.peer_host, closing=False)
        self.busy = True
        self._rate_wait = self.callLater(wait, lambda: self._rate_allows(parts))
        return False

    def _rate_allows(self, parts: list[Part]) -> None:
        self._rate_wait = None
        self.busy = False
        if self.closing_after:
            _discard(streamed_literals(parts))
            self.close_with("* BYE Server shutting down")
            return
        self._dispatch(parts)
        if self.busy:
            self._regulate_input()
        else:
            self.take_input()

    def _literal_too_big(self, exc: LiteralTooBig) -> None:
        tag = tag_of([exc.first_line]) if exc.first_line else "*"
        # RFC 7889: too big for APPEND is NO [TOOBIG]; a synchronising literal is
        # refused before the client sends it.
        self.tagged(tag, "NO" if tag != "*" else "BAD",
                    f"[TOOBIG] Literal of {exc.size} octets is over the limit of "
                    f"{self.reader.max_literal}"
                    + ("" if self.state != NOT_AUTHENTICATED else " before login"))

    def _error(self) -> None:
        """A command answered BAD: it counts against the session's max_errors, and
        against the address's [limits] client_errors."""
        self.errors += 1
        self.spend_error()
        if self.errors > self.cfg.max_errors and not self.closing:
            self.log.warn("too many errors from {peer}", peer=self.peer_host)
            self.close_with("* BYE Too many invalid commands")

    def close_for_errors(self, sentence: str) -> None:
        if not self.closing:
            self.close_with(f"* BYE [LIMIT] {sentence}")

    def resume_input(self) -> None:
        if not self.busy and not self.closing:
            self.take_input()

    # Lines that arrive while a command waits for them, routed by process():
    def _idle_line(self, line: bytes) -> None:
        """DONE (or junk) during IDLE: ``mailboxes.py``."""
        raise NotImplementedError

    def _sasl_line(self, line: bytes) -> None:
        """A SASL response during AUTHENTICATE: ``session.py``."""
        raise NotImplementedError

    # -- dispatch -------------------------------------------------------------------

    def _dispatch(self, parts: list[Part]) -> None:
        # A streamed literal that its command did not stage (refused, failed, or not
        # APPEND's message after all) is thrown away when the command is done.
        streamed = streamed_literals(parts)
        try:
            command = parse_command(parts)
        except ParseError as exc:
            _discard(streamed)
            self.factory.meters.command("")         # counted as "other"
            self.tagged(tag_of(parts), "BAD", str(exc))
            self._error()
            return
        self.factory.meters.command(command.name)
        entry = COMMANDS.get(command.name)
        if entry is None:
            _discard(streamed)
            self.tagged(command.tag, "BAD", f"Unknown command {command.name[:30]}")
            self._error()
            return
        states, method = entry
        if self.state not in states:
            _discard(streamed)
            self.tagged(command.tag, "BAD",
                        f"{command.name} is not allowed in the {self.state} state")
            self._error()
            return
        self.busy = True
        self._out = []
        d = defer.ensureDeferred(self._run(command, getattr(self, method)))
        d.addErrback(self._internal_error, command)
        if streamed:
            d.addBoth(_discarding, streamed)
        d.addBoth(self._done)

    async def _run(self, command: Command,
                   handler: Callable[[Command], Awaitable[Optional[Reply]]]) -> None:
        try:
            reply = await handler(command)
        except Bad as exc:
            self._error()
            reply = Reply("BAD", str(exc))
        except ParseError as exc:
            self._error()
            reply = Reply("BAD", str(exc))
        except No as exc:
            reply = Reply("NO", str(exc))
        except NoSuchMailbox:
            reply = Reply("NO", "[NONEXISTENT] No such mailbox")
        if reply is None:           # the handler answers later (IDLE, AUTHENTICATE)
            return
        if self.selected is not None and not self.closing:
            # RFC 9051 §7.5.1: no EXPUNGE while answering FETCH, STORE or SEARCH.
            held = command.name in ("FETCH", "STORE", "SEARCH", "SORT", "THREAD")
            await self.catch_up(allow_expunge=not held)
        self.tagged(command.tag, reply.status, f"{reply.text}")

    def _internal_error(self, failure: Failure, command: Command) -> None:
        if self.closing:
            return
        self.log.failure("internal error in {command}", failure, command=command.name)
        self.tagged(command.tag, "NO", "[SERVERBUG] Internal error; the command failed")

    def _done(self, _: Any) -> None:
        # Also when the handler answers later: IDLE's DONE and SASL responses arrive
        # as lines that process() routes while the command is pending.
        self.busy = False
        self.flush()
        self._out = None
        if not self.closing:
            self.resetTimeout()            # the client's idle time starts at the answer
        if self.closing_after and not self.closing and self.idling is None:
            self.close_with("* BYE Server shutting down")
            return
        if not self.closing:
            self.take_input()
        # A change announced while the last catch-up ran is still to be told.
        self._push_idle_updates()

    # -- mailbox changes ------------------------------------------------------------

    def poll(self) -> None:
        """NOOP and CHECK: the client asks for what changed.  Changes made in this
        process are announced before they are answered; with worker processes one
        made in another may still be on its way, so the catch-up reads the store."""
        if self.hub.announced_late and self.selected is not None:
            self.selected.dirty = True

    def mailbox_changed(self, change: Any) -> None:
        if self.selected is None or change.mailbox_id != self.selected.id:
            return
        self.selected.hear(change)
        self._push_idle_updates()

    def _push_idle_updates(self) -> None:
        """In IDLE, tell the client of changes at once (RFC 2177)."""
        selected = self.selected
        if (self.idling is None or self.busy or self.closing or selected is None
                or not (selected.dirty or selected.pending)):
            return
        self.busy = True
        self._out = []
        d = defer.ensureDeferred(self.catch_up(allow_expunge=True))
        d.addErrback(lambda f: self.log.failure("IDLE update failed", f))
        d.addBoth(self._done)

    async def catch_up(self, allow_expunge: bool) -> None:
        selected = self.selected
        if selected is None:
            return
        if not (selected.dirty or selected.pending) \
                and not (allow_expunge and selected.held_expunges):
            return
        updates = Updates()
        if selected.dirty or selected.pending:
            if selected.dirty:
                selected.dirty = False
                selected.pending.clear()
                selected.reading = True
                try:
                    changes = await self.store.changes_since(selected.id, selected.modseq)
                except NoSuchMailbox:
                    self.close_with("* BYE The selected mailbox was deleted")
                    return
                finally:
                    selected.reading = False
                if self.selected is not selected:
                    return
                if changes.mailbox.uidvalidity != selected.mailbox.uidvalidity:
                    # Deleted, and its id given to a new mailbox (SQLite reuses ids).
                    self.close_with("* BYE The selected mailbox was deleted")
                    return
                selected.heard = max(selected.modseq, changes.mailbox.highestmodseq)
            else:
                # Announced with their content, nothing missed: no read needed.
                changes = selected.take_pending()
            # RFC 3501 §2.3.2: new mail is \Recent only in the session told of it first.
            uidnext = changes.mailbox.uidnext
            selected.first_recent = await (
                self.hub.peek_recent(selected.id, uidnext) if selected.readonly
                else self.hub.claim_recent(selected.id, uidnext))
            if self.selected is not selected:
                return
            await sliced(selected.applying(changes, allow_expunge, updates))
        elif allow_expunge:
            await sliced(selected.releasing(updates))
        if self.selected is selected:
            await sliced(self.sending_updates(updates))

    def sending_updates(self, updates: Updates) -> Steps:
        """Tell the client ``updates``, in steps (``sliced``): after a big COPY or
        STORE, 300,000 responses."""
        selected = self.selected
        assert selected is not None
        if updates.expunged:
            if "QRESYNC" in self.enabled:
                text = yield from formatting_sequence(updates.expunged, 4 * STEP)
                self.untagged(f"VANISHED {text}")
            else:
                numbers = updates.expunged_numbers
                for start in range(0, len(numbers), STEP):
                    self.write(b"".join([b"* %d EXPUNGE\r\n" % number
                                         for number in numbers[start:start + STEP]]))
                    yield
        if updates.new_keywords:
            self.tell_flags()
        flags = updates.flags
        for start in range(0, len(flags), STEP):
            for info in flags[start:start + STEP]:
                number = selected.number_of(info.uid)
                if number:
                    self.untagged(self._flags_fetch(number, info))
            yield
        if updates.exists is not None:
            self.untagged(f"{updates.exists} EXISTS")
            if not self.rev2:
                self.untagged(f"{updates.recent or 0} RECENT")

    def tell_flags(self) -> None:
        """FLAGS and PERMANENTFLAGS of the selected mailbox: at SELECT, and again
        before a FETCH shows a keyword the client has not been told of (RFC 9051
        §7.3.5, RFC 3501 §7.2.6)."""
        selected = self.selected
        assert selected is not None
        flags = " ".join(SYSTEM_FLAGS + tuple(selected.keywords))
        self.untagged(f"FLAGS ({flags})")
        permanent = "" if selected.readonly else flags + " \\*"
        self.untagged(f"OK [PERMANENTFLAGS ({permanent})] Flags allowed")

    def _flags_fetch(self, number: int, info: MessageInfo) -> bytes:
        assert self.selected is not None
        out = b"%d FETCH (UID %d FLAGS " % (number, info.uid)
        out += self.selected.flag_list(info.uid)
        if self._condstore:
            out += b" MODSEQ (%d)" % info.modseq
        return out + b")"

    def enable_condstore(self) -> None:
        """A CONDSTORE-enabling command (RFC 7162 §3.1): the first one tells the
        client the selected mailbox's HIGHESTMODSEQ, which it may not have had."""
        if "CONDSTORE" in self.enabled:
            return
        self.enabled.add("CONDSTORE")
        if self.selected is not None:
            self.untagged(f"OK [HIGHESTMODSEQ {self.selected.modseq}] Highest")

    @property
    def _condstore(self) -> bool:
        return "CONDSTORE" in self.enabled or "QRESYNC" in self.enabled

    # -- capabilities ---------------------------------------------------------------

    def capabilities(self) -> list[str]:
        caps = ["IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ENABLE", "ID", "IDLE",
                "NAMESPACE", "UNSELECT", "UIDPLUS", "MOVE", "CHILDREN", "SPECIAL-USE",
                "CREATE-SPECIAL-USE", "CONDSTORE", "QRESYNC", "ESEARCH", "SEARCHRES",
                "SORT", "SORT=DISPLAY", "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES",
                "LIST-EXTENDED", "LIST-STATUS", "QUOTA", "QUOTA=RES-STORAGE",
                f"APPENDLIMIT={self.cfg.max_literal}", "UTF8=ACCEPT", "BINARY",
                "STATUS=SIZE", "WITHIN"]
        if self.compressor is None:
            caps.append("COMPRESS=DEFLATE")
        if self.state == NOT_AUTHENTICATED:
            if self.factory.tls_context is not None and not self.tls:
                caps.append("STARTTLS")
            if self._auth_allowed():
                offer = self.factory.services.sasl
                caps += [f"AUTH={name}"
                         for name in offer.names(offer.context(self.transport, self.tls))]
            else:
                caps.append("LOGINDISABLED")
        return caps

    def _auth_allowed(self) -> bool:
        return self.tls or self.factory.services.config.directory.auth_over_plaintext

    # -- helpers --------------------------------------------------------------------

    @staticmethod
    def _no_args(cmd: Command) -> None:
        if cmd.args:
            raise Bad(f"{cmd.name} takes no arguments")


    def _unselect(self) -> None:
        selected = self.selected
        if selected is not None:
            self.hub.unwatch(selected.id, self)
            self.selected = None
            if selected.exists > STEP:
                defer.ensureDeferred(sliced(selected.dismantling()))


def _discard(streamed: list[StreamedLiteral]) -> None:
    for literal in streamed:
        literal.discard()


def _discarding(result: Any, streamed: list[StreamedLiteral]) -> Any:
    _discard(streamed)
    return result


def parse_number(value: Any, allow_zero: bool = True) -> int:
    """A number64 (RFC 9051 §9): UIDVALIDITY and mod-sequences; a larger one would
    overflow the database's BIGINT."""
    text = astring(value) if not isinstance(value, list) else ""
    if not (text.isascii() and text.isdigit()):
        raise Bad("expected a number")
    if len(text.lstrip("0")) > 19 or int(text) > MAX_NUMBER64:
        raise Bad("number out of range")
    if not allow_zero and int(text) == 0:
        raise Bad("expected a number")
    return int(text)


def use_name(use: str) -> Optional[str]:
    from lightmail.config import SPECIAL_USES
    return next((u for u in SPECIAL_USES if u.lower() == use.lower()), None)


def parse_date_time(text: str) -> int:
    """RFC 9051 date-time ``"17-Jul-1996 02:44:25 -0700"`` -> ms since the epoch.

    A field out of range (31-Feb, 24:00:00, zone +2400) is BAD like any other
    malformed argument: ``calendar.timegm`` would roll it over into another date."""
    match = DATE_TIME.match(text)
    month = MONTHS.get(match.group(2).lower()) if match else None
    if match is None or month is None:
        raise Bad("invalid date-time")
    day, year, hour, minute, second, zone_hours, zone_minutes = (
        int(match.group(i)) for i in (1, 3, 4, 5, 6, 8, 9))
    east = match.group(7) == "+"
    if not (_date_in_range(year, month, day) and _time_in_range(hour, minute, second)
            and _zone_in_range(east, zone_hours, zone_minutes)):
        raise Bad("invalid date-time: a field is out of range")
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
        time.gmtime(seconds)
    except (ValueError, OverflowError):
        raise Bad("invalid date-time") from None
    offset = (zone_hours * 60 + zone_minutes) * 60
    return (seconds - offset if east else seconds + offset) * 1000


def _date_in_range(year: int, month: int, day: int) -> bool:
    return 1 <= day <= calendar.monthrange(year, month)[1]


def _time_in_range(hour: int, minute: int, second: int) -> bool:
    # Second 60 is a leap second: timegm counts it as the next minute's first.
    return hour < 24 and minute < 60 and second <= 60


def _zone_in_range(east: bool, hours: int, minutes: int) -> bool:
    """Zones in use run from -1200 to +1400; minutes (under 60) may stretch the
    west end to -1259."""
    return minutes < 60 and hours * 100 + minutes <= (1400 if east else 1259)



if TYPE_CHECKING:
    from lightmail.imap.session import IMAPFactory
