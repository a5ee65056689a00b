"""The LMTP server: the SMTP session with LHLO, and one final reply per recipient.

RFC 2033 differs from SMTP where it matters for delivery: there is no queue between
the client and the mailboxes, so after DATA (or BDAT LAST) the server answers once
for every accepted recipient, in RCPT order, and each 250 means "filed, durably".
One recipient over quota does not fail the others.  Everything else - parsing,
limits, PIPELINING, SIZE, 8BITMIME, SMTPUTF8, CHUNKING, STARTTLS, timeouts, draining -
is the SMTP session's own code (``lightmail.smtp.session``).

Recipients must lead to local mailboxes: an LMTP server delivers, it does not relay,
so an address in another domain, or an alias that leads outside, is refused at RCPT.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import Logger

from lightmail.config import ListenerConfig
from lightmail.smtp import codes
from lightmail.smtp.codes import Reply
from lightmail.smtp.policy import Session, SMTPHandler, Transaction
from lightmail.smtp.session import SMTPFactory, SMTPServerSession, inbound_policy
from lightmail.storage.interfaces import IStagedBlob, QueueRecipient

NOT_LOCAL = Reply(550, "5.1.1", "Recipient address rejected: not a local mailbox")
USE_LHLO = Reply(500, "5.5.1", "This is LMTP: say LHLO")
OVER_QUOTA = Reply(552, "5.2.2", "Mailbox full")
OVER_QUOTA_TEMP = Reply(452, "4.2.2", "Mailbox full, try again later")


class LMTPServerSession(SMTPServerSession):
    protocol_name = "LMTP"
    log_namespace = "lightmail.lmtp"

    def smtp_LHLO(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def smtp_EHLO(self, arg: str) -> None:
        self.reply(USE_LHLO)          # RFC 2033 §4.1: LHLO, never HELO/EHLO

    smtp_HELO = smtp_EHLO

    def extensions(self) -> list[str]:
        # DSN is the client's business: it gets a reply per recipient and reports.
        return [line for line in super().extensions() if line != "DSN"]

    def received_protocol(self) -> str:
        assert self.tx is not None
        return "UTF8LMTP" if self.tx.smtputf8 else "LMTP"      # RFC 3848, RFC 6531

    def final_replies(self, tx: Transaction, reply: Reply | list[Reply]) -> None:
        replies = reply if isinstance(reply, list) else [reply] * len(tx.accepted)
        for one in replies:
            self.factory.meters.message(one.code, one.status)
            self.reply(one)


class LMTPHandler(SMTPHandler):
    """Accepts local recipients and files the message into their mailboxes."""

    log = Logger(namespace="lightmail.lmtp")

    @defer.inlineCallbacks
    def decide_rcpt(self, session: Session, tx: Transaction, address: str,
                    orcpt: Optional[str], notify: Optional[str]) -> Any:
        resolution = yield self.resolve(address)
        if isinstance(resolution, Reply):
            return resolution, []
        if not resolution.is_local_domain or resolution.remote:
            return NOT_LOCAL, []
        if not resolution.local:
            return codes.NO_SUCH_USER, []
        return codes.RCPT_OK, [QueueRecipient(address, "local", orcpt, notify)]

    @defer.inlineCallbacks
    def accept(self, session: Session, tx: Transaction, blob: IStagedBlob,
               queue_id: str) -> Any:
        """File the message for each accepted RCPT, all at once; a reply for each
        (after the listener's inbound checks, SMTPHandler.handle_message).

        One recipient's delivery makes the staged blob durable in its own
        transaction's worker hop; with several, it is made durable first.
        """
        # The delivery ids are new (the queue id is made for this message): no
        # earlier append can carry one.
        deliveries = self.services.local_delivery.deliver_each(
            [(address, f"lmtp/{queue_id}/{index}")
             for index, (address, _) in enumerate(tx.accepted)], blob,
            tx.findings.folder)
        results = yield defer.gatherResults(
            [d.addErrback(self._failed) for d in deliveries], consumeErrors=True)
        return [self._reply(address, result, queue_id, session.conn_id)
                for (address, _), result in zip(tx.accepted, results, strict=True)]

    def _failed(self, failure: Any) -> None:
        self.log.failure("local delivery failed", failure)
        return None

    def _reply(self, address: str, result: Any, queue_id: str, conn_id: str) -> Reply:
        if result is None:
            return codes.TEMP_FAILURE
        status, _, detail = result.detail.partition(" ")
        self.log.info("to=<{rcpt}> status={status} ({detail})", rcpt=address,
                      status=result.status, detail=result.detail, conn_id=conn_id,
                      msg_id=queue_id)
        if result.status == "delivered":
            return Reply(250, "2.0.0", f"<{address}> delivered as {queue_id}")
        if status.endswith(".2.2"):           # mailbox full
            tempfail = self.services.config.lmtp.quota_full_tempfail
            return OVER_QUOTA_TEMP if tempfail else OVER_QUOTA
        if result.status == "bounced":
            return Reply(550, status or "5.1.1", f"<{address}> {detail}")
        return Reply(451, status or "4.3.0", f"<{address}> {detail}")


class LMTPFactory(SMTPFactory):
    # Its client is the server's own MTA: an unknown recipient is no abuse.
    counts_client_errors = False
    commands = tuple(sorted(name[5:] for name in dir(LMTPServerSession)
                            if name.startswith("smtp_")))

    def make_protocol(self, addr: Any) -> LMTPServerSession:
        return LMTPServerSession(self)


def build_lmtp_factory(listener: ListenerConfig, services: Any) -> LMTPFactory:
    return LMTPFactory(listener, services, submission=False,
                       handler=LMTPHandler(services, inbound_policy(listener, services)))
