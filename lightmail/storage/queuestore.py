"""The durable mail queue in SQL (IQueueStore).

A queued message is one ``queue_messages`` row that holds a reference to its blob and
one ``queue_recipients`` row per recipient, which carries the delivery state.  Work is
claimed with a lease (owner + expiry) so that a crashed process's work is taken over
when its lease runs out, and so that several nodes can share one queue: on PostgreSQL
and MariaDB the claim uses ``SELECT ... FOR UPDATE SKIP LOCKED``; SQLite serialises
writers anyway.  When every recipient of a message is final, the message leaves the
queue and its blob reference is released.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from zope.interface import implementer

from lightmail.storage import schema as s
from lightmail.storage.database import Database, now_ms
from lightmail.storage.interfaces import (
    AlreadyWarned,
    BlobRef,
    Envelope,
    IBlobStore,
    IQueueStore,
    QueueItem,
    QueueRecipient,
)
from lightmail.storage.sqlstore import release_blob_refs, upsert_blob_ref

_B32 = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: ids never spell words


def new_queue_id() -> str:
    """A short, unique, time-sortable queue id such as ``1R7KD3QXBN5F2G``."""
    value = (int(time.time() * 1000) << 40) | int.from_bytes(os.urandom(5), "big")
    out = []
    while value:
        value, digit = divmod(value, len(_B32))
        out.append(_B32[digit])
    return "".join(reversed(out))


FINAL_STATES = ("delivered", "bounced")
DUE_STATES = ("queued", "deferred")

_r = s.queue_recipients
# Statements built once (executemany with bound parameters): the hot path of a drain.
_FINISH = _r.update().where(
    (_r.c.id == sa.bindparam("b_id")) & (_r.c.lease_owner == sa.bindparam("b_owner"))
).values(state=sa.bindparam("b_state"), last_error=sa.bindparam("b_error"),
         finished=sa.bindparam("b_now"), lease_owner=None, lease_until=None,
         attempts=_r.c.attempts + 1)
_DEFER = _r.update().where(
    (_r.c.id == sa.bindparam("b_id")) & (_r.c.lease_owner == sa.bindparam("b_owner"))
).values(state="deferred", last_error=sa.bindparam("b_error"),
         next_attempt=sa.bindparam("b_next"), lease_owner=None, lease_until=None,
         attempts=_r.c.attempts + 1)
_m = s.queue_messages
_due = (((_r.c.state.in_(DUE_STATES) & (_r.c.next_attempt <= sa.bindparam("b_now")))
         | ((_r.c.state == "active") & (_r.c.lease_until < sa.bindparam("b_now"))))
        & _r.c.transport.in_(sa.bindparam("b_transports", expanding=True)))
_DUE = (sa.select(_r.c.id).where(_due).order_by(_r.c.next_attempt)
        .limit(sa.bindparam("b_limit")))
_DUE_LOCKED = _DUE.with_for_update(skip_locked=True)
_LEASE = _r.update().where(_r.c.id.in_(sa.bindparam("b_ids", expanding=True))).values(
    state="active", lease_owner=sa.bindparam("b_owner"),
    lease_until=sa.bindparam("b_until"))
_CLAIMED = (sa.select(_r, _m.c.blob_id, _m.c.size, _m.c.mail_from, _m.c.envid, _m.c.ret,
                      _m.c.body, _m.c.smtputf8, _m.c.source, _m.c.auth_user,
                      _m.c.client_address, _m.c.priority, _m.c.folder,
                      _m.c.requiretls)
            .join(_m, _m.c.id == _r.c.queue_id)
            .where(_r.c.id.in_(sa.bindparam("b_ids", expanding=True)))
            .order_by(_m.c.priority.desc(), _r.c.next_attempt, _r.c.id))

# Retiring messages whose recipients are all final (_retire_done).
_LOCK_MESSAGES = (sa.select(_m.c.id, _m.c.blob_id)
                  .where(_m.c.id.in_(sa.bindparam("b_ids", expanding=True)))
                  .order_by(_m.c.id))
_LOCK_MESSAGES_FOR_UPDATE = _LOCK_MESSAGES.with_for_update()
_STILL_OPEN = (sa.select(_r.c.queue_id)
               .where(_r.c.queue_id.in_(sa.bindparam("b_ids", expanding=True))
                      & _r.c.state.not_in(FINAL_STATES)).distinct())
_DELETE_RECIPIENTS = _r.delete().where(
    _r.c.queue_id.in_(sa.bindparam("b_ids", expanding=True)))
_CENSUS = (sa.select(_r.c.state, sa.func.count(), sa.func.min(_m.c.received))
           .join(_m, _m.c.id == _r.c.queue_id).group_by(_r.c.state))
_DELETE_MESSAGES = _m.delete().where(_m.c.id.in_(sa.bindparam("b_ids", expanding=True)))


class _Finish(NamedTuple):
    recipient_id: int
    queue_id: str
    owner: str
    state: str                   # delivered, bounced
    error: str | None


@implementer(IQueueStore)
class SQLQueueStore:
    def __init__(self, db: Database, blobs: IBlobStore) -> None:
        self.db = db
        self.blobs = blobs

    def enqueue_now(self, conn: Connection, envelope: Envelope, blob: BlobRef,
                    queue_id: str | None = None) -> str:
        """Queue a message inside the caller's transaction (the write port's
        ``enqueue``: lightmail.storage.sqlwrites)."""
        if not envelope.recipients:
            raise ValueError("a queued message needs at least one recipient")
        queue_id = queue_id or new_queue_id()
        now = now_ms()
        upsert_blob_ref(conn, self.blobs, blob)
        conn.execute(s.queue_messages.insert().values(
            id=queue_id, blob_id=blob.id, size=blob.size, mail_from=envelope.mail_from,
            envid=envelope.envid, ret=envelope.ret, body=envelope.body,
            smtputf8=envelope.smtputf8, source=envelope.source,
            auth_user=envelope.auth_user, client_address=envelope.client_address,
            priority=envelope.priority, received=now, folder=envelope.folder,
            requiretls=envelope.requiretls))
        conn.execute(s.queue_recipients.insert(), [
            {"queue_id": queue_id, "recipient": rcpt.address, "orcpt": rcpt.orcpt,
             "notify": rcpt.notify, "state": "queued", "transport": rcpt.transport,
             "next_attempt": now, "attempts": 0}
            for rcpt in envelope.recipients])
        return queue_id

    def claim(self, owner: str, transports: Sequence[str], limit: int,
              lease_seconds: float) -> Deferred[list[QueueItem]]:
        return self.db.write(self._claim, owner, list(transports), limit, lease_seconds)

    def _claim(self, conn: Connection, owner: str, transports: list[str], limit: int,
               lease_seconds: float) -> list[QueueItem]:
        now = now_ms()
        locking = conn.dialect.name in ("postgresql", "mysql")
        ids = [row.id for row in conn.execute(
            _DUE_LOCKED if locking else _DUE,
            {"b_now": now, "b_transports": transports, "b_limit": limit})]
        if not ids:
            return []
        conn.execute(_LEASE, {"b_ids": ids, "b_owner": owner,
                              "b_until": now + int(lease_seconds * 1000)})
        return [_item(row) for row in conn.execute(_CLAIMED, {"b_ids": ids})]

    # One outcome each; the outcomes pending at once share a transaction, and
    # their statements (Database.write_merged: an executemany and a few IN lists).
    def delivered(self, item: QueueItem, owner: str) -> Deferred[None]:
        return self.db.write_merged(self._finish_many, _Finish(
            item.recipient_id, item.queue_id, owner, "delivered", None))

    def bounced(self, item: QueueItem, owner: str, error: str) -> Deferred[None]:
        return self.db.write_merged(self._finish_many, _Finish(
            item.recipient_id, item.queue_id, owner, "bounced", error))

    def dead(self, item: QueueItem, owner: str, error: str) -> Deferred[None]:
        return self.db.write_merged(self._finish_many, _Finish(
            item.recipient_id, item.queue_id, owner, "dead", error))

    def finish_now(self, conn: Connection, item: QueueItem, owner: str, state: str,
                   error: str | None) -> None:
        """Make a recipient final, inside the caller's transaction (so that a local
        delivery and its queue update commit together)."""
        self._finish_many(conn, [_Finish(item.recipient_id, item.queue_id, owner, state,
                                         error)])

    def _finish_many(self, conn: Connection, finishes: list[_Finish]) -> list[None]:
        now = now_ms()
        conn.execute(_FINISH, [{"b_id": f.recipient_id, "b_owner": f.owner,
                                "b_state": f.state, "b_error": f.error, "b_now": now}
                               for f in sorted(finishes)])
        self._retire_done(conn, {f.queue_id for f in finishes})
        return [None] * len(finishes)

    def deferred(self, item: QueueItem, owner: str, error: str,
                 next_attempt: int) -> Deferred[None]:
        return self.db.write_merged(self._defer_many, (item.recipient_id, owner, error,
                                                       next_attempt))

    def _defer_many(self, conn: Connection,
                    defers: list[tuple[int, str, str, int]]) -> list[None]:
        conn.execute(_DEFER, [{"b_id": rid, "b_owner": owner, "b_error": error,
                               "b_next": next_attempt}
                              for rid, owner, error, next_attempt in sorted(defers)])
        return [None] * len(defers)

    def _retire_done(self, conn: Connection, queue_ids: set[str]) -> None:
        """Remove the messages among ``queue_ids`` whose recipients are all final, and
        release their blob references.  The message rows are locked first (in id
        order), so that of two transactions finishing a message's last recipients
        the second waits for the first and then sees its recipient final."""
        if not queue_ids:
            return
        locking = conn.dialect.name != "sqlite"
        blobs = {row.id: row.blob_id for row in conn.execute(
            _LOCK_MESSAGES_FOR_UPDATE if locking else _LOCK_MESSAGES,
            {"b_ids": sorted(queue_ids)})}
        if not blobs:
            return
        still_open = {row.queue_id for row in conn.execute(_STILL_OPEN,
                                                           {"b_ids": list(blobs)})}
        done = [queue_id for queue_id in blobs if queue_id not in still_open]
        if not done:
            return
        conn.execute(_DELETE_RECIPIENTS, {"b_ids": done})
        conn.execute(_DELETE_MESSAGES, {"b_ids": done})
        release_blob_refs(conn, Counter(blobs[queue_id] for queue_id in done))

    def manage(self, action: str, queue_ids: Sequence[str] = ()) -> Deferred[int]:
        """Administer queued mail (``lightmail queue ...``), as postsuper does:
        hold (no more attempts), release (back from hold, due now), requeue (due now),
        delete (gone, no notice).  ``queue_ids`` empty means every message.  Fires with
        the number of recipients changed.  A delivery in progress finishes first."""
        r = s.queue_recipients
        sources = {"hold": ("queued", "deferred"), "release": ("held",),
                   "requeue": ("queued", "deferred", "held", "dead"),
                   "delete": ("queued", "deferred", "held", "dead")}[action]

        def manage_(conn: Connection) -> int:
            where: Any = r.c.state.in_(sources)
            if queue_ids:
                where &= r.c.queue_id.in_(list(queue_ids))
            if action == "delete":
                touched = [row.queue_id for row in conn.execute(
                    sa.select(r.c.queue_id).where(where).distinct())]
                count = conn.execute(r.delete().where(where)).rowcount
                self._retire_done(conn, set(touched))
                return int(count)
            values: dict[str, Any] = {"state": "held"} if action == "hold" else {
                "state": "deferred", "next_attempt": now_ms()}
            return int(conn.execute(r.update().where(where).values(**values)).rowcount)
        return self.db.write(manage_)

    def release_leases(self, owner: str) -> Deferred[int]:
        """Give back every lease ``owner`` holds: a node restarting after a crash
        retries its own interrupted deliveries at once instead of waiting for the
        leases to run out.  Fires with how many there were."""
        def release(conn: Connection) -> int:
            r = s.queue_recipients
            return int(conn.execute(r.update().where(
                (r.c.lease_owner == owner) & (r.c.state == "active")).values(
                state="deferred", next_attempt=now_ms(), lease_owner=None,
                lease_until=None)).rowcount)
        return self.db.write(release)

    def list_recipients(self, states: Sequence[str] = ()) -> Deferred[list[dict[str, Any]]]:
        def list_(conn: Connection) -> list[dict[str, Any]]:
            r, m = s.queue_recipients, s.queue_messages
            query = (sa.select(r.c.id, r.c.queue_id, r.c.recipient, r.c.state,
                               r.c.transport, r.c.attempts, r.c.next_attempt,
                               r.c.last_error, m.c.mail_from, m.c.size, m.c.received)
                     .join(m, m.c.id == r.c.queue_id).order_by(m.c.received, r.c.id))
            if states:
                query = query.where(r.c.state.in_(list(states)))
            return [dict(row._mapping) for row in conn.execute(query)]
        return self.db.read(list_)

    def find_messages(self, search: QueueSearch) -> Deferred[list[dict[str, Any]]]:
        """A page of queued messages, oldest first, each with its recipients (the
        admin API).  ``search.after`` is the last (received, queue id) of the page
        before; messages match when any of their recipients does."""
        def find(conn: Connection) -> list[dict[str, Any]]:
            r, m = s.queue_recipients, s.queue_messages
            wanted: Any = r.c.state.not_in(FINAL_STATES)
            if search.state:
                wanted &= r.c.state == search.state
            if search.recipient:
                wanted &= sa.func.lower(r.c.recipient) == search.recipient.lower()
            if search.domain:
                wanted &= sa.func.lower(r.c.recipient).like(
                    "%@" + _like_escaped(search.domain.lower()), escape="\\")
            query = sa.select(m).where(m.c.id.in_(sa.select(r.c.queue_id).where(wanted)))
            if search.sender is not None:
                query = query.where(sa.func.lower(m.c.mail_from) == search.sender.lower())
            if search.older_than_ms:
                query = query.where(m.c.received <= now_ms() - search.older_than_ms)
            if search.after is not None:
                received, queue_id = search.after
                query = query.where((m.c.received > received) | (
                    (m.c.received == received) & (m.c.id > queue_id)))
            messages = conn.execute(
                query.order_by(m.c.received, m.c.id).limit(search.limit)).all()
            return _with_recipients(conn, messages)
        return self.db.read(find)

    def message(self, queue_id: str) -> Deferred[dict[str, Any] | None]:
        """One queued message with its recipients and blob id; None when not queued."""
        def find(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(sa.select(s.queue_messages).where(
                s.queue_messages.c.id == queue_id)).first()
            return _with_recipients(conn, [row])[0] if row is not None else None
        return self.db.read(find)

    def claim_message(self, owner: str, queue_id: str,
                      lease_seconds: float) -> Deferred[list[QueueItem]]:
        """Lease every recipient of ``queue_id`` that is waiting (queued, deferred,
        held or dead) for ``owner``, whatever their next attempt: an administrator
        returns the message to its sender.  One being delivered is left to finish."""
        def claim(conn: Connection) -> list[QueueItem]:
            r = s.queue_recipients
            waiting = (r.c.queue_id == queue_id) & r.c.state.in_(
                ("queued", "deferred", "held", "dead"))
            select = sa.select(r.c.id).where(waiting)
            if conn.dialect.name != "sqlite":
                select = select.with_for_update()
            ids = [row.id for row in conn.execute(select)]
            if not ids:
                return []
            conn.execute(_LEASE, {"b_ids": ids, "b_owner": owner,
                                  "b_until": now_ms() + int(lease_seconds * 1000)})
            return [_item(row) for row in conn.execute(_CLAIMED, {"b_ids": ids})]
        return self.db.write(claim)

    def census(self) -> Deferred[list[tuple[str, int, float]]]:
        def count(conn: Connection) -> list[tuple[str, int, float]]:
            now = now_ms()
            rows = conn.execute(_CENSUS).all()
            return [(state, int(number), max(0.0, (now - int(oldest)) / 1000.0))
                    for state, number, oldest in rows]
        return self.db.read(count)

    def delayed_recipients(self, queue_id: str) -> Deferred[list[dict[str, Any]]]:
        def list_(conn: Connection) -> list[dict[str, Any]]:
            r = s.queue_recipients
            # Waiting after a failure: "deferred" with an error (a lease given back
            # after a crash of a first attempt is "deferred" without one).
            query = (sa.select(r.c.id, r.c.recipient, r.c.orcpt, r.c.notify,
                               r.c.last_error, r.c.attempts)
                     .where((r.c.queue_id == queue_id) & (r.c.state == "deferred")
                            & r.c.delay_warned.is_(None) & r.c.last_error.is_not(None))
                     .order_by(r.c.id))
            return [dict(row._mapping) for row in conn.execute(query)]
        return self.db.read(list_)

    @staticmethod
    def mark_warned_now(conn: Connection, recipient_ids: Sequence[int]) -> None:
        """Mark the recipients as warned of their delay, inside the caller's
        transaction; AlreadyWarned (roll it back) when any of them was already (by
        another node, say)."""
        ids = sorted(set(recipient_ids))
        r = s.queue_recipients
        marked = conn.execute(r.update().where(
            r.c.id.in_(ids) & r.c.delay_warned.is_(None)).values(
            delay_warned=now_ms())).rowcount
        if marked != len(ids):
            raise AlreadyWarned("a recipient was warned of its delay already")


@dataclass(frozen=True)
class QueueSearch:
    """What the admin API's queue listing asks for."""

    state: str | None = None
    sender: str | None = None          # the envelope sender, exactly ('' for <>)
    recipient: str | None = None       # one recipient, exactly
    domain: str | None = None          # a recipient's domain
    older_than_ms: int = 0             # arrived at least this long ago
    limit: int = 100
    after: tuple[int, str] | None = None


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _with_recipients(conn: Connection, messages: Sequence[Any]) -> list[dict[str, Any]]:
    if not messages:
        return []
    r = s.queue_recipients
    recipients: dict[str, list[dict[str, Any]]] = {row.id: [] for row in messages}
    for row in conn.execute(sa.select(r).where(r.c.queue_id.in_(list(recipients)))
                            .order_by(r.c.id)):
        if row.state not in FINAL_STATES:
            recipients[row.queue_id].append(dict(row._mapping))
    return [{**dict(row._mapping), "recipients": recipients[row.id]} for row in messages]


def _item(row: Any) -> QueueItem:
    recipient = QueueRecipient(address=row.recipient, transport=row.transport,
                               orcpt=row.orcpt, notify=row.notify)
    envelope = Envelope(mail_from=row.mail_from, recipients=(recipient,), source=row.source,
                        envid=row.envid, ret=row.ret, body=row.body,
                        smtputf8=bool(row.smtputf8), auth_user=row.auth_user,
                        client_address=row.client_address, priority=row.priority,
                        folder=row.folder, requiretls=bool(row.requiretls))
    return QueueItem(recipient_id=row.id, queue_id=row.queue_id, recipient=recipient,
                     mail_from=row.mail_from, blob=BlobRef(row.blob_id, row.size),
                     attempts=row.attempts, envelope=envelope,
                     delay_warned=row.delay_warned is not None)


def queue_id_time(queue_id: str) -> float:
    """The Unix time a queue id was made (0.0 if it is not one of ours)."""
    value = 0
    for char in queue_id:
        digit = _B32.find(char)
        if digit < 0:
            return 0.0
        value = value * len(_B32) + digit
    return (value >> 40) / 1000.0
