"""The engines of the write port (IWritePort): grouped in this process, or the writer
process's.

Both run the same SQL (lightmail.storage.sqlwrites), as a named operation with its
arguments and the staged blob it makes durable first, and both announce the
committed changes on the storage's ChangeFeed before the caller hears of the
result.  Which one runs is decided once, where LightMail is wired
(lightmail.wiring): the writer process's engine is used by a server that runs from a
configuration file with ``[storage] writer_process = yes``; it writes in this process
through the grouped engine while the writer process is not there (starting, or
started again after it ended).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.storage.changes import ChangeFeed
from lightmail.storage.database import Database
from lightmail.storage.interfaces import (
    AlreadyWarned,
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
from lightmail.storage.queuestore import new_queue_id
from lightmail.storage.sqlwrites import Outcome, SQLWrites
from lightmail.storage.writerlink import WriterLink, WriterLost

#: Operations that file mail or queue it: grouped with each other (group commit).
#: IMAP's run as plain writes (which on SQLite are grouped too), and so does an
#: APPEND whose blob is durable already; a staged blob always goes in a group.
_DELIVERIES = frozenset(("enqueue", "warn_delayed", "accept", "file", "file_queued"))


class _Engine:
    """IWritePort's operations on top of one method, :meth:`_run`."""

    def __init__(self, feed: ChangeFeed, sync_flag_changes: bool) -> None:
        self.feed = feed
        #: Whether STORE's and EXPUNGE's commits are on disk before they are
        #: answered ([storage] sync_flag_changes; Database.write_unsynced if not).
        self.sync_flag_changes = sync_flag_changes

    def _run(self, op: str, args: tuple[Any, ...], blob: Optional[IStagedBlob],
             durable: bool) -> Deferred[Outcome]:
        """Run operation ``op(conn, *args)``, ``blob`` made durable first (None: no
        blob to make durable); fires with (result, changes) once committed."""
        raise NotImplementedError

    def _do(self, op: str, args: tuple[Any, ...], blob: Optional[IStagedBlob] = None,
            durable: bool = True) -> Deferred[Any]:
        if blob is not None and blob.durable:
            blob = None
        return self._run(op, args, blob, durable).addCallback(self._announced)

    def _announced(self, outcome: Outcome) -> Any:
        result, changes = outcome
        self.feed.announce(changes)
        return result

    # -- IWritePort ---------------------------------------------------------------------

    def enqueue(self, envelope: Envelope, blob: IStagedBlob,
                queue_id: Optional[str] = None) -> Deferred[str]:
        # The id is made here, not in the transaction: should the writer process die
        # before it answers, the id tells whether it had committed (WriterProcessPort).
        return self._do("enqueue", (envelope, blob.ref, queue_id or new_queue_id()), blob)

    def accept(self, filings: Sequence[Filing], blob: IStagedBlob) -> Deferred[list[Filed]]:
        return self._do("accept", (list(filings), blob.ref), blob)

    def file(self, filings: Sequence[Filing], blob: IStagedBlob) -> list[Deferred[Filed]]:
        if len(filings) == 1 or blob.durable:
            return [self._do("file", (filing, blob.ref), blob) for filing in filings]
        # Several: the blob is made durable once, first; then each on its own.
        outs: list[Deferred[Filed]] = [Deferred() for _ in filings]

        def each(_: Any) -> None:
            for filing, out in zip(filings, outs, strict=True):
                self._do("file", (filing, blob.ref)).chainDeferred(out)

        def none(failure: Failure) -> None:
            for out in outs:
                out.errback(failure)
        blob.commit().addCallbacks(each, none)
        return outs

    def file_queued(self, filing: Filing, item: QueueItem, owner: str) -> Deferred[Filed]:
        return self._do("file_queued", (filing, item, owner))

    def append(self, mailbox_id: int, blob: IStagedBlob, flags: Sequence[str],
               internal_date: int) -> Deferred[Appended]:
        return self._do("append", (mailbox_id, blob.ref, list(flags), internal_date), blob)

    def append_many(self, mailbox_id: int,
                    messages: Sequence[tuple[IStagedBlob, Sequence[str], int]]
                    ) -> Deferred[list[Appended]]:
        args = (mailbox_id, [(blob.ref, list(flags), date) for blob, flags, date in messages])
        staged = [blob for blob, _, _ in messages if not blob.durable]
        if not staged:
            return self._do("append_many", args)
        return self._make_durable(staged).addCallback(
            lambda _: self._do("append_many", args))

    def _make_durable(self, staged: list[IStagedBlob]) -> Deferred[None]:
        """Make staged blobs durable together (one flush per store, where the store
        can), off the reactor thread; fails with the first blob's error."""
        raise NotImplementedError

    def set_flags(self, mailbox_id: int, uids: Sequence[int], flags: Sequence[str],
                  mode: str) -> Deferred[list[MessageInfo]]:
        return self._do("set_flags", (mailbox_id, list(uids), list(flags), mode),
                        durable=self.sync_flag_changes)

    def expunge(self, mailbox_id: int, uids: Sequence[int]) -> Deferred[list[int]]:
        return self._do("expunge", (mailbox_id, list(uids)),
                        durable=self.sync_flag_changes)

    def copy(self, source_id: int, uids: Sequence[int], target_id: int,
             move: bool) -> Deferred[Copied]:
        return self._do("copy", (source_id, list(uids), target_id, move))

    def warn_delayed(self, recipient_ids: Sequence[int], notice: Envelope,
                     blob: IStagedBlob) -> Deferred[Optional[str]]:
        d = self._do("warn_delayed", (sorted(set(recipient_ids)), notice, blob.ref), blob)

        def already(failure: Failure) -> None:
            failure.trap(AlreadyWarned)
            return None
        return d.addErrback(already)


