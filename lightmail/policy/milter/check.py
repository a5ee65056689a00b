"""The milter check of the inbound chain: each ``[milter:NAME]`` spoken to through
the chain's steps, one connection per SMTP session (as Postfix does), ABORT between
transactions, QUIT when the session ends.

* mail step: CONNECT and HELO on the session's first transaction (HELO again when
  the client greeted anew), then MAIL with its ESMTP arguments;
* rcpt step: RCPT (a refusal refuses that recipient only);
* content step: DATA, each header field, EOH, the body in chunks, EOB; the edits
  asked for at EOB go into the transaction's Findings, for the chain's one rewrite
  (header fields, body) and the SMTP handler (recipients, sender, discard).  The
  ESMTP arguments of an added recipient (NOTIFY, ORCPT) and of a new sender (RET,
  ENVID) go with them, checked as RCPT TO's and MAIL FROM's are; others are logged
  and ignored, the change itself made (as Postfix 3.7's cleanup does).

What an answer does: reject is 550 5.7.1, tempfail 451 4.7.1, a reply code the
milter's own (sanitised, lightmail.policy.milter.wire.smtp_reply); discard accepts
the message and delivers it nowhere; quarantine files it into each local
recipient's Junk folder (Postfix would hold it in its queue); accept ends the
milter's say for the message (at CONNECT or HELO: for the session).  A milter that
cannot be reached, times out or breaks the protocol gets its ``default_action`` for
the rest of the session, and its connection is closed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.config import Config, MilterConfig
from lightmail.policy.inbound.edits import header_end, header_fields
from lightmail.policy.inbound.findings import (
    AddedRecipient,
    Findings,
    HeaderEdit,
    InboundCheck,
    Message,
    NewSender,
)
from lightmail.policy.milter import wire
from lightmail.policy.milter.client import MilterClient, MilterUnavailable
from lightmail.policy.milter.wire import Edit, ProtocolError, Verdict
from lightmail.smtp import params
from lightmail.smtp.codes import Reply

log = Logger(namespace="lightmail.policy.milter")

REJECTED = Reply(550, "5.7.1", "Command rejected")
TEMPFAILED = Reply(451, "4.7.1", "Service unavailable - try again later")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class MilterCheck(InboundCheck):
    """Every configured milter, in order, for one listener; what each keeps for an
    SMTP session lives until the handler says the session ended."""

    name = "milter"

    def __init__(self, config: Callable[[], Config], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default
            reactor = default
        self.config = config            # a callable: a reload may change the milters
        self.reactor = reactor
        self.sessions: dict[str, list[MilterSession]] = {}

    def _milters(self, session: Any) -> list[MilterSession]:
        found = self.sessions.get(session.conn_id)
        if found is None:
            cfg = self.config()
            found = [MilterSession(milter, cfg, self.reactor) for milter in cfg.milters]
            self.sessions[session.conn_id] = found
        return found

    def mail(self, session: Any, tx: Any, findings: Findings) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._each(session, "mail", session, tx, findings))

    def rcpt(self, session: Any, tx: Any, address: str,
             findings: Findings) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            self._each(session, "rcpt", session, tx, address, findings))

    def content(self, session: Any, tx: Any, message: Message,
                findings: Findings) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            self._each(session, "content", session, tx, message, findings))

    async def _each(self, session: Any, step: str, *args: Any) -> Optional[Reply]:
        for milter in self._milters(session):
            reply = await getattr(milter, step)(*args)
            if reply is not None:
                return reply
        return None

    def session_ended(self, session: Any) -> None:
        for milter in self.sessions.pop(session.conn_id, []):
            milter.close()


class MilterSession:
    """One milter's part in one SMTP session."""

    def __init__(self, cfg: MilterConfig, config: Config, reactor: Any) -> None:
        self.cfg = cfg
        self.hostname = config.hostname
        self.max_body = config.smtp.max_message_size
        self.reactor = reactor
        self.client: Optional[MilterClient] = None
        #: Set once the milter failed: its default action stands for the session.
        self.failed = False
        #: The milter's answer at CONNECT or HELO, which stands for the session.
        self.session_verdict: Optional[Verdict] = None
        self.helo_sent: Optional[str] = None
        #: MAIL was sent and EOB not answered: the next MAIL needs an ABORT first.
        self.in_message = False
        #: The transaction the milter is done with (it accepted or discarded it).
        self.done_with: Any = None
        #: The SMTP session is over (a command still waiting fails quietly).
        self.ended = False

    # -- the chain's steps ------------------------------------------------------------

    async def mail(self, session: Any, tx: Any, findings: Findings) -> Optional[Reply]:
        if self.failed:
            return self._default()
        try:
            if self.client is None and self.session_verdict is None:
                await self._open(session)
            if self.session_verdict is None and self.client is not None:
                return await self._mail(session, tx, findings)
        except (MilterUnavailable, ProtocolError) as exc:
            return self._fail(session, exc)
        return self._session_answer()

    async def _mail(self, session: Any, tx: Any, findings: Findings) -> Optional[Reply]:
        client = self.client
        assert client is not None
        if self.in_message:
            client.abort()
        if session.helo != self.helo_sent:
            verdict = await self._helo(session)
            if verdict is not None:
                return self._session_answer()
        self.in_message, self.done_with = True, None
        macros = [("{mail_addr}", tx.mail_from),
                  ("{mail_host}", tx.mail_from.rpartition("@")[2])]
        if session.account is not None:
            macros.append(("{auth_authen}", session.account.user.address))
        return self._answer(await client.command(wire.MAIL, wire.cstrings(
            f"<{tx.mail_from}>", *_mail_arguments(tx)), macros), tx, findings, "mail")

    async def rcpt(self, session: Any, tx: Any, address: str,
                   findings: Findings) -> Optional[Reply]:
        if self.failed:
            return self._default()
        if self.client is None or self.session_verdict or self.done_with is tx:
            return None
        macros = [("{rcpt_addr}", address), ("{rcpt_host}", address.rpartition("@")[2])]
        try:
            verdict = await self.client.command(wire.RCPT, wire.cstrings(f"<{address}>"),
                                                macros)
        except (MilterUnavailable, ProtocolError) as exc:
            return self._fail(session, exc)
        return self._answer(verdict, tx, findings, "rcpt")

    async def content(self, session: Any, tx: Any, message: Message,
                      findings: Findings) -> Optional[Reply]:
        if self.failed:
            return self._default()
        if self.client is None or self.session_verdict or self.done_with is tx:
            return None
        try:
            return await self._content(session, tx, message, findings)
        except (MilterUnavailable, ProtocolError) as exc:
            return self._fail(session, exc)

    async def _content(self, session: Any, tx: Any, message: Message,
                       findings: Findings) -> Optional[Reply]:
        client = self.client
        assert client is not None
        queue_id = [("i", tx.queue_id or "")]
        data = await message.content()
        verdict = await client.command(wire.DATA, b"", queue_id)
        if verdict.kind != "continue":
            return self._answer(verdict, tx, findings, "data")
        end = header_end(data)
        leading_space = client.negotiated.wants(wire.P_HDR_LEADSPC)
        for field in header_fields(data[:end]):
            name, value = _field_for_milter(field, leading_space)
            if name is None:
                continue
            verdict = await client.command(wire.HEADER, wire.cstrings(name, value))
            if verdict.kind != "continue":
                return self._answer(verdict, tx, findings, "header")
        verdict = await client.command(wire.EOH, b"", queue_id)
        if verdict.kind != "continue":
            return self._answer(verdict, tx, findings, "end of headers")
        body = data[end + 2:] if data[end:end + 2] == b"\r\n" else data[end + 1:]
        for start in range(0, len(body), wire.BODY_CHUNK):
            verdict = await client.command(wire.BODY, body[start:start + wire.BODY_CHUNK])
            if verdict.kind == "skip":
                break
            if verdict.kind != "continue":
                return self._answer(verdict, tx, findings, "body")
        verdict, edits = await client.end_of_message(queue_id)
        self.in_message = False
        if verdict.kind in ("continue", "accept"):
            self._take(edits, findings, leading_space,
                       {"conn_id": session.conn_id, "msg_id": tx.queue_id})
        return self._answer(verdict, tx, findings, "end of message")

    def close(self) -> None:
        self.ended = True
        if self.client is not None:
            try:
                self.client.quit()
            except MilterUnavailable:
                self.client.close()
            self.client = None

    # -- the session's start ------------------------------------------------------------

    async def _open(self, session: Any) -> None:
        cfg = self.cfg
        self.client = await MilterClient.open(cfg.socket, self.reactor, cfg.connect_timeout,
                                              cfg.command_timeout, cfg.eom_timeout)
        family = b"6" if ":" in session.peer else b"4"
        data = (wire.cstrings(f"[{session.peer}]") + family
                + session.peer_port.to_bytes(2, "big") + wire.cstrings(session.peer))
        macros = [("j", self.hostname), ("{daemon_name}", _daemon_name(session)),
                  ("v", "LightMail"), ("{client_addr}", session.peer),
                  ("{client_port}", str(session.peer_port)),
                  ("{client_name}", f"[{session.peer}]")]
        verdict = await self.client.command(wire.CONNECT, data, macros)
        self._session_verdict(verdict, "connect")

    async def _helo(self, session: Any) -> Optional[Verdict]:
        assert self.client is not None
        self.helo_sent = session.helo
        macros = []
        if session.tls:
            version, _, cipher = session.tls.partition(" ")
            macros = [("{tls_version}", version), ("{cipher}", cipher)]
        verdict = await self.client.command(wire.HELO, wire.cstrings(session.helo or ""),
                                            macros)
        self._session_verdict(verdict, "helo")
        return self.session_verdict

    def _session_verdict(self, verdict: Verdict, step: str) -> None:
        if verdict.kind == "continue":
            return
        if verdict.kind == "discard":
            raise ProtocolError(f"discard at {step}")
        self.session_verdict = verdict
        log.info("milter {milter}: {verdict} at {step}, for the whole session",
                 milter=self.cfg.name, verdict=verdict.kind, step=step)
        if verdict.kind == "accept" and self.client is not None:
            self.close()          # nothing more to say to it in this session

    def _session_answer(self) -> Optional[Reply]:
        verdict = self.session_verdict
        if verdict is None or verdict.kind == "accept":
            return None
        return _refusal(verdict)

    # -- answers ------------------------------------------------------------------------

    def _answer(self, verdict: Verdict, tx: Any, findings: Findings,
                step: str) -> Optional[Reply]:
        if verdict.kind == "continue":
            return None
        if verdict.kind in ("accept", "discard"):
            self.done_with = tx
            if verdict.kind == "discard":
                findings.discard(f"milter {self.cfg.name} at {step}")
            return None
        reply = _refusal(verdict)
        log.info("milter {milter}: {verdict} at {step}: {code} {status} {text}",
                 milter=self.cfg.name, verdict=verdict.kind, step=step, code=reply.code,
                 status=reply.status, text=reply.text)
        return reply

    def _take(self, edits: Sequence[Edit], findings: Findings, leading_space: bool,
              ids: dict[str, Any]) -> None:
        """The end-of-message edits into the transaction's findings (``ids``: the
        connection's and the message's, for the log)."""
        body: list[bytes] = []
        for edit in edits:
            command = edit.command
            if command in (wire.ADDHEADER, wire.INSHEADER, wire.CHGHEADER):
                value = _value_from_milter(edit.value, leading_space)
                if command == wire.ADDHEADER:
                    findings.edit_header(HeaderEdit("append", edit.name, value))
                elif command == wire.INSHEADER:
                    findings.edit_header(HeaderEdit("insert", edit.name, value, edit.index))
                else:
                    findings.edit_header(HeaderEdit(
                        "change", edit.name, value if edit.value else None, edit.index))
            elif command == wire.REPLBODY:
                body.append(edit.value)
            elif command in (wire.ADDRCPT, wire.ADDRCPT_PAR):
                given = self._arguments(edit, RECIPIENT_ARGUMENTS, "added recipient", ids)
                findings.added_recipients.append(AddedRecipient(
                    edit.name, _upper(given.get("NOTIFY")), given.get("ORCPT")))
            elif command == wire.DELRCPT:
                findings.removed_recipients.append(edit.name)
            elif command == wire.CHGFROM:
                given = self._arguments(edit, SENDER_ARGUMENTS, "new sender", ids)
                findings.new_sender = NewSender(edit.name, _upper(given.get("RET")),
                                                given.get("ENVID"))
            elif command == wire.QUARANTINE:
                reason = _CONTROL.sub("?", edit.value.decode("utf-8", "replace"))
                findings.quarantine("Junk", f"milter {self.cfg.name}: {reason[:200]}")
        if body:
            new = b"".join(body)
            if len(new) > self.max_body:
                raise ProtocolError(f"a new body of {len(new)} octets, beyond "
                                    f"[smtp] max_message_size")
            findings.body = _crlf(new)

    def _arguments(self, edit: Edit, known: dict[str, Callable[[str], bool]], what: str,
                   ids: dict[str, Any]) -> dict[str, str]:
        """The ESMTP arguments of an envelope change that we honour; the others are
        logged and ignored (the change itself stands), as Postfix's cleanup does with
        a bad NOTIFY or ORCPT."""
        taken, ignored = envelope_arguments(edit.value, known)
        if ignored:
            log.warn("milter {milter}: ignoring ESMTP arguments of the {what} <{address}>:"
                     " {ignored}", milter=self.cfg.name, what=what, address=edit.name,
                     ignored="; ".join(ignored[:10]), **ids)
        return taken

    # -- failure --------------------------------------------------------------------------

    def _fail(self, session: Any, exc: Exception) -> Optional[Reply]:
        self.failed = True
        if self.ended:                # the client left while the milter was asked
            return self._default()
        log.warn("milter {milter} ({socket}) failed: {error}; default action {action} "
                 "for the rest of the session", milter=self.cfg.name,
                 socket=self.cfg.socket, error=str(exc), action=self.cfg.default_action,
                 conn_id=session.conn_id)
        if self.client is not None:
            self.client.close()
            self.client = None
        return self._default()

    def _default(self) -> Optional[Reply]:
        action = self.cfg.default_action
        return None if action == "accept" else TEMPFAILED if action == "tempfail" else REJECTED


