"""The IMAP server protocol: IMAP4rev2 (RFC 9051) and IMAP4rev1 (RFC 3501).

Not built on ``twisted.mail.imap4.IMAP4Server``: its mailbox interface has no MODSEQ,
no UIDVALIDITY-safe copy results and no way to stream from the blob store, and it
answers several commands synchronously.  LightMail keeps Twisted's modified UTF-7 codec
(``names.py``) and writes its own parser (``parser.py``), message structure
(``message.py``), SEARCH/SORT/THREAD (``search.py``, ``sort.py``) and this session.

One command runs at a time (later pipelined commands wait in the buffer); each
handler is a coroutine that writes its untagged responses and returns the tagged
status.  After each command the session catches up with changes to the selected
mailbox (``selected.py``) and tells the client before the tagged reply.

Extensions: LITERAL+ (RFC 7888), IDLE (2177), UIDPLUS (4315), MOVE (6851), NAMESPACE
(2342), ID (2971), ENABLE (5161), UNSELECT (3691), SPECIAL-USE and CREATE-SPECIAL-USE
(6154), CONDSTORE and QRESYNC (7162), ESEARCH (4731), SEARCHRES (5182), SORT and
THREAD (5256), LIST-EXTENDED (5258), LIST-STATUS (5819), QUOTA (9208), APPENDLIMIT
(7889), UTF8=ACCEPT (6855), BINARY (3516), COMPRESS=DEFLATE (4978), SASL-IR (4959).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail import __version__, sasl
from lightmail.config import ListenerConfig
from lightmail.directory.interfaces import IMailAccount
from lightmail.imap import fetch as fetching
from lightmail.imap import search as searching
from lightmail.imap import sort as sorting
from lightmail.imap.hub import MailboxHub, hub_for
from lightmail.imap.message import ParsedMessage
from lightmail.imap.names import (
    DELIMITER,
    BadName,
    decode_name,
    encode_name,
    parents,
    pattern_regex,
)
from lightmail.imap.parser import (
    Command,
    CommandReader,
    LineTooLong,
    LiteralTooBig,
    parse_command,
    tag_of,
)
from lightmail.imap.selected import SelectedMailbox, Updates
from lightmail.imap.sequence import SequenceSet, format_sequence, parse_sequence_set
from lightmail.imap.tokens import (
    Atom,
    ParseError,
    astring,
    astring_out,
    is_nil,
    plist,
    quote,
)
from lightmail.listeners import ServiceFactory, TrackedProtocol
from lightmail.logs import BoundLogger, new_id
from lightmail.storage.interfaces import (
    MailboxExists,
    MessageInfo,
    NoSuchMailbox,
)
from lightmail.streams import PushProducer

NOT_AUTHENTICATED, AUTHENTICATED, SELECTED, LOGOUT = (
    "not authenticated", "authenticated", "selected", "logout")
ANY = (NOT_AUTHENTICATED, AUTHENTICATED, SELECTED)
AUTHED = (AUTHENTICATED, SELECTED)

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_FLAG_RE = re.compile(r"^\\?[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|~]+$")
_DATE_TIME = re.compile(
    r"^\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$")
_MONTHS = {m: i for i, m in enumerate(
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


_flags_of = attrgetter("flags")

# Output collected before a transport write (see IMAPSession.write).
OUTPUT_CHUNK = 64 * 1024

# Blob reads kept in flight while a command walks messages' content: one thread-pool
# round trip waited for per message cost SEARCH and FETCH of content most of their
# time (bench/imap.py: 0.1-0.3 ms a message against ~25 us of parsing).
READ_AHEAD = 16

# Header blocks asked of the store (IMailStore.headers_for) in one query.
HEADERS_BATCH = 500


# Blobs read in one thread hop (small ones: up to READ_BATCH_OCTETS together).
READ_BATCH = 16
READ_BATCH_OCTETS = 256 * 1024


class _ReadAhead:
    """The contents of ``uids`` (of ``selected``) in order, read READ_AHEAD ahead,
    several small blobs per thread hop."""

    def __init__(self, store: Any, selected: SelectedMailbox, uids: list[int]) -> None:
        self.store, self.selected, self.uids = store, selected, uids
        self.next = 0
        self.reads: dict[int, defer.Deferred[bytes]] = {}
        self.read_many: Callable[[list[str]], defer.Deferred[list[Any]]] = \
            store.blobs.read_many

    def read(self, index: int) -> defer.Deferred[bytes]:
        """The content of ``uids[index]`` (not expunged); starts the next reads."""
        self.next = max(self.next, index)
        while self.next < len(self.uids) and self.next < index + READ_AHEAD:
            self._start_batch()
        return self.reads.pop(index)

    def _start_batch(self) -> None:
        indexes: list[int] = []
        blob_ids: list[str] = []
        octets = 0
        info = self.selected.info
        while (self.next < len(self.uids) and len(blob_ids) < READ_BATCH
               and octets < READ_BATCH_OCTETS):
            uid = self.uids[self.next]
            if uid not in self.selected.gone:
                indexes.append(self.next)
                blob_ids.append(info[uid].blob_id)
                octets += info[uid].size
            self.next += 1
        if len(blob_ids) == 1:
            for index, blob_id in zip(indexes, blob_ids, strict=True):
                self.reads[index] = self.store.blobs.read(blob_id)
            return
        if not blob_ids:
            return
        waiting: list[defer.Deferred[bytes]] = []
        for index in indexes:
            d: defer.Deferred[bytes] = defer.Deferred()
            self.reads[index] = d
            waiting.append(d)

        def hand_out(contents: list[Any]) -> None:
            for each, content in zip(waiting, contents, strict=True):
                if isinstance(content, Exception):
                    each.errback(content)
                else:
                    each.callback(content)

        def fail(failure: Failure) -> None:
            for each in waiting:
                each.errback(failure)
        self.read_many(blob_ids).addCallbacks(hand_out, fail)

    def discard(self) -> None:
        """Reads nobody will wait for (the command ended early)."""
        for d in self.reads.values():
            d.addErrback(lambda _: None)
        self.reads.clear()


class No(Exception):
    """Answer the command NO with this text (it may start with a response code)."""


class Bad(Exception):
    """Answer the command BAD with this text."""


@dataclass
class Reply:
    status: str
    text: str


def _ok(text: str) -> Reply:
    return Reply("OK", text)


@implementer(IPushProducer)
class IMAPSession(TrackedProtocol, TimeoutMixin, PushProducer):
    factory: IMAPFactory

    def __init__(self, factory: IMAPFactory) -> None:
        self.cfg = factory.services.config.imap
        self.state = NOT_AUTHENTICATED
        self.reader = CommandReader(self.cfg.max_line_length, self.cfg.max_literal,
                                    self.cfg.max_literal + self.cfg.max_line_length)
        self.busy = False
        self.closing = False
        self.tls = factory.listener.tls == "implicit"
        self.errors = 0
        self.account: Any = None
        self.user: Any = None
        self.selected: Optional[SelectedMailbox] = None
        self.enabled: set[str] = set()
        self.idling: Optional[str] = None           # the IDLE command's tag
        self.sasl: Optional[tuple[str, sasl.Mechanism]] = None
        self.saved_search: Optional[list[int]] = None   # SEARCHRES, as UIDs
        self.compressor: Any = None
        self.decompressor: Any = None
        self._out: Optional[list[bytes]] = None     # collecting a command's output
        self._out_size = 0
        self._logged_in = False

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
        self.log = BoundLogger(namespace="lightmail.imap", conn_id=new_id())
        self.log.info("connect from {peer} to {listener}", peer=self.peer_host,
                      listener=self.factory.listener.name)
        self.setTimeout(self.cfg.idle_timeout)
        self.untagged(f"OK [CAPABILITY {' '.join(self.capabilities())}] "
                      f"{self.factory.hostname} IMAP LightMail ready")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.setTimeout(None)
        self.closing = True
        self.fail_paused(reason)
        self._unselect()
        if self._logged_in:
            self._logged_in = False
            self.hub.logout(self.user.id)
        self.factory.connection_lost(self)
        self.log.info("disconnect from {peer}", peer=self.peer_host)

    def timeoutConnection(self) -> None:
        self.log.info("autologout after {seconds}s idle", seconds=self.cfg.idle_timeout)
        self.close_with("* BYE Autologout; idle for too long")

    def drain(self) -> None:
        if not self.busy:
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
        self.transport.write(data)

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
        self.transport.write(data)

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
        if self.decompressor is not None:
            try:
                data = self.decompressor.decompress(data)
            except zlib.error:
                self.close_with("* BYE Compression error")
                return
        self.reader.buffer += data
        self.process()

    def process(self) -> None:
        while not self.busy and not self.closing:
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
            self._dispatch(value)

    def _literal_too_big(self, exc: LiteralTooBig) -> None:
        tag = tag_of([exc.first_line]) if exc.first_line else "*"
        # RFC 7889: too big for APPEND is NO [TOOBIG]; a synchronising literal is
        # refused before the client sends it.
        self.tagged(tag, "NO" if tag != "*" else "BAD",
                    f"[TOOBIG] Literal of {exc.size} octets is over the limit of "
                    f"{self.cfg.max_literal}")

    def _error(self) -> None:
        self.errors += 1
        if self.errors > self.cfg.max_errors and not self.closing:
            self.log.warn("too many errors from {peer}", peer=self.peer_host)
            self.close_with("* BYE Too many invalid commands")

    # -- dispatch -------------------------------------------------------------------

    def _dispatch(self, parts: list[bytes]) -> None:
        try:
            command = parse_command(parts)
        except ParseError as exc:
            self.tagged(tag_of(parts), "BAD", str(exc))
            self._error()
            return
        entry = _COMMANDS.get(command.name)
        if entry is None:
            self.tagged(command.tag, "BAD", f"Unknown command {command.name[:30]}")
            self._error()
            return
        states, method = entry
        if self.state not in states:
            self.tagged(command.tag, "BAD",
                        f"{command.name} is not allowed in the {self.state} state")
            self._error()
            return
        self.busy = True
        self._out = []
        d = defer.ensureDeferred(self._run(command, getattr(self, method)))
        d.addErrback(self._internal_error, command)
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
        if self.closing_after and not self.closing and self.idling is None:
            self.close_with("* BYE Server shutting down")
            return
        if self.reader.buffer and not self.closing:
            self.process()
        # A change announced while the last catch-up ran is still to be told.
        self._push_idle_updates()

    # -- mailbox changes ------------------------------------------------------------

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
                selected.heard = max(selected.modseq, changes.mailbox.highestmodseq)
            else:
                # Announced with their content, nothing missed: no read needed.
                changes = selected.take_pending()
            # RFC 3501 §2.3.2: new mail is \Recent only in the session told of it first.
            uidnext = changes.mailbox.uidnext
            selected.first_recent = (
                self.hub.peek_recent(selected.id, uidnext) if selected.readonly
                else self.hub.claim_recent(selected.id, uidnext))
            updates = selected.apply(changes, allow_expunge)
        elif allow_expunge:
            selected.release_expunges(updates)
        self.send_updates(updates)

    def send_updates(self, updates: Updates) -> None:
        selected = self.selected
        assert selected is not None
        if updates.expunged:
            if "QRESYNC" in self.enabled:
                self.untagged(f"VANISHED {format_sequence(updates.expunged)}")
            else:
                for number in updates.expunged_numbers:
                    self.untagged(f"{number} EXPUNGE")
        for info in updates.flags:
            number = selected.number_of(info.uid)
            if number:
                self.untagged(self._flags_fetch(number, info))
        if updates.exists is not None:
            self.untagged(f"{updates.exists} EXISTS")
            if not self.rev2:
                self.untagged(f"{updates.recent or 0} RECENT")

    def _flags_fetch(self, number: int, info: MessageInfo) -> bytes:
        assert self.selected is not None
        out = b"%d FETCH (UID %d FLAGS " % (number, info.uid)
        out += self.selected.flag_list(info.uid)
        if self._condstore:
            out += b" MODSEQ (%d)" % info.modseq
        return out + b")"

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
                caps += [f"AUTH={name}" for name in sasl.mechanisms()]
            else:
                caps.append("LOGINDISABLED")
        return caps

    def _auth_allowed(self) -> bool:
        return self.tls or self.factory.services.config.directory.auth_over_plaintext

    # -- any state ------------------------------------------------------------------

    async def do_CAPABILITY(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        self.untagged("CAPABILITY " + " ".join(self.capabilities()))
        return _ok("CAPABILITY completed")

    async def do_NOOP(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        return _ok("NOOP completed")

    async def do_LOGOUT(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        self.untagged("BYE LightMail logging out")
        self.tagged(cmd.tag, "OK", "LOGOUT completed")
        self.flush()
        self.state = LOGOUT
        self.closing = True
        if self.transport is not None:
            self.transport.loseConnection()
        return Reply("OK", "")   # not sent: the connection is closing

    async def do_ID(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1 or not (is_nil(cmd.args[0]) or isinstance(cmd.args[0], list)):
            raise Bad("ID takes NIL or a list of field-value pairs")
        fields = {"name": "LightMail", "version": __version__,
                  "vendor": "LightMail", "support-url": "https://example.invalid/lightmail"}
        del fields["support-url"]
        self.untagged(b"ID " + plist([quote(k) + b" " + quote(v) for k, v in fields.items()]))
        return _ok("ID completed")

    async def do_ENABLE(self, cmd: Command) -> Reply:
        if not cmd.args:
            raise Bad("ENABLE needs capability names")
        known = {"CONDSTORE", "QRESYNC", "UTF8=ACCEPT", "IMAP4REV2"}
        now = []
        for arg in cmd.args:
            name = astring(arg).upper()
            if name in known and name not in self.enabled:
                self.enabled.add(name)
                now.append(name)
                if name == "QRESYNC":
                    self.enabled.add("CONDSTORE")
        if now:
            self.untagged("ENABLED " + " ".join(
                "IMAP4rev2" if n == "IMAP4REV2" else n for n in now))
        return _ok("ENABLE completed")

    async def do_COMPRESS(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1 or astring(cmd.args[0]).upper() != "DEFLATE":
            raise Bad("Only COMPRESS DEFLATE is supported")
        if self.compressor is not None:
            raise No("[COMPRESSIONACTIVE] Compression is already on")
        self.tagged(cmd.tag, "OK", "DEFLATE active")
        self.flush()
        # RFC 4978 §3: raw DEFLATE (no zlib header) both ways from the next octet.
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.decompressor = zlib.decompressobj(-15)
        if self.reader.buffer:
            pending, self.reader.buffer = self.reader.buffer, b""
            self.reader.buffer = self.decompressor.decompress(pending)
        return None  # type: ignore[return-value]

    # -- not authenticated ----------------------------------------------------------

    async def do_STARTTLS(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        if self.factory.tls_context is None or self.tls:
            raise Bad("STARTTLS is not available here")
        self.tagged(cmd.tag, "OK", "Begin TLS negotiation now")
        self.flush()
        self.reader.buffer = b""     # RFC 9051 §6.2.1: nothing sent before counts
        self.tls = True
        self.transport.startTLS(self.factory.tls_context)  # type: ignore[union-attr]
        return None  # type: ignore[return-value]

    async def do_LOGIN(self, cmd: Command) -> Reply:
        if len(cmd.args) != 2:
            raise Bad("LOGIN needs a user name and a password")
        if not self._auth_allowed():
            raise No("[PRIVACYREQUIRED] LOGIN is disabled without TLS: use STARTTLS")
        from twisted.cred import credentials
        username, password = astring(cmd.args[0]), astring(cmd.args[1])
        creds = credentials.UsernamePassword(username.encode(), password.encode())
        return await self._login(creds, username)

    async def do_AUTHENTICATE(self, cmd: Command) -> Optional[Reply]:
        if not cmd.args or len(cmd.args) > 2:
            raise Bad("AUTHENTICATE needs a mechanism")
        if not self._auth_allowed():
            raise No("[PRIVACYREQUIRED] Authentication is disabled without TLS")
        mechanism = sasl.new_mechanism(astring(cmd.args[0]))
        if mechanism is None:
            raise No("Unsupported authentication mechanism")
        try:
            initial = None
            if len(cmd.args) == 2:
                raw = astring(cmd.args[1])
                initial = b"" if raw == "=" else base64.b64decode(raw, validate=True)
            step = mechanism.start(initial)
        except (binascii.Error, ValueError, sasl.SASLError):
            raise Bad("Malformed authentication exchange") from None
        return await self._sasl_step(cmd.tag, mechanism, step)

    async def _sasl_step(self, tag: str, mechanism: sasl.Mechanism,
                         step: sasl.Step) -> Optional[Reply]:
        if step.challenge is not None:
            self.sasl = (tag, mechanism)
            self.write(b"+ " + base64.b64encode(step.challenge) + b"\r\n")
            return None
        assert step.credentials is not None
        return await self._login(step.credentials,
                                 step.credentials.username.decode("utf-8", "replace"))

    def _sasl_line(self, line: bytes) -> None:
        assert self.sasl is not None
        tag, mechanism = self.sasl
        self.sasl = None
        self.busy = True
        self._out = []

        async def step() -> None:
            if line == b"*":
                reply: Optional[Reply] = Reply("BAD", "Authentication cancelled")
            else:
                try:
                    next_step = mechanism.step(base64.b64decode(line, validate=True))
                except (binascii.Error, ValueError, sasl.SASLError):
                    reply = Reply("BAD", "Malformed authentication exchange")
                else:
                    reply = await self._sasl_step(tag, mechanism, next_step)
            if reply is not None:
                self.tagged(tag, reply.status, reply.text)

        d = defer.ensureDeferred(step())
        d.addErrback(self._internal_error, Command(tag, "AUTHENTICATE"))
        d.addBoth(self._done)

    async def _login(self, creds: Any, username: str) -> Reply:
        try:
            result = await self.factory.services.portal.login(creds, None, IMailAccount)
        except Exception:
            self.log.warn("authentication failed for {user} from {peer}", user=username,
                          peer=self.peer_host)
            return Reply("NO", "[AUTHENTICATIONFAILED] Authentication failed")
        account = result[1]
        if not self.hub.login(account.user.id, self.cfg.max_connections_per_user):
            self.log.warn("{user}: too many IMAP sessions", user=account.user.address)
            return Reply("NO", "[LIMIT] Too many sessions for this user")
        self._logged_in = True
        self.account, self.user, self.state = account, account.user, AUTHENTICATED
        self.log = self.log.bind(user=account.user.address)
        await self._ensure_mailboxes()
        self.log.info("{user} logged in", user=account.user.address)
        return _ok(f"[CAPABILITY {' '.join(self.capabilities())}] Logged in")

    async def _ensure_mailboxes(self) -> None:
        """INBOX and the configured special-use mailboxes exist for every user."""
        if self.user.id in self.hub.provisioned:
            return
        have = {box.name for box in await self.store.list_mailboxes(self.user.id)}
        if "INBOX" not in have:
            await self.store.get_or_create_mailbox(self.user.id, "INBOX")
        for pair in self.cfg.special_use:
            name, _, use = pair.rpartition(":")
            if name not in have:
                try:
                    await self.store.create_mailbox(self.user.id, name, _use_name(use))
                except MailboxExists:
                    pass
        self.hub.provisioned.add(self.user.id)

    # -- authenticated: mailboxes ---------------------------------------------------

    def _name(self, value: Any) -> str:
        try:
            return decode_name(astring(value, "mailbox name"), self.utf8)
        except BadName as exc:
            raise No(f"[CANNOT] {exc}") from None

    def _show(self, name: str) -> bytes:
        return astring_out(encode_name(name, self.utf8))

    async def _mailbox(self, name: str) -> Any:
        box = await self.store.get_mailbox(self.user.id, name)
        if box is None:
            raise No("[NONEXISTENT] No such mailbox")
        return box

    async def do_SELECT(self, cmd: Command) -> Reply:
        return await self._select(cmd, readonly=False)

    async def do_EXAMINE(self, cmd: Command) -> Reply:
        return await self._select(cmd, readonly=True)

    async def _select(self, cmd: Command, readonly: bool) -> Reply:
        if not cmd.args or len(cmd.args) > 2:
            raise Bad(f"{cmd.name} needs a mailbox name")
        qresync = self._select_params(cmd.args[1] if len(cmd.args) == 2 else None)
        if self.selected is not None:
            self._unselect()
            self.state = AUTHENTICATED
            if "QRESYNC" in self.enabled or self.rev2:
                self.untagged("OK [CLOSED] Previous mailbox closed")
        name = self._name(cmd.args[0])
        # The mailbox row and its messages in one read; the changes announced while it
        # ran, before this session watches the mailbox, are looked up in the hub.
        mark = self.hub.announced
        found = await self.store.select_mailbox(self.user.id, name)
        if found is None:
            raise No("[NONEXISTENT] No such mailbox")
        box, messages = found
        first_recent = (self.hub.peek_recent(box.id, box.uidnext) if readonly
                        else self.hub.claim_recent(box.id, box.uidnext))
        # IMAP4rev2 has no \Recent (RFC 9051 §2.3.2): nothing is recent to this session,
        # though it still claims the recent messages from rev1 sessions.
        selected = SelectedMailbox(box, messages, readonly,
                                   first_recent if not self.rev2 else 1 << 62)
        self.selected, self.state = selected, SELECTED
        self.saved_search = None
        self.hub.watch(box.id, self)
        missed = self.hub.missed_since(mark, box.id, box.highestmodseq)
        # Messages share a few flag sets (see sqlstore): their keywords are those of
        # the distinct sets.
        flag_sets = set(map(_flags_of, messages))
        keywords = sorted({flag for flags in flag_sets for flag in flags
                           if not flag.startswith("\\")})
        flags = list(SYSTEM_FLAGS) + keywords
        self.untagged(f"{selected.exists} EXISTS")
        if not self.rev2:
            self.untagged(f"{len(selected.recent)} RECENT")
        self.untagged(f"FLAGS ({' '.join(flags)})")
        permanent = "" if readonly else " ".join(flags + ["\\*"])
        self.untagged(f"OK [PERMANENTFLAGS ({permanent})] Flags allowed")
        if not self.rev2 and any("\\Seen" not in flags for flags in flag_sets):
            unseen = next((n for n, m in enumerate(messages, 1)
                           if "\\Seen" not in m.flags), None)
            if unseen is not None:
                self.untagged(f"OK [UNSEEN {unseen}] First unseen")
        self.untagged(f"OK [UIDVALIDITY {box.uidvalidity}] UIDs valid")
        self.untagged(f"OK [UIDNEXT {box.uidnext}] Predicted next UID")
        self.untagged(f"OK [HIGHESTMODSEQ {box.highestmodseq}] Highest")
        if self.rev2:
            self.untagged(b"LIST () \"/\" " + self._show(box.name))
        if qresync is not None:
            await self._qresync(selected, *qresync)
        # The listing holds every change up to the mailbox's MODSEQ (maybe later ones
        # too): later changes are heard as they are announced, unless one was announced
        # before this session watched the mailbox, which calls for a read.
        if missed:
            selected.dirty = True
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        return _ok(f"[{mode}] {cmd.name} completed")

    def _select_params(self, params: Any) -> Optional[tuple[int, int, Optional[SequenceSet]]]:
        """SELECT's (CONDSTORE) or (QRESYNC (uidvalidity modseq [known-uids]))."""
        if params is None:
            return None
        if not isinstance(params, list):
            raise Bad("SELECT parameters must be a list")
        result = None
        index = 0
        while index < len(params):
            name = astring(params[index]).upper()
            if name == "CONDSTORE":
                self.enabled.add("CONDSTORE")
                index += 1
            elif name == "QRESYNC":
                if "QRESYNC" not in self.enabled:
                    raise Bad("QRESYNC must be enabled first (ENABLE QRESYNC)")
                value = params[index + 1] if index + 1 < len(params) else None
                if not isinstance(value, list) or len(value) < 2:
                    raise Bad("QRESYNC needs (uidvalidity modseq [known-uids])")
                known = parse_sequence_set(astring(value[2])) if len(value) > 2 else None
                result = (_number(value[0]), _number(value[1], allow_zero=False), known)
                index += 2
            else:
                raise Bad(f"unknown SELECT parameter {name[:20]}")
        return result

    async def _qresync(self, selected: SelectedMailbox, uidvalidity: int, modseq: int,
                       known: Optional[SequenceSet]) -> None:
        """RFC 7162 §3.2.5: what changed since the client's last visit."""
        if uidvalidity != selected.mailbox.uidvalidity:
            return
        changes = await self.store.changes_since(selected.id, modseq)
        gone = [uid for uid in changes.expunged
                if known is None or known.contains(uid, selected.largest_uid or 1)]
        if gone:
            self.untagged(f"VANISHED (EARLIER) {format_sequence(gone)}")
        for info in changes.changed:
            number = selected.number_of(info.uid)
            if number:
                self.untagged(self._flags_fetch(number, selected.info[info.uid]))

    def _unselect(self) -> None:
        if self.selected is not None:
            self.hub.unwatch(self.selected.id, self)
            self.selected = None

    async def do_CREATE(self, cmd: Command) -> Reply:
        if not cmd.args or len(cmd.args) > 2:
            raise Bad("CREATE needs a mailbox name")
        raw = astring(cmd.args[0])
        name = self._name(raw.rstrip(DELIMITER) or raw)
        use = None
        if len(cmd.args) == 2:
            opts = cmd.args[1]
            if (not isinstance(opts, list) or len(opts) != 2
                    or astring(opts[0]).upper() != "USE" or not isinstance(opts[1], list)):
                raise Bad("CREATE takes (USE (\\Special-use))")
            uses = [astring(u) for u in opts[1]]
            if len(uses) > 1:
                raise No("[USEATTR] One special use per mailbox")
            if uses:
                use = _use_name(uses[0])
                if use is None:
                    raise No("[USEATTR] Unknown special use")
        if name == "INBOX":
            raise No("[ALREADYEXISTS] INBOX exists")
        existing = {box.name for box in await self.store.list_mailboxes(self.user.id)}
        if name in existing:
            raise No("[ALREADYEXISTS] Mailbox exists")
        # RFC 9051 §6.3.4: the missing superiors are created too.
        for parent in parents(name):
            if parent not in existing and parent != "INBOX":
                try:
                    await self.store.create_mailbox(self.user.id, parent, subscribed=False)
                except MailboxExists:
                    pass
        try:
            await self.store.create_mailbox(self.user.id, name, use, subscribed=False)
        except MailboxExists:
            raise No("[ALREADYEXISTS] Mailbox exists") from None
        return _ok("CREATE completed")

    async def do_DELETE(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1:
            raise Bad("DELETE needs a mailbox name")
        name = self._name(cmd.args[0])
        if name == "INBOX":
            raise No("[CANNOT] INBOX cannot be deleted")
        boxes = await self.store.list_mailboxes(self.user.id)
        if not any(box.name == name for box in boxes):
            raise No("[NONEXISTENT] No such mailbox")
        if any(box.name.startswith(name + DELIMITER) for box in boxes):
            # A mailbox with children and no \Noselect support: refuse, as Dovecot.
            raise No("[INUSE] Mailbox has children, delete them first")
        if self.selected is not None and self.selected.mailbox.name == name:
            self._unselect()
            self.state = AUTHENTICATED
        await self.store.delete_mailbox(self.user.id, name)
        return _ok("DELETE completed")

    async def do_RENAME(self, cmd: Command) -> Reply:
        if len(cmd.args) != 2:
            raise Bad("RENAME needs two mailbox names")
        old, new = self._name(cmd.args[0]), self._name(cmd.args[1])
        if new == "INBOX":
            raise No("[ALREADYEXISTS] INBOX exists")
        boxes = {box.name for box in await self.store.list_mailboxes(self.user.id)}
        if old not in boxes:
            raise No("[NONEXISTENT] No such mailbox")
        if new in boxes:
            raise No("[ALREADYEXISTS] Mailbox exists")
        if new.startswith(old + DELIMITER):
            raise No("[CANNOT] A mailbox cannot be moved into itself")
        for parent in parents(new):
            if parent not in boxes:
                await self.store.create_mailbox(self.user.id, parent, subscribed=False)
        try:
            await self.store.rename_mailbox(self.user.id, old, new)
        except MailboxExists:
            raise No("[ALREADYEXISTS] Mailbox exists") from None
        return _ok("RENAME completed")

    async def do_SUBSCRIBE(self, cmd: Command) -> Reply:
        return await self._subscribe(cmd, True)

    async def do_UNSUBSCRIBE(self, cmd: Command) -> Reply:
        return await self._subscribe(cmd, False)

    async def _subscribe(self, cmd: Command, subscribed: bool) -> Reply:
        if len(cmd.args) != 1:
            raise Bad(f"{cmd.name} needs a mailbox name")
        box = await self._mailbox(self._name(cmd.args[0]))
        await self.store.set_subscribed(box.id, subscribed)
        return _ok(f"{cmd.name} completed")

    async def do_LIST(self, cmd: Command) -> Reply:
        return await self._list(cmd, lsub=False)

    async def do_LSUB(self, cmd: Command) -> Reply:
        return await self._list(cmd, lsub=True)

    async def _list(self, cmd: Command, lsub: bool) -> Reply:
        args = list(cmd.args)
        select: set[str] = set()
        if args and isinstance(args[0], list) and not lsub:
            select = {astring(a).upper() for a in args.pop(0)}
            unknown = select - {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
            if unknown:
                raise Bad(f"unknown LIST selection option {sorted(unknown)[0]}")
            if select == {"RECURSIVEMATCH"}:
                raise Bad("RECURSIVEMATCH needs another selection option")
        if len(args) < 2:
            raise Bad(f"{cmd.name} needs a reference and a mailbox pattern")
        reference = astring(args[0])
        patterns = args[1] if isinstance(args[1], list) and not lsub else [args[1]]
        returns: set[str] = set()
        status_items: list[str] = []
        if len(args) > 2:
            if (len(args) != 4 or astring(args[2]).upper() != "RETURN"
                    or not isinstance(args[3], list)):
                raise Bad("LIST ... RETURN (options)")
            opts = args[3]
            index = 0
            while index < len(opts):
                opt = astring(opts[index]).upper()
                if opt == "STATUS":
                    if index + 1 >= len(opts) or not isinstance(opts[index + 1], list):
                        raise Bad("RETURN (STATUS (items))")
                    status_items = [astring(i).upper() for i in opts[index + 1]]
                    index += 1
                elif opt not in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                    raise Bad(f"unknown LIST return option {opt[:20]}")
                returns.add(opt)
                index += 1
        boxes = await self.store.list_mailboxes(self.user.id)
        by_name = {box.name: box for box in boxes}
        regexes = []
        for pattern in patterns:
            text = astring(pattern)
            if not lsub and not text and len(patterns) == 1 and not select:
                # RFC 9051 §6.3.9: the delimiter and the root of the reference.
                self.untagged(b'LIST (\\Noselect) "/" ""')
                return _ok("LIST completed")
            try:
                ref = decode_name(reference, self.utf8) if reference else ""
            except BadName:
                ref = reference
            if not self.utf8 and "&" in text:
                try:
                    text = text.encode("ascii").decode("imap4-utf-7")
                except (UnicodeError, ValueError):
                    pass
            regexes.append(pattern_regex(ref, text))
        subscribed_only = lsub or "SUBSCRIBED" in select
        names = set(by_name)
        # Superiors that exist only as the path of a child are listed as
        # \NonExistent (LIST-EXTENDED) or \Noselect (rev1), when they match.
        phantom = {p for name in by_name for p in parents(name) if p not in by_name}
        for name in sorted(names | phantom, key=lambda n: (n != "INBOX", n)):
            if not any(regex.match(name) for regex in regexes):
                continue
            box = by_name.get(name)
            if lsub and not (box and box.subscribed) and any(
                    other.startswith(name + DELIMITER) and found.subscribed
                    and not any(regex.match(other) for regex in regexes)
                    for other, found in by_name.items()):
                # RFC 3501 §6.3.9: LSUB "%" names the unsubscribed superior of a
                # subscribed mailbox that the pattern does not reach, as \Noselect.
                self.untagged(b'LSUB (\\Noselect) "/" ' + self._show(name))
                continue
            # RFC 5258 §3.5: with (SUBSCRIBED RECURSIVEMATCH), a mailbox that is not
            # subscribed itself but has a subscribed descendant is listed with
            # CHILDINFO ("SUBSCRIBED").
            childinfo = ("SUBSCRIBED" in select and "RECURSIVEMATCH" in select
                         and not (box and box.subscribed)
                         and any(other.startswith(name + DELIMITER) and found.subscribed
                                 for other, found in by_name.items()))
            attrs = []
            if box is None:
                if (subscribed_only or select) and not childinfo:
                    continue
                attrs.append("\\NonExistent" if self.rev2 or select else "\\Noselect")
            if subscribed_only and not (box and box.subscribed) and not childinfo:
                continue
            if "SPECIAL-USE" in select and not (box and box.special_use):
                continue
            children = any(other.startswith(name + DELIMITER) for other in names)
            attrs.append("\\HasChildren" if children else "\\HasNoChildren")
            if box is not None and box.subscribed and (
                    "SUBSCRIBED" in returns or subscribed_only):
                attrs.append("\\Subscribed")
            if box is not None and box.special_use and not lsub:
                attrs.append(box.special_use)
            word = "LSUB" if lsub else "LIST"
            self.untagged(f"{word} ({' '.join(attrs)}) \"/\" ".encode() + self._show(name)
                          + (b' ("CHILDINFO" ("SUBSCRIBED"))' if childinfo else b""))
            if status_items and box is not None:
                await self._status_response(box, status_items)
        return _ok(f"{cmd.name} completed")

    async def do_STATUS(self, cmd: Command) -> Reply:
        if len(cmd.args) != 2 or not isinstance(cmd.args[1], list) or not cmd.args[1]:
            raise Bad("STATUS needs a mailbox name and a list of items")
        box = await self._mailbox(self._name(cmd.args[0]))
        await self._status_response(box, [astring(i).upper() for i in cmd.args[1]])
        return _ok("STATUS completed")

    async def _status_response(self, box: Any, items: list[str]) -> None:
        allowed = {"MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE",
                   "RECENT", "HIGHESTMODSEQ", "APPENDLIMIT"}
        bad = [item for item in items if item not in allowed]
        if bad:
            raise Bad(f"unknown STATUS item {bad[0][:20]}")
        status = await self.store.status(box.id)
        mailbox = status.mailbox
        values = {
            "MESSAGES": status.messages, "UIDNEXT": mailbox.uidnext,
            "UIDVALIDITY": mailbox.uidvalidity, "UNSEEN": status.unseen,
            "DELETED": status.deleted, "SIZE": status.size,
            "HIGHESTMODSEQ": mailbox.highestmodseq, "APPENDLIMIT": self.cfg.max_literal,
        }
        if "RECENT" in items:
            first = self.hub.peek_recent(box.id, mailbox.uidnext)
            values["RECENT"] = max(0, min(status.messages, mailbox.uidnext - first))
        if "HIGHESTMODSEQ" in items:
            self.enabled.add("CONDSTORE")
        body = " ".join(f"{item} {values[item]}" for item in items)
        self.untagged(b"STATUS " + self._show(box.name) + f" ({body})".encode())

    async def do_NAMESPACE(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        self.untagged('NAMESPACE (("" "/")) NIL NIL')
        return _ok("NAMESPACE completed")

    async def do_APPEND(self, cmd: Command) -> Reply:
        args = list(cmd.args)
        if len(args) < 2:
            raise Bad("APPEND needs a mailbox name and a message")
        name = self._name(args.pop(0))
        flags: list[str] = []
        date: Optional[int] = None
        if args and isinstance(args[0], list):
            flags = self._flags(args.pop(0))
        # The date-time is a quoted string (a plain str; an Atom such as UTF8 is not).
        if len(args) > 1 and isinstance(args[0], str) and not isinstance(args[0], Atom):
            date = _parse_date_time(astring(args.pop(0)))
        if len(args) == 2 and isinstance(args[0], Atom) and args[0].upper() == "UTF8" \
                and isinstance(args[1], list):
            # RFC 6855 §4: UTF8 (literal8) when UTF8=ACCEPT is on.
            args = args[1]
        if len(args) != 1 or not isinstance(args[0], bytes):
            raise Bad("APPEND needs the message as a literal")
        data = args[0]
        # The blob is written (two fsyncs) while the mailbox is looked up and the
        # quota checked; a refused APPEND leaves an unreferenced blob to the garbage
        # collector, as a crash between the two would.
        writing = self.store.blobs.put(data)
        try:
            box = await self.store.get_mailbox(self.user.id, name)
            if box is None:
                raise No("[TRYCREATE] No such mailbox")
            if self.user.quota_bytes:
                used = await self.store.usage(self.user.id)
                if used + len(data) > self.user.quota_bytes:
                    raise No("[OVERQUOTA] Quota exceeded")
        except BaseException:
            writing.addErrback(lambda _: None)
            raise
        blob = await writing
        appended = await self.store.append(box.id, blob, flags, date)
        return _ok(f"[APPENDUID {appended.uidvalidity} {appended.uid}] APPEND completed")

    def _flags(self, values: Any) -> list[str]:
        if not isinstance(values, list):
            values = [values]
        flags = []
        for value in values:
            flag = astring(value)
            if not _FLAG_RE.match(flag) or flag.upper() == "\\RECENT":
                raise Bad(f"invalid flag {flag[:30]}")
            if flag.startswith("\\"):
                proper = next((f for f in SYSTEM_FLAGS if f.upper() == flag.upper()), None)
                if proper is None:
                    raise Bad(f"unknown system flag {flag[:30]}")
                flag = proper
            flags.append(flag)
        return flags

    async def do_IDLE(self, cmd: Command) -> Optional[Reply]:
        self._no_args(cmd)
        if self.selected is not None:
            await self.catch_up(allow_expunge=True)
        self.idling = cmd.tag
        self.write(b"+ idling\r\n")
        return None

    def _idle_line(self, line: bytes) -> None:
        tag, self.idling = self.idling, None
        assert tag is not None
        if line.strip().upper() != b"DONE":
            self.tagged(tag, "BAD", "Expected DONE")
            self._error()
            return
        self.tagged(tag, "OK", "IDLE terminated")

    async def do_GETQUOTAROOT(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1:
            raise Bad("GETQUOTAROOT needs a mailbox name")
        box = await self._mailbox(self._name(cmd.args[0]))
        roots = ' ""' if self.user.quota_bytes else ""
        self.untagged(b"QUOTAROOT " + self._show(box.name) + roots.encode())
        if self.user.quota_bytes:
            await self._quota_response()
        return _ok("GETQUOTAROOT completed")

    async def do_GETQUOTA(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1:
            raise Bad("GETQUOTA needs a quota root")
        if astring(cmd.args[0]) != "" or not self.user.quota_bytes:
            raise No("[NONEXISTENT] No such quota root")
        await self._quota_response()
        return _ok("GETQUOTA completed")

    async def _quota_response(self) -> None:
        used = await self.store.usage(self.user.id)
        # RFC 9208 §5.1: STORAGE is in units of 1024 octets.
        self.untagged(f'QUOTA "" (STORAGE {(used + 1023) // 1024} '
                      f'{self.user.quota_bytes // 1024})')

    async def do_SETQUOTA(self, cmd: Command) -> Reply:
        raise No("[NOPERM] Quotas are set by the administrator")

    # -- selected state -------------------------------------------------------------

    def _sel(self) -> SelectedMailbox:
        assert self.selected is not None
        return self.selected

    def _resolve(self, text: Any, uid: bool) -> list[int]:
        """The UIDs a sequence set names, in ascending order."""
        selected = self._sel()
        if not isinstance(text, Atom):
            raise Bad("expected a sequence set")
        seqset = parse_sequence_set(text)
        if seqset.saved:
            saved = set(self.saved_search or ())
            return [u for u in selected.uids if u in saved]
        if uid:
            largest = selected.largest_uid
            return seqset.select_sorted(selected.uids, largest) if largest else []
        count = selected.exists
        if count == 0 and any(-1 in r for r in seqset.ranges):
            return []       # "*" in an empty mailbox: nothing, as Dovecot answers
        ranges = sorted(seqset.resolve(count))
        if any(high > count for _, high in ranges):
            raise Bad("Invalid message sequence number")
        # Numbers are positions in the (ascending) UIDs: each range is a slice.
        uids: list[int] = []
        taken = 0           # numbers up to this are decided
        for low, high in ranges:
            if high > taken:
                uids.extend(selected.uids[max(low, taken + 1) - 1:high])
                taken = high
        return uids

    async def do_CHECK(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        return _ok("CHECK completed")

    async def do_CLOSE(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        selected = self._sel()
        if not selected.readonly:
            deleted = [u for u in selected.uids if "\\Deleted" in selected.info[u].flags]
            if deleted:
                await self.store.expunge(selected.id, deleted)
        self._unselect()
        self.state = AUTHENTICATED
        return _ok("CLOSE completed")

    async def do_UNSELECT(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        self._unselect()
        self.state = AUTHENTICATED
        return _ok("UNSELECT completed")

    async def do_EXPUNGE(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        return await self._expunge(None)

    async def do_UID_EXPUNGE(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1:
            raise Bad("UID EXPUNGE needs a UID set")
        return await self._expunge(set(self._resolve(cmd.args[0], uid=True)))

    async def _expunge(self, only: Optional[set[int]]) -> Reply:
        selected = self._sel()
        if selected.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        await self.catch_up(allow_expunge=True)
        deleted = [u for u in selected.uids if "\\Deleted" in selected.info[u].flags
                   and (only is None or u in only)]
        if deleted:
            await self.store.expunge(selected.id, deleted)
        return _ok("EXPUNGE completed")

    async def do_FETCH(self, cmd: Command) -> Reply:
        return await self._fetch(cmd, uid=False)

    async def do_UID_FETCH(self, cmd: Command) -> Reply:
        return await self._fetch(cmd, uid=True)

    async def _fetch(self, cmd: Command, uid: bool) -> Reply:
        if len(cmd.args) not in (2, 3):
            raise Bad("FETCH needs a sequence set and data items")
        selected = self._sel()
        uids = self._resolve(cmd.args[0], uid)
        items = fetching.parse_fetch_items(cmd.args[1])
        changed_since: Optional[int] = None
        vanished = False
        if len(cmd.args) == 3:
            changed_since, vanished = self._fetch_modifiers(cmd.args[2], uid)
        if uid and not any(item.name == "UID" for item in items):
            items.insert(0, fetching.FetchItem("UID"))
        if changed_since is not None and not any(i.name == "MODSEQ" for i in items):
            items.append(fetching.FetchItem("MODSEQ"))
        if any(item.name == "MODSEQ" for item in items):
            self.enabled.add("CONDSTORE")
        if changed_since is not None:
            if vanished:
                changes = await self.store.changes_since(selected.id, changed_since)
                gone = [u for u in changes.expunged if uids and uids[0] <= u <= uids[-1]]
                if gone:
                    self.untagged(f"VANISHED (EARLIER) {format_sequence(gone)}")
            uids = [u for u in uids if selected.info[u].modseq > changed_since]
        seen = fetching.sets_seen(items) and not selected.readonly
        if seen:
            unseen = [u for u in uids if "\\Seen" not in selected.info[u].flags]
            if unseen:
                changed = await self.store.set_flags(selected.id, unseen, ["\\Seen"], "add")
                selected.update_flags(changed)
                if not any(item.name == "FLAGS" for item in items):
                    items.append(fetching.FetchItem("FLAGS"))
                if self._condstore:
                    # RFC 7162 §3.1: a FETCH that sets \Seen implicitly reports the
                    # UID and MODSEQ too once CONDSTORE is on (IMAPClient expects it).
                    if not any(item.name == "UID" for item in items):
                        items.insert(0, fetching.FetchItem("UID"))
                    if not any(item.name == "MODSEQ" for item in items):
                        items.append(fetching.FetchItem("MODSEQ"))
        content = fetching.needs_content(items)
        if not content and all(item.name in fetching.META_ITEMS for item in items):
            await self._fetch_meta(selected, uids, [item.name for item in items])
            return _ok(f"{cmd.name} completed")
        # Header items only: the header blocks kept in SQL, HEADERS_BATCH a query.
        header_only = content and fetching.header_only(items)
        heads: dict[int, bytes] = {}
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        count = 0
        ahead = _ReadAhead(self.store, selected, uids)
        try:
            for index, message_uid in enumerate(uids):
                if self.closing or self.selected is not selected:
                    break
                if header_only and index % HEADERS_BATCH == 0:
                    heads = await self.store.headers_for(
                        selected.id, uids[index:index + HEADERS_BATCH])
                if message_uid in selected.gone:
                    continue     # expunged meanwhile; not told yet (RFC 9051 §7.5.1)
                info = selected.info[message_uid]
                parsed = None
                if header_only:
                    head = heads.get(message_uid)
                    parsed = ParsedMessage(head if head is not None else
                                           await self.store.blobs.read(info.blob_id))
                elif content:
                    raw = await ahead.read(index)
                    parsed = ParsedMessage(raw)
                self._write_fetch(selected, info, items, parsed)
                count += 1
                if self._paused is not None:
                    await self._paused
                elif count % BATCH == 0:
                    await breathe()
        finally:
            ahead.discard()
            if self.transport is not None:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]
        return _ok(f"{cmd.name} completed")

    async def _fetch_meta(self, selected: SelectedMailbox, uids: list[int],
                          names: list[str]) -> None:
        """FETCH of items a MessageInfo answers (UID, FLAGS, INTERNALDATE,
        RFC822.SIZE, MODSEQ): BATCH responses formatted in one loop and written
        together, flag lists formatted once per distinct flag set."""
        info, recent, gone = selected.info, selected.recent, selected.gone
        flag_list, date = fetching.flag_list, fetching.internal_date
        # All the messages (FETCH 1:*): message numbers are positions.
        every = len(uids) == selected.exists
        number_of = selected.number_of
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        try:
            for start in range(0, len(uids), BATCH):
                if self.closing or self.selected is not selected:
                    break
                lines = []
                for index in range(start, min(start + BATCH, len(uids))):
                    message_uid = uids[index]
                    if message_uid in gone:
                        continue     # expunged meanwhile; not told yet (RFC 9051 §7.5.1)
                    m = info[message_uid]
                    parts = []
                    for name in names:
                        if name == "FLAGS":
                            parts.append(b"FLAGS " + flag_list(m.flags, message_uid in recent))
                        elif name == "UID":
                            parts.append(b"UID %d" % message_uid)
                        elif name == "MODSEQ":
                            parts.append(b"MODSEQ (%d)" % m.modseq)
                        elif name == "RFC822.SIZE":
                            parts.append(b"RFC822.SIZE %d" % m.size)
                        else:
                            parts.append(b"INTERNALDATE " + date(m.internal_date))
                    lines.append(b"* %d FETCH (%s)\r\n" % (
                        index + 1 if every else number_of(message_uid), b" ".join(parts)))
                self.write(b"".join(lines))
                if self._paused is not None:
                    await self._paused
                elif start + BATCH < len(uids):
                    await breathe()
        finally:
            if self.transport is not None:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]

    def _fetch_modifiers(self, value: Any, uid: bool) -> tuple[Optional[int], bool]:
        if not isinstance(value, list):
            raise Bad("FETCH modifiers must be a list")
        changed_since, vanished = None, False
        index = 0
        while index < len(value):
            name = astring(value[index]).upper()
            if name == "CHANGEDSINCE" and index + 1 < len(value):
                changed_since = _number(value[index + 1])
                index += 2
            elif name == "VANISHED":
                if not uid or "QRESYNC" not in self.enabled:
                    raise Bad("VANISHED needs UID FETCH with QRESYNC enabled")
                vanished = True
                index += 1
            else:
                raise Bad(f"unknown FETCH modifier {name[:20]}")
        if vanished and changed_since is None:
            raise Bad("VANISHED needs CHANGEDSINCE")
        return changed_since, vanished

    def _write_fetch(self, selected: SelectedMailbox, info: MessageInfo,
                     items: list[fetching.FetchItem], parsed: Optional[ParsedMessage]) -> None:
        out = []
        for item in items:
            if item.name == "UID":
                out.append(b"UID %d" % info.uid)
            elif item.name == "FLAGS":
                out.append(b"FLAGS " + selected.flag_list(info.uid))
            elif item.name == "INTERNALDATE":
                out.append(b"INTERNALDATE " + fetching.internal_date(info.internal_date))
            elif item.name == "RFC822.SIZE":
                out.append(b"RFC822.SIZE %d" % info.size)
            elif item.name == "MODSEQ":
                out.append(b"MODSEQ (%d)" % info.modseq)
            else:
                assert parsed is not None
                try:
                    out.append(fetching.content_item(item, parsed))
                except fetching.UnknownCTE:
                    raise No("[UNKNOWN-CTE] Cannot decode the part's "
                             "Content-Transfer-Encoding") from None
        number = selected.number_of(info.uid)
        self.untagged(b"%d FETCH (" % number + b" ".join(out) + b")")

    async def do_STORE(self, cmd: Command) -> Reply:
        return await self._store(cmd, uid=False)

    async def do_UID_STORE(self, cmd: Command) -> Reply:
        return await self._store(cmd, uid=True)

    async def _store(self, cmd: Command, uid: bool) -> Reply:
        args = list(cmd.args)
        if len(args) < 3:
            raise Bad("STORE needs a sequence set, an action and flags")
        selected = self._sel()
        uids = self._resolve(args.pop(0), uid)
        unchanged_since = None
        if isinstance(args[0], list):
            mods = args.pop(0)
            if len(mods) != 2 or astring(mods[0]).upper() != "UNCHANGEDSINCE":
                raise Bad("STORE modifier must be (UNCHANGEDSINCE n)")
            unchanged_since = _number(mods[1])
            self.enabled.add("CONDSTORE")
        action = astring(args.pop(0)).upper()
        match = re.match(r"^([+-]?)FLAGS(\.SILENT)?$", action)
        if match is None or not args:
            raise Bad("STORE action must be [+|-]FLAGS[.SILENT]")
        flags = self._flags(args if len(args) > 1 else args[0])
        if selected.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        mode = {"": "replace", "+": "add", "-": "remove"}[match.group(1)]
        modified: list[int] = []
        if unchanged_since is not None:
            # Checked against this session's view after a catch-up; a concurrent
            # change in the same instant may slip through (not atomic in the store).
            await self.catch_up(allow_expunge=False)
            modified = [u for u in uids if selected.info[u].modseq > unchanged_since]
            uids = [u for u in uids if u not in modified]
        uids = [u for u in uids if u not in selected.gone]
        changed = await self.store.set_flags(selected.id, uids, flags, mode) if uids else []
        selected.update_flags(changed)
        silent = match.group(2) is not None
        changed_uids = {info.uid for info in changed}
        for message_uid in uids:
            if silent and not (self._condstore and message_uid in changed_uids):
                continue
            info = selected.info[message_uid]
            number = selected.number_of(message_uid)
            parts = [b"FLAGS " + selected.flag_list(message_uid)]
            if silent:
                parts = []
            # RFC 7162 §3.2.4: with CONDSTORE on, every untagged FETCH a STORE causes
            # carries both UID and MODSEQ.
            if uid or self._condstore:
                parts.insert(0, b"UID %d" % message_uid)
            if self._condstore:
                parts.append(b"MODSEQ (%d)" % info.modseq)
            if parts:
                self.untagged(b"%d FETCH (" % number + b" ".join(parts) + b")")
        if modified:
            numbers = modified if uid else [selected.number_of(u) for u in modified]
            return _ok(f"[MODIFIED {format_sequence(numbers)}] Conditional STORE failed "
                       "for some messages")
        return _ok(f"{cmd.name} completed")

    async def do_COPY(self, cmd: Command) -> Reply:
        return await self._copy(cmd, uid=False, move=False)

    async def do_UID_COPY(self, cmd: Command) -> Reply:
        return await self._copy(cmd, uid=True, move=False)

    async def do_MOVE(self, cmd: Command) -> Reply:
        return await self._copy(cmd, uid=False, move=True)

    async def do_UID_MOVE(self, cmd: Command) -> Reply:
        return await self._copy(cmd, uid=True, move=True)

    async def _copy(self, cmd: Command, uid: bool, move: bool) -> Reply:
        if len(cmd.args) != 2:
            raise Bad(f"{cmd.name} needs a sequence set and a mailbox name")
        selected = self._sel()
        uids = [u for u in self._resolve(cmd.args[0], uid) if u not in selected.gone]
        target = await self.store.get_mailbox(self.user.id, self._name(cmd.args[1]))
        if target is None:
            raise No("[TRYCREATE] No such mailbox")
        if move and selected.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        if self.user.quota_bytes and uids and not move:
            used = await self.store.usage(self.user.id)
            size = sum(selected.info[u].size for u in uids)
            if used + size > self.user.quota_bytes:
                raise No("[OVERQUOTA] Quota exceeded")
        copied = await self.store.copy(selected.id, uids, target.id, move=move)
        code = ""
        if copied.pairs:
            code = (f"[COPYUID {copied.uidvalidity} "
                    f"{','.join(str(p[0]) for p in copied.pairs)} "
                    f"{','.join(str(p[1]) for p in copied.pairs)}] ")
        if move:
            if code:
                self.untagged(f"OK {code}Moved")
            return _ok(f"{cmd.name} completed")
        return _ok(f"{code}{cmd.name} completed")

    # -- SEARCH, SORT, THREAD ---------------------------------------------------------

    async def do_SEARCH(self, cmd: Command) -> Reply:
        return await self._search(cmd, uid=False)

    async def do_UID_SEARCH(self, cmd: Command) -> Reply:
        return await self._search(cmd, uid=True)

    async def _matching(self, args: list[Any]) -> tuple[list[searching.MessageView], Any,
                                                         dict[int, ParsedMessage]]:
        """The messages that match search keys, with their parsed content if read."""
        selected = self._sel()
        try:
            key, _charset = searching.parse_search(args, utf8=self.utf8)
        except searching.BadCharset:
            raise No("[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset") from None
        context = searching.SearchContext(
            largest_seq=selected.exists, largest_uid=selected.largest_uid,
            saved=self.saved_search)
        content_needed = searching.needs_content(key)
        # Header keys only: the header blocks kept in SQL, HEADERS_BATCH a query.
        header_only = content_needed and not searching.needs_body(key)
        heads: dict[int, bytes] = {}
        found = []
        parsed: dict[int, ParsedMessage] = {}
        if searching.flags_only(key):
            # UNSEEN, DELETED, KEYWORD...: each distinct flag set is tested once.
            make_view, infos, recent, gone = searching.MessageView, selected.info, \
                selected.recent, selected.gone
            decided: tuple[dict[frozenset[str], bool], dict[frozenset[str], bool]] = ({}, {})
            for number, message_uid in enumerate(selected.uids, 1):
                m = infos[message_uid]
                is_recent = message_uid in recent
                ok = decided[is_recent].get(m.flags)
                if ok is None:
                    flags = m.flags | {"\\Recent"} if is_recent else m.flags
                    ok = decided[is_recent][m.flags] = searching.matches_flags(
                        key, flags, context)
                if ok and message_uid not in gone:
                    found.append(make_view(number, message_uid,
                                           selected.flags_of(message_uid),
                                           m.internal_date, m.size, m.modseq))
            return found, key, parsed
        ahead = _ReadAhead(self.store, selected, selected.uids)
        for number, message_uid in enumerate(selected.uids, 1):
            if header_only and (number - 1) % HEADERS_BATCH == 0:
                heads = await self.store.headers_for(
                    selected.id, selected.uids[number - 1:number - 1 + HEADERS_BATCH])
            if message_uid in selected.gone:
                continue
            info = selected.info[message_uid]
            view = searching.MessageView(number, message_uid, selected.flags_of(message_uid),
                                         info.internal_date, info.size, info.modseq)
            content = None
            if header_only:
                head = heads.get(message_uid)
                content = ParsedMessage(head if head is not None else
                                        await self.store.blobs.read(info.blob_id))
            elif content_needed:
                try:
                    content = ParsedMessage(await ahead.read(number - 1))
                except BaseException:
                    ahead.discard()
                    raise
            if searching.matches(key, view, context, content):
                found.append(view)
                if content is not None:     # kept for SORT and THREAD: matches only
                    parsed[message_uid] = content
            if number % BATCH == 0:
                await breathe()
        return found, key, parsed

    async def _search(self, cmd: Command, uid: bool) -> Reply:
        args = list(cmd.args)
        returns: Optional[list[str]] = None
        if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "RETURN":
            if not isinstance(args[1], list):
                raise Bad("SEARCH RETURN needs a list of options")
            returns = [astring(a).upper() for a in args[1]] or ["ALL"]
            bad = set(returns) - {"MIN", "MAX", "ALL", "COUNT", "SAVE"}
            if bad:
                raise Bad(f"unknown SEARCH RETURN option {sorted(bad)[0]}")
            args = args[2:]
        elif self.rev2:
            # IMAP4rev2 has no SEARCH response: ESEARCH as for RETURN (ALL) (RFC 9051
            # §6.4.4).
            returns = ["ALL"]
        found, key, _ = await self._matching(args)
        numbers = [view.uid if uid else view.seq for view in found]
        modseq = max((view.modseq for view in found), default=0) \
            if searching.uses_modseq(key) else None
        if modseq is not None:
            self.enabled.add("CONDSTORE")
        if returns is None:
            text = "SEARCH" + "".join(f" {n}" for n in numbers)
            if modseq and numbers:
                text += f" (MODSEQ {modseq})"
            self.untagged(text)
            return _ok(f"{cmd.name} completed")
        if "SAVE" in returns:
            saved = found
            if set(returns) - {"SAVE"}:
                picks = set(returns) - {"SAVE", "COUNT"}
                if picks and "ALL" not in picks:
                    saved = [v for v in (found[:1] if "MIN" in picks else []) +
                             (found[-1:] if "MAX" in picks else [])]
            self.saved_search = [v.uid for v in saved]
            if set(returns) == {"SAVE"}:
                return _ok(f"{cmd.name} completed")
        parts = [f'(TAG "{cmd.tag}")']
        if uid:
            parts.append("UID")
        if numbers:
            if "MIN" in returns:
                parts.append(f"MIN {numbers[0]}")
            if "MAX" in returns:
                parts.append(f"MAX {numbers[-1]}")
            if "ALL" in returns:
                parts.append(f"ALL {format_sequence(numbers)}")
        if "COUNT" in returns:
            parts.append(f"COUNT {len(numbers)}")
        if modseq and numbers:
            parts.append(f"MODSEQ {modseq}")
        self.untagged("ESEARCH " + " ".join(parts))
        return _ok(f"{cmd.name} completed")

    async def do_SORT(self, cmd: Command) -> Reply:
        return await self._sort(cmd, uid=False)

    async def do_UID_SORT(self, cmd: Command) -> Reply:
        return await self._sort(cmd, uid=True)

    async def _sort(self, cmd: Command, uid: bool) -> Reply:
        if len(cmd.args) < 3 or not isinstance(cmd.args[0], list):
            raise Bad("SORT needs (criteria) charset search-keys")
        criteria = sorting.parse_sort_criteria(cmd.args[0])
        found, _, parsed = await self._with_content(
            [Atom("CHARSET"), cmd.args[1]] + list(cmd.args[2:]))
        ordered = sorting.sort_messages([(v, parsed[v.uid]) for v in found], criteria)
        self.untagged("SORT" + "".join(f" {v.uid if uid else v.seq}" for v in ordered))
        return _ok(f"{cmd.name} completed")

    async def do_THREAD(self, cmd: Command) -> Reply:
        return await self._thread(cmd, uid=False)

    async def do_UID_THREAD(self, cmd: Command) -> Reply:
        return await self._thread(cmd, uid=True)

    async def _thread(self, cmd: Command, uid: bool) -> Reply:
        if len(cmd.args) < 3:
            raise Bad("THREAD needs an algorithm, a charset and search keys")
        algorithm = astring(cmd.args[0]).upper()
        if algorithm not in ("ORDEREDSUBJECT", "REFERENCES"):
            raise Bad("THREAD algorithms: ORDEREDSUBJECT, REFERENCES")
        found, _, parsed = await self._with_content(
            [Atom("CHARSET"), cmd.args[1]] + list(cmd.args[2:]))
        threads = sorting.thread_messages(algorithm, [(v, parsed[v.uid]) for v in found])
        self.untagged(b"THREAD " + sorting.format_threads(threads, uid))
        return _ok(f"{cmd.name} completed")

    async def _with_content(self, args: list[Any]) -> tuple[list[searching.MessageView],
                                                            Any, dict[int, ParsedMessage]]:
        found, key, parsed = await self._matching(args)
        selected = self._sel()
        # SORT and THREAD read header fields only: the header blocks kept in SQL.
        missing = [view.uid for view in found if view.uid not in parsed]
        for start in range(0, len(missing), HEADERS_BATCH):
            batch = missing[start:start + HEADERS_BATCH]
            heads = await self.store.headers_for(selected.id, batch)
            for message_uid in batch:
                head = heads.get(message_uid)
                if head is None:
                    info = selected.info[message_uid]
                    head = await self.store.blobs.read(info.blob_id)
                parsed[message_uid] = ParsedMessage(head)
        return found, key, parsed

    # -- helpers --------------------------------------------------------------------

    @staticmethod
    def _no_args(cmd: Command) -> None:
        if cmd.args:
            raise Bad(f"{cmd.name} takes no arguments")


def _number(value: Any, allow_zero: bool = True) -> int:
    text = astring(value) if not isinstance(value, list) else ""
    if not text.isdigit() or (not allow_zero and int(text) == 0):
        raise Bad("expected a number")
    return int(text)


def _use_name(use: str) -> Optional[str]:
    from lightmail.config import SPECIAL_USES
    return next((u for u in SPECIAL_USES if u.lower() == use.lower()), None)


def _parse_date_time(text: str) -> int:
    """RFC 9051 date-time ``"17-Jul-1996 02:44:25 -0700"`` -> ms since the epoch."""
    match = _DATE_TIME.match(text)
    month = _MONTHS.get(match.group(2).lower()) if match else None
    if match is None or month is None:
        raise Bad("invalid date-time")
    day, year, hour, minute, second = (int(match.group(i)) for i in (1, 3, 4, 5, 6))
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
        time.gmtime(seconds)
    except (ValueError, OverflowError):
        raise Bad("invalid date-time") from None
    offset = (int(match.group(8)) * 60 + int(match.group(9))) * 60
    seconds -= offset if match.group(7) == "+" else -offset
    return seconds * 1000


# command -> (states it is allowed in, handler method)
_COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {}


def _register() -> None:
    any_state = ("CAPABILITY", "NOOP", "LOGOUT", "ID", "COMPRESS")
    not_auth = ("STARTTLS", "LOGIN", "AUTHENTICATE")
    authed = ("ENABLE", "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE",
              "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "NAMESPACE", "APPEND", "IDLE",
              "GETQUOTAROOT", "GETQUOTA", "SETQUOTA")
    selected = ("CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "UID EXPUNGE", "FETCH",
                "UID FETCH", "STORE", "UID STORE", "COPY", "UID COPY", "MOVE", "UID MOVE",
                "SEARCH", "UID SEARCH", "SORT", "UID SORT", "THREAD", "UID THREAD")
    for names, states in ((any_state, ANY), (not_auth, (NOT_AUTHENTICATED,)),
                          (authed, AUTHED), (selected, (SELECTED,))):
        for name in names:
            _COMMANDS[name] = (states, "do_" + name.replace(" ", "_"))


_register()


class IMAPFactory(ServiceFactory):
    refusal = b"* BYE [UNAVAILABLE] Too many connections, try later\r\n"

    def __init__(self, listener: ListenerConfig, services: Any) -> None:
        super().__init__(listener, services)
        self.hub = hub_for(services)

    def make_protocol(self, addr: Any) -> IMAPSession:
        return IMAPSession(self)


def build_imap_factory(listener: ListenerConfig, services: Any) -> IMAPFactory:
    return IMAPFactory(listener, services)
