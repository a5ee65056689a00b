"""The SMTP client: one transaction with one receiving MTA (RFC 5321).

ESMTP with PIPELINING (RFC 2920: MAIL, every RCPT and DATA in one write), SIZE (a
message over the server's limit is not sent: 5.3.4), 8BITMIME (sent as it is when
the server does not offer it, as Postfix does), SMTPUTF8 (a message that needs it is
not sent to a server without it: 5.6.7, RFC 6531 §3.2), CHUNKING (BDAT, no
dot-stuffing), DSN parameters passed through (RFC 3461) when offered, REQUIRETLS
(RFC 8689) passed on (only to a server that offers it), opportunistic
STARTTLS (RFC 3207) with the certificate checked and the outcome logged, SMTP AUTH
(RFC 4954: PLAIN, or LOGIN when only that is offered) to a relay host that needs it,
only over TLS unless the transport says ``tls = none``.

Each recipient gets its own answer: accepted at RCPT and then by the reply to the
content, or refused.  4xx means try again later, 5xx means bounce.
"""

from __future__ import annotations

import base64
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Optional

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.storage.interfaces import BlobRef, IBlobStore
from lightmail.streams import DotStuffer, blob_chunks, dot_stuffed

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class OutboundRecipient:
    address: str
    orcpt: Optional[str] = None
    notify: Optional[str] = None


@dataclass(frozen=True)
class OutboundMessage:
    mail_from: str
    recipients: tuple[OutboundRecipient, ...]
    blob: BlobRef
    envid: Optional[str] = None
    ret: Optional[str] = None
    body: Optional[str] = None          # 8BITMIME when the client said so
    smtputf8: bool = False
    requiretls: bool = False            # MAIL FROM ... REQUIRETLS (RFC 8689)
    # The blob's content when it was read ahead (small messages): sent in one write.
    content: Optional[bytes] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def status(self) -> str:
        """The enhanced status code given, or one derived from the basic code."""
        match = _ENHANCED.match(self.lines[0] if self.lines else "")
        if match and match.group(1) == str(self.code)[0]:
            return match.group(0)
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass
class Outcome:
    """What one session achieved, per recipient address: (reply, from whom)."""

    results: dict[str, Reply] = field(default_factory=dict)
    tls: str = ""                       # e.g. "TLSv1.3 (verified)"


class SessionFailed(Exception):
    """The session ended before the recipients got answers: try the next host
    (``next_host``) or give every recipient ``reply``."""

    def __init__(self, reply: Reply, next_host: bool, remote: bool = True,
                 auth: bool = False, no_tls: bool = False) -> None:
        super().__init__(str(reply))
        # remote: the server said it (else LightMail decided: timeouts, limits).
        self.reply, self.next_host, self.remote = reply, next_host, remote
        self.auth = auth                # SMTP AUTH failed or could not be attempted
        # TLS was required and the server offers no STARTTLS, or refused it.
        self.no_tls = no_tls


@dataclass(frozen=True)
class Credentials:
    """SMTP AUTH credentials for a relay host (the password is never shown)."""

    user: str
    password: str = field(repr=False)


def local_reply(code: int, status: str, text: str) -> Reply:
    return Reply(code, (f"{status} {text}",))