def _refusal(verdict: Verdict) -> Reply:
    if verdict.kind == "reply" and verdict.reply is not None:
        return verdict.reply
    return TEMPFAILED if verdict.kind == "tempfail" else REJECTED


def _daemon_name(session: Any) -> str:
    """{daemon_name}: which kind of listener (OpenDKIM's MTA option signs for some)."""
    return "submission" if session.submission else "mx"


def _mail_arguments(tx: Any) -> list[str]:
    """MAIL FROM's ESMTP parameters, as the client gave those we kept."""
    args = []
    if tx.declared_size is not None:
        args.append(f"SIZE={tx.declared_size}")
    if tx.body:
        args.append(f"BODY={tx.body}")
    if tx.smtputf8:
        args.append("SMTPUTF8")
    if tx.ret:
        args.append(f"RET={tx.ret}")
    if tx.envid:
        args.append(f"ENVID={tx.envid}")
    return args


#: The ESMTP arguments honoured on a milter's envelope changes, and their checks:
#: the DSN parameters (RFC 3461) our envelope keeps, by the rules of RCPT TO and MAIL
#: FROM.  (SIZE, BODY and the like describe a message already received; AUTH and
#: REQUIRETLS are the client's to give, not a filter's.)
RECIPIENT_ARGUMENTS: dict[str, Callable[[str], bool]] = {
    "NOTIFY": params.valid_notify, "ORCPT": params.valid_orcpt}
