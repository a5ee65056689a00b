"""An application's own write port: LightMail's engine, plus an archive of its own.

    root = makeService(config, write_port=ArchivingWritePort)

docs/embedding.rst ("Your own write port") shows this class and explains the seam;
tests/test_embedding_port.py runs SMTP and IMAP over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from twisted.internet.defer import Deferred
from zope.interface import implementer

from lightmail.storage.interfaces import (
    Appended,
    Copied,
    Envelope,
    Filed,
    Filing,
    IStagedBlob,
    IWritePort,
    MessageInfo,
    QueueItem,
)


@implementer(IWritePort)
class ArchivingWritePort:
    """Runs every operation on ``inner``, the engine LightMail would run, and records
    what it did once the engine's result says it is durable.

    ``archive``: every message whose content became durable here (queued, accepted,
    filed, appended), by blob id, with where it went.  ``journal``: the operations on
    mail that was durable already (queued mail filed, flags, expunges, copies).
    """

    def __init__(self, inner: IWritePort) -> None:
        self.inner = inner
        self.archive: dict[str, list[str]] = {}
        self.journal: list[tuple[Any, ...]] = []

    def _archived(self, result: Any, blob_id: str, where: str) -> Any:
        self.archive.setdefault(blob_id, []).append(where)
        return result

    def _journaled(self, result: Any, *entry: Any) -> Any:
        self.journal.append((*entry, result))
        return result

    def enqueue(self, envelope: Envelope, blob: IStagedBlob,
                queue_id: Optional[str] = None) -> Deferred[str]:
        d = self.inner.enqueue(envelope, blob, queue_id)
        return d.addCallback(lambda qid: self._archived(qid, blob.ref.id, f"queued {qid}"))

    def accept(self, filings: Sequence[Filing], blob: IStagedBlob) -> Deferred[list[Filed]]:
        def done(filed: list[Filed]) -> list[Filed]:
            placed = ", ".join(p for f in filed for p in f.placed)
            return self._archived(filed, blob.ref.id, f"accepted {placed}")
        return self.inner.accept(filings, blob).addCallback(done)

    def file(self, filings: Sequence[Filing], blob: IStagedBlob) -> list[Deferred[Filed]]:
        # One Deferred per filing, each settled on its own: wrap each.
        def done(filed: Filed) -> Filed:
            return self._archived(filed, blob.ref.id, f"filed {', '.join(filed.placed)}")
        return [d.addCallback(done) for d in self.inner.file(filings, blob)]

    def file_queued(self, filing: Filing, item: QueueItem, owner: str) -> Deferred[Filed]:
        d = self.inner.file_queued(filing, item, owner)
        return d.addCallback(self._journaled, "file_queued", item.queue_id)

    def append(self, mailbox_id: int, blob: IStagedBlob, flags: Sequence[str],
               internal_date: int) -> Deferred[Appended]:
        def done(appended: Appended) -> Appended:
            where = f"appended mailbox={appended.mailbox_id} uid={appended.uid}"
            return self._archived(appended, blob.ref.id, where)
        return self.inner.append(mailbox_id, blob, flags, internal_date).addCallback(done)

    def append_many(self, mailbox_id: int,
                    messages: Sequence[tuple[IStagedBlob, Sequence[str], int]]
                    ) -> Deferred[list[Appended]]:
        def done(appended: list[Appended]) -> list[Appended]:
            for (blob, _, _), one in zip(messages, appended, strict=True):
                self._archived(one, blob.ref.id,
                               f"appended mailbox={one.mailbox_id} uid={one.uid}")
            return appended
        return self.inner.append_many(mailbox_id, messages).addCallback(done)

    def set_flags(self, mailbox_id: int, uids: Sequence[int], flags: Sequence[str],
                  mode: str) -> Deferred[list[MessageInfo]]:
        d = self.inner.set_flags(mailbox_id, uids, flags, mode)
        return d.addCallback(self._journaled, "set_flags", mailbox_id, tuple(flags), mode)

    def expunge(self, mailbox_id: int, uids: Sequence[int]) -> Deferred[list[int]]:
        d = self.inner.expunge(mailbox_id, uids)
        return d.addCallback(self._journaled, "expunge", mailbox_id)

    def copy(self, source_id: int, uids: Sequence[int], target_id: int,
             move: bool) -> Deferred[Copied]:
        d = self.inner.copy(source_id, uids, target_id, move)
        return d.addCallback(self._journaled, "move" if move else "copy", source_id,
                             target_id)

    def warn_delayed(self, recipient_ids: Sequence[int], notice: Envelope,
                     blob: IStagedBlob) -> Deferred[Optional[str]]:
        def done(qid: Optional[str]) -> Optional[str]:
            # None: another node warned them first, and nothing was queued here.
            return qid if qid is None else self._archived(qid, blob.ref.id,
                                                          f"delay notice {qid}")
        return self.inner.warn_delayed(recipient_ids, notice, blob).addCallback(done)
