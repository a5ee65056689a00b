"""The IMAP server protocol: IMAP4rev2 (RFC 9051) and IMAP4rev1 (RFC 3501).

Not built on ``twisted.mail.imap4.IMAP4Server``: its mailbox interface has no MODSEQ,
no UIDVALIDITY-safe copy results and no way to stream from the blob store, and it
answers several commands synchronously.  LightMail keeps Twisted's modified UTF-7 codec
(``names.py``) and writes its own parser (``parser.py``), message structure
(``message.py``), SEARCH/SORT/THREAD (``search.py``, ``sort.py``) and the session, in
layers: ``core.py`` (reading, dispatch, output, updates), ``mailboxes.py``
(authenticated-state commands), ``messages.py`` (selected-state commands) and this
module (any state, authentication, the factory).

One command runs at a time (later pipelined commands wait in the buffer, under
COMPRESS still deflated: ``core.SessionCore.take_input``); each handler is a
coroutine that writes its untagged responses and returns the tagged status.  After
each command the session catches up with changes to the selected mailbox
(``selected.py``) and tells the client before the tagged reply.

Extensions: LITERAL+ (RFC 7888), IDLE (2177), UIDPLUS (4315), MOVE (6851), NAMESPACE
(2342), ID (2971), ENABLE (5161), UNSELECT (3691), SPECIAL-USE and CREATE-SPECIAL-USE
(6154), CONDSTORE and QRESYNC (7162), ESEARCH (4731), SEARCHRES (5182), SORT and
THREAD (5256), LIST-EXTENDED (5258), LIST-STATUS (5819), QUOTA (9208), APPENDLIMIT
(7889), UTF8=ACCEPT (6855), BINARY (3516), COMPRESS=DEFLATE (4978), SASL-IR (4959).
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from lightmail import __version__, sasl
from lightmail.config import ListenerConfig
from lightmail.directory.logins import Attempt, LoginFailed, LoginUnavailable, PasswordExpired
from lightmail.imap.core import (
    ANY,
    AUTHED,
    AUTHENTICATED,
    COMMANDS,
    LOGOUT,
    NOT_AUTHENTICATED,
    SELECTED,
    Bad,
    No,
    Reply,
    ok,
    use_name,
)
from lightmail.imap.headcache import HEADERS
from lightmail.imap.messages import MessageCommands
from lightmail.imap.parser import (
    Command,
    Inflater,
)
from lightmail.imap.tokens import (
    astring,
    is_nil,
    plist,
    quote,
)
from lightmail.listeners import CLIENT_ERRORS, MEMORY, ServiceFactory
from lightmail.policy.clamav import NO_APPEND_CHECK, AppendAntivirus
from lightmail.policy.interfaces import IAppendCheck, ITrainer
from lightmail.storage.interfaces import (
    MailboxExists,
)


@implementer(IPushProducer)
class IMAPSession(MessageCommands):
    """One IMAP connection: the commands of any state and of authentication."""

    # -- any state ------------------------------------------------------------------

    async def do_CAPABILITY(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        self.untagged("CAPABILITY " + " ".join(self.capabilities()))
        return ok("CAPABILITY completed")

    async def do_NOOP(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        self.poll()
        return ok("NOOP completed")

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
        return ok("ID completed")

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
        return ok("ENABLE completed")

    async def do_COMPRESS(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1 or astring(cmd.args[0]).upper() != "DEFLATE":
            raise Bad("Only COMPRESS DEFLATE is supported")
        if self.compressor is not None:
            raise No("[COMPRESSIONACTIVE] Compression is already on")
        self.tagged(cmd.tag, "OK", "DEFLATE active")
        self.flush()
        # RFC 4978 §3: raw DEFLATE (no zlib header) both ways from the next octet.
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.transcript.deflating()
        self.inflater = Inflater()
        # What followed the command is compressed already: inflated (or refused
        # with BYE if corrupt) by take_input() when this command is done.
        self.inflater.feed(self.reader.buffer)
        self.reader.buffer = b""
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
        return await self._login(creds, Attempt("imap", "password", self.peer_host, username))

    def _sasl_context(self) -> sasl.Context:
        return self.factory.services.sasl.context(self.transport, self.tls)

    async def do_AUTHENTICATE(self, cmd: Command) -> Optional[Reply]:
        if not cmd.args or len(cmd.args) > 2:
            raise Bad("AUTHENTICATE needs a mechanism")
        if not self._auth_allowed():
            raise No("[PRIVACYREQUIRED] Authentication is disabled without TLS")
        exchange = self.factory.services.sasl.exchange(astring(cmd.args[0]),
                                                       self._sasl_context())
        if exchange is None:
            raise No("Unsupported authentication mechanism")
        initial = astring(cmd.args[1]) if len(cmd.args) == 2 else None
        return await self._sasl_step(cmd.tag, exchange, exchange.start(initial))

    async def _sasl_step(self, tag: str, exchange: sasl.Exchange,
                         next_step: defer.Deferred[sasl.Step]) -> Optional[Reply]:
        try:
            step = await next_step
        except sasl.Cancelled:
            return Reply("BAD", "Authentication cancelled")
        except sasl.SASLError:
            return Reply("BAD", "Malformed authentication exchange")
        if step.challenge is not None:
            self.sasl = (tag, exchange)
            self.write(b"+ " + sasl.encode(step.challenge).encode() + b"\r\n")
            return None
        return await self._login(step.credentials,
                                 Attempt("imap", exchange.name, self.peer_host, step.username))

    def _sasl_line(self, line: bytes) -> None:
        assert self.sasl is not None
        tag, exchange = self.sasl
        self.sasl = None
        self.busy = True
        self._out = []

        async def step() -> None:
            reply = await self._sasl_step(tag, exchange, exchange.respond(line))
            if reply is not None:
                self.tagged(tag, reply.status, reply.text)

        d = defer.ensureDeferred(step())
        d.addErrback(self._internal_error, Command(tag, "AUTHENTICATE"))
        d.addBoth(self._done)

    async def _login(self, creds: Any, attempt: Attempt) -> Reply:
        try:
            account = await self.factory.services.logins.login(creds, attempt)
        except LoginFailed as failed:
            self.factory.meters.auth(attempt.mechanism.lower(), False)
            if isinstance(failed, PasswordExpired):
                return Reply("NO", "[EXPIRED] The password has expired: ask for a new one")
            return Reply("NO", "[AUTHENTICATIONFAILED] Authentication failed")
        except LoginUnavailable:            # RFC 5530 §3
            return Reply("NO", "[UNAVAILABLE] Authentication temporarily unavailable")
        self.factory.meters.auth(attempt.mechanism.lower(), True)
        if not await self.hub.login(account.user.id, self.cfg.max_connections_per_user):
            self.log.warn("{user}: too many IMAP sessions", user=account.user.address)
            return Reply("NO", "[LIMIT] Too many sessions for this user")
        if self.closing:                # gone while the count was asked for
            self.hub.logout(account.user.id)
            return Reply("NO", "Connection closed")
        self._logged_in = True
        self._logged_in_now()
        self.factory.logged_in(self, account.user.address)
        self.account, self.user, self.state = account, account.user, AUTHENTICATED
        self.log = self.log.bind(user=account.user.address)
        await self._ensure_mailboxes()
        self.log.info("{user} logged in", user=account.user.address)
        return ok(f"[CAPABILITY {' '.join(self.capabilities())}] Logged in")

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
                    await self.store.create_mailbox(self.user.id, name, use_name(use))
                except MailboxExists:
                    pass
        self.hub.provisioned.add(self.user.id)



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
            COMMANDS[name] = (states, "do_" + name.replace(" ", "_"))


_register()


class IMAPFactory(ServiceFactory):
    refusal = b"* BYE [UNAVAILABLE] Too many connections, try later\r\n"
    commands = tuple(sorted(COMMANDS))

    def refusal_line(self, reason: str, kind: str) -> bytes:
        if kind in (MEMORY, CLIENT_ERRORS):         # RFC 5530 §3
            return f"* BYE [UNAVAILABLE] {reason}\r\n".encode()
        return self.refusal

    def __init__(self, listener: ListenerConfig, services: Any) -> None:
        super().__init__(listener, services)
        self.hub = services.imap_hub
        HEADERS.resize(services.config.imap.header_cache)
        self.append_check = append_check(listener, services)
        #: Told of COPY and MOVE (Junk training; a no-op when it is off).
        self.trainer: ITrainer = services.trainer

    def reconfigure(self, listener: ListenerConfig, hostname: str) -> None:
        super().reconfigure(listener, hostname)
        HEADERS.resize(self.services.config.imap.header_cache)      # reloaded already
        self.append_check = append_check(listener, self.services)

    def make_protocol(self, addr: Any) -> IMAPSession:
        return IMAPSession(self)


def build_imap_factory(listener: ListenerConfig, services: Any) -> IMAPFactory:
    return IMAPFactory(listener, services)


def append_check(listener: ListenerConfig, services: Any) -> IAppendCheck:
    """What APPEND asks before filing: the virus scanner where the listener's checks
    include antivirus ([listener:NAME] checks), nothing otherwise."""
    if "antivirus" in listener.inbound_checks:
        return AppendAntivirus(services.antivirus, services.blobs,
                               lambda: services.config.antivirus)
    return NO_APPEND_CHECK
