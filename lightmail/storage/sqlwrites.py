"""The SQL of the write port: each operation inside the caller's transaction.

Both engines run these same functions (lightmail.storage.writeport): the grouped
transaction of this process, and the writer process's (lightmail.storage.writer).
Every operation is ``op(conn, *args) -> (result, changes)``: its result, and the
mailbox changes the engine announces once the transaction has committed.  A
function may run twice in one group (see ``Database.write_grouped``): it acts only
on the database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lightmail.storage import schema as s
from lightmail.storage.database import first_direct, now_ms, run_direct
from lightmail.storage.interfaces import (
    Appended,
    BlobRef,
    Copied,
    Envelope,
    Filed,
    Filing,
    FilingTarget,
    IBlobStore,
    Mailbox,
    MailboxChange,
    MessageInfo,
    NotFiled,
    QueueItem,
)
from lightmail.storage.queuestore import SQLQueueStore
from lightmail.storage.sqlstore import (
    _BUMP_BY_NAME,
    _EARLIER_DELIVERY,
    _FILED_WITH,
    _INSERT_EXPUNGED,
    _INSERT_MESSAGE,
    _LOCK_BY_NAME,
    _SET_FLAGS,
    _SET_HIGHESTMODSEQ,
    _UPDATE_UIDNEXT,
    SQLMailStore,
    _flag_sets,
    _flags_set,
    _flags_text,
    _lock_mailbox,
    _mailbox,
    _messages_by_uid,
    add_blob_refs,
    create_mailbox_unless_made_now,
    delete_messages,
    release_blob_refs,
    upsert_blob_ref,
)

Outcome = tuple[Any, list[MailboxChange]]

_QUEUED = sa.select(s.queue_messages.c.id).where(s.queue_messages.c.id == sa.bindparam("b_id"))


class SQLWrites:
    """The write port's operations on SQL (see the module docstring)."""

    def __init__(self, blobs: IBlobStore, queue: SQLQueueStore) -> None:
        self.blobs = blobs
        self.queue = queue

    def operation(self, name: str) -> Callable[..., Outcome]:
        """The operation called ``name`` (one of OPERATIONS)."""
        if name not in OPERATIONS:
            raise LookupError(f"no write operation {name!r}")
        return getattr(self, name + "_now")  # type: ignore[no-any-return]

    # -- the operations ---------------------------------------------------------------

    def enqueue_now(self, conn: Connection, envelope: Envelope, blob: BlobRef,
                    queue_id: Optional[str]) -> Outcome:
        return self.queue.enqueue_now(conn, envelope, blob, queue_id), []

    def warn_delayed_now(self, conn: Connection, recipient_ids: Sequence[int],
                         notice: Envelope, blob: BlobRef) -> Outcome:
        """AlreadyWarned (raised, so that the marks roll back) when any was warned."""
        self.queue.mark_warned_now(conn, recipient_ids)
        return self.queue.enqueue_now(conn, notice, blob), []

    def accept_now(self, conn: Connection, filings: Sequence[Filing],
                   blob: BlobRef) -> Outcome:
        """All or nothing: NotFiled (raised, so the request's savepoint rolls back
        whatever it did) when any filing cannot be delivered in full."""
        results, changes = [], []
        for filing in filings:
            try:
                filed, more = self.file_now(conn, filing, blob)
            except Exception as exc:
                raise NotFiled(f"{_who(filing)}: {exc.__class__.__name__}: {exc}") from exc
            if not filed.placed or filed.full:
                raise NotFiled(f"{_who(filing)}: " + (
                    f"over quota: {', '.join(filed.full)}" if filed.full else
                    "no mailbox owner"))
            results.append(filed)
            changes += more
        return results, changes

    def file_now(self, conn: Connection, filing: Filing, blob: BlobRef) -> Outcome:
        """File for each of the filing's owners (those with room)."""
        placed: list[str] = []
        full: list[str] = []
        changes: list[MailboxChange] = []
        for target in filing.targets:
            if target.quota_bytes and (SQLMailStore.usage_now(conn, target.user_id)
                                       + blob.size > target.quota_bytes):
                full.append(target.address)
                continue
            if filing.fresh:
                placed.append(self._file_fresh(conn, target, blob, filing.delivery_id,
                                               changes))
            else:
                placed.append(self._file_again(conn, target, blob, filing.delivery_id,
                                               changes))
        return Filed(tuple(placed), tuple(full)), changes

    def file_queued_now(self, conn: Connection, filing: Filing, item: QueueItem,
                        owner: str) -> Outcome:
        filed, changes = self.file_now(conn, filing, item.blob)
        if filed.delivered:
            self.queue.finish_now(conn, item, owner, "delivered", None)
        return filed, changes

    def filed_already_now(self, conn: Connection, filings: Sequence[Filing]
                          ) -> Optional[list[Filed]]:
        """Where each filing was filed, or None if nowhere (a read, for a writer that
        died before it answered: its filings were one transaction, so one found
        means all were)."""
        results, found = [], False
        for filing in filings:
            placed = []
            for target in filing.targets:
                row = first_direct(conn, _FILED_WITH, {"b_user": target.user_id,
                                                       "b_delivery": filing.delivery_id})
                if row is not None:
                    placed.append(f"{target.address}/{row.name} uid={int(row.uid)}")
            found = found or bool(placed)
            results.append(Filed(tuple(placed)))
        return results if found else None

    def queued_already_now(self, conn: Connection, queue_id: str) -> bool:
        """Whether a message is queued under ``queue_id`` (a read, as above)."""
        return first_direct(conn, _QUEUED, {"b_id": queue_id}) is not None

    def _file_again(self, conn: Connection, target: FilingTarget, blob: BlobRef,
                    delivery_id: str, changes: list[MailboxChange]) -> str:
        """Append under a delivery id that may have been filed before (a queued
        recipient handed over again): the mailbox is found and locked in one query,
        and an earlier append with the id is the answer."""
        box = None
        if target.folder:
            box = first_direct(conn, _LOCK_BY_NAME, {"b_user": target.user_id,
                                                     "b_name": target.folder})
            if box is None and target.create_folder:
                made = _create_folder(conn, target, changes)
                box = first_direct(conn, _LOCK_BY_NAME, {"b_user": target.user_id,
                                                         "b_name": made.name})
        if box is None:
            box = first_direct(conn, _LOCK_BY_NAME, {"b_user": target.user_id,
                                                     "b_name": "INBOX"})
        locked = box
        if box is None:
            box = _made_for_filing(conn, target.user_id, "INBOX", changes)
            if box is None:              # another node's writer made it meanwhile
                box = locked = first_direct(conn, _LOCK_BY_NAME, {
                    "b_user": target.user_id, "b_name": "INBOX"})
        user_id, appended = self._append(conn, box.id, blob, (), None, delivery_id,
                                         locked)
        if not appended.duplicate:
            changes.append(appended_change(user_id, blob, appended))
        return _placed(target.address, box.name, appended)

    def _file_fresh(self, conn: Connection, target: FilingTarget, blob: BlobRef,
                    delivery_id: str, changes: list[MailboxChange]) -> str:
        """Append with a new delivery id: the mailbox is found, locked and advanced in
        one statement (``_append_fresh``)."""
        user_id = target.user_id
        placed, name = None, "INBOX"
        if target.folder:
            placed, name = self._append_fresh(conn, user_id, target.folder, blob,
                                              delivery_id), target.folder
            if placed is None and target.create_folder:
                _create_folder(conn, target, changes)
                placed = self._append_fresh(conn, user_id, target.folder, blob,
                                            delivery_id)
        if placed is None:
            name = "INBOX"
            placed = self._append_fresh(conn, user_id, name, blob, delivery_id)
        if placed is None:
            # Made here, or by another node's writer meanwhile: there now either way.
            _made_for_filing(conn, user_id, name, changes)
            placed = self._append_fresh(conn, user_id, name, blob, delivery_id)
            assert placed is not None
        _, appended = placed
        changes.append(appended_change(user_id, blob, appended))
        return _placed(target.address, name, appended)

    def append_now(self, conn: Connection, mailbox_id: int, blob: BlobRef,
                   flags: Sequence[str], internal_date: int) -> Outcome:
        """IMAP APPEND: (Appended, its change)."""
        user_id, appended = self._append(conn, mailbox_id, blob, flags, internal_date)
        return appended, [appended_change(user_id, blob, appended, flags)]

    def append_many_now(self, conn: Connection, mailbox_id: int,
                        messages: Sequence[tuple[BlobRef, Sequence[str], int]]) -> Outcome:
        """Several APPENDs in order (MULTIAPPEND, an import): ([Appended], one change):
        consecutive UIDs and one new MODSEQ for them all, as COPY gives."""
        box = _lock_mailbox(conn, mailbox_id)
        uid, modseq = box.uidnext, box.highestmodseq + 1
        rows, results, infos = [], [], []
        for blob, flags, internal_date in messages:
            upsert_blob_ref(conn, self.blobs, blob)
            text = _flags_text(flags)
            rows.append({"mailbox_id": mailbox_id, "uid": uid, "modseq": modseq,
                         "blob_id": blob.id, "size": blob.size,
                         "internal_date": internal_date, "flags": text,
                         "delivery_id": None})
            results.append(Appended(mailbox_id, box.uidvalidity, uid, modseq,
                                    internal_date=internal_date))
            infos.append(MessageInfo(mailbox_id, uid, modseq, blob.id, blob.size,
                                     internal_date, _flag_sets[text]))
            uid += 1
        if not rows:
            return [], []
        run_direct(conn, _INSERT_MESSAGE, rows)
        run_direct(conn, _UPDATE_UIDNEXT, {"b_id": mailbox_id, "b_uidnext": uid,
                                           "b_modseq": modseq})
        return results, [MailboxChange(box.user_id, mailbox_id, "appended",
                                       tuple(info.uid for info in infos), modseq,
                                       tuple(infos))]

    def _append(self, conn: Connection, mailbox_id: int, blob: BlobRef,
                flags: Sequence[str] = (), internal_date: Optional[int] = None,
                delivery_id: Optional[str] = None,
                locked: Any = None) -> tuple[int, Appended]:
        """Append inside the caller's transaction; returns (user id, result).

        ``locked``: the mailbox row, already locked in this transaction.
        """
        box = locked if locked is not None else _lock_mailbox(conn, mailbox_id)
        if delivery_id is not None:
            earlier = first_direct(conn, _EARLIER_DELIVERY, {"b_box": mailbox_id,
                                                       "b_delivery": delivery_id})
            if earlier is not None:
                return box.user_id, Appended(mailbox_id, box.uidvalidity, earlier.uid,
                                             earlier.modseq, duplicate=True)
        upsert_blob_ref(conn, self.blobs, blob)
        uid, modseq = box.uidnext, box.highestmodseq + 1
        if internal_date is None:
            internal_date = now_ms()
        self._insert_message(conn, mailbox_id, uid, modseq, blob, flags, internal_date,
                             delivery_id)
        run_direct(conn, _UPDATE_UIDNEXT, {"b_id": mailbox_id, "b_uidnext": uid + 1,
                                           "b_modseq": modseq})
        return box.user_id, Appended(mailbox_id, box.uidvalidity, uid, modseq,
                                     internal_date=internal_date)

    @staticmethod
    def _insert_message(conn: Connection, mailbox_id: int, uid: int, modseq: int,
                        blob: BlobRef, flags: Sequence[str], internal_date: Optional[int],
                        delivery_id: Optional[str]) -> None:
        run_direct(conn, _INSERT_MESSAGE, {
            "mailbox_id": mailbox_id, "uid": uid, "modseq": modseq, "blob_id": blob.id,
            "size": blob.size,
            "internal_date": internal_date if internal_date is not None else now_ms(),
            "flags": _flags_text(flags), "delivery_id": delivery_id})

    def _append_fresh(self, conn: Connection, user_id: int, name: str, blob: BlobRef,
                         delivery_id: str) -> Optional[tuple[int, Appended]]:
        """Append to the user's mailbox ``name`` inside the caller's transaction, for a
        delivery id made for this transaction (no earlier append can carry it; the
        unique index would refuse one).  Returns (mailbox id, result), or None when the
        user has no such mailbox.  Two or three statements: the mailbox row is found,
        locked and advanced at once where the database has UPDATE ... RETURNING.
        """
        if conn.dialect.name in ("sqlite", "postgresql"):
            row = run_direct(conn, _BUMP_BY_NAME,
                             {"b_user": user_id, "b_name": name}).fetchone()
            if row is None:
                return None
            mailbox_id, uidvalidity, uidnext, modseq = row
            uid = uidnext - 1
        else:
            locked = conn.execute(_LOCK_BY_NAME, {"b_user": user_id, "b_name": name}).first()
            if locked is None:
                return None
            mailbox_id, uidvalidity = locked.id, locked.uidvalidity
            uid, modseq = locked.uidnext, locked.highestmodseq + 1
            conn.execute(_UPDATE_UIDNEXT, {"b_id": mailbox_id, "b_uidnext": uid + 1,
                                           "b_modseq": modseq})
        upsert_blob_ref(conn, self.blobs, blob)
        internal_date = now_ms()
        self._insert_message(conn, mailbox_id, uid, modseq, blob, (), internal_date,
                             delivery_id)
        return mailbox_id, Appended(mailbox_id, uidvalidity, uid, modseq,
                                    internal_date=internal_date)

    def set_flags_now(self, conn: Connection, mailbox_id: int, uids: Sequence[int],
                      flags: Sequence[str], mode: str) -> Outcome:
        """STORE: the messages changed."""
        box = _lock_mailbox(conn, mailbox_id)
        rows = _messages_by_uid(conn, mailbox_id, uids)
        modseq = box.highestmodseq
        changed = []
        updates = []
        given = frozenset(flags)
        for row in rows:
            old = _flags_set(row.flags)
            new = (given if mode == "replace" else
                   old | given if mode == "add" else old - given)
            if new == old:
                continue
            modseq += 1
            text = _flags_text(new)
            updates.append({"b_id": row.id, "b_flags": text, "b_modseq": modseq})
            changed.append(MessageInfo(mailbox_id, row.uid, modseq, row.blob_id,
                                       row.size, row.internal_date, _flag_sets[text]))
        if changed:
            run_direct(conn, _SET_FLAGS, updates)
            run_direct(conn, _SET_HIGHESTMODSEQ, {"b_id": mailbox_id, "b_modseq": modseq})
            return changed, [MailboxChange(box.user_id, mailbox_id, "flags",
                                           tuple(m.uid for m in changed), modseq,
                                           _announced(changed))]
        return changed, []

    def expunge_now(self, conn: Connection, mailbox_id: int,
                    uids: Sequence[int]) -> Outcome:
        """EXPUNGE: the UIDs gone."""
        box = _lock_mailbox(conn, mailbox_id)
        rows = _messages_by_uid(conn, mailbox_id, uids)
        if not rows:
            return [], []
        modseq = box.highestmodseq + 1
        delete_messages(conn, [row.id for row in rows])
        run_direct(conn, _INSERT_EXPUNGED, [
            {"mailbox_id": mailbox_id, "uid": row.uid, "modseq": modseq} for row in rows])
        release_blob_refs(conn, Counter(row.blob_id for row in rows))
        run_direct(conn, _SET_HIGHESTMODSEQ, {"b_id": mailbox_id, "b_modseq": modseq})
        gone = [row.uid for row in rows]
        return gone, [MailboxChange(box.user_id, mailbox_id, "expunged", tuple(gone),
                                    modseq)]

    def copy_now(self, conn: Connection, source_id: int, uids: Sequence[int],
                 target_id: int, move: bool = False) -> Outcome:
        """COPY/MOVE inside the caller's transaction: one new MODSEQ for the target
        (and one for the source's expunges), new UIDs in source UID order.  One
        statement per kind of row, not one per message (a COPY of 1:* in a mailbox
        of 300,000 messages spent minutes in per-message statements)."""
        # Lock in id order, so that two opposite moves cannot deadlock.
        boxes = {box_id: _lock_mailbox(conn, box_id)
                 for box_id in sorted({source_id, target_id})}
        source, target = boxes[source_id], boxes[target_id]
        rows = _messages_by_uid(conn, source_id, uids)
        if not rows:
            return Copied(target.uidvalidity), []
        first, modseq = target.uidnext, target.highestmodseq + 1
        run_direct(conn, _INSERT_MESSAGE, [{
            "mailbox_id": target_id, "uid": uid, "modseq": modseq,
            "blob_id": row.blob_id, "size": row.size, "internal_date": row.internal_date,
            "flags": row.flags, "envelope": row.envelope,
            "bodystructure": row.bodystructure, "headers": row.headers,
            "delivery_id": None} for uid, row in enumerate(rows, first)])
        uidnext = first + len(rows)
        run_direct(conn, _UPDATE_UIDNEXT, {"b_id": target_id, "b_uidnext": uidnext,
                                           "b_modseq": modseq})
        copies = () if len(rows) > ANNOUNCE_MESSAGES else tuple(
            MessageInfo(target_id, uid, modseq, row.blob_id, row.size,
                        row.internal_date, _flag_sets[row.flags])
            for uid, row in enumerate(rows, first))
        source_uids = [row.uid for row in rows]
        changes = [MailboxChange(target.user_id, target_id, "appended",
                                 tuple(range(first, uidnext)), modseq, copies)]
        if move:
            # The blobs change hands: their reference counts stay as they are.
            gone_modseq = (modseq if source_id == target_id else source.highestmodseq) + 1
            delete_messages(conn, [row.id for row in rows])
            run_direct(conn, _INSERT_EXPUNGED, [
                {"mailbox_id": source_id, "uid": uid, "modseq": gone_modseq}
                for uid in source_uids])
            run_direct(conn, _SET_HIGHESTMODSEQ, {"b_id": source_id,
                                                  "b_modseq": gone_modseq})
            changes.append(MailboxChange(source.user_id, source_id, "expunged",
                                         tuple(source_uids), gone_modseq))
        else:
            add_blob_refs(conn, Counter(row.blob_id for row in rows))
        return Copied.of(target.uidvalidity, source_uids, first), changes


