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

from collections.abc import Callable, Sequence
from typing import Any, Optional

from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.directory.interfaces import DirectoryError, IDirectory
from lightmail.queue.interfaces import DeliveryResult, IDeliveryAgent, IMailboxDelivery
from lightmail.storage.interfaces import (
    Appended,
    BlobMissing,
    BlobRef,
    IMailStore,
    MailboxChange,
    QueueItem,
)


@implementer(IDeliveryAgent, IMailboxDelivery)
class LocalDeliveryAgent:
    transport = "local"

    def __init__(self, directory: IDirectory, mailstore: IMailStore,
                 queue: Any = None, owner: Optional[str] = None) -> None:
        self.directory = directory
        self.mailstore = mailstore
        self.queue = queue
        self.owner = owner
        #: A lightmail.storage.writer.WriterClient: grouped writes in that process.
        self.writer: Any = None
        db = getattr(mailstore, "db", None)
        # Directory and mail store in one database: resolve and file in one
        # transaction.  With the queue there too, the outcome is recorded in it.
        self._shared_db = (
            db is not None and getattr(directory, "db", None) is db
            and hasattr(directory, "resolve_now") and hasattr(mailstore, "append_now"))
        self._one_transaction = (
            self._shared_db and owner is not None and getattr(queue, "db", None) is db
            and hasattr(queue, "finish_now"))

    def deliver(self, item: QueueItem) -> Deferred[DeliveryResult]:
        if self._one_transaction:
            d = self._grouped(None, self._deliver_now, item)
        else:
            d = self._file_step_by_step(item.recipient.address, item.blob,
                                        delivery_id(item), over_quota="deferred")
        return d

    def deliver_to_mailbox(self, address: str, blob: BlobRef, delivery_id: str,
                           fresh: bool = False,
                           before: Optional[Callable[[], Any]] = None
                           ) -> Deferred[DeliveryResult]:
        """File ``blob`` for one local address now, without the queue (LMTP does).

        Durable when the Deferred fires.  Over quota is a permanent failure here
        (552 5.2.2, as Dovecot's LMTP answers by default): the sender keeps the message.
        ``fresh``: ``delivery_id`` was made for this delivery (no earlier append can
        carry it), as in :meth:`_file_now`.  ``before``: makes the blob durable, on
        the worker thread of the transaction and before it (see
        :meth:`Database.write_grouped_after`); only where :meth:`can_file_after`.
        """
        if self._shared_db:
            fresh = fresh and hasattr(self.mailstore, "append_fresh_now")
            return self._grouped("file_one", self._file_now, address, blob, delivery_id,
                                 "bounced", fresh, before=before)
        assert before is None
        return self._file_step_by_step(address, blob, delivery_id, over_quota="bounced")

    def can_file_after(self, pending: Any = None) -> bool:
        """Whether to pass ``before`` (make the blob durable in the transaction's worker
        hop): the deliveries go in one grouped transaction, and either the group's
        blobs are made durable together (``pending.batched``: one flush for all) or
        the group would start at once.  Otherwise, when groups are busy, the blob is
        better made durable on the I/O pool, in parallel with other blobs and with the
        commit in progress, than with one fsync after another in the group's thread
        (measured: at 10 LMTP connections it was slower)."""
        db = getattr(self.mailstore, "db", None)
        if self.writer is not None and self.writer.ready:
            return pending is not None and hasattr(pending, "detach")
        return (self._shared_db and hasattr(db, "write_grouped_after")
                and (bool(getattr(pending, "batched", False))
                     or bool(db.groups_idle())))  # type: ignore[union-attr]

    # -- in one transaction ---------------------------------------------------------

    def _write(self, op: Optional[str], fn: Any, args: tuple[Any, ...],
               before: Optional[Callable[[], Any]]) -> Deferred[Any]:
        """``fn(conn, *args)`` in a grouped transaction: in the writer process (as its
        operation ``op``, the same method there) when there is one, else here."""
        writer = self.writer
        if op is not None and writer is not None and writer.ready:
            d: Deferred[Any] = writer.call(op, args, pending=before)
            if op in ("file_all", "file_one"):
                d.addErrback(self._unless_filed, op, args)
            return d
        db: Any = self.mailstore.db  # type: ignore[attr-defined]
        if before is None:
            return db.write_grouped(fn, *args)  # type: ignore[no-any-return]
        return db.write_grouped_after(before, fn, *args)  # type: ignore[no-any-return]

    def _unless_filed(self, failure: Failure, op: str, args: tuple[Any, ...]) -> Any:
        """The writer process went away before it answered (WriterLost): had it
        committed?  Its delivery ids say (made for this delivery, so found only if it
        was filed).  If so, the outcome is "delivered", once its commit is made
        durable here (the writer may have died before its flush); if not, the failure
        stands, nothing was filed, and the sender's retry is safe.  Without this, a
        writer killed between its commit and its answer would have SMTP answer 451
        for a message already filed, and the retry would file it twice."""
        from lightmail.storage.writer import WriterLost
        if not failure.check(WriterLost):
            return failure
        if op == "file_all":
            addresses, _, queue_id = args
            pairs = [(address, acceptance_delivery_id(queue_id, index))
                     for index, address in enumerate(addresses)]
        else:
            address, _, delivery_id = args[:3]
            pairs = [(address, delivery_id)]
        db: Any = self.mailstore.db  # type: ignore[attr-defined]
        d: Deferred[Optional[list[DeliveryResult]]] = db.read(self._filed_already_now,
                                                              pairs)

        def decide(results: Optional[list[DeliveryResult]]) -> Any:
            if results is None:
                return failure
            return db.run(db.sync_now).addCallback(
                lambda _: ((results if op == "file_all" else results[0]), []))
        return d.addCallback(decide)

    def _filed_already_now(self, conn: Connection, pairs: list[tuple[str, str]]
                           ) -> Optional[list[DeliveryResult]]:
        """For each (address, delivery id), where it was filed; None if nowhere (one
        transaction filed them all, so one found means all were)."""
        store: Any = self.mailstore
        results, found = [], False
        for address, delivery_id in pairs:
            resolution = self.directory.resolve_now(conn, address)  # type: ignore[attr-defined]
            filed = []
            for target in resolution.local:
                place = store.filed_with_now(conn, target.user.id, delivery_id)
                if place is not None:
                    filed.append(f"{target.user.address}/{place[0]} uid={place[1]}")
            found = found or bool(filed)
            results.append(DeliveryResult.delivered("2.0.0 " + ", ".join(filed)))
        return results if found else None

    def _grouped(self, op: Optional[str], fn: Any, *args: Any,
                 before: Optional[Callable[[], Any]] = None) -> Deferred[DeliveryResult]:
        d: Deferred[tuple[DeliveryResult, list[MailboxChange]]] = self._write(
            op, fn, args, before)

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
        """A queued recipient: file it and record the outcome in one transaction."""
        result, changes = self._file_now(conn, item.recipient.address, item.blob,
                                         delivery_id(item), "deferred")
        if result.status == "deferred":
            return result, changes         # the runner schedules the next attempt
        self.queue.finish_now(conn, item, self.owner, result.status,
                              None if result.status == "delivered" else result.detail)
        return _recorded(result), changes

    def _file_now(self, conn: Connection, address: str, blob: BlobRef, delivery_id: str,
                  over_quota: str, fresh: bool = False
                  ) -> tuple[DeliveryResult, list[MailboxChange]]:
        """File for one address inside the caller's transaction.

        ``fresh``: the delivery id was made for this transaction (acceptance), so no
        earlier append can carry it, and a resolution the directory remembers from
        RCPT a moment ago will do.
        """
        store: Any = self.mailstore
        resolution = None
        if fresh:
            resolution = getattr(self.directory, "cached_resolution", _none)(address)
        if resolution is None:
            resolution = self.directory.resolve_now(conn, address)  # type: ignore[attr-defined]
        if not resolution.local:
            return DeliveryResult.bounced(NO_MAILBOX), []
        filed: list[str] = []
        full: list[str] = []
        changes: list[MailboxChange] = []
        for target in resolution.local:
            if target.user.quota_bytes and (
                    store.usage_now(conn, target.user.id) + blob.size
                    > target.user.quota_bytes):
                full.append(target.user.address)
                continue
            if fresh:
                filed.append(self._file_fresh(conn, target, blob, delivery_id, changes))
                continue
            # Find and lock the mailbox in one query (append_now takes the row).
            box = None
            if target.detail:
                box = store.lock_mailbox_now(conn, target.user.id, target.detail)
            if box is None:
                box = store.lock_mailbox_now(conn, target.user.id, "INBOX")
            locked = box
            if box is None:
                box = store.create_mailbox_now(conn, target.user.id, "INBOX")
                changes.append(MailboxChange(target.user.id, box.id, "created"))
            user_id, appended = store.append_now(conn, box.id, blob,
                                                 delivery_id=delivery_id, locked=locked)
            if not appended.duplicate:
                changes.append(store.appended_change(user_id, blob, appended))
            filed.append(_filed(target.user.address, box.name, appended))
        return _outcome(filed, full, over_quota), changes

    def _file_fresh(self, conn: Connection, target: Any, blob: BlobRef, delivery_id: str,
                    changes: list[MailboxChange]) -> str:
        """Append with a new delivery id: the mailbox is found, locked and advanced in
        one statement (``append_fresh_now``)."""
        store: Any = self.mailstore
        user_id = target.user.id
        placed, name = None, "INBOX"
        if target.detail:
            placed, name = store.append_fresh_now(conn, user_id, target.detail, blob,
                                                  delivery_id), target.detail
        if placed is None:
            name = "INBOX"
            placed = store.append_fresh_now(conn, user_id, name, blob, delivery_id)
        if placed is None:
            box = store.create_mailbox_now(conn, user_id, name)
            changes.append(MailboxChange(user_id, box.id, "created"))
            placed = store.append_fresh_now(conn, user_id, name, blob, delivery_id)
            assert placed is not None
        _, appended = placed
        changes.append(store.appended_change(user_id, blob, appended))
        return _filed(target.user.address, name, appended)

    # -- at acceptance ---------------------------------------------------------------

    def can_deliver_at_acceptance(self) -> bool:
        """Whether :meth:`deliver_at_acceptance` can file in one grouped transaction."""
        return self._shared_db and hasattr(self.mailstore, "lock_mailbox_now")

    def deliver_at_acceptance(self, addresses: Sequence[str], blob: BlobRef,
                              queue_id: str, before: Optional[Callable[[], Any]] = None
                              ) -> Deferred[list[DeliveryResult]]:
        """File ``blob`` for every address in one grouped transaction, all or nothing.

        For SMTP's acceptance: the content is durable in the blob store, and the
        Deferred fires once every address has it in its mailbox, committed.  It fails
        with :class:`NotFiled` (nothing filed, nothing committed) when any address
        cannot be filed right now (over quota, no mailbox, a directory or storage
        error): the caller queues the message instead, for the queue runner to
        deliver, defer or bounce as always.  Any other failure may come from the commit
        itself: the caller must not assume that nothing was filed.  ``before``: as
        for :meth:`deliver_to_mailbox` (when it fails, so does the Deferred, with its
        exception, and nothing is filed; NotFiled means it succeeded).
        """
        d: Deferred[tuple[list[DeliveryResult], list[MailboxChange]]] = self._write(
            "file_all", self._file_all_now, (list(addresses), blob, queue_id), before)

        def announce(outcome: tuple[list[DeliveryResult], list[MailboxChange]]
                     ) -> list[DeliveryResult]:
            results, changes = outcome
            for change in changes:
                self.mailstore._announce(change)  # type: ignore[attr-defined]
            return results
        return d.addCallback(announce)

    def _file_all_now(self, conn: Connection, addresses: list[str], blob: BlobRef,
                      queue_id: str) -> tuple[list[DeliveryResult], list[MailboxChange]]:
        results, changes = [], []
        for index, address in enumerate(addresses):
            try:
                result, more = self._file_now(conn, address, blob,
                                              acceptance_delivery_id(queue_id, index),
                                              "deferred", fresh=True)
            except Exception as exc:
                # Rolled back with this request's savepoint: nothing of it commits.
                raise NotFiled(f"{address}: {exc.__class__.__name__}: {exc}") from exc
            if result.status != "delivered":
                raise NotFiled(f"{address}: {result.detail}")
            results.append(result)
            changes += more
        return results, changes

    # -- through the interfaces -----------------------------------------------------

    @inlineCallbacks
    def _file_step_by_step(self, address: str, blob: BlobRef, delivery_id: str,
                           over_quota: str) -> Any:
        try:
            resolution = yield self.directory.resolve(address)
        except DirectoryError as exc:
            return DeliveryResult.deferred(f"4.3.0 {exc}")
        if not resolution.local:
            return DeliveryResult.bounced(NO_MAILBOX)
        filed, full = [], []
        for target in resolution.local:
            if target.user.quota_bytes:
                used = yield self.mailstore.usage(target.user.id)
                if used + blob.size > target.user.quota_bytes:
                    full.append(target.user.address)
                    continue
            mailbox = None
            if target.detail:
                mailbox = yield self.mailstore.get_mailbox(target.user.id, target.detail)
            if mailbox is None:
                mailbox = yield self.mailstore.get_or_create_mailbox(target.user.id, "INBOX")
            try:
                appended = yield self.mailstore.append(mailbox.id, blob,
                                                       delivery_id=delivery_id)
            except BlobMissing as exc:
                return DeliveryResult.deferred(f"4.3.0 {exc}")
            filed.append(_filed(target.user.address, mailbox.name, appended))
        return _outcome(filed, full, over_quota)


NO_MAILBOX = "5.1.1 no such local mailbox"


class NotFiled(Exception):
    """Filing at acceptance was not possible; nothing was filed or committed."""


def acceptance_delivery_id(queue_id: str, index: int) -> str:
    """The delivery id of a message filed as it is accepted (never a queue row's)."""
    return f"smtp/{queue_id}/{index}"


def _none(address: str) -> None:
    return None


def _outcome(filed: list[str], full: list[str], over_quota: str) -> DeliveryResult:
    """Delivered when any target got it (an alias to several users delivers to those
    with room); otherwise the mailbox is full, as a temporary or permanent failure."""
    if filed or not full:
        return DeliveryResult.delivered("2.0.0 " + ", ".join(filed))
    status = "4.2.2" if over_quota == "deferred" else "5.2.2"
    return DeliveryResult(over_quota, f"{status} mailbox full: {', '.join(full)} over quota")


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
