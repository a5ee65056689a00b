"""Mailboxes and messages in SQL (IMailStore), the one place UIDs and MODSEQs are made.

Each change runs in one write transaction that locks the mailbox row, so UIDs and
MODSEQs are strictly increasing per mailbox on every backend (RFC 3501 §2.3.1.1,
RFC 7162 §3.1.1).  Listeners hear about a change only after it has committed.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from lightmail.storage import schema as s
from lightmail.storage.blobs import HEADER_CAP, header_block
from lightmail.storage.changes import ChangeFeed
from lightmail.storage.database import (
    Database,
    first_direct,
    now_ms,
    rows_direct,
    run_direct,
)
from lightmail.storage.interfaces import (
    Appended,
    BlobMissing,
    BlobRef,
    Copied,
    IBlobStore,
    IChangeListener,
    IMailStore,
    IStagedBlob,
    IWritePort,
    Mailbox,
    MailboxChange,
    MailboxChanges,
    MailboxExists,
    MailboxStatus,
    MessageInfo,
    NoSuchMailbox,
    staged,
)

if TYPE_CHECKING:
    from lightmail.storage.sqlwrites import SQLWrites

# Statements of the delivery path, built once: SQLAlchemy then finds their compiled
# form by identity instead of building and hashing a new statement for every message.
_upserts: dict[str, Any] = {}


def _upsert_stmt(dialect: str) -> Any:
    stmt = _upserts.get(dialect)
    if stmt is not None:
        return stmt
    values = {"id": sa.bindparam("b_id"), "size": sa.bindparam("b_size"), "refcount": 1,
              "created": sa.bindparam("b_created"), "unreferenced_since": None,
              "headers": sa.bindparam("b_headers", type_=sa.LargeBinary)}
    update = {"refcount": s.blobs.c.refcount + 1, "unreferenced_since": None}
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        pg = pg_insert(s.blobs).values(values)
        stmt = pg.on_conflict_do_update(index_elements=[s.blobs.c.id], set_={
            **update, "headers": sa.func.coalesce(s.blobs.c.headers, pg.excluded.headers)})
    elif dialect == "mysql":
        from sqlalchemy.dialects.mysql import insert as my_insert
        my = my_insert(s.blobs).values(values)
        stmt = my.on_duplicate_key_update(
            refcount=s.blobs.c.refcount + 1, unreferenced_since=None,
            headers=sa.func.coalesce(s.blobs.c.headers, my.inserted.headers))
    else:
        from sqlalchemy.dialects.sqlite import insert as lite_insert
        lite = lite_insert(s.blobs).values(values)
        stmt = lite.on_conflict_do_update(index_elements=[s.blobs.c.id], set_={
            **update, "headers": sa.func.coalesce(s.blobs.c.headers, lite.excluded.headers)})
    _upserts[dialect] = stmt
    return stmt


def upsert_blob_ref(conn: Connection, blobs: IBlobStore, ref: BlobRef) -> None:
    """Count one more reference to ``ref``, inside the caller's write transaction.

    The blob must exist after the row is locked: garbage collection deletes a file only
    while holding the row, so checking here closes the race with a concurrent GC.
    """
    run_direct(conn, _upsert_stmt(conn.dialect.name),
               {"b_id": ref.id, "b_size": ref.size, "b_created": now_ms(),
                "b_headers": ref.headers})
    if not blobs.exists_now(ref.id):
        raise BlobMissing(f"blob {ref.id} vanished before it was referenced")


_INSERT_MESSAGE = s.messages.insert()
_UPDATE_UIDNEXT = s.mailboxes.update().where(
    s.mailboxes.c.id == sa.bindparam("b_id")).values(
    uidnext=sa.bindparam("b_uidnext"), highestmodseq=sa.bindparam("b_modseq"))
_LOCK_BY_NAME = sa.select(s.mailboxes).where(
    (s.mailboxes.c.user_id == sa.bindparam("b_user"))
    & (s.mailboxes.c.name == sa.bindparam("b_name"))).with_for_update()
# Lock, read and advance in one statement where UPDATE ... RETURNING exists.
_BUMP_BY_NAME = s.mailboxes.update().where(
    (s.mailboxes.c.user_id == sa.bindparam("b_user"))
    & (s.mailboxes.c.name == sa.bindparam("b_name"))).values(
    uidnext=s.mailboxes.c.uidnext + 1,
    highestmodseq=s.mailboxes.c.highestmodseq + 1).returning(
    s.mailboxes.c.id, s.mailboxes.c.uidvalidity, s.mailboxes.c.uidnext,
    s.mailboxes.c.highestmodseq)


def release_blob_ref(conn: Connection, blob_id: str, count: int = 1) -> None:
    """Count ``count`` fewer references, inside the caller's write transaction."""
    release_blob_refs(conn, {blob_id: count})


_RELEASE = s.blobs.update().where(s.blobs.c.id == sa.bindparam("b_id")).values(
    refcount=s.blobs.c.refcount - sa.bindparam("b_count"))

