"""Local delivery: file a queued message into the recipient's mailbox.

``user+detail@domain`` goes to the mailbox named ``detail`` when the user has one
(as Dovecot's lda_mailbox_autocreate=no does), otherwise to INBOX.  The queue
recipient's queue id and row id make the delivery id, so handing the same item over twice (after a
crash, or a lease that ran out) files it once.

When directory, mail store and queue share one SQL database (the default), the whole
delivery - resolve, file, mark the recipient delivered - is one transaction, grouped
with other deliveries (group commit): exactly once by construction, one commit for
many messages under load.  Otherwise it goes step by step through the interfaces.
"""

from __future__ import annotations

from typing import Any, Optional

from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, inlineCallbacks
from zope.interface import implementer

from lightmail.directory.interfaces import DirectoryError, IDirectory
from lightmail.queue.interfaces import DeliveryResult, IDeliveryAgent
from lightmail.storage.interfaces import (
    Appended,
    BlobMissing,
    IMailStore,
    MailboxChange,
    QueueItem,
)


@implementer(IDeliveryAgent)
class LocalDeliveryAgent:
    transport = "local"

    def __init__(self, directory: IDirectory, mailstore: IMailStore,
                 queue: Any = None, owner: Optional[str] = None) -> None:
        self.directory = directory
        self.mailstore = mailstore
        self.queue = queue
        self.owner = owner
        db = getattr(mailstore, "db", None)
        self._one_transaction = (
            owner is not None and db is not None
            and getattr(directory, "db", None) is db and getattr(queue, "db", None) is db
            and all(hasattr(obj, name) for obj, name in (
                (directory, "resolve_now"), (mailstore, "append_now"),
                (queue, "finish_now"))))

    def deliver(self, item: QueueItem) -> Deferred[DeliveryResult]:
        if self._one_transaction:
            return self._deliver_in_one_transaction(item)
        return self._deliver_step_by_step(item)

    # -- one transaction ------------------------------------------------------------

    def _deliver_in_one_transaction(self, item: QueueItem) -> Deferred[DeliveryResult]:
        d: Deferred[tuple[DeliveryResult, list[MailboxChange]]] = \
            self.mailstore.db.write_grouped(self._deliver_now, item)  # type: ignore[attr-defined]

        def announce(outcome: tuple[DeliveryResult, list[MailboxChange]]) -> DeliveryResult:
            result, changes = outcome
            for change in changes:
                self.mailstore._announce(change)  # type: ignore[attr-defined]
            return result

        def failed(failure: Any) -> DeliveryResult:
            if failure.check(DirectoryError, BlobMissing):
                return DeliveryResult.deferred(f"4.3.0 {failure.getErrorMessage()}")
            return failure  # type: ignore[no-any-return]
        return d.addCallbacks(announce, failed)

    def _deliver_now(self, conn: Connection,
                     item: QueueItem) -> tuple[DeliveryResult, list[MailboxChange]]:
        store: Any = self.mailstore
        resolution = self.directory.resolve_now(conn, item.recipient.address)  # type: ignore[attr-defined]
        if not resolution.local:
            result = DeliveryResult.bounced("5.1.1 no such local mailbox")
            self.queue.finish_now(conn, item, self.owner, "bounced", result.detail)
            return _recorded(result), []
        filed, changes = [], []
        for target in resolution.local:
            box = None
            if target.detail:
                box = store._get_mailbox(conn, target.user.id, target.detail)
            if box is None:
                box = store._get_mailbox(conn, target.user.id, "INBOX")
            if box is None:
                box = store.create_mailbox_now(conn, target.user.id, "INBOX")
                changes.append(MailboxChange(target.user.id, box.id, "created"))
            user_id, appended = store.append_now(conn, box.id, item.blob,
                                                 delivery_id=delivery_id(item))
            if not appended.duplicate:
                changes.append(MailboxChange(user_id, box.id, "appended", (appended.uid,),
                                             appended.modseq))
            filed.append(_filed(target.user.address, box.name, appended))
        result = DeliveryResult.delivered("2.0.0 " + ", ".join(filed))
        self.queue.finish_now(conn, item, self.owner, "delivered", None)
        return _recorded(result), changes

    # -- through the interfaces -----------------------------------------------------

    @inlineCallbacks
    def _deliver_step_by_step(self, item: QueueItem) -> Any:
        try:
            resolution = yield self.directory.resolve(item.recipient.address)
        except DirectoryError as exc:
            return DeliveryResult.deferred(f"4.3.0 {exc}")
        if not resolution.local:
            return DeliveryResult.bounced("5.1.1 no such local mailbox")
        filed = []
        for target in resolution.local:
            mailbox = None
            if target.detail:
                mailbox = yield self.mailstore.get_mailbox(target.user.id, target.detail)
            if mailbox is None:
                mailbox = yield self.mailstore.get_or_create_mailbox(target.user.id, "INBOX")
            try:
                appended = yield self.mailstore.append(
                    mailbox.id, item.blob, delivery_id=delivery_id(item))
            except BlobMissing as exc:
                return DeliveryResult.deferred(f"4.3.0 {exc}")
            filed.append(_filed(target.user.address, mailbox.name, appended))
        return DeliveryResult.delivered("2.0.0 " + ", ".join(filed))


def delivery_id(item: QueueItem) -> str:
    """Names one delivery of one queued recipient, for idempotent appends.

    The queue id is part of it because row ids are not unique over time: SQLite hands
    a deleted row's id out again, and a bare row id would make a new message look
    like one already filed.
    """
    return f"{item.queue_id}/{item.recipient_id}"


def _filed(address: str, mailbox: str, appended: Appended) -> str:
    return (f"{address}/{mailbox} uid={appended.uid}"
            + (" (already filed)" if appended.duplicate else ""))


def _recorded(result: DeliveryResult) -> DeliveryResult:
    return DeliveryResult(result.status, result.detail, recorded=True)
