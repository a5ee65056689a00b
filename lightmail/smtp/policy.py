"""The SMTP handler: what the protocol asks at each step of a transaction.

In the manner of aiosmtpd's ``handle_RCPT``/``handle_DATA``: the protocol parses and
enforces limits, the handler decides.  An embedding application replaces or subclasses
:class:`SMTPHandler` to plug in its own policy or delivery.  The handler runs the
listener's inbound policy chain (lightmail.policy.inbound: SPF at MAIL FROM, DKIM and
the Authentication-Results field once the content is in), given to it when the
listener's factory is built; an embedder may give its own chain.  Every hook returns
a Deferred (or a plain value).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import Logger

from lightmail.address import AddressError, normalise_address, split_address
from lightmail.directory.interfaces import DirectoryError
from lightmail.logs import BoundLogger
from lightmail.policy.inbound import Findings, InboundPolicy
from lightmail.smtp import codes
from lightmail.smtp.codes import Reply
from lightmail.storage.interfaces import (
    DurableBlob,
    Envelope,
    IStagedBlob,
    NotFiled,
    QueueRecipient,
)


@dataclass
class Session:
    """What is known about a connection (shared with hooks, read-only for them)."""

    conn_id: str
    peer: str
    submission: bool
    peer_port: int = 0
    helo: Optional[str] = None
    esmtp: bool = False
    tls: Optional[str] = None          # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    account: Any = None                # IMailAccount after AUTH


@dataclass
class Transaction:
    """One MAIL ... DATA/BDAT transaction."""

    mail_from: str
    smtputf8: bool = False
    requiretls: bool = False           # MAIL FROM ... REQUIRETLS (RFC 8689)
    body: Optional[str] = None
    envid: Optional[str] = None
    ret: Optional[str] = None
    declared_size: Optional[int] = None
    recipients: list[QueueRecipient] = field(default_factory=list)
    rcpt_count: int = 0                # accepted RCPT commands
    # Each accepted RCPT address with what it expanded to (LMTP answers for each).
    accepted: list[tuple[str, list[QueueRecipient]]] = field(default_factory=list)
    # What the inbound checks found (SPF, DKIM...), and where they want it filed.
    findings: Findings = field(default_factory=Findings)
    # Once the content is in: the id it is queued under (milters see it as "i").
    queue_id: Optional[str] = None


class SMTPHandler:
    log = Logger(namespace="lightmail.smtp")

    def __init__(self, services: Any, policy: Optional[InboundPolicy] = None) -> None:
        self.services = services
        #: The listener's inbound checks (none when not given).
        self.policy = policy or InboundPolicy((), services.blobs,
                                              lambda: services.config.authserv_id)

    def handle_connect(self, session: Session) -> Any:
        """A new connection: None to greet it, or the Reply (421) to close it with."""
        return self.policy.connect(session)

    @defer.inlineCallbacks
    def handle_mail(self, session: Session, tx: Transaction) -> Any:
        reply = yield self.check_sender(session, tx)
        if reply.is_error:
            return reply
        refused = yield self.policy.mail(session, tx)
        return refused or reply

    def check_sender(self, session: Session, tx: Transaction) -> Any:
        """Submission: whether the user may send as MAIL FROM's address."""
        if not session.submission or not tx.mail_from:
            return codes.SENDER_OK
        if not self.services.config.smtp.require_sender_match:
            return codes.SENDER_OK
        d = defer.maybeDeferred(self.services.directory.allowed_senders,
                                session.account.user)

        def check(allowed: list[str]) -> Reply:
            try:
                sender = normalise_address(tx.mail_from)
            except AddressError:
                return codes.BAD_ADDRESS
            return codes.SENDER_OK if sender in allowed else codes.SENDER_DENIED
        return d.addCallback(check)

    @defer.inlineCallbacks
    def resolve(self, address: str) -> Any:
        """The directory's answer for a recipient, or the reply refusing it.

        RFC 5321 §4.5.1: ``<postmaster>`` and postmaster at every local domain are
        always accepted; where the directory has no postmaster, they lead to
        ``[server] postmaster``."""
        # A bounce to one of our SRS addresses: on to the sender it stands for.
        returning = self.services.srs.resolve(address)
        if returning is not None:
            return returning
        postmaster = self.services.config.server.postmaster
        bare = address.lower() == "postmaster"
        try:
            local, _ = split_address(address) if not bare else ("postmaster", "")
        except AddressError:
            return codes.BAD_ADDRESS
        try:
            resolution: Any = None
            if not bare:
                resolution = yield self.services.directory.resolve(address)
            if (local == "postmaster" and postmaster
                    and (bare or (resolution.is_local_domain
                                  and not resolution.deliverable))):
                found = yield self.services.directory.resolve(postmaster)
                # Local to us whatever the address: mail to it is ours to deliver
                # (or to relay, as an alias to a remote address is).
                resolution = replace(found, address=address, is_local_domain=True)
        except DirectoryError as exc:
            self.log.warn("resolving {rcpt} failed: {error}", rcpt=address, error=str(exc))
            return codes.TEMP_FAILURE
        if resolution is None:
            return codes.NO_SUCH_USER
        return resolution

    @defer.inlineCallbacks
    def handle_rcpt(self, session: Session, tx: Transaction, address: str,
                    orcpt: Optional[str], notify: Optional[str]) -> Any:
        """Decide on one recipient: (reply, queue recipients it expands to); the
        inbound checks' rcpt step has the last word on one the directory accepts."""
        reply, recipients = yield self.decide_rcpt(session, tx, address, orcpt, notify)
        if reply.is_error:
            return reply, recipients
        refused = yield self.policy.rcpt(session, tx, address)
        return (refused, []) if refused is not None else (reply, recipients)

    @defer.inlineCallbacks
    def decide_rcpt(self, session: Session, tx: Transaction, address: str,
                    orcpt: Optional[str], notify: Optional[str]) -> Any:
        """The directory's and the relay rules' answer for one recipient."""
        resolution = yield self.resolve(address)
        if isinstance(resolution, Reply):
            return resolution, []
        orcpt = orcpt or f"rfc822;{address}"
        if not resolution.is_local_domain:
            if session.account is None:    # RFC 5321 §3.6.2: no open relay
                trusted = yield self.services.access.is_trusted(session.peer)
                if not trusted:            # ([access] trusted networks relay)
                    return codes.RELAY_DENIED, []
            return codes.RCPT_OK, [QueueRecipient(address, "smtp", orcpt, notify)]
        if not resolution.deliverable:
            return codes.NO_SUCH_USER, []
        targets = []
        for target in resolution.local:
            user_local, user_domain = target.user.address.rsplit("@", 1)
            delimiter = self.services.config.directory.recipient_delimiter
            name = (f"{user_local}{delimiter}{target.detail}@{user_domain}"
                    if target.detail else target.user.address)
            targets.append(QueueRecipient(name, "local", orcpt, notify))
        targets += [QueueRecipient(remote, "smtp", orcpt, notify)
                    for remote in resolution.remote]
        return codes.RCPT_OK, targets

    @defer.inlineCallbacks
    def handle_message(self, session: Session, tx: Transaction, blob: IStagedBlob,
                       queue_id: str) -> Any:
        """Run the content checks, then queue the message (or file it, all local),
        then answer.

        ``blob`` is the content, staged: the write port makes it durable in the
        transaction that queues or files it.  The checks may replace it (an
        Authentication-Results field written on top): what they give back is ours
        to discard if queueing fails.
        """
        tx.queue_id = queue_id
        refused, checked = yield self.policy.content(session, tx, blob)
        if refused is not None:
            checked.discard()
            return refused
        try:
            yield self.change_envelope(session, tx)
        except BaseException:
            checked.discard()
            raise
        if tx.findings.discarded is not None or not tx.recipients:
            # A milter's DISCARD (Postfix's "milter-discard"): the client is told the
            # message was taken, and nothing is queued.
            checked.discard()
            self.log.warn("discarded from=<{sender}> nrcpt={nrcpt}: {reason}; accepted "
                          "and delivered nowhere", sender=tx.mail_from,
                          nrcpt=len(tx.recipients),
                          reason=tx.findings.discarded or "every recipient was removed",
                          conn_id=session.conn_id, msg_id=queue_id)
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        try:
            reply = yield self.accept(session, tx, checked, queue_id)
        except BaseException:
            checked.discard()         # a no-op once its commit has started
            raise
        return reply

    @defer.inlineCallbacks
    def change_envelope(self, session: Session, tx: Transaction) -> Any:
        """The checks' changes to the envelope (a milter's CHGFROM, DELRCPT, ADDRCPT):
        the new sender as given, with the RET and ENVID given with it; recipients
        removed by the address RCPT TO gave; those added through
        :meth:`decide_rcpt` with their NOTIFY and ORCPT, as if the client had given
        them, so that the same rules hold (on an MX listener only local addresses: a
        milter opens no relay)."""
        findings = tx.findings
        log = BoundLogger(namespace=self.log.namespace, conn_id=session.conn_id,
                          msg_id=tx.queue_id)
        change = findings.new_sender
        if change is not None and change.address != tx.mail_from:
            log.info("sender changed by a check: <{old}> -> <{new}>", old=tx.mail_from,
                     new=change.address)
            tx.mail_from = change.address
        if change is not None and (change.ret or change.envid):
            log.info("DSN parameters changed by a check: RET={ret} ENVID={envid}",
                     ret=change.ret or tx.ret, envid=change.envid or tx.envid)
            tx.ret = change.ret or tx.ret
            tx.envid = change.envid or tx.envid
        if findings.removed_recipients:
            gone = {address.lower() for address in findings.removed_recipients}
            log.info("recipients removed by a check: {rcpts}",
                     rcpts=", ".join(a for a, _ in tx.accepted if a.lower() in gone))
            tx.accepted = [(a, r) for a, r in tx.accepted if a.lower() not in gone]
            tx.recipients = [rcpt for _, expanded in tx.accepted for rcpt in expanded]
        for added in findings.added_recipients:
            address = added.address
            reply, recipients = yield self.decide_rcpt(session, tx, address, added.orcpt,
                                                       added.notify)
            if reply.is_error:
                log.warn("recipient <{rcpt}> added by a check refused: {code} {text}",
                         rcpt=address, code=reply.code, text=reply.text)
                continue
            log.info("recipient <{rcpt}> added by a check{notify}{orcpt}", rcpt=address,
                     notify=f" NOTIFY={added.notify}" if added.notify else "",
                     orcpt=f" ORCPT={added.orcpt}" if added.orcpt else "")
            tx.accepted.append((address, recipients))
            tx.recipients.extend(recipients)

    def session_ended(self, session: Session) -> None:
        """The connection is gone: the checks let go of what they kept for it."""
        self.policy.session_ended(session)

    @defer.inlineCallbacks
    def accept(self, session: Session, tx: Transaction, blob: IStagedBlob,
               queue_id: str) -> Any:
        """Queue the message (or file it, all local): the 250 once it is durable."""
        folder = tx.findings.folder
        envelope = Envelope(
            mail_from=tx.mail_from, recipients=_unique(tx.recipients),
            source="submission" if session.submission else "mx", envid=tx.envid,
            ret=tx.ret, body=tx.body, smtputf8=tx.smtputf8,
            auth_user=session.account.user.address if session.account else None,
            client_address=session.peer, priority=1 if session.submission else 0,
            folder=folder, requiretls=tx.requiretls)
        services = self.services
        if (services.config.smtp.direct_delivery
                and all(rcpt.transport == "local" for rcpt in envelope.recipients)):
            # All local: file it now, in the grouped transaction that would have
            # queued it (as LMTP does); the 250 then means filed.
            addresses = [rcpt.address for rcpt in envelope.recipients]
            try:
                results = yield services.local_delivery.deliver_at_acceptance(
                    addresses, blob, queue_id, folder)
            except NotFiled as exc:
                # Nothing was filed (the blob is durable): queue it, the queue runner
                # retries or bounces.
                self.log.info("not filed at once, queueing: {reason}", reason=str(exc),
                              conn_id=session.conn_id, msg_id=queue_id)
                blob = DurableBlob(blob.ref)
            else:
                for address, result in zip(addresses, results, strict=True):
                    self.log.info("to=<{rcpt}> transport=local status=delivered {detail}",
                                  rcpt=address, detail=result.detail,
                                  conn_id=session.conn_id, msg_id=queue_id)
                return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        yield services.write_port.enqueue(envelope, blob, queue_id)
        services.queue_runner.kick()
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def _unique(recipients: list[QueueRecipient]) -> list[QueueRecipient]:
    """One queue row per final address (two aliases to one user deliver once)."""
    seen: dict[tuple[str, str], QueueRecipient] = {}
    for rcpt in recipients:
        seen.setdefault((rcpt.address.lower(), rcpt.transport), rcpt)
    return list(seen.values())