#: The most messages a change is announced with (MailboxChange.messages).  A bigger
#: one goes with its UIDs only, and the sessions that hear of it read the store, in a
#: thread: 300,000 records took 0.5 s of the reactor to come out of pickle (the writer
#: process's answer, a worker's relay), and as long again through the sessions.
ANNOUNCE_MESSAGES = 1000


def _announced(messages: list[MessageInfo]) -> tuple[MessageInfo, ...]:
    return tuple(messages) if len(messages) <= ANNOUNCE_MESSAGES else ()


#: The operations of the write port, by the names the engines send.
OPERATIONS = ("enqueue", "warn_delayed", "accept", "file", "file_queued", "append",
              "append_many", "set_flags", "expunge", "copy")


def appended_change(user_id: int, blob: BlobRef, appended: Appended,
                    flags: Sequence[str] = ()) -> MailboxChange:
    """The announcement of an append made with ``_append`` or
    ``_append_fresh`` (not a duplicate), with the message as filed: a
    session that has the mailbox selected takes it in without a read."""
    return MailboxChange(
        user_id, appended.mailbox_id, "appended", (appended.uid,), appended.modseq,
        (MessageInfo(appended.mailbox_id, appended.uid, appended.modseq, blob.id,
                     blob.size, appended.internal_date,
                     _flag_sets[_flags_text(flags)]),))