@implementer(IPushProducer)
class SMTPClientProtocol(Protocol):
    """Reads replies and hands them to whoever waits; writes with flow control."""

    def __init__(self) -> None:
        self.buffer = b""
        self.pending: list[str] = []
        self.replies: list[Reply] = []
        self.waiter: Optional[defer.Deferred[Reply]] = None
        self.lost: Optional[Failure] = None
        self.paused: Optional[defer.Deferred[None]] = None
        self.connected_d: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.connected_d.callback(None)

    def dataReceived(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit():
                line = "421 " + line         # garbage: treat as a failing reply
            self.pending.append(line[4:])
            if line[3:4] != "-":
                self.replies.append(Reply(int(line[:3]), tuple(self.pending)))
                self.pending = []
        if len(self.buffer) > 64 * 1024:
            self.transport.loseConnection()  # type: ignore[union-attr]
        self._deliver()

    def _deliver(self) -> None:
        if self.waiter is not None and (self.replies or self.lost is not None):
            waiter, self.waiter = self.waiter, None
            if self.replies:
                waiter.callback(self.replies.pop(0))
            else:
                assert self.lost is not None
                waiter.errback(self.lost)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost = reason
        self.resumeProducing()
        self._deliver()

    def read(self, timeout: float, clock: Any) -> defer.Deferred[Reply]:
        d: defer.Deferred[Reply] = defer.Deferred()
        self.waiter = d
        self._deliver()
        if not d.called:
            d.addTimeout(timeout, clock)
        return d

    def send(self, *lines: str) -> None:
        assert self.transport is not None
        self.transport.write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))

    def pauseProducing(self) -> None:
        if self.paused is None:
            self.paused = defer.Deferred()

    def resumeProducing(self) -> None:
        paused, self.paused = self.paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """TLS 1.2+ for STARTTLS, with SNI, without verification in the handshake (so
    opportunistic TLS still encrypts); :func:`verify_peer` checks afterwards."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self.context.set_verify(SSL.VERIFY_NONE, lambda *args: True)

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tls_protocol)
        connection.set_tlsext_host_name(self.hostname.encode("idna"))
        connection.set_connect_state()
        return connection


def verify_peer(transport: Any, hostname: str, ca_file: str = "") -> str:
    """Describe the TLS in use, and whether the server's certificate is trusted
    (system roots, or the roots in ``ca_file``) and valid for ``hostname``."""
    try:
        connection = transport.getHandle()
        version = connection.get_protocol_version_name()
        chain = connection.get_peer_cert_chain() or []
    except Exception:
        return "TLS"
    if not chain:
        return f"{version} (no certificate)"
    try:
        store = crypto.X509Store()
        if ca_file:
            store.load_locations(ca_file)
        else:
            paths = ssl.get_default_verify_paths()
            store.load_locations(paths.cafile, paths.capath)
        leaf, *intermediates = chain
        crypto.X509StoreContext(store, leaf, intermediates).verify_certificate()
        from service_identity.pyopenssl import verify_hostname
        verify_hostname(connection, hostname)
    except Exception as exc:
        return f"{version} (untrusted: {exc.__class__.__name__})"
    return f"{version} (verified)"


@dataclass
class Timeouts:
    command: float = 300.0
    data: float = 600.0


class ClientSession:
    """One SMTP (or LMTP) session with a receiving MTA, for one or more transactions.

    :meth:`open` greets and negotiates (EHLO, STARTTLS, EHLO again); :meth:`send` runs
    one transaction and leaves the session open, so that the agent can reuse it for
    the next message to the same destination (after an RSET, :meth:`reset`).
    Failures that end the session raise :class:`SessionFailed`.
    """

    def __init__(self, proto: SMTPClientProtocol, server_name: str, helo: str,
                 timeouts: Timeouts, clock: Any, lmtp: bool = False,
                 ca_file: str = "", credentials: Optional[Credentials] = None) -> None:
        self.proto, self.server_name, self.helo = proto, server_name, helo
        self.credentials = credentials
        self.authenticated = ""         # the user name, after 235
        self.ca_file = ca_file
        self.timeouts, self.clock, self.lmtp = timeouts, clock, lmtp
        self.extensions: dict[str, str] = {}
        self.tls = ""
        # How far STARTTLS got (for TLS-RPT): "" (not tried: tls = none, LMTP, or the
        # session ended before), "not offered", "refused", "negotiating" (the
        # handshake or the EHLO after it failed), "done".
        self.starttls = ""
        # "DANE-EE" or "DANE-TA" once the delivery agent matched the server's chain
        # to its TLSA records (outbound/dane.py): verified as much as a valid chain.
        self.dane = ""
        self.usable = True
        self.transactions = 0
        # A reused session's RSET, to go out with the next transaction's commands.
        self.rset_pending = False

    async def reply(self, timeout: Optional[float] = None) -> Reply:
        try:
            return await self.proto.read(timeout or self.timeouts.command, self.clock)
        except defer.TimeoutError:
            self.abort()
            raise SessionFailed(local_reply(421, "4.4.2", "timeout talking to "
                                            f"{self.server_name}"), True, False) from None
        except Exception as exc:
            self.usable = False
            raise SessionFailed(local_reply(421, "4.4.2", "lost connection with "
                                            f"{self.server_name}: {exc.__class__.__name__}"),
                                True, False) from None

    def send_lines(self, *lines: str) -> None:
        self.proto.send(*lines)

    def abort(self) -> None:
        self.usable = False
        if self.proto.transport is not None:
            self.proto.transport.loseConnection()

    def close(self) -> None:
        """QUIT and hang up (without waiting for the 221)."""
        if self.usable and self.proto.lost is None:
            self.proto.send("QUIT")
        self.abort()

    def fail(self, reply: Reply, next_host: bool, remote: bool = True,
             no_tls: bool = False) -> SessionFailed:
        self.close()
        return SessionFailed(reply, next_host, remote, no_tls=no_tls)

    async def open(self, tls_policy: str) -> None:
        greeting = await self.reply()
        if greeting.code != 220:
            raise self.fail(greeting, next_host=True)   # a busy or refusing MX: next
        await self._hello()
        if tls_policy != "none" and not self.lmtp:
            self.starttls = "not offered"
        if "STARTTLS" in self.extensions and tls_policy != "none" and not self.lmtp:
            self.send_lines("STARTTLS")
            answer = await self.reply()
            if answer.code == 220:
                self.starttls = "negotiating"
                self.proto.transport.startTLS(  # type: ignore[union-attr]
                    ClientTLS(self.server_name))
                await self._hello()
                self.starttls = "done"
                self.tls = verify_peer(self.proto.transport, self.server_name,
                                       self.ca_file)
            else:
                self.starttls = "refused"
            if answer.code != 220 and tls_policy == "encrypt":
                raise self.fail(answer, next_host=True, no_tls=True)
        if tls_policy == "encrypt" and not self.tls:
            raise self.fail(local_reply(450, "4.7.5", f"{self.server_name} offers no "
                                        "STARTTLS and TLS is required"), True, False,
                            no_tls=True)
        if self.credentials is not None:
            await self._authenticate(self.credentials, tls_policy)

    def _auth_failed(self, status: str, text: str) -> SessionFailed:
        self.close()
        return SessionFailed(local_reply(454, status, text), True, False, auth=True)

    async def _authenticate(self, credentials: Credentials, tls_policy: str) -> None:
        """SMTP AUTH (RFC 4954) with an initial response: PLAIN, else LOGIN.  Any
        failure is temporary (4.7.x) for the recipients: wrong credentials are the
        administrator's to fix, not a reason to bounce the users' mail."""
        who = f"as {credentials.user} to {self.server_name}"
        if not self.tls and tls_policy != "none":
            raise self._auth_failed("4.7.0", f"SMTP AUTH {who} not attempted: the "
                                    "connection is not encrypted (no STARTTLS); "
                                    "credentials are only sent over TLS unless tls = none")
        offered = set(self.extensions.get("AUTH", "").upper().split())
        for keyword in self.extensions:          # the old "AUTH=PLAIN LOGIN" form
            if keyword.startswith("AUTH="):
                offered.update(keyword[5:].split())
                offered.update(self.extensions[keyword].upper().split())
        if "PLAIN" in offered:
            token = f"\0{credentials.user}\0{credentials.password}".encode()
            self.send_lines(f"AUTH PLAIN {base64.b64encode(token).decode()}")
            answer = await self.reply()
        elif "LOGIN" in offered:
            user = base64.b64encode(credentials.user.encode()).decode()
            self.send_lines(f"AUTH LOGIN {user}")
            answer = await self.reply()
            if answer.code == 334:
                self.send_lines(base64.b64encode(credentials.password.encode()).decode())
                answer = await self.reply()
        else:
            mechanisms = " ".join(sorted(offered)) or "no AUTH at all"
            raise self._auth_failed("4.7.0", f"SMTP AUTH {who} not possible: the server "
                                    f"offers {mechanisms} (LightMail speaks PLAIN, LOGIN)")
        if answer.code == 334:
            self.send_lines("*")                 # an unexpected challenge: cancel
            answer = await self.reply()
        if answer.code != 235:
            raise self._auth_failed("4.7.8", f"SMTP AUTH {who} refused: {answer}")
        self.authenticated = credentials.user

    async def _hello(self) -> None:
        self.send_lines(f"{'LHLO' if self.lmtp else 'EHLO'} {self.helo}")
        answer = await self.reply()
        if answer.code != 250 and not self.lmtp:
            self.send_lines(f"HELO {self.helo}")
            answer = await self.reply()
        if answer.code != 250:
            raise self.fail(answer, next_host=True)
        self.extensions = {}
        for line in answer.lines[1:]:
            keyword, _, value = line.partition(" ")
            self.extensions[keyword.upper()] = value

    @property
    def verified(self) -> bool:
        """A certificate chain the roots trust, valid for the host name; or one that
        matched the host's DANE TLSA records."""
        return self.tls.endswith("(verified)") or bool(self.dane)

    def peer_certificates(self) -> list[x509.Certificate]:
        """The server's certificate chain as it sent it, its own first; ``[]``
        without TLS."""
        if not self.tls:
            return []
        try:
            chain = self.proto.transport.getHandle().get_peer_cert_chain()  # type: ignore[union-attr]
        except Exception:
            return []
        return [cert.to_cryptography() for cert in chain or []]

    @property
    def local_address(self) -> str:
        """This side's IP address of the connection (TLS-RPT's sending-mta-ip)."""
        try:
            return str(self.proto.transport.getHost().host)  # type: ignore[union-attr]
        except Exception:
            return ""

    async def reset(self) -> bool:
        """Before reusing the session: is it still there and willing?"""
        if not self.usable or self.proto.lost is not None:
            return False
        self.send_lines("RSET")
        try:
            answer = await self.reply()
        except SessionFailed:
            return False
        return answer.code == 250

    async def send(self, message: OutboundMessage, blobs: IBlobStore,
                   prefix: bytes = b"") -> Outcome:
        """One transaction; the recipients' answers.  ``prefix`` goes before the
        stored content (header fields added on the way out, such as DKIM-Signature)."""
        outcome = Outcome(tls=self.tls)
        extensions = self.extensions
        size = extensions.get("SIZE", "")
        total = len(prefix) + message.blob.size
        if size.isascii() and size.isdigit() and int(size) and total > int(size):
            raise self.fail(local_reply(552, "5.3.4", f"message size {total} exceeds "
                                        f"the limit of {size}"), False, False)
        if message.smtputf8 and "SMTPUTF8" not in extensions:
            raise self.fail(local_reply(553, "5.6.7", "the message needs SMTPUTF8, which "
                                        "the server does not offer"), False, False)
        if message.requiretls and "REQUIRETLS" not in extensions:
            # The agent never gets here (it checks first); the next MX may offer it.
            raise self.fail(local_reply(450, "4.7.30", "the message needs REQUIRETLS, "
                                        "which the server does not offer"), True, False)
        dsn = "DSN" in extensions
        mail = f"MAIL FROM:<{message.mail_from}>"
        if size:
            mail += f" SIZE={total}"
        if message.body == "8BITMIME" and "8BITMIME" in extensions:
            mail += " BODY=8BITMIME"
        if message.smtputf8:
            mail += " SMTPUTF8"
        if message.requiretls:
            mail += " REQUIRETLS"           # RFC 8689 §2
        if dsn and message.ret:
            mail += f" RET={message.ret}"
        if dsn and message.envid:
            mail += f" ENVID={message.envid}"
        rcpts = []
        for rcpt in message.recipients:
            line = f"RCPT TO:<{rcpt.address}>"
            if dsn and rcpt.notify:
                line += f" NOTIFY={rcpt.notify}"
            if dsn and rcpt.orcpt:
                line += f" ORCPT={_xtext_orcpt(rcpt.orcpt)}"
            rcpts.append(line)
        chunking = "CHUNKING" in extensions
        pipelining = "PIPELINING" in extensions
        rset, self.rset_pending = self.rset_pending, False
        if pipelining:
            self.send_lines(*(["RSET"] if rset else []), mail, *rcpts,
                            *([] if chunking else ["DATA"]))
        else:
            if rset:
                self.send_lines("RSET")
            self.send_lines(mail)
        if rset:
            answer = await self.reply()
            if answer.code != 250:
                # Not remote: the agent tries again on a new connection (what follows
                # the RSET is answered, if at all, on a session that is hung up).
                raise self.fail(local_reply(421, "4.4.2", f"{self.server_name} refused "
                                            f"RSET: {answer}"), True, False)
        mail_reply = await self.reply()
        accepted = []
        for rcpt, line in zip(message.recipients, rcpts, strict=True):
            if not pipelining:
                if mail_reply.code != 250:
                    break
                self.send_lines(line)
            answer = await self.reply()
            if mail_reply.code != 250:
                continue              # pipelined RCPTs after a refused MAIL: ignored
            if answer.code in (250, 251):
                accepted.append(rcpt.address)
            else:
                outcome.results[rcpt.address] = answer
        if mail_reply.code != 250:
            if pipelining and not chunking:
                await self.reply()    # the DATA reply (503 or so)
            raise self.fail(mail_reply, next_host=mail_reply.code < 500)
        if not accepted:
            if pipelining and not chunking:
                await self.reply()
            self.transactions += 1
            return outcome
        transport: Any = self.proto.transport
        content = message.content
        if chunking:
            transport.write(f"BDAT {total} LAST\r\n".encode() + prefix
                            + (content if content is not None else b""))
            if content is None:
                await _stream(self.proto, blobs, message.blob, stuffer=None)
        else:
            if not pipelining:
                self.send_lines("DATA")
            go = await self.reply()
            if go.code != 354:
                raise self.fail(go, next_host=go.code < 500)
            if content is not None:
                transport.write(dot_stuffed(prefix + content))
            else:
                stuffer = DotStuffer()
                transport.write(stuffer.feed(prefix))
                await _stream(self.proto, blobs, message.blob, stuffer)
                transport.write(stuffer.end())
        if self.lmtp:
            # RFC 2033 §4.2: one reply per accepted recipient, in RCPT order.
            for address in accepted:
                outcome.results[address] = await self.reply(self.timeouts.data)
        else:
            final = await self.reply(self.timeouts.data)
            for address in accepted:
                outcome.results[address] = final
        self.transactions += 1
        return outcome


