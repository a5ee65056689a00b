"""The POP3 server protocol: RFC 1939 with CAPA, RESP-CODES, PIPELINING (RFC 2449),
AUTH through the shared SASL layer (RFC 5034), STLS (RFC 2595) and implicit TLS
(RFC 8314, the listener's ``tls = implicit``).

Not built on ``twisted.mail.pop3``: it reads whole messages into memory through
IMailbox.getMessage, has no RESP-CODES, AUTH-RESP-CODE or SASL initial responses, and
expects synchronous deletion.  This session streams each message from the blob store
in chunks with flow control, and holds pipelined commands while one is answered.

APOP is never offered: it needs the cleartext password, and LightMail keeps only
argon2 hashes.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail import sasl
from lightmail.config import ListenerConfig
from lightmail.directory.logins import Attempt, LoginFailed, LoginUnavailable, PasswordExpired
from lightmail.listeners import (
    CLIENT_ERRORS,
    INPUT_SLICE,
    MEMORY,
    ServiceFactory,
    TrackedProtocol,
)
from lightmail.logs import BoundLogger
from lightmail.policy.limits.throttle import command_rate
from lightmail.pop3.maildrop import LockUnavailable, LoginTooSoon, Maildrop, MaildropLocked
from lightmail.storage.interfaces import MessageInfo
from lightmail.streams import DotStuffer, PushProducer, dot_stuffed
from lightmail.transport import write_at_once

AUTHORIZATION, TRANSACTION = "authorization", "transaction"

# Commands allowed in each state (RFC 1939 §4-6; CAPA in both, RFC 2449 §5).
COMMANDS = {
    AUTHORIZATION: {"USER", "PASS", "AUTH", "STLS", "CAPA", "QUIT", "NOOP"},
    TRANSACTION: {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT", "TOP", "UIDL",
                  "CAPA"},
}

@implementer(IPushProducer)
class POP3Session(TrackedProtocol, TimeoutMixin, PushProducer):
    factory: POP3Factory

    def __init__(self, factory: POP3Factory) -> None:
        self.cfg = factory.services.config.pop3
        self.state = AUTHORIZATION
        self.buffer = b""
        self.busy = False
        self.closing = False
        self.draining = False
        self.discarding = False
        self.tls = factory.listener.tls == "implicit"
        self.errors = 0
        self.username: Optional[str] = None       # from USER, waiting for PASS
        self.sasl: Optional[sasl.Exchange] = None
        self.account: Any = None
        self.maildrop: Optional[Maildrop] = None
        self._login_deadline: Any = None
        limits = factory.services.config.limits
        # [limits] pop3_commands: the command waiting for its turn (see _at_rate).
        self.rate = command_rate("pop3_commands", limits.pop3_commands,
                                 limits.command_overrun)
        self._rate_wait: Any = None

    # -- connection -----------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connection_made(self)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        self.log = BoundLogger(namespace="lightmail.pop3", conn_id=self.conn_id)
        self.log.info("connect from {peer} to {listener}", peer=self.peer_host,
                      listener=self.factory.listener.name)
        self.setTimeout(self.cfg.command_timeout)
        self._login_deadline = self.callLater(self.cfg.login_timeout, self._login_too_slow)
        self.ok(f"{self.factory.hostname} POP3 LightMail ready")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.setTimeout(None)
        self._cancel_login_deadline()
        self._stop_rate_wait()
        self.closing = True
        self.fail_paused(reason)
        if self.maildrop is not None:
            # A dropped connection never reaches UPDATE: nothing is deleted.
            self.maildrop.close()
        self.factory.connection_lost(self)
        self.log.info("disconnect from {peer}", peer=self.peer_host)

    def timeoutConnection(self) -> None:
        if self.busy:
            # Still answering (a slow disk, a password check on a busy machine): the
            # client is not the one idling.
            self.resetTimeout()
            return
        self.log.info("timeout in {state} state", state=self.state)
        self.close_with("-ERR Disconnected for inactivity")

    def _login_too_slow(self) -> None:
        self._login_deadline = None
        if self.state == AUTHORIZATION and not self.closing:
            self.log.info("no login within {seconds}s from {peer}",
                          seconds=self.cfg.login_timeout, peer=self.peer_host)
            self.close_with("-ERR Disconnected: log in sooner")

    def _cancel_login_deadline(self) -> None:
        deadline, self._login_deadline = self._login_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def drain(self) -> None:
        """Server shutdown: no UPDATE state, so nothing is deleted (RFC 1939 §6)."""
        self.draining = True
        if not self.busy or self._stop_rate_wait():
            self.close_with("-ERR [SYS/TEMP] Server shutting down")

    # -- output ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            write_at_once(self.transport, data)

    def ok(self, text: str = "") -> None:
        self.write(b"+OK" + (b" " + text.encode() if text else b"") + b"\r\n")

    def err(self, text: str, counts: bool = True) -> None:
        """Answer -ERR: an error of the session's (max_errors), and, when ``counts``
        (the client's mistake: not a failed login, which the login guard counts, nor
        the server's own trouble), of its address's ([limits] client_errors)."""
        self.write(f"-ERR {text}\r\n".encode())
        self.errors += 1
        if counts:
            self.spend_error()
        if self.errors > self.cfg.max_errors and not self.closing:
            self.log.warn("too many errors from {peer}", peer=self.peer_host)
            self.close_with("-ERR Too many errors, closing")

    def close_for_errors(self, sentence: str) -> None:
        if not self.closing:
            self.close_with(f"-ERR [SYS/TEMP] {sentence}")

    def resume_input(self) -> None:
        if self.buffer and not self.busy and not self.closing:
            self.process()

    def multiline(self, first: str, lines: list[str]) -> None:
        body = "".join(f"{line}\r\n" for line in lines)
        self.write(f"+OK {first}\r\n{body}.\r\n".encode())

    def close_with(self, line: str) -> None:
        self.write(line.encode() + b"\r\n")
        self.closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    # -- input ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimeout()
        self.buffer += data
        self.process()

    def process(self) -> None:
        turn_ends = time.monotonic() + INPUT_SLICE
        while self.buffer and not self.busy and not self.closing and not self.errors_pending:
            if time.monotonic() > turn_ends:
                # The rest waits for the next reactor turn (listeners.INPUT_SLICE).
                from twisted.internet import reactor, task
                self._wait(task.deferLater(reactor, 0, lambda: None))
                return
            # A SASL response (a bearer token, say) may be longer than a command.
            limit = sasl.RESPONSE_LIMIT if self.sasl is not None else self.cfg.max_line_length
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > limit:
                    if not self.discarding:
                        self.err("Line too long")
                    self.discarding, self.buffer = True, b""
                return
            line, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
            if self.discarding or len(line) > limit:
                if not self.discarding:
                    self.err("Line too long")
                self.discarding = False
                continue
            text = line.rstrip(b"\r\n")
            if self.sasl is not None:
                self._auth_response(text)
            elif self.rate is not None:
                self._at_rate(text)
            else:
                self._command(text)

    def _wait(self, d: defer.Deferred[Any]) -> None:
        """Hold pipelined input until ``d`` (which answers for itself) is done."""
        self.busy = True

        def done(_: Any) -> None:
            self.busy = False
            if not self.closing:
                self.resetTimeout()        # the client's idle time starts at the answer
            if self.draining and not self.closing:
                self.close_with("-ERR [SYS/TEMP] Server shutting down")
            elif self.buffer:
                self.process()

        def failed(failure: Failure) -> None:
            if self.closing:
                return                      # the client went away mid-answer
            self.log.failure("internal error in {state} state", failure, state=self.state)
            self.close_with("-ERR [SYS/TEMP] Internal error, closing")
        d.addErrback(failed).addBoth(done)

    def _command(self, raw: bytes) -> None:
        result = self._run_command(raw)
        if result is not None:
            self._wait(result)

    def _run_command(self, raw: bytes) -> Optional[defer.Deferred[Any]]:
        """Run one command: None when it is answered, else a Deferred of its answer."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.err("Command is not UTF-8")
            return None
        verb, _, arg = line.strip().partition(" ")
        verb = verb.upper()
        handler = getattr(self, f"pop3_{verb}", None) if verb.isalpha() else None
        self.factory.meters.command(verb)       # unknown verbs count as "other"
        if handler is None:
            self.err("Unknown command")
            return None
        if verb not in COMMANDS[self.state]:
            self.err(f"{verb} is not allowed in the {self.state.upper()} state")
            return None
        try:
            result = handler(arg.strip())
        except Exception:
            return defer.fail(Failure())
        return result if isinstance(result, defer.Deferred) else None

    # -- [limits] pop3_commands -------------------------------------------------------

    def _at_rate(self, raw: bytes) -> None:
        """Run the command now, or when the session's rate allows it (the connection
        is not read meanwhile); or close the session, far over its rate
        (lightmail/policy/limits/throttle.py)."""
        assert self.rate is not None
        wait = self.rate.delay()
        if self.rate.far_over():
            self.rate.tell(self.log, self.peer_host, closing=True)
            self.close_with(f"-ERR [SYS/TEMP] {self.rate.sentence()}")
            return
        if wait <= 0:
            self._command(raw)
            return
        self.rate.tell(self.log, self.peer_host, closing=False)
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        turn: defer.Deferred[None] = defer.Deferred()
        self._rate_wait = self.callLater(wait, lambda: turn.callback(None))
        self._wait(turn.addCallback(self._rate_allows, raw))

    def _rate_allows(self, _: None, raw: bytes) -> Optional[defer.Deferred[Any]]:
        self._rate_wait = None
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        return self._run_command(raw)

    # -- commands in any state ------------------------------------------------------

    def pop3_CAPA(self, arg: str) -> None:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state == AUTHORIZATION:
            if self._auth_allowed():
                offer = self.factory.services.sasl
                caps += ["USER", "SASL " + " ".join(offer.names(self._sasl_context()))]
            if self.factory.tls_context is not None and not self.tls:
                caps.append("STLS")
        caps.append(f"EXPIRE {self.cfg.expire}")
        if self.cfg.login_delay:
            caps.append(f"LOGIN-DELAY {int(self.cfg.login_delay)}")
        caps.append("IMPLEMENTATION LightMail")
        self.multiline("Capability list follows", caps)

    def pop3_NOOP(self, arg: str) -> None:
        self.ok()

    def pop3_QUIT(self, arg: str) -> Any:
        if self.state == AUTHORIZATION or self.maildrop is None:
            self.close_with("+OK Bye")
            return None
        return defer.ensureDeferred(self._update())

    async def _update(self) -> None:
        """The UPDATE state (RFC 1939 §6): deletions happen now, and only now."""
        assert self.maildrop is not None
        try:
            removed = await self.maildrop.commit()
        except Exception:
            self.log.failure("could not delete messages for {user}",
                             user=self.account.user.address)
            await self.maildrop.close()
            self.close_with("-ERR [SYS/TEMP] Deleting messages failed; nothing deleted")
            return
        # The lock is free before the client hears +OK: a client that logs in again
        # at once (through any worker process) must not find its maildrop IN-USE.
        await self.maildrop.close()
        self.log.info("{user} logged out, {removed} messages deleted",
                      user=self.account.user.address, removed=removed)
        self.close_with(f"+OK Logging out, {removed} messages deleted")

    # -- AUTHORIZATION ----------------------------------------------------------------

    def _auth_allowed(self) -> bool:
        return self.tls or self.factory.services.config.directory.auth_over_plaintext

    def pop3_STLS(self, arg: str) -> None:
        if self.factory.tls_context is None:
            self.err("STLS not available")
            return
        if self.tls:
            self.err("Already using TLS")
            return
        self.ok("Begin TLS negotiation now")
        self.buffer = b""           # nothing sent before the handshake counts
        self.tls = True
        self.transport.startTLS(self.factory.tls_context)  # type: ignore[union-attr]

    def pop3_USER(self, arg: str) -> None:
        if not self._auth_allowed():
            self.err("[AUTH] Plaintext authentication disallowed without TLS: use STLS")
            return
        if not arg:
            self.err("USER needs a name")
            return
        self.username = arg
        self.ok()

    def pop3_PASS(self, arg: str) -> Any:
        if self.username is None:
            self.err("USER first")
            return None
        username, self.username = self.username, None
        from twisted.cred import credentials
        creds = credentials.UsernamePassword(username.encode(), arg.encode())
        return self._login(creds, Attempt("pop3", "password", self.peer_host, username))

    def _sasl_context(self) -> sasl.Context:
        return self.factory.services.sasl.context(self.transport, self.tls)

    def pop3_AUTH(self, arg: str) -> Any:
        offer = self.factory.services.sasl
        if not arg:
            # Common practice (not in RFC 5034): list the mechanisms.
            self.multiline("Mechanisms follow", offer.names(self._sasl_context()))
            return None
        if not self._auth_allowed():
            self.err("[AUTH] Authentication disallowed without TLS: use STLS")
            return None
        name, _, initial = arg.partition(" ")
        exchange = offer.exchange(name, self._sasl_context())
        if exchange is None:
            self.err("Unsupported authentication mechanism")
            return None
        self.sasl = exchange
        return self._auth_next(exchange.start(initial or None))

    def _auth_response(self, raw: bytes) -> None:
        assert self.sasl is not None
        self._wait(self._auth_next(self.sasl.respond(raw)))

    def _auth_next(self, d: defer.Deferred[sasl.Step]) -> defer.Deferred[Any]:
        """The mechanism's next step, when it comes (SCRAM reads the user's keys)."""
        exchange = self.sasl
        assert exchange is not None
        self.sasl = None                # input meanwhile is held (_wait), not a response

        def step(step: sasl.Step) -> Any:
            if step.challenge is not None:
                self.sasl = exchange
                self.write(b"+ " + sasl.encode(step.challenge).encode() + b"\r\n")
                return None
            return self._login(step.credentials,
                               Attempt("pop3", exchange.name, self.peer_host, step.username))

        def error(failure: Failure) -> None:
            if failure.check(sasl.Cancelled):
                self.err("Authentication cancelled", counts=False)
            else:
                failure.trap(sasl.SASLError)
                self.err("[AUTH] Malformed authentication exchange")
        return d.addCallbacks(step, error)

    @defer.inlineCallbacks
    def _login(self, creds: Any, attempt: Attempt) -> Any:
        try:
            account = yield self.factory.services.logins.login(creds, attempt)
        except LoginFailed as failed:
            self.factory.meters.auth(attempt.mechanism.lower(), False)
            self.err("[AUTH] The password has expired: ask for a new one"
                     if isinstance(failed, PasswordExpired) else "[AUTH] Authentication failed",
                     counts=False)
            return
        except LoginUnavailable:            # RFC 3206 §4
            self.err("[SYS/TEMP] Authentication temporarily unavailable", counts=False)
            return
        self.factory.meters.auth(attempt.mechanism.lower(), True)
        user = account.user
        try:
            self.maildrop = yield Maildrop.open(
                user.id, account.mailstore, self.factory.services.blobs,
                self.factory.services.pop3_locks, self.cfg.login_delay)
        except MaildropLocked:
            self.err("[IN-USE] Mailbox is locked by another POP3 session", counts=False)
            return
        except LockUnavailable:
            self.err("[SYS/TEMP] Cannot lock the maildrop now; try again later",
                     counts=False)
            return
        except LoginTooSoon:
            self.err(f"[LOGIN-DELAY] Wait {int(self.cfg.login_delay)}s between logins",
                     counts=False)
            return
        self.account, self.state = account, TRANSACTION
        self._cancel_login_deadline()
        self.factory.logged_in(self, user.address)
        self.log.info("{user} logged in, {count} messages", user=user.address,
                      count=len(self.maildrop.messages))
        if self.closing:                    # gone while we were opening: let go
            self.maildrop.close()
            return
        self.ok("Logged in")

    # -- TRANSACTION --------------------------------------------------------------------

    def _message(self, arg: str) -> Optional[tuple[int, MessageInfo]]:
        assert self.maildrop is not None
        if not (arg.isascii() and arg.isdigit()):    # not "²": int() refuses it
            self.err("Need a message number")
            return None
        message = self.maildrop.get(int(arg))
        if message is None:
            self.err("No such message")
            return None
        return int(arg), message

    def pop3_STAT(self, arg: str) -> None:
        assert self.maildrop is not None
        count, size = self.maildrop.stat()
        self.ok(f"{count} {size}")

    def pop3_LIST(self, arg: str) -> None:
        self._listing(arg, lambda message: str(message.size))

    def pop3_UIDL(self, arg: str) -> None:
        assert self.maildrop is not None
        self._listing(arg, self.maildrop.uidl)

    def _listing(self, arg: str, value: Any) -> None:
        assert self.maildrop is not None
        if arg:
            found = self._message(arg)
            if found is not None:
                self.ok(f"{found[0]} {value(found[1])}")
            return
        live = self.maildrop.live()
        lines = [f"{number} {value(message)}" for number, message in live]
        self.multiline(f"{len(live)} messages", lines)

    def pop3_DELE(self, arg: str) -> None:
        assert self.maildrop is not None
        found = self._message(arg)
        if found is not None:
            self.maildrop.delete(found[0])
            self.ok(f"Message {found[0]} deleted")

    def pop3_RSET(self, arg: str) -> None:
        assert self.maildrop is not None
        self.maildrop.reset()
        count, size = self.maildrop.stat()
        self.ok(f"{count} messages ({size} octets)")

    def pop3_RETR(self, arg: str) -> Any:
        found = self._message(arg)
        if found is None:
            return None
        return self._retrieve(*found, None)

    def pop3_TOP(self, arg: str) -> Any:
        parts = arg.split()
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            self.err("TOP needs a message number and a line count")
            return None
        found = self._message(parts[0])
        if found is None:
            return None
        return self._retrieve(*found, int(parts[1]))

    def _retrieve(self, number: int, message: MessageInfo,
                  body_lines: Optional[int]) -> Optional[defer.Deferred[None]]:
        """RETR or TOP: a small message whole, in one write (at once when it was read
        ahead: no Deferred, so pipelined commands go on in the same loop), a large
        one streamed."""
        assert self.maildrop is not None
        if not self.maildrop.is_small(message):
            return defer.ensureDeferred(self._stream(message, body_lines))
        content = self.maildrop.read_now(number)
        if content is not None:
            return self._send_whole(message, content, body_lines)
        return self.maildrop.read(number).addCallback(
            lambda content: self._send_whole(message, content, body_lines))

    def _send_whole(self, message: MessageInfo, content: bytes,
                    body_lines: Optional[int]) -> Optional[defer.Deferred[None]]:
        """Write the answer; when that fills the transport's buffer, a Deferred that
        fires once the client has read it down (so that a client that pipelines
        RETRs and does not read cannot make the server buffer without bound)."""
        assert self.transport is not None
        if body_lines is not None:
            content = _TopCut(body_lines).take(content)
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.write(f"+OK {message.size} octets\r\n".encode() + dot_stuffed(content))
        if self._paused is None:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            return None
        return defer.ensureDeferred(self._drained())

    async def _drained(self) -> None:
        try:
            if self._paused is not None:
                await self._paused
        finally:
            if self.transport is not None:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]

    async def _stream(self, message: MessageInfo, body_lines: Optional[int]) -> None:
        """RETR (all of it) or TOP (headers and ``body_lines`` lines), dot-stuffed,
        streamed chunk by chunk as the client takes it."""
        assert self.maildrop is not None and self.transport is not None
        self.ok(f"{message.size} octets")
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        try:
            cut = _TopCut(body_lines) if body_lines is not None else None
            stuffer = DotStuffer()
            async for chunk in self.maildrop.content(message):
                if cut is not None:
                    chunk = cut.take(chunk)
                self.write(stuffer.feed(chunk))
                if self.closing or (cut is not None and cut.done):
                    break
                if self._paused is not None:
                    await self._paused
            self.write(stuffer.end())
        finally:
            if self.transport is not None:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]