SENDER_ARGUMENTS: dict[str, Callable[[str], bool]] = {
    "RET": params.valid_ret, "ENVID": params.valid_envid}
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


def envelope_arguments(raw: bytes, known: dict[str, Callable[[str], bool]]
                       ) -> tuple[dict[str, str], list[str]]:
    """(name: value for the arguments of ``raw`` that ``known`` names and whose value
    passes its check, the first of each name; why each other one is ignored).
    Anything but printable ASCII is ignored: a filter's garbage never reaches the
    queue or a DSN."""
    taken: dict[str, str] = {}
    ignored: list[str] = []
    for item in raw.decode("utf-8", "replace").split():
        shown = _CONTROL.sub("?", item)[:100]
        name, eq, value = item.partition("=")
        name = name.upper()
        if not _PRINTABLE.match(item):
            ignored.append(f"{shown} (not printable ASCII)")
        elif name not in known:
            ignored.append(f"{shown} (not one we honour)")
        elif name in taken:
            ignored.append(f"{shown} (given twice)")
        elif not eq or not value or not known[name](value):
            ignored.append(f"{shown} (malformed)")
        else:
            taken[name] = value
    return taken, ignored


def _upper(value: Optional[str]) -> Optional[str]:
    return value.upper() if value is not None else None


def _field_for_milter(field: bytes, leading_space: bool) -> tuple[Optional[bytes], bytes]:
    """A header field as HEADER sends it: its name, and its value with folds as bare
    LF (as Sendmail and Postfix send them) and, unless the milter asked for it
    (SMFIP_HDR_LEADSPC), without the white space after the colon."""
    name, colon, value = field.partition(b":")
    if not colon or not name.strip():
        return None, b""
    value = value.rstrip(b"\r\n").replace(b"\r\n", b"\n")
    if not leading_space:
        value = value.lstrip(b" \t")
    return name.strip(), value


def _value_from_milter(raw: bytes, leading_space: bool) -> bytes:
    """A milter's header value as we write it after the colon: CR LF folds, each
    continuation line starting with white space (one that did not would start a
    field of its own), a space after the colon unless the milter gives its own."""
    lines = [line for line in re.split(rb"\r\n|\r|\n", raw.replace(b"\0", b""))]
    kept = [lines[0]] + [line if line[:1] in (b" ", b"\t") else b"\t" + line
                         for line in lines[1:] if line.strip()]
    value = b"\r\n".join(kept)
    return value if leading_space else b" " + value


def _crlf(body: bytes) -> bytes:
    """Line ends as CR LF, whatever the milter used."""
    return re.sub(rb"\r?\n|\r", b"\r\n", body)


