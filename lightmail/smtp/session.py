"""The SMTP server protocol: RFC 5321 with the extensions a modern MX and MSA offer.

PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531),
ENHANCEDSTATUSCODES (RFC 2034/3463), CHUNKING/BDAT (RFC 3030), DSN parameters
(RFC 3461), STARTTLS (RFC 3207), AUTH (RFC 4954).

Not built on ``twisted.mail.smtp.ESMTP``: that class has no CHUNKING, no enhanced codes
on every reply, no DSN parameters and no size enforcement while streaming, and adding
them would override nearly every method.  This class parses its own input buffer so
that a pipelined command waits while the one before it is answered asynchronously, and
so that no line, however long, is ever buffered beyond the configured limit.

Acceptance is durable: the content streams into the blob store, and the final 250 goes
out only after the blob is fsynced and the queue rows are committed (policy.py).
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from lightmail import sasl
from lightmail.address import MAX_PATH, AddressError, split_address
from lightmail.config import ListenerConfig
from lightmail.directory.logins import Attempt, LoginFailed, LoginUnavailable, PasswordExpired
from lightmail.listeners import INPUT_SLICE, MEMORY, ServiceFactory, TrackedProtocol
from lightmail.logs import BoundLogger
from lightmail.policy.inbound import InboundPolicy, build_checks
from lightmail.smtp import codes
from lightmail.smtp.codes import Reply
from lightmail.smtp.lines import LineScan, bare_line_ends, scan_lines, undot
from lightmail.smtp.params import (
    parse_params,
    valid_envid,
    valid_notify,
    valid_orcpt,
    valid_ret,
)
from lightmail.smtp.policy import Session, SMTPHandler, Transaction
from lightmail.storage.interfaces import IBlobWriter
from lightmail.storage.queuestore import new_queue_id
from lightmail.transport import write_at_once

COMMAND, DATA, BDAT, AUTH = "command", "data", "bdat", "auth"
_PATH = re.compile(r"^(?P<kw>FROM|TO):\s*<(?P<addr>[^<>]*)>(?P<params>.*)$", re.I)


class SMTPServerSession(TrackedProtocol, TimeoutMixin):
    """One SMTP connection."""

    factory: SMTPFactory
    protocol_name = "ESMTP"            # in the greeting
    log_namespace = "lightmail.smtp"

    def __init__(self, factory: SMTPFactory) -> None:
        self.cfg = factory.services.config.smtp
        self.mode = COMMAND
        self.buffer = b""
        self.busy = False
        self.discarding = False       # inside an over-long command line
        # The server drains (drain): the first transaction may still be made, the
        # next MAIL is answered 421, and silence between transactions ends it.
        self.draining = False
        # The session time limit passed: the transaction in progress ends it.
        self.expired = False
        self.closing = False
        self.idle_since = time.monotonic()      # the last input, or answer to it
        self.drain_timer: Any = None
        self.tx: Optional[Transaction] = None
        self.writer: Optional[IBlobWriter] = None
        self.errors = 0
        self.commands_before_auth = 0
        self.messages = 0
        self.sasl: Optional[sasl.Exchange] = None

    # -- connection -----------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connection_made(self)
        # Replies are small and answer a waiting client: Nagle's algorithm would hold
        # them for the peer's delayed ACK (tens of milliseconds a round trip).
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        conn_id = self.conn_id
        self.log = BoundLogger(namespace=self.log_namespace, conn_id=conn_id)
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        port = peer.port if isinstance(peer, (IPv4Address, IPv6Address)) else 0
        self.session = Session(conn_id=conn_id, peer=self.peer_host,
                               submission=self.factory.submission, peer_port=port)
        if self.factory.listener.tls == "implicit":
            self.session.tls = "TLS"
        self.setTimeout(self.cfg.command_timeout)
        from twisted.internet import reactor
        self.session_timer = reactor.callLater(self.cfg.session_timeout,
                                               self._session_expired)
        self.log.info("connect from {peer} to {listener}", peer=self.peer_host,
                      listener=self.factory.listener.name)
        greeting = Reply(220, "", f"{self.factory.hostname} {self.protocol_name} LightMail")
        checked = defer.maybeDeferred(self.factory.handler.handle_connect, self.session)

        def greet(refusal: Optional[Reply]) -> None:
            if refusal is None:
                self.send(greeting)
            else:
                self.log.info("refused connection from {peer}: {code} {status} {text}",
                              peer=self.peer_host, code=refusal.code,
                              status=refusal.status, text=refusal.text)
                self.close_with(refusal)

        def failed(failure: Failure) -> None:
            self.log.failure("the connect checks failed; greeting all the same", failure)
            self.send(greeting)
        # Input that comes before the greeting waits for it (busy), as any other.
        self._wait(checked.addCallbacks(greet, failed))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        # Pipelined commands still buffered (behind a pending reply, or a reactor turn:
        # listeners.INPUT_SLICE) are not run for a client that has gone.
        self.closing = True
        self.setTimeout(None)
        if self.session_timer.active():
            self.session_timer.cancel()
        if self.drain_timer is not None and self.drain_timer.active():
            self.drain_timer.cancel()
        self._abort_content()
        self.factory.handler.session_ended(self.session)
        self.factory.connection_lost(self)
        self.log.info("disconnect from {peer}: {messages} messages, {errors} errors",
                      peer=self.peer_host, messages=self.messages, errors=self.errors)

    def timeoutConnection(self) -> None:
        if self.busy:
            # Still answering (a slow disk, a password check on a busy machine): the
            # client is not the one idling.
            self.resetTimeout()
            return
        self.log.info("timeout in {mode} state", mode=self.mode)
        self.close_with(codes.TIMEOUT)

    def _session_expired(self) -> None:
        self.log.info("session time limit of {limit:g}s reached",
                      limit=self.cfg.session_timeout)
        self.expired = True      # finish the transaction, then 421
        if self._between_transactions():
            self.close_with(codes.TIMEOUT)

    def drain(self) -> None:
        """The server drains: the transaction in progress finishes, and a session
        that has made none may still make one (a client that has just connected
        is not turned away); after one, its next MAIL is answered 421 4.3.2.
        Between transactions, ``[smtp] drain_idle_timeout`` of silence closes it
        with 421 4.3.2 (RFC 5321 §3.8)."""
        self.draining = True
        self._drain_check()

    def _between_transactions(self) -> bool:
        return not self.busy and self.mode == COMMAND and self.tx is None

    def _drain_check(self) -> None:
        if self.closing:
            return
        grace = self.cfg.drain_idle_timeout
        silent = time.monotonic() - self.idle_since
        if self._between_transactions() and silent >= grace:
            self.close_with(codes.SHUTTING_DOWN)
            return
        from twisted.internet import reactor
        wait = grace - silent if self._between_transactions() else grace
        self.drain_timer = reactor.callLater(max(wait, 0.05), self._drain_check)

    def send(self, reply: Reply) -> None:
        if self.transport is not None and not self.closing:
            write_at_once(self.transport, reply.render())

    def close_with(self, reply: Reply) -> None:
        self.send(reply)
        self.closing = True
        self._abort_content()
        if self.transport is not None:
            self.transport.loseConnection()

    def reply(self, reply: Reply, login: bool = False) -> None:
        """Answer a command; errors count towards the session's error limit, and
        (unless ``login``: a failed AUTH, which the login guard counts) towards its
        address's [limits] client_errors."""
        error = reply.code >= 500 or reply.code in (421,)
        if error:
            self.errors += 1
        self.send(reply)
        if error and not login:
            self.spend_error()
        if self.errors > self.cfg.max_errors and not self.closing:
            self.log.warn("too many errors ({errors}) from {peer}", errors=self.errors,
                          peer=self.peer_host)
            self.close_with(codes.TOO_MANY_ERRORS)

    def close_for_errors(self, sentence: str) -> None:
        if not self.closing:
            self.close_with(Reply(421, "4.7.0", sentence))

    def resume_input(self) -> None:
        if self.buffer and not self.busy and not self.closing:
            self.process()

    # -- input ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimeout()
        self.idle_since = time.monotonic()
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
            limit = sasl.RESPONSE_LIMIT if self.mode == AUTH else self.cfg.max_line_length
            if self.mode == BDAT:
                self._bdat_input()
                continue
            if self.mode == DATA:
                if not self._data_input():
                    return
                continue
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > limit:
                    # RFC 5321 §4.5.3.1.4: answer once, then drop until the line ends.
                    if not self.discarding:
                        self.reply(codes.LINE_TOO_LONG)
                    self.discarding = True
                    self.buffer = b""
                return
            line, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
            if self.discarding:
                self.discarding = False
                continue
            if len(line) > limit:
                self.reply(codes.LINE_TOO_LONG)
                continue
            if self.mode == AUTH:
                self._auth_response(line.rstrip(b"\r\n"))
            else:
                self._command(line.rstrip(b"\r\n"))

    def _wait(self, d: Any) -> None:
        """Hold further input until ``d`` (which sends its own reply) is done."""
        self.busy = True

        def done(_: Any) -> None:
            self.busy = False
            self.idle_since = time.monotonic()
            if not self.closing:
                self.resetTimeout()        # the client's idle time starts at the answer
            if self.expired and self.mode == COMMAND and self.tx is None:
                self.close_with(codes.SHUTTING_DOWN)
            elif self.buffer:
                self.process()
        d.addErrback(self._internal_error)
        d.addBoth(done)

    def _internal_error(self, failure: Failure) -> None:
        self.log.failure("internal error in {mode} state", failure, mode=self.mode)
        self._reset_transaction()
        self.mode = COMMAND
        self.send(codes.TEMP_FAILURE)

    # -- commands -------------------------------------------------------------------

    def _command(self, raw: bytes) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.reply(codes.BAD_SYNTAX)
            return
        verb, _, arg = line.strip().partition(" ")
        verb = verb.upper()
        if self.tx is None and (self.expired or (
                self.draining and verb == "MAIL" and self.messages)):
            self.close_with(codes.SHUTTING_DOWN)
            return
        if self.session.submission and self.session.account is None:
            self.commands_before_auth += 1
            if self.commands_before_auth > self.cfg.max_commands_before_auth:
                self.close_with(codes.TOO_MANY_COMMANDS)
                return
        handler = getattr(self, f"smtp_{verb}", None) if verb.isalpha() else None
        self.factory.meters.command(verb)       # unknown verbs count as "other"
        if handler is None:
            self.reply(codes.UNKNOWN_COMMAND)
            return
        try:
            result = handler(arg.strip())
        except Exception:
            self._internal_error(Failure())
            return
        if isinstance(result, defer.Deferred):
            self._wait(result)

    def smtp_EHLO(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def smtp_HELO(self, arg: str) -> None:
        self._greet(arg, esmtp=False)

    def _greet(self, arg: str, esmtp: bool) -> None:
        if not arg or " " in arg or not arg.isprintable():
            self.reply(codes.BAD_SYNTAX)
            return
        self._reset_transaction()
        self.session.helo, self.session.esmtp = arg, esmtp
        if not esmtp:
            self.send(Reply(250, "", self.factory.hostname))
            return
        lines = [f"{self.factory.hostname} greets {arg}", *self.extensions()]
        self.send(Reply(250, "", "\n".join(lines)))

    def extensions(self) -> list[str]:
        """The EHLO keywords offered now."""
        lines = ["PIPELINING", f"SIZE {self.cfg.max_message_size}", "8BITMIME",
                 "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"]
        if self.cfg.smtputf8:
            lines.append("SMTPUTF8")
        if self.factory.listener.tls == "starttls" and not self.session.tls:
            lines.append("STARTTLS")
        if self._requiretls_offered():
            lines.append("REQUIRETLS")
        if self._auth_allowed():
            lines.append("AUTH " + " ".join(self._sasl_offer().names(self._sasl_context())))
        return lines

    def _requiretls_offered(self) -> bool:
        """RFC 8689 §2: REQUIRETLS only on a session that is over TLS already."""
        return self.cfg.requiretls and bool(self.session.tls)

    def _sasl_offer(self) -> sasl.Offer:
        return self.factory.services.sasl

    def _sasl_context(self) -> sasl.Context:
        return self._sasl_offer().context(self.transport, bool(self.session.tls))

    def _auth_allowed(self) -> bool:
        return self.session.submission and (
            bool(self.session.tls)
            or self.factory.services.config.directory.auth_over_plaintext)

    def smtp_NOOP(self, arg: str) -> None:
        self.reply(codes.OK)

    def smtp_RSET(self, arg: str) -> None:
        self._reset_transaction()
        self.reply(codes.RESET)

    def smtp_QUIT(self, arg: str) -> None:
        self.close_with(codes.BYE)

    def smtp_VRFY(self, arg: str) -> None:
        self.reply(codes.VRFY)     # no user enumeration

    def smtp_EXPN(self, arg: str) -> None:
        self.reply(codes.NOT_IMPLEMENTED)

    def smtp_HELP(self, arg: str) -> None:
        self.reply(codes.HELP)

    def smtp_STARTTLS(self, arg: str) -> None:
        if self.factory.listener.tls != "starttls" or self.factory.tls_context is None:
            self.reply(codes.NOT_IMPLEMENTED)
            return
        if self.session.tls:
            self.reply(codes.BAD_SEQUENCE)
            return
        if arg:
            self.reply(codes.BAD_SYNTAX)
            return
        self.send(codes.READY_TLS)
        # RFC 3207 §4.2 (and CVE-2011-0411): nothing sent before the handshake counts.
        self.buffer = b""
        self._reset_transaction()
        self.session.helo = None
        self.session.tls = "TLS"
        self.transport.startTLS(self.factory.tls_context)  # type: ignore[union-attr]

    # -- AUTH (RFC 4954) --------------------------------------------------------------

    def smtp_AUTH(self, arg: str) -> None:
        if not self.session.submission:
            self.reply(codes.NOT_IMPLEMENTED)
            return
        if self.session.helo is None or not self.session.esmtp:
            self.reply(codes.NEED_HELO)
            return
        if self.session.account is not None:
            self.reply(codes.ALREADY_AUTH)
            return
        if self.tx is not None:
            self.reply(codes.BAD_SEQUENCE)
            return
        if not self._auth_allowed():
            self.reply(codes.TLS_REQUIRED)
            return
        name, _, initial = arg.partition(" ")
        exchange = self._sasl_offer().exchange(name, self._sasl_context())
        if exchange is None:
            self.reply(Reply(504, "5.5.4", "Unrecognized authentication type"))
            return
        self.sasl = exchange
        self._auth_wait(exchange.start(initial or None))

    def _auth_response(self, raw: bytes) -> None:
        assert self.sasl is not None
        self._auth_wait(self.sasl.respond(raw))

    def _auth_wait(self, d: Deferred[sasl.Step]) -> None:
        """Hold input while the mechanism works (SCRAM reads the user's keys)."""
        self.mode = COMMAND
        self._wait(d.addCallbacks(self._auth_step, self._auth_error))

    def _auth_error(self, failure: Failure) -> None:
        self.sasl = None
        if failure.check(sasl.Cancelled):
            self.reply(codes.AUTH_CANCELLED, login=True)
        elif failure.check(sasl.SASLError):
            self.reply(codes.BAD_SYNTAX)
        else:
            failure.raiseException()

    def _auth_step(self, step: sasl.Step) -> Optional[Deferred[None]]:
        exchange = self.sasl
        assert exchange is not None
        if step.challenge is not None:
            self.mode = AUTH
            self.send(Reply(334, "", sasl.encode(step.challenge)))
            return None
        self.sasl = None
        attempt = Attempt("smtp", exchange.name, self.peer_host, step.username)
        d = self.factory.services.logins.login(step.credentials, attempt)

        meters = self.factory.meters

        def ok(account: Any) -> None:
            meters.auth(attempt.mechanism.lower(), True)
            self.session.account = account
            self.factory.logged_in(self, account.user.address)
            self.log.info("authenticated as {user}", user=account.user.address)
            self.reply(codes.AUTH_OK)

        def failed(failure: Failure) -> None:
            if failure.trap(LoginFailed, LoginUnavailable) is LoginUnavailable:
                self.reply(codes.AUTH_UNAVAILABLE)
                return
            meters.auth(attempt.mechanism.lower(), False)
            self.reply(codes.PASSWORD_EXPIRED if failure.check(PasswordExpired)
                       else codes.AUTH_FAILED, login=True)
        return d.addCallbacks(ok, failed)

    # -- the transaction --------------------------------------------------------------

    def smtp_MAIL(self, arg: str) -> Any:
        if self.session.helo is None:
            return self.reply(codes.NEED_HELO)
        if self.session.submission and self.session.account is None:
            return self.reply(codes.AUTH_REQUIRED)
        if self.tx is not None:
            return self.reply(codes.BAD_SEQUENCE)
        match = _PATH.match(arg)
        if not match or match.group("kw").upper() != "FROM":
            return self.reply(codes.BAD_SYNTAX)
        tx = Transaction(mail_from=match.group("addr"))
        for name, value in parse_params(match.group("params")):
            if name == "SIZE" and value and _is_number(value):
                tx.declared_size = int(value)
                if tx.declared_size > self.cfg.max_message_size:
                    return self.reply(codes.TOO_BIG)
            elif name == "BODY" and value and value.upper() in ("7BIT", "8BITMIME"):
                tx.body = value.upper()
            elif name == "SMTPUTF8" and value is None and self.cfg.smtputf8:
                tx.smtputf8 = True
            elif name == "RET" and value and valid_ret(value):
                tx.ret = value.upper()
            elif name == "ENVID" and value and valid_envid(value):
                tx.envid = value
            elif name == "AUTH" and value:
                pass                        # RFC 4954 §5: accepted, not trusted
            elif name == "REQUIRETLS" and value is None and self.cfg.requiretls:
                if not self.session.tls:
                    return self.reply(codes.REQUIRETLS_NEEDS_TLS)
                tx.requiretls = True
            else:
                return self.reply(codes.BAD_PARAM)
        if tx.mail_from:
            reply = self._check_address(tx.mail_from, tx.smtputf8)
            if reply is not None:
                return self.reply(reply)
        d = defer.maybeDeferred(self.factory.handler.handle_mail, self.session, tx)

        def decided(reply: Reply) -> None:
            if not reply.is_error:
                self.tx = tx
            else:
                self.factory.meters.refused("mail", reply.code, reply.status)
                self.log.info("rejected MAIL FROM:<{sender}>: {code} {status} {text}",
                              sender=tx.mail_from, code=reply.code, status=reply.status,
                              text=reply.text)
            self.reply(reply)
        return d.addCallback(decided)

    def _check_address(self, address: str, smtputf8: bool,
                       rcpt: bool = False) -> Optional[Reply]:
        if not address.isascii() and not smtputf8:
            return codes.UTF8_NEEDS_PARAM
        if rcpt and address.lower() == "postmaster":
            return None             # RFC 5321 §4.1.1.3: <Postmaster>, with no domain
        # Only the path's limit (§4.5.3.1.3) is held here.  A sender's local part
        # may be longer than §4.5.3.1.1's 64 octets, as Postfix accepts it (other
        # forwarders' SRS addresses, mailing lists' VERP bounce addresses; §4.5.3.1
        # asks for no limits where possible); a recipient's may be when it is one of
        # our SRS addresses (lightmail.policy.srs): the handler, which knows them,
        # holds the others to 64.
        if len(address.encode("utf-8")) + 2 > MAX_PATH:
            return codes.BAD_ADDRESS
        try:
            split_address(address, max_local=None)
        except AddressError:
            return codes.BAD_ADDRESS
        return None

    def smtp_RCPT(self, arg: str) -> Any:
        if self.tx is None:
            return self.reply(codes.NEED_MAIL)
        match = _PATH.match(arg)
        if not match or match.group("kw").upper() != "TO" or not match.group("addr"):
            return self.reply(codes.BAD_SYNTAX)
        if self.tx.rcpt_count >= self.cfg.max_recipients:
            return self.send(codes.TOO_MANY_RCPTS)    # 4xx: not counted as an error
        address, notify, orcpt = match.group("addr"), None, None
        for name, value in parse_params(match.group("params")):
            if name == "NOTIFY" and value and valid_notify(value):
                notify = value.upper()
            elif name == "ORCPT" and value and valid_orcpt(value):
                orcpt = value
            else:
                return self.reply(codes.BAD_PARAM)
        reply = self._check_address(address, self.tx.smtputf8, rcpt=True)
        if reply is not None:
            return self.reply(reply)
        tx = self.tx
        d = defer.maybeDeferred(self.factory.handler.handle_rcpt, self.session, tx,
                                address, orcpt, notify)

        def decided(result: tuple[Reply, list[Any]]) -> None:
            reply, recipients = result
            if not reply.is_error and tx is self.tx:
                tx.recipients.extend(recipients)
                tx.accepted.append((address, recipients))
                tx.rcpt_count += 1
            elif reply.is_error:
                self.factory.meters.refused("rcpt", reply.code, reply.status)
                self.log.info("rejected RCPT TO:<{rcpt}> from <{sender}>: {code} {status} "
                              "{text}", rcpt=address, sender=tx.mail_from, code=reply.code,
                              status=reply.status, text=reply.text)
            self.reply(reply)
        return d.addCallback(decided)

    def smtp_DATA(self, arg: str) -> None:
        if self.tx is None:
            self.reply(codes.NEED_MAIL)
        elif self.writer is not None:
            self.reply(codes.BAD_SEQUENCE)        # BDAT in progress (RFC 3030 §3)
        elif not self.tx.recipients:
            self.reply(codes.NO_VALID_RCPTS)
        else:
            self._begin_content()
            self.mode = DATA
            self.setTimeout(self.cfg.data_timeout)
            self.send(codes.START_DATA)

    def smtp_BDAT(self, arg: str) -> None:
        parts = arg.split()
        if not parts or not _is_number(parts[0]) or len(parts) > 2 or (
                len(parts) == 2 and parts[1].upper() != "LAST"):
            self.reply(codes.BAD_SYNTAX)   # cannot know how much to skip: RFC 3030 §2
            return
        self.bdat_left = int(parts[0])
        self.bdat_last = len(parts) == 2
        self.bdat_error: Optional[Reply] = None
        if self.tx is None:
            self.bdat_error = codes.NEED_MAIL
        elif not self.tx.recipients:
            self.bdat_error = codes.NO_VALID_RCPTS
        elif self.writer is None:
            self._begin_content()
        self.mode = BDAT
        self.setTimeout(self.cfg.data_timeout)
        if self.bdat_left == 0:
            self._bdat_chunk_done()

    # -- content --------------------------------------------------------------------

    def _begin_content(self) -> None:
        assert self.tx is not None
        self.queue_id = new_queue_id()
        self.content_size = 0
        self.content_error: Optional[Reply] = None
        self.previous_crlf = True
        self.bdat_cr = False        # the last BDAT chunk ended with a CR
        self.writer = self.factory.services.blobs.writer()
        received = self._received_header()
        self.writer.write(received)

    def _received_header(self) -> bytes:
        # RFC 5321 §4.4; protocol names per RFC 3848 and RFC 6531 §4.3.
        assert self.tx is not None
        s = self.session
        proto = self.received_protocol() + ("S" if s.tls else "") + ("A" if s.account else "")
        tls = ""
        if s.tls and ISSLTransport.providedBy(self.transport):
            try:
                handle = self.transport.getHandle()  # type: ignore[union-attr,attr-defined]
                tls = (f"\r\n\t(using {handle.get_protocol_version_name()} with cipher "
                       f"{handle.get_cipher_name()})")
            except Exception:
                tls = ""
        helo = re.sub(r"[^\x21-\x7e]", "?", s.helo or "unknown")
        recipient = ""
        if len(self.tx.recipients) == 1 and self.tx.rcpt_count == 1:
            recipient = f"\r\n\tfor <{self.tx.recipients[0].address}>"
        header = (f"Received: from {helo} ([{s.peer}])\r\n\tby {self.factory.hostname} "
                  f"(LightMail) with {proto} id {self.queue_id}{tls}{recipient};\r\n\t"
                  f"{formatdate(localtime=False, usegmt=False)}\r\n")
        return header.encode("utf-8")

    def received_protocol(self) -> str:
        assert self.tx is not None
        if self.tx.smtputf8:
            return "UTF8SMTP"
        s = self.session
        return "ESMTP" if s.esmtp or s.tls or s.account else "SMTP"

    def _add_content(self, data: bytes) -> None:
        self.content_size += len(data)
        if self.content_size > self.cfg.max_message_size:
            self.content_error = self.content_error or codes.TOO_BIG
        if self.content_error is None and self.writer is not None:
            self.writer.write(data)

    def _data_input(self) -> bool:
        """Take the complete lines of DATA from the buffer; False if none is complete.

        Whole blocks of lines at a time, scanned once (lines.py) rather than with a
        Python loop per line: a 100 KB message is about 1,300 lines."""
        end = self.buffer.rfind(b"\n")
        if end < 0:
            if len(self.buffer) > self.cfg.max_line_length:
                # A line longer than allowed: remember, keep only the last octet
                # (it may be the CR of the CRLF still to come).
                self.content_error = self.content_error or codes.LONG_LINES
                self.buffer = self.buffer[-1:]
                self.previous_crlf = False
            return False
        block, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
        scan = scan_lines(block, self.cfg.max_line_length)
        stop = self._end_of_data(block, scan.dots)
        if stop < 0:
            self._add_lines(block, scan)
            return True
        if stop:
            lines = block[:stop]
            if scan.bare_newline or scan.too_long:   # perhaps only after the end
                self._add_lines(lines, scan_lines(lines, self.cfg.max_line_length))
            else:
                self._add_lines(lines, LineScan(False, False,
                                                [d for d in scan.dots if d < stop]))
        rest = block[stop + 3:]
        if rest:
            self.buffer = rest + self.buffer
        self._end_content()
        return True

    def _end_of_data(self, block: bytes, dots: list[int]) -> int:
        """Where the line "." that ends DATA starts in ``block``, or -1.  Only CR LF . CR
        LF ends DATA, never a bare LF before or after the dot (SMTP smuggling)."""
        for dot in dots:
            if block[dot + 1:dot + 3] == b"\r\n" and (
                    block[dot - 2:dot] == b"\r\n" if dot else self.previous_crlf):
                return dot
        return -1

    def _add_lines(self, lines: bytes, scan: LineScan) -> None:
        """Complete lines of DATA (ending with LF, starting at a line's start): check
        them, undo the dot-stuffing (RFC 5321 §4.5.2) and add them to the content."""
        self.previous_crlf = lines.endswith(b"\r\n")
        if self.content_error is None and (scan.bare_newline or scan.too_long):
            self.content_error = _first_line_error(lines, self.cfg.max_line_length)
        self._add_text(undot(lines, scan.dots))

    def _add_text(self, data: bytes) -> None:
        """DATA content: text, so no NUL (RFC 5321 §4.5.2; BDAT may carry binary)."""
        if b"\0" in data:
            self.content_error = self.content_error or codes.NUL_IN_MESSAGE
        self._add_content(data)

    def _bdat_input(self) -> None:
        take = self.buffer[:self.bdat_left]
        self.buffer = self.buffer[len(take):]
        self.bdat_left -= len(take)
        if self.bdat_error is None:
            if self.content_error is None and take:
                bare, self.bdat_cr = bare_line_ends(take, self.bdat_cr)
                if bare:
                    self.content_error = codes.BARE_NEWLINE
            self._add_content(take)
        if self.bdat_left == 0:
            self._bdat_chunk_done()

    def _bdat_chunk_done(self) -> None:
        self.mode = COMMAND
        self.setTimeout(self.cfg.command_timeout)
        if self.bdat_error is not None:
            self.reply(self.bdat_error)
            if self.tx is not None and self.bdat_error is not codes.NEED_MAIL:
                self._reset_transaction()
            return
        if self.bdat_last:
            if self.bdat_cr and self.content_error is None:
                self.content_error = codes.BARE_NEWLINE     # a CR with no LF, at the end
            self._end_content()
        else:
            self.send(Reply(250, "2.0.0", f"{self.content_size} octets received"))

    def _end_content(self) -> None:
        self.mode = COMMAND
        self.setTimeout(self.cfg.command_timeout)
        tx, writer, error = self.tx, self.writer, self.content_error
        assert tx is not None and writer is not None
        self.writer = None
        if error is not None:
            writer.abort()
            self._reset_transaction()
            self.log.info("rejected message from <{sender}>: {code} {status} {text}",
                          sender=tx.mail_from, code=error.code, status=error.status,
                          text=error.text)
            self.final_replies(tx, error)
            return
        queue_id, size = self.queue_id, self.content_size
        log = self.log.bind(msg_id=queue_id)

        handler = self.factory.handler

        @defer.inlineCallbacks
        def accept() -> Any:
            staged = None
            span = self.trace.message(queue_id, size, len(tx.recipients))
            try:
                staged = yield writer.stage()
                reply = yield handler.handle_message(self.session, tx, staged, queue_id)
            except Exception:
                log.failure("could not queue the message from <{sender}>",
                            sender=tx.mail_from)
                reply = codes.TEMP_FAILURE
                if staged is not None:
                    staged.discard()    # its temporary file, if never committed
            else:
                self.messages += 1
                log.info("accepted from=<{sender}> size={size} nrcpt={nrcpt} via {listener}",
                         sender=tx.mail_from, size=size, nrcpt=len(tx.recipients),
                         listener=self.factory.listener.name)
            # (LMTP: a reply per recipient; accepted when one of them is.)
            replies = reply if isinstance(reply, list) else [reply]
            span.end("accepted" if any(one.code < 400 for one in replies) else "refused")
            if self.tx is tx:
                self.tx = None
            self.final_replies(tx, reply)
        self._wait(accept())

    def final_replies(self, tx: Transaction, reply: Reply) -> None:
        """The answer to the end of the content: one reply (LMTP: one per recipient)."""
        self.factory.meters.message(reply.code, reply.status)
        self.reply(reply)

    def _abort_content(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def _reset_transaction(self) -> None:
        self._abort_content()
        self.tx = None


def _first_line_error(lines: bytes, limit: int) -> Optional[Reply]:
    """The error of the first bad line among complete lines of DATA, or None: an LF or
    a CR that is not part of a CR LF (RFC 5321 §2.3.8), or a line longer than
    ``limit`` with its CR LF (§4.5.3.1.6).  Line by line: called only when
    :func:`scan_lines` found one of them, to tell which comes first."""
    for line in lines.split(b"\n")[:-1]:
        if not line.endswith(b"\r") or b"\r" in line[:-1]:
            return codes.BARE_NEWLINE
        if len(line) + 1 > limit:
            return codes.LONG_LINES
    return None


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses."""
    return text.isascii() and text.isdigit()


class SMTPFactory(ServiceFactory):
    def __init__(self, listener: ListenerConfig, services: Any, submission: bool,
                 handler: Optional[SMTPHandler] = None) -> None:
        super().__init__(listener, services)
        self.submission = submission
        self.handler = handler or SMTPHandler(services, inbound_policy(listener, services))

    commands = tuple(sorted(name[5:] for name in dir(SMTPServerSession)
                            if name.startswith("smtp_")))

    def make_protocol(self, addr: Any) -> SMTPServerSession:
        return SMTPServerSession(self)

    def refusal_line(self, reason: str, kind: str) -> bytes:
        # RFC 3463: 4.3.2 "system not accepting network messages"; 4.7.0 for the
        # limits (of connections, of failed commands).
        status = "4.3.2" if kind == MEMORY else "4.7.0"
        return Reply(421, status, f"{self.hostname} {reason}").render()


def inbound_policy(listener: ListenerConfig, services: Any) -> InboundPolicy:
    """The listener's inbound checks ([listener:NAME] checks), built once."""
    return InboundPolicy(build_checks(listener.inbound_checks, services), services.blobs,
                         lambda: services.config.authserv_id)


def build_mx_factory(listener: ListenerConfig, services: Any) -> SMTPFactory:
    return SMTPFactory(listener, services, submission=False)


def build_submission_factory(listener: ListenerConfig, services: Any) -> SMTPFactory:
    return SMTPFactory(listener, services, submission=True)