_UNREFERENCED = s.blobs.update().where(
    s.blobs.c.id.in_(sa.bindparam("b_ids", expanding=True)) & (s.blobs.c.refcount <= 0)
    & s.blobs.c.unreferenced_since.is_(None)).values(
    unreferenced_since=sa.bindparam("b_now"))


def release_blob_refs(conn: Connection, counts: Mapping[str, int]) -> None:
    """Count fewer references to several blobs (``counts``: blob id -> how many
    fewer), inside the caller's write transaction; rows updated in id order."""
    ids = sorted(counts)
    if not ids:
        return
    run_direct(conn, _RELEASE, [{"b_id": blob_id, "b_count": counts[blob_id]}
                                for blob_id in ids])
    now = now_ms()
    for chunk in in_chunks(ids):
        conn.execute(_UNREFERENCED, {"b_ids": chunk, "b_now": now})


_ADD_REFS = s.blobs.update().where(s.blobs.c.id == sa.bindparam("b_id")).values(
    refcount=s.blobs.c.refcount + sa.bindparam("b_count"), unreferenced_since=None)


def add_blob_refs(conn: Connection, counts: Mapping[str, int]) -> None:
    """Count more references to blobs that are referenced already (COPY: by the
    messages copied, whose rows this transaction holds, so that garbage collection,
    which takes only blobs nothing refers to, cannot have them), in id order."""
    ids = sorted(counts)
    if ids:
        run_direct(conn, _ADD_REFS, [{"b_id": blob_id, "b_count": counts[blob_id]}
                                     for blob_id in ids])


def normalise_mailbox_name(name: str) -> str:
    """INBOX is case-insensitive (RFC 3501 §5.1); every other name is kept as given."""
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX/":
        return "INBOX/" + name[6:]
    return name


def _flags_text(flags: Sequence[str] | frozenset[str]) -> str:
    return " ".join(sorted(set(flags)))


class _FlagSets(dict[str, frozenset[str]]):
    """The flags column's text -> its frozenset, one shared object per distinct text:
    most messages carry one of a handful of flag sets, and a SELECTed mailbox then
    holds a few frozensets rather than one per message (about 200 octets each)."""

    LIMIT = 4096        # distinct texts kept (keywords could make many); then restart

    def __missing__(self, text: str) -> frozenset[str]:
        if len(self) >= self.LIMIT:
            self.clear()
        value = self[text] = frozenset(text.split())
        return value


# Shared by all threads: a dict's get and set are atomic, and a lost entry after a
# concurrent clear() is only recomputed.
_flag_sets = _FlagSets()


def _flags_set(text: str) -> frozenset[str]:
    return _flag_sets[text]


def _mailbox(row: Any) -> Mailbox:
    return Mailbox(id=row.id, user_id=row.user_id, name=row.name,
                   uidvalidity=row.uidvalidity, uidnext=row.uidnext,
                   highestmodseq=row.highestmodseq, special_use=row.special_use,
                   subscribed=bool(row.subscribed))


def _message(row: Any) -> MessageInfo:
    return MessageInfo(row.mailbox_id, row.uid, row.modseq, row.blob_id, row.size,
                       row.internal_date, _flag_sets[row.flags])


# Only the columns a MessageInfo needs (the messages table also has text caches).
_m = s.messages.c
_LIST_MESSAGES = sa.select(_m.uid, _m.modseq, _m.blob_id, _m.size, _m.internal_date,
                           _m.flags).where(_m.mailbox_id == sa.bindparam("b_box")
                                           ).order_by(_m.uid)


# The same on SQLite, as one row: a JSON array of the rows (see _rows_as_one).
_LIST_MESSAGES_JSON = (
    "SELECT json_group_array(json_array(uid, modseq, blob_id, size, internal_date, flags))"
    " FROM (SELECT uid, modseq, blob_id, size, internal_date, flags FROM messages"
    " WHERE mailbox_id = ? ORDER BY uid)")


# A page of them (lightmail export reads a large mailbox a part at a time).
_MESSAGES_PAGE = sa.select(_m.uid, _m.modseq, _m.blob_id, _m.size, _m.internal_date,
                           _m.flags).where(
    (_m.mailbox_id == sa.bindparam("b_box")) & (_m.uid > sa.bindparam("b_after"))
).order_by(_m.uid).limit(sa.bindparam("b_limit"))