def _placed(address: str, mailbox: str, appended: Appended) -> str:
    return (f"{address}/{mailbox} uid={appended.uid}"
            + (" (already filed)" if appended.duplicate else ""))


def _who(filing: Filing) -> str:
    return ", ".join(target.address for target in filing.targets) or filing.delivery_id


def _create_folder(conn: Connection, target: FilingTarget,
                   changes: list[MailboxChange]) -> Mailbox:
    """A quarantine's folder, made for an owner who lacks it (``create_folder``), or
    found made by another node's writer meanwhile."""
    assert target.folder is not None
    use = "\\Junk" if target.folder.lower() == "junk" else None
    box = _made_for_filing(conn, target.user_id, target.folder, changes, use)
    if box is None:
        row = first_direct(conn, _LOCK_BY_NAME, {"b_user": target.user_id,
                                                 "b_name": target.folder})
        assert row is not None
        box = _mailbox(row)
    return box


def _made_for_filing(conn: Connection, user_id: int, name: str,
                     changes: list[MailboxChange],
                     special_use: Optional[str] = None) -> Optional[Mailbox]:
    """Create mailbox ``name`` for a delivery (its change added to ``changes``), or
    None when another node's writer made it meanwhile (then the filing goes on into
    that one, rather than failing for a retry minutes later)."""
    box = create_mailbox_unless_made_now(conn, user_id, name, special_use)
    if box is not None:
        changes.append(MailboxChange(user_id, box.id, "created"))
    return box