class _TopCut:
    """Passes the header, the blank line and then ``lines`` body lines (TOP)."""

    def __init__(self, lines: int) -> None:
        self.left = lines
        self.in_body = False
        self.done = False
        self.tail = b""          # the end of the previous chunk, to find CRLF CRLF

    def take(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        start = 0
        if not self.in_body:
            seen = self.tail + chunk
            end = seen.find(b"\r\n\r\n")
            if end < 0:
                self.tail = seen[-3:]
                return chunk
            self.in_body = True
            start = end + 4 - len(self.tail)
        position = start
        while self.left > 0:
            newline = chunk.find(b"\n", position)
            if newline < 0:
                return chunk
            position, self.left = newline + 1, self.left - 1
        self.done = True
        return chunk[:position]


class POP3Factory(ServiceFactory):
    refusal = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"

    def refusal_line(self, reason: str, kind: str) -> bytes:
        if kind in (MEMORY, CLIENT_ERRORS):         # RFC 3206 §4
            return f"-ERR [SYS/TEMP] {reason}\r\n".encode()
        return self.refusal
    commands = tuple(sorted(set().union(*COMMANDS.values())))

    def make_protocol(self, addr: Any) -> POP3Session:
        return POP3Session(self)


def build_pop3_factory(listener: ListenerConfig, services: Any) -> POP3Factory:
    return POP3Factory(listener, services)