def _rows_as_one(conn: Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    """The rows of a SQLite query that gives them all as one JSON array of arrays, in
    the order of its inner ORDER BY (its first column), as lists.

    Why: the driver gives up Python's GIL for each row it steps to, and a worker
    thread must then win it back from the reactor thread, which under load holds it
    most of the time: measured beside a busy thread, 100 rows took 24 ms one by one
    and 6 ms as one row (0.1 ms either way when nothing else runs).
    """
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    (text,) = cursor.execute(sql, params).fetchone()
    rows: list[Any] = json.loads(text)
    # json_group_array keeps the inner query's order in practice; SQLite does not
    # promise it before 3.44 (ORDER BY inside an aggregate), so make sure (a sort of
    # sorted rows is one pass).
    rows.sort(key=itemgetter(0))
    return rows


# headers_for: UIDs per query, and the statements.
HEADERS_BATCH = 500
_HEADERS = sa.select(_m.uid, _m.blob_id, s.blobs.c.headers).select_from(
    s.messages.join(s.blobs, s.blobs.c.id == _m.blob_id)).where(
    (_m.mailbox_id == sa.bindparam("b_box"))
    & _m.uid.in_(sa.bindparam("b_uids", expanding=True)))
# The same on SQLite, as one row (see _rows_as_one); the header blocks in hex (and a
# missing one as null: SQLite's hex(NULL) is '').
_HEADERS_JSON = (
    "SELECT json_group_array(json_array(uid, blob_id, headers)) FROM ("
    " SELECT m.uid AS uid, m.blob_id AS blob_id,"
    "  CASE WHEN b.headers IS NULL THEN NULL ELSE hex(b.headers) END AS headers"
    " FROM messages AS m JOIN blobs AS b ON b.id = m.blob_id"
    " WHERE m.mailbox_id = ? AND m.uid IN (SELECT value FROM json_each(?))"
    " ORDER BY m.uid)")
_FILL_HEADERS = s.blobs.update().where(
    (s.blobs.c.id == sa.bindparam("b_id")) & s.blobs.c.headers.is_(None)).values(
    headers=sa.bindparam("b_headers", type_=sa.LargeBinary))


def _all_tuples(result: Any) -> list[Any]:
    """All rows of :func:`run_direct`'s cursor or SQLAlchemy Result, as tuples."""
    if isinstance(result, sa.engine.Result):
        return _raw_rows(result)
    return result.fetchall()  # type: ignore[no-any-return]


def _raw_rows(result: Any) -> list[Any]:
    """All rows of a result as the driver gives them (for columns that need no
    SQLAlchemy result processing: integers, strings, bytes): iterating SQLAlchemy's
    Rows, one fetchone each, cost a third or more of reading a big mailbox."""
    cursor = result.cursor
    rows = cursor.fetchall() if cursor is not None else result.fetchall()
    result.close()
    return rows  # type: ignore[no-any-return]


# The statements of STORE, EXPUNGE, COPY and MOVE, built once (building and caching
# an expression costs more than running it on SQLite).
_LOCK_BY_ID = sa.select(s.mailboxes).where(
    s.mailboxes.c.id == sa.bindparam("b_id")).with_for_update()
_BY_UIDS = sa.select(s.messages).where(
    (s.messages.c.mailbox_id == sa.bindparam("b_box"))
    & s.messages.c.uid.in_(sa.bindparam("b_uids", expanding=True))).order_by(
    s.messages.c.uid)
_BY_ONE_UID = sa.select(s.messages).where(
    (s.messages.c.mailbox_id == sa.bindparam("b_box"))
    & (s.messages.c.uid == sa.bindparam("b_uid")))
_SET_FLAGS = s.messages.update().where(s.messages.c.id == sa.bindparam("b_id")).values(
    flags=sa.bindparam("b_flags"), modseq=sa.bindparam("b_modseq"))
_SET_HIGHESTMODSEQ = s.mailboxes.update().where(
    s.mailboxes.c.id == sa.bindparam("b_id")).values(
    highestmodseq=sa.bindparam("b_modseq"))
_DELETE_MESSAGES = s.messages.delete().where(
    s.messages.c.id.in_(sa.bindparam("b_ids", expanding=True)))
_INSERT_EXPUNGED = s.expunged.insert()
_BY_NAME = sa.select(s.mailboxes).where(
    (s.mailboxes.c.user_id == sa.bindparam("b_user"))
    & (s.mailboxes.c.name == sa.bindparam("b_name")))
_BY_ID = sa.select(s.mailboxes).where(s.mailboxes.c.id == sa.bindparam("b_id"))
_MAILBOXES_OF = sa.select(s.mailboxes).where(
    s.mailboxes.c.user_id == sa.bindparam("b_user")).order_by(s.mailboxes.c.name)
_FILED_WITH = sa.select(s.mailboxes.c.name, s.messages.c.uid).select_from(
    s.messages.join(s.mailboxes, s.mailboxes.c.id == s.messages.c.mailbox_id)).where(
    (s.mailboxes.c.user_id == sa.bindparam("b_user"))
    & (s.messages.c.delivery_id == sa.bindparam("b_delivery")))
_EARLIER_DELIVERY = sa.select(s.messages.c.uid, s.messages.c.modseq).where(
    (s.messages.c.mailbox_id == sa.bindparam("b_box"))
    & (s.messages.c.delivery_id == sa.bindparam("b_delivery")))
_COUNTS = sa.select(
    sa.func.count(),
    sa.func.coalesce(sa.func.sum(s.messages.c.size), 0),
    sa.func.coalesce(sa.func.sum(sa.case(
        (s.messages.c.flags.contains("\\Seen", autoescape=True), 0), else_=1)), 0),
    sa.func.coalesce(sa.func.sum(sa.case(
        (s.messages.c.flags.contains("\\Deleted", autoescape=True), 1), else_=0)), 0),
    sa.func.coalesce(sa.func.sum(sa.case(
        (s.messages.c.uid >= sa.bindparam("b_from_uid"), 1), else_=0)), 0),
).where(s.messages.c.mailbox_id == sa.bindparam("b_box"))
_CHANGED_SINCE = sa.select(s.messages).where(
    (s.messages.c.mailbox_id == sa.bindparam("b_box"))
    & (s.messages.c.modseq > sa.bindparam("b_modseq"))).order_by(s.messages.c.uid)
_EXPUNGED_SINCE = sa.select(s.expunged.c.uid).where(
    (s.expunged.c.mailbox_id == sa.bindparam("b_box"))
    & (s.expunged.c.modseq > sa.bindparam("b_modseq"))).order_by(s.expunged.c.uid)
_USAGE = sa.select(sa.func.coalesce(sa.func.sum(s.messages.c.size), 0)).select_from(
    s.messages.join(s.mailboxes, s.messages.c.mailbox_id == s.mailboxes.c.id)).where(
    s.mailboxes.c.user_id == sa.bindparam("b_user"))


def _lock_mailbox(conn: Connection, mailbox_id: int) -> Any:
    row = first_direct(conn, _LOCK_BY_ID, {"b_id": mailbox_id})
    if row is None:
        raise NoSuchMailbox(f"no mailbox with id {mailbox_id}")
    return row


# Values bound in one IN (...) at most: SQLite allows 32,766 (250,000 in Debian's
# build), PostgreSQL's and MariaDB's protocols 65,535; a STORE 1:* in a mailbox of
# 300,000 messages went over and failed.
IN_CHUNK = 10_000


def in_chunks(values: Sequence[Any]) -> list[list[Any]]:
    """``values`` cut into lists of IN_CHUNK at most, for statements with an IN."""
    values = list(values)
    return [values[start:start + IN_CHUNK] for start in range(0, len(values), IN_CHUNK)]


def _messages_by_uid(conn: Connection, mailbox_id: int, uids: Sequence[int]) -> list[Any]:
    """The rows of the given UIDs, in UID order (the mailbox row is locked already)."""
    if len(uids) == 1:          # the common STORE or EXPUNGE: no expanding IN (...)
        return rows_direct(conn, _BY_ONE_UID, {"b_box": mailbox_id, "b_uid": uids[0]})
    rows: list[Any] = []
    for chunk in in_chunks(sorted(uids)):
        rows += conn.execute(_BY_UIDS, {"b_box": mailbox_id, "b_uids": chunk})
    return rows


def delete_messages(conn: Connection, row_ids: Sequence[int]) -> None:
    """Delete the messages with these row ids, inside the caller's transaction."""
    for chunk in in_chunks(row_ids):
        conn.execute(_DELETE_MESSAGES, {"b_ids": chunk})


_last_uidvalidity = 0


def new_uidvalidity(user_id: int, name: str) -> int:
    """A UIDVALIDITY that differs for a mailbox re-created under the same name."""
    # Seconds since 2020 keep it under 2**32 (RFC 3501 nz-number) until 2156; the
    # low bits mix in the name so that two mailboxes made in one second differ.
    # Within a process it also only grows: a mailbox deleted and re-created in the
    # same second must not get its old UIDVALIDITY back (RFC 9051 §2.3.1.1: UID 1
    # would name two messages).
    global _last_uidvalidity
    base = int(time.time()) - 1577836800
    value = ((base << 4) | (zlib.crc32(f"{user_id}/{name}".encode()) & 0xF)) & 0xFFFFFFFF
    _last_uidvalidity = max(value, _last_uidvalidity + 1) & 0xFFFFFFFF or 1
    return _last_uidvalidity


def create_mailbox_now(conn: Connection, user_id: int, name: str,
                       special_use: Optional[str] = None,
                       subscribed: bool = True) -> Mailbox:
    """Create a mailbox inside the caller's transaction (MailboxExists if it is there)."""
    exists = conn.execute(sa.select(s.mailboxes.c.id).where(
        (s.mailboxes.c.user_id == user_id) & (s.mailboxes.c.name == name))).first()
    if exists is not None:
        raise MailboxExists(f"mailbox {name!r} exists already")
    if take_subscription_now(conn, user_id, name):
        subscribed = True              # the name was subscribed before (§6.3.7)
    result = conn.execute(s.mailboxes.insert().values(
        user_id=user_id, name=name, uidvalidity=new_uidvalidity(user_id, name),
        uidnext=1, highestmodseq=1, special_use=special_use, subscribed=subscribed,
        created=now_ms()))
    key = result.inserted_primary_key
    assert key is not None
    row = conn.execute(sa.select(s.mailboxes).where(s.mailboxes.c.id == key[0])).one()
    return _mailbox(row)


def create_mailbox_unless_made_now(conn: Connection, user_id: int, name: str,
                                   special_use: Optional[str] = None
                                   ) -> Optional[Mailbox]:
    """Create a mailbox that was found missing, or None when another transaction made
    it meanwhile.  One process's writes make mailboxes one transaction at a time,
    but two nodes can both find a user's INBOX missing (a first delivery, or a first
    login, on each at once): the second INSERT then meets the unique (user, name) key
    once the first commits.  In a savepoint, so that only the INSERT is undone; the
    caller then reads the other's mailbox with a locking read (``_LOCK_BY_NAME``),
    which sees its commit whatever the isolation level."""
    try:
        with conn.begin_nested():
            return create_mailbox_now(conn, user_id, name, special_use)
    except (sa.exc.IntegrityError, MailboxExists):
        return None


def take_subscription_now(conn: Connection, user_id: int, name: str) -> bool:
    """Take a subscription to ``name`` out of ``subscriptions`` (a mailbox of that
    name is being made); whether there was one."""
    taken = conn.execute(s.subscriptions.delete().where(
        (s.subscriptions.c.user_id == user_id) & (s.subscriptions.c.name == name)))
    return bool(taken.rowcount)


def keep_subscription_now(conn: Connection, user_id: int, name: str) -> None:
    """Keep a subscription to ``name``, whose mailbox is going (RFC 9051 §6.3.7)."""
    conn.execute(s.subscriptions.insert().values(user_id=user_id, name=name))


@implementer(IMailStore)
class SQLMailStore:
    log = Logger()

    def __init__(self, db: Database, blobs: IBlobStore, feed: ChangeFeed,
                 port: IWritePort, writes: SQLWrites) -> None:
        self.db = db
        self.blobs = blobs
        #: Where committed changes are announced (the write port's too).
        self.feed = feed
        #: Mail is filed, flagged, expunged and copied through the port.
        self.port = port
        #: The SQL of those writes, for the one this store runs itself (RENAME INBOX).
        self.writes = writes

    def add_listener(self, listener: IChangeListener) -> None:
        self.feed.add_listener(listener)

    def _announcing(self, d: Deferred[Any], make: Any) -> Deferred[Any]:
        def announce(result: Any) -> Any:
            self.feed.announce(make(result))
            return result
        return d.addCallback(announce)

    # -- mailboxes ------------------------------------------------------------------

    def create_mailbox(self, user_id: int, name: str,
                       special_use: Optional[str] = None,
                       subscribed: bool = True) -> Deferred[Mailbox]:
        name = normalise_mailbox_name(name)
        d = self.db.write(self.create_mailbox_now, user_id, name, special_use, subscribed)
        return self._announcing(d, lambda mb: [MailboxChange(user_id, mb.id, "created")])

    @staticmethod
    def create_mailbox_now(conn: Connection, user_id: int, name: str,
                           special_use: Optional[str] = None,
                           subscribed: bool = True) -> Mailbox:
        return create_mailbox_now(conn, user_id, name, special_use, subscribed)

    def get_mailbox(self, user_id: int, name: str) -> Deferred[Optional[Mailbox]]:
        return self.db.read(self._get_mailbox, user_id, normalise_mailbox_name(name))

    @staticmethod
    def _get_mailbox(conn: Connection, user_id: int, name: str) -> Optional[Mailbox]:
        row = first_direct(conn, _BY_NAME, {"b_user": user_id, "b_name": name})
        return None if row is None else _mailbox(row)

    def get_or_create_mailbox(self, user_id: int, name: str) -> Deferred[Mailbox]:
        """The named mailbox, created first if it is missing (INBOX on first delivery)."""
        name = normalise_mailbox_name(name)

        def get_or_create(conn: Connection) -> tuple[Mailbox, bool]:
            found = self._get_mailbox(conn, user_id, name)
            if found is not None:
                return found, False
            made = create_mailbox_unless_made_now(conn, user_id, name)
            if made is not None:
                return made, True
            # Made by another node meanwhile (two first logins at once).
            row = first_direct(conn, _LOCK_BY_NAME, {"b_user": user_id, "b_name": name})
            return _mailbox(row), False

        d = self.db.write(get_or_create)
        d = self._announcing(d, lambda res: [MailboxChange(user_id, res[0].id, "created")]
                             if res[1] else [])
        return d.addCallback(lambda res: res[0])

    def list_mailboxes(self, user_id: int) -> Deferred[list[Mailbox]]:
        def list_(conn: Connection) -> list[Mailbox]:
            rows = conn.execute(_MAILBOXES_OF, {"b_user": user_id})
            return [_mailbox(row) for row in rows]
        return self.db.read(list_)

    # -- messages -------------------------------------------------------------------

    def append(self, mailbox_id: int, blob: IStagedBlob | BlobRef,
               flags: Sequence[str] = (),
               internal_date: Optional[int] = None) -> Deferred[Appended]:
        return self.port.append(mailbox_id, staged(blob), list(flags),
                                now_ms() if internal_date is None else internal_date)

    def list_messages(self, mailbox_id: int) -> Deferred[list[MessageInfo]]:
        return self.db.read(self._list_messages, mailbox_id)

    @staticmethod
    def _list_messages(conn: Connection, mailbox_id: int) -> list[MessageInfo]:
        # Plain tuples straight from the driver's rows: this runs once per message
        # of the mailbox at every SELECT (100,000 for a big one).
        flag_sets, info = _flag_sets, MessageInfo
        if conn.dialect.name == "sqlite":
            rows = _rows_as_one(conn, _LIST_MESSAGES_JSON, (mailbox_id,))
        else:
            rows = _all_tuples(run_direct(conn, _LIST_MESSAGES, {"b_box": mailbox_id}))
        return [info(mailbox_id, uid, modseq, blob_id, size, date, flag_sets[flags])
                for uid, modseq, blob_id, size, date, flags in rows]

    def messages_page(self, mailbox_id: int, after_uid: int, limit: int
                      ) -> Deferred[list[MessageInfo]]:
        def page(conn: Connection) -> list[MessageInfo]:
            rows = conn.execute(_MESSAGES_PAGE, {"b_box": mailbox_id, "b_after": after_uid,
                                                 "b_limit": limit})
            return [MessageInfo(mailbox_id, row.uid, row.modseq, row.blob_id, row.size,
                                row.internal_date, _flag_sets[row.flags]) for row in rows]
        return self.db.read(page)

    def select_mailbox(self, user_id: int, name: str
                       ) -> Deferred[Optional[tuple[Mailbox, list[MessageInfo]]]]:
        name = normalise_mailbox_name(name)

        def select(conn: Connection) -> Optional[tuple[Mailbox, list[MessageInfo]]]:
            # The row first, then the list: in one SQLite read transaction both come
            # from one snapshot; under READ COMMITTED (PostgreSQL, MariaDB) the list
            # may be newer than the row, never older, which is all the caller needs.
            box = self._get_mailbox(conn, user_id, name)
            if box is None:
                return None
            return box, self._list_messages(conn, box.id)
        return self.db.read(select)

    def headers_for(self, mailbox_id: int, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        wanted = list(uids)

        def read(conn: Connection) -> tuple[dict[int, bytes], dict[str, list[int]]]:
            found: dict[int, bytes] = {}
            unknown: dict[str, list[int]] = {}
            sqlite = conn.dialect.name == "sqlite"
            for start in range(0, len(wanted), HEADERS_BATCH):
                batch = wanted[start:start + HEADERS_BATCH]
                if sqlite:
                    rows = [(uid, blob_id, None if text is None else bytes.fromhex(text))
                            for uid, blob_id, text in _rows_as_one(
                                conn, _HEADERS_JSON, (mailbox_id, json.dumps(batch)))]
                else:
                    rows = _raw_rows(conn.execute(_HEADERS, {
                        "b_box": mailbox_id, "b_uids": batch}))
                for uid, blob_id, headers in rows:
                    if headers is None:
                        unknown.setdefault(blob_id, []).append(uid)
                    elif headers:
                        found[uid] = bytes(headers)
            return found, unknown

        def fill(conn: Connection, blocks: dict[str, bytes]) -> None:
            conn.execute(_FILL_HEADERS, [{"b_id": blob_id, "b_headers": block}
                                         for blob_id, block in blocks.items()])

        def run() -> dict[int, bytes]:
            found, unknown = self.db.read_now(read)
            if not unknown:
                return found
            # Messages filed before the header cache, or through a path that did not
            # see the header: read each blob's head once, and keep it.
            blocks: dict[str, bytes] = {}
            for blob_id, blob_uids in unknown.items():
                try:
                    block = header_block(self.blobs.read_now(blob_id, HEADER_CAP + 1))
                except BlobMissing:
                    continue
                blocks[blob_id] = block
                if block:
                    for uid in blob_uids:
                        found[uid] = block
            if blocks:
                try:
                    self.db.write_now(fill, blocks)
                except Exception:
                    self.log.failure("keeping {count} header blocks failed",
                                     count=len(blocks))
            return found

        return self.db.run(run)

    def set_flags(self, mailbox_id: int, uids: Sequence[int], flags: Sequence[str],
                  mode: str = "replace") -> Deferred[list[MessageInfo]]:
        if mode not in ("replace", "add", "remove"):
            raise ValueError(f"unknown flag mode {mode!r}")
        return self.port.set_flags(mailbox_id, list(uids), list(flags), mode)

    def expunge(self, mailbox_id: int, uids: Sequence[int]) -> Deferred[list[int]]:
        return self.port.expunge(mailbox_id, list(uids))

    def delete_mailbox(self, user_id: int, name: str) -> Deferred[None]:
        name = normalise_mailbox_name(name)

        def delete(conn: Connection) -> int:
            row = conn.execute(_LOCK_BY_NAME, {"b_user": user_id, "b_name": name}).first()
            if row is None:
                raise NoSuchMailbox(f"no mailbox {name!r}")
            refs = conn.execute(sa.select(s.messages.c.blob_id, sa.func.count())
                                .where(s.messages.c.mailbox_id == row.id)
                                .group_by(s.messages.c.blob_id)).all()
            conn.execute(s.messages.delete().where(s.messages.c.mailbox_id == row.id))
            conn.execute(s.expunged.delete().where(s.expunged.c.mailbox_id == row.id))
            for blob_id, count in refs:
                release_blob_ref(conn, blob_id, count)
            conn.execute(s.mailboxes.delete().where(s.mailboxes.c.id == row.id))
            if row.subscribed:
                keep_subscription_now(conn, user_id, name)
            return int(row.id)

        d = self.db.write(delete)
        return self._announcing(d, lambda box_id: [MailboxChange(user_id, box_id, "deleted")]
                                ).addCallback(lambda _: None)

    def rename_mailbox(self, user_id: int, old: str, new: str) -> Deferred[None]:
        old, new = normalise_mailbox_name(old), normalise_mailbox_name(new)

        def rename(conn: Connection) -> list[MailboxChange]:
            source = conn.execute(_LOCK_BY_NAME, {"b_user": user_id, "b_name": old}).first()
            if source is None:
                raise NoSuchMailbox(f"no mailbox {old!r}")
            if self._get_mailbox(conn, user_id, new) is not None:
                raise MailboxExists(f"mailbox {new!r} exists already")
            if old == "INBOX":
                # RFC 9051 §6.3.6: INBOX's messages move to the new mailbox; INBOX
                # stays, empty, and its children are not renamed.
                target = self.create_mailbox_now(conn, user_id, new)
                uids = [row.uid for row in conn.execute(
                    sa.select(s.messages.c.uid).where(s.messages.c.mailbox_id == source.id))]
                moved = self.writes.copy_now(conn, source.id, uids, target.id, move=True)
                return [MailboxChange(user_id, target.id, "created"), *moved[1]]
            children = conn.execute(sa.select(s.mailboxes.c.id, s.mailboxes.c.name).where(
                (s.mailboxes.c.user_id == user_id)
                & (sa.func.substr(s.mailboxes.c.name, 1, len(old) + 1) == old + "/"))).all()
            for child in children:
                renamed = new + child.name[len(old):]
                if self._get_mailbox(conn, user_id, renamed) is not None:
                    raise MailboxExists(f"mailbox {renamed!r} exists already")
                conn.execute(s.mailboxes.update().where(s.mailboxes.c.id == child.id)
                             .values(name=renamed))
            # A renamed mailbox is a new one for clients that cached the old name:
            # new UIDVALIDITY is not needed (RFC 9051 §6.3.6 keeps it), so keep it.
            conn.execute(s.mailboxes.update().where(s.mailboxes.c.id == source.id)
                         .values(name=new))
            if take_subscription_now(conn, user_id, new):
                conn.execute(s.mailboxes.update().where(s.mailboxes.c.id == source.id)
                             .values(subscribed=True))
            return [MailboxChange(user_id, source.id, "renamed")] + [
                MailboxChange(user_id, child.id, "renamed") for child in children]

        d = self.db.write(rename)
        return self._announcing(d, lambda changes: changes).addCallback(lambda _: None)

    def set_subscribed(self, mailbox_id: int, subscribed: bool) -> Deferred[None]:
        def subscribe(conn: Connection) -> None:
            conn.execute(s.mailboxes.update().where(s.mailboxes.c.id == mailbox_id)
                         .values(subscribed=subscribed))
        return self.db.write(subscribe)

    def subscriptions_without_mailbox(self, user_id: int) -> Deferred[list[str]]:
        def names(conn: Connection) -> list[str]:
            return [row.name for row in conn.execute(
                sa.select(s.subscriptions.c.name)
                .where(s.subscriptions.c.user_id == user_id)
                .order_by(s.subscriptions.c.name))]
        return self.db.read(names)

    def unsubscribe_name(self, user_id: int, name: str) -> Deferred[bool]:
        name = normalise_mailbox_name(name)
        return self.db.write(take_subscription_now, user_id, name)

    def status(self, mailbox_id: int, from_uid: Optional[int] = None
               ) -> Deferred[MailboxStatus]:
        def status_(conn: Connection) -> MailboxStatus:
            row = first_direct(conn, _BY_ID, {"b_id": mailbox_id})
            if row is None:
                raise NoSuchMailbox(f"no mailbox with id {mailbox_id}")
            counts = first_direct(conn, _COUNTS, {"b_box": mailbox_id,
                                                  "b_from_uid": from_uid or row.uidnext})
            return MailboxStatus(_mailbox(row), int(counts[0]), int(counts[2]),
                                 int(counts[3]), int(counts[1]), int(counts[4]))
        return self.db.read(status_)

    def changes_since(self, mailbox_id: int, modseq: int) -> Deferred[MailboxChanges]:
        def changes(conn: Connection) -> MailboxChanges:
            row = first_direct(conn, _BY_ID, {"b_id": mailbox_id})
            if row is None:
                raise NoSuchMailbox(f"no mailbox with id {mailbox_id}")
            params = {"b_box": mailbox_id, "b_modseq": modseq}
            changed = [_message(r) for r in rows_direct(conn, _CHANGED_SINCE, params)]
            gone = [r.uid for r in rows_direct(conn, _EXPUNGED_SINCE, params)]
            return MailboxChanges(_mailbox(row), changed, gone)
        return self.db.read(changes)

    def copy(self, source_id: int, uids: Sequence[int], target_id: int,
             move: bool = False) -> Deferred[Copied]:
        return self.port.copy(source_id, list(uids), target_id, move)

    # -- quota ----------------------------------------------------------------------

    def usage(self, user_id: int) -> Deferred[int]:
        return self.db.read(self.usage_now, user_id)

    @staticmethod
    def usage_now(conn: Connection, user_id: int) -> int:
        """Octets in all of a user's mailboxes (what a quota counts, as RFC 9208's
        STORAGE resource does: the size of each message, shared blobs or not)."""
        return int(first_direct(conn, _USAGE, {"b_user": user_id})[0])

    # -- garbage collection ---------------------------------------------------------

    def collect_garbage(self, grace_seconds: float) -> Deferred[int]:
        """Delete unreferenced blobs older than the grace period; fires with the count."""
        cutoff = time.time() - grace_seconds
        cutoff_ms = int(cutoff * 1000)

        def candidates(conn: Connection) -> list[str]:
            rows = conn.execute(sa.select(s.blobs.c.id).where(
                (s.blobs.c.refcount <= 0) & (s.blobs.c.unreferenced_since < cutoff_ms)))
            return [row.id for row in rows]

        def delete_one(conn: Connection, blob_id: str) -> bool:
            # Row first, file second, in one transaction: a concurrent reference to
            # the same content waits on the row and then finds the file (or not).
            gone = conn.execute(s.blobs.delete().where(
                (s.blobs.c.id == blob_id) & (s.blobs.c.refcount <= 0))).rowcount
            if not gone:
                return False
            if not self.blobs.delete_now(blob_id, cutoff) and self.blobs.exists_now(blob_id):
                raise _KeepBlob()   # touched inside the grace period: roll back
            return True

        def orphans(conn: Connection, ids: list[str]) -> list[str]:
            known = {row.id for row in conn.execute(
                sa.select(s.blobs.c.id).where(s.blobs.c.id.in_(ids)))}
            return [blob_id for blob_id in ids if blob_id not in known]

        def collect() -> int:
            with self.blobs.collecting_now() as free:
                if not free:
                    # A backup is copying the blobs its snapshot refers to.
                    self.log.info("garbage collection put off: a backup holds the "
                                  "blob store")
                    return 0
                # An expunge may have been committed unsynced (write_unsynced): put it
                # on disk before deleting the files it let go of.
                self.db.sync_now()
                removed = 0
                for blob_id in self.db.read_now(candidates):
                    try:
                        removed += self.db.write_now(delete_one, blob_id)
                    except _KeepBlob:
                        pass
                return removed

        def collect_orphans(old_ids: list[str]) -> Deferred[int]:
            # Files with no row at all: left by a crash between the blob write and
            # the transaction that would have referenced it.
            def run() -> int:
                removed = 0
                with self.blobs.collecting_now() as free:
                    for start in range(0, len(old_ids) if free else 0, 500):
                        for blob_id in self.db.read_now(orphans,
                                                        old_ids[start:start + 500]):
                            removed += self.db.write_now(_delete_orphan, self.blobs,
                                                         blob_id, cutoff)
                return removed
            return self.db.run(run)

        d: Deferred[int] = self.db.run(collect)

        def then_orphans(count: int) -> Deferred[int]:
            return self.blobs.sweep(cutoff).addCallback(collect_orphans).addCallback(
                lambda more: count + more)
        return d.addCallback(then_orphans)


class _KeepBlob(Exception):
    pass


def _delete_orphan(conn: Connection, blobs: IBlobStore, blob_id: str, cutoff: float) -> int:
    # Lock out a concurrent first reference: it inserts the row we check for here.
    row = conn.execute(sa.select(s.blobs.c.id).where(s.blobs.c.id == blob_id)
                       .with_for_update()).first()
    if row is not None:
        return 0
    return int(blobs.delete_now(blob_id, cutoff))
