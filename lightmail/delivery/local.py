"""Local delivery: file a message into the mailboxes its recipient leads to.

The directory says where an address leads (users, ``user+detail`` folders, aliases);
the write port (lightmail.storage.interfaces.IWritePort) files it there.  Three
callers: the queue runner (``deliver``: the filing and the queue's record of it in
one transaction, so a recipient handed over twice after a crash is filed once), LMTP
(``deliver_each``: one answer per recipient) and SMTP's acceptance
(``deliver_at_acceptance``: every recipient in one transaction, all or nothing).

``user+detail@domain`` goes to the mailbox named ``detail`` when the user has one
(as Dovecot's lda_mailbox_autocreate=no does), otherwise to INBOX.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.directory.interfaces import DirectoryError, IDirectory, Resolution
from lightmail.queue.interfaces import DeliveryResult, IDeliveryAgent, IMailboxDelivery
from lightmail.storage.interfaces import (
    BlobMissing,
    Filed,
    Filing,
    FilingTarget,
    IStagedBlob,
    IWritePort,
    NotFiled,
    QueueItem,
)

NO_MAILBOX = "5.1.1 no such local mailbox"


@implementer(IDeliveryAgent, IMailboxDelivery)
class LocalDeliveryAgent:
    transport = "local"

    def __init__(self, directory: IDirectory, port: IWritePort, owner: str) -> None:
        self.directory = directory
        self.port = port
        #: This node's name in the queue's leases.
        self.owner = owner

    def prepare(self, items: list[QueueItem]) -> Deferred[list[QueueItem]]:
        return defer.succeed(items)     # filing never reads the content

    def deliver_held(self, item: QueueItem
                     ) -> Deferred[tuple[DeliveryResult, Callable[[], None]]]:
        return self.deliver(item).addCallback(lambda result: (result, _nothing))

    def stop_waiting(self) -> None:
        pass                            # a delivery starts at once: none waits

    def close(self) -> None:
        pass                            # no connections

    def deliver(self, item: QueueItem) -> Deferred[DeliveryResult]:
        """A queued recipient; over quota is temporary (the queue tries again)."""
        d = self._filing(item.recipient.address, delivery_id(item),
                         folder=item.envelope.folder)

        def file(filing: Filing | DeliveryResult
                 ) -> Deferred[DeliveryResult] | DeliveryResult:
            if isinstance(filing, DeliveryResult):
                return filing
            filed = self.port.file_queued(filing, item, self.owner)
            return filed.addCallback(_result, "deferred", True)
        result: Deferred[Any] = d.addCallback(file).addErrback(_temporary)
        return result

    def deliver_each(self, deliveries: Sequence[tuple[str, str]], blob: IStagedBlob,
                     folder: Optional[str] = None) -> list[Deferred[DeliveryResult]]:
        """File ``blob`` for each (address, delivery id) on its own (LMTP): one
        result each, in order.  The delivery ids are new (made for this message).
        Over quota is a permanent failure here (552 5.2.2, as Dovecot's LMTP answers
        by default): the sender keeps the message."""
        resolving = defer.gatherResults(
            [self._filing(address, delivery, fresh=True, folder=folder)
             for address, delivery in deliveries],
            consumeErrors=True)
        outs: list[Deferred[Any]] = [Deferred() for _ in deliveries]

        def file(filings: list[Filing | DeliveryResult]) -> None:
            wanted = [(out, filing) for out, filing in zip(outs, filings, strict=True)
                      if isinstance(filing, Filing)]
            if not wanted:
                blob.discard()
            filed = self.port.file([filing for _, filing in wanted], blob) if wanted else []
            for out, filing in zip(outs, filings, strict=True):
                if not isinstance(filing, Filing):
                    out.callback(filing)
            for (out, _), d in zip(wanted, filed, strict=True):
                one: Deferred[Any] = d.addCallback(_result, "bounced")
                one.addErrback(_temporary).chainDeferred(out)

        def failed(failure: Failure) -> None:
            blob.discard()
            for out in outs:
                out.errback(failure)
        resolving.addCallbacks(file, failed)
        return outs

    def deliver_at_acceptance(self, addresses: Sequence[str], blob: IStagedBlob,
                              queue_id: str, folder: Optional[str] = None
                              ) -> Deferred[list[DeliveryResult]]:
        """File ``blob`` for every address in one transaction, all or nothing (SMTP's
        acceptance: the 250 then means filed).  Fails with
        :class:`~lightmail.storage.interfaces.NotFiled` when any address cannot be
        filed now (nothing is filed, the blob is durable): the caller queues the
        message instead, with ``DurableBlob(blob.ref)``.  Any other failure may come
        from the commit itself: the caller must not assume that nothing was filed."""
        resolving = defer.gatherResults(
            [self._filing(address, acceptance_delivery_id(queue_id, index), fresh=True,
                          folder=folder)
             for index, address in enumerate(addresses)], consumeErrors=True)

        def file(filings: list[Filing | DeliveryResult]
                 ) -> Deferred[list[DeliveryResult]]:
            refused = [f"{address}: {f.detail}"
                       for address, f in zip(addresses, filings, strict=True)
                       if isinstance(f, DeliveryResult)]
            if refused:
                # NotFiled promises a durable blob (the message is queued with it).
                def not_filed(_: Any) -> Any:
                    raise NotFiled(refused[0])
                return blob.commit().addCallback(not_filed)
            d = self.port.accept([f for f in filings if isinstance(f, Filing)], blob)
            return d.addCallback(lambda all_filed: [_result(filed, "deferred")
                                                    for filed in all_filed])
        return resolving.addCallback(file)

    def _filing(self, address: str, delivery: str, fresh: bool = False,
                folder: Optional[str] = None) -> Deferred[Filing | DeliveryResult]:
        """Where ``address`` leads, as a Filing; or the result when it leads to no
        local mailbox (bounced).  ``folder`` (a quarantine: the inbound checks'
        Findings.folder) replaces the +detail folder."""
        def found(resolution: Resolution) -> Filing | DeliveryResult:
            if not resolution.local:
                return DeliveryResult.bounced(NO_MAILBOX)
            return Filing(tuple(FilingTarget(target.user.id, target.user.address,
                                             target.user.quota_bytes,
                                             folder or target.detail,
                                             create_folder=folder is not None)
                                for target in resolution.local), delivery, fresh)
        return self.directory.resolve(address).addCallback(found)


def _result(filed: Filed, over_quota: str, recorded: bool = False) -> DeliveryResult:
    """Delivered when any owner got it (an alias to several users delivers to those
    with room); otherwise the mailbox is full, as a temporary or permanent failure."""
    if filed.delivered:
        return DeliveryResult("delivered", "2.0.0 " + ", ".join(filed.placed),
                              recorded=recorded)
    status = "4.2.2" if over_quota == "deferred" else "5.2.2"
    return DeliveryResult(over_quota,
                          f"{status} mailbox full: {', '.join(filed.full)} over quota")


def _nothing() -> None:
    pass


def _temporary(failure: Failure) -> DeliveryResult | Failure:
    """A directory that cannot answer, a blob that went missing: try again later."""
    if failure.check(DirectoryError, BlobMissing):
        return DeliveryResult.deferred(f"4.3.0 {failure.getErrorMessage()}")
    return failure


def acceptance_delivery_id(queue_id: str, index: int) -> str:
    """The delivery id of a message filed as it is accepted (never a queue row's)."""
    return f"smtp/{queue_id}/{index}"


def delivery_id(item: QueueItem) -> str:
    """Names one delivery of one queued recipient, for idempotent appends.

    The queue id is part of it because row ids are not unique over time: SQLite hands
    a deleted row's id out again, and a bare row id would make a new message look
    like one already filed.
    """
    return f"{item.queue_id}/{item.recipient_id}"