async def transact(proto: SMTPClientProtocol, message: OutboundMessage, blobs: IBlobStore,
                   helo: str, server_name: str, tls_policy: str, timeouts: Timeouts,
                   clock: Any, prefix: bytes = b"", lmtp: bool = False) -> Outcome:
    """Open a session, run one transaction, QUIT."""
    session = ClientSession(proto, server_name, helo, timeouts, clock, lmtp)
    await session.open(tls_policy)
    outcome = await session.send(message, blobs, prefix)
    session.close()
    return outcome


async def _stream(proto: SMTPClientProtocol, blobs: IBlobStore, blob: BlobRef,
                  stuffer: Optional[DotStuffer]) -> None:
    transport: Any = proto.transport
    transport.registerProducer(proto, True)
    try:
        async for chunk in blob_chunks(blobs, blob.id, blob.size):
            if proto.lost is not None:
                break
            transport.write(stuffer.feed(chunk) if stuffer else chunk)
            if proto.paused is not None:
                await proto.paused
    finally:
        if proto.lost is None:
            transport.unregisterProducer()


def _xtext_orcpt(orcpt: str) -> str:
    """xtext (RFC 3461 §4): an ORCPT that came in over SMTP already is; one made here
    (``rfc822;user+tag@example.com``) gets its '+', '=' and non-ASCII encoded."""
    out = []
    for index, ch in enumerate(orcpt):
        escaped = ch == "+" and re.match(r"[0-9A-F]{2}", orcpt[index + 1:index + 3])
        if 33 <= ord(ch) <= 126 and ch != "=" and (ch != "+" or escaped):
            out.append(ch)
        else:
            out.append("".join(f"+{b:02X}" for b in ch.encode()))
    return "".join(out)