@implementer(IWritePort)
class GroupedWritePort(_Engine):
    """Writes in this process: the Database's group commit, where a group's staged
    blobs are made durable in the group's worker hop, with one flush."""

    def __init__(self, db: Database, writes: SQLWrites, feed: ChangeFeed,
                 sync_flag_changes: bool = True) -> None:
        super().__init__(feed, sync_flag_changes)
        self.db = db
        self.writes = writes

    def _run(self, op: str, args: tuple[Any, ...], blob: Optional[IStagedBlob],
             durable: bool) -> Deferred[Outcome]:
        fn = self.writes.operation(op)
        db = self.db
        if blob is not None:
            # In the group's hop when the store flushes a group's blobs at once, or
            # the group starts now; otherwise the blob is better made durable on the
            # I/O pool, beside other blobs and the commit in progress, than in the
            # group's thread one fsync after another (measured: at 10 LMTP
            # connections it was slower).
            if blob.store.batches_commits or db.groups_idle():
                return db.write_grouped_after(blob, fn, *args)
            return blob.commit().addCallback(lambda _: db.write_grouped(fn, *args))
        if op in _DELIVERIES:
            return db.write_grouped(fn, *args)
        return (db.write if durable else db.write_unsynced)(fn, *args)

    def _make_durable(self, staged: list[IStagedBlob]) -> Deferred[None]:
        return self.db.run(_commit_staged_now, staged)


@implementer(IWritePort)
class WriterProcessPort(_Engine):
    """Writes in the writer process (lightmail.storage.writer) over ``link``; through
    ``local`` while the writer process is not there."""

    def __init__(self, link: WriterLink, local: GroupedWritePort) -> None:
        super().__init__(local.feed, local.sync_flag_changes)
        self.link = link
        self.local = local

    def _run(self, op: str, args: tuple[Any, ...], blob: Optional[IStagedBlob],
             durable: bool) -> Deferred[Outcome]:
        if not self.link.ready:
            return self.local._run(op, args, blob, durable)
        try:
            handoff = blob.handoff() if blob is not None else None
        except Exception:
            return defer.fail()     # a blob discarded before its commit, say
        d = self.link.call(op, args, handoff, durable)
        if op in ("accept", "file", "enqueue"):
            d.addErrback(self._unless_filed, op, args)
        return d

    def _make_durable(self, staged: list[IStagedBlob]) -> Deferred[None]:
        return self.local._make_durable(staged)

    def _unless_filed(self, failure: Failure, op: str, args: tuple[Any, ...]) -> Any:
        """The writer process went away before it answered (WriterLost): had it
        committed?  The delivery ids say (made for this delivery, so found only if it
        was filed), or, for a message queued, its queue id (made by the caller).  If
        so, the result is "filed" (or the queue id), once its commit is made durable
        here (the writer may have died before its flush); if not, the failure
        stands, nothing was filed, and the sender's retry is safe.  Without this, a
        writer killed between its commit and its answer would have SMTP answer 451
        for a message already filed (or queued), and the retry would file (or queue,
        and so deliver) it twice."""
        if not failure.check(WriterLost):
            return failure
        db = self.local.db
        writes = self.local.writes
        d: Deferred[Any]
        if op == "enqueue":
            # Queued under the id made for it, or not at all (one transaction).
            queue_id = args[2]
            d = db.read(writes.queued_already_now, queue_id)
            d.addCallback(lambda found: queue_id if found else None)
        else:
            filings = list(args[0]) if op == "accept" else [args[0]]
            d = db.read(writes.filed_already_now, filings)
            d.addCallback(lambda results: results if results is None or op == "accept"
                          else results[0])

        def decide(result: Any) -> Any:
            if result is None:
                return failure
            return db.run(db.sync_now).addCallback(lambda _: (result, []))
        return d.addCallback(decide)


def _commit_staged_now(staged: list[IStagedBlob]) -> None:
    """Make staged blobs durable, each store's together (worker thread)."""
    by_store: dict[Any, list[IStagedBlob]] = {}
    for blob in staged:
        by_store.setdefault(blob.store, []).append(blob)
    errors = [error for store, blobs in by_store.items()
              for error in store.commit_staged_now(blobs) if error is not None]
    if errors:
        raise errors[0]
