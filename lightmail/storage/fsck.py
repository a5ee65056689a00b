"""Checking the store against what it promises (``lightmail fsck``), and repairing it.

What is checked, in this order:

1. rows whose parent row is gone (a message without its mailbox, a queue recipient
   without its message...): the foreign keys forbid them, so they come only from
   outside LightMail (a restore, a hand edit, SQLite without ``foreign_keys``);
2. every blob file against its name (the SHA-256 of its content, the store's one
   invariant) and against the ``blobs`` table: a file whose content has changed, a
   row whose file is gone, a file no row knows (older than the GC's grace period:
   younger ones are being written);
3. the reference counts of ``blobs`` against the messages and queue entries that
   refer to each blob, and references to blobs with no row;
4. each mailbox's UIDs and MODSEQs: every UID below ``uidnext`` (messages and
   expunged ones), every MODSEQ at most ``highestmodseq``, no UID both live and
   expunged, UIDs and MODSEQs from 1, UIDVALIDITY a nonzero 32-bit number, one
   message per UID (RFC 3501 §2.3.1.1, RFC 7162 §3.1).

Memory stays bounded however big the store: the blob files are walked one fan-out
directory at a time against that directory's rows (1/256 of the store), and the
other checks are SQL statements that return only what is wrong, of which at most
``LIMIT`` per kind are kept for the report (all are counted).  Reads only, unless
``repair``; the command refuses to repair while a server runs.

Repairs, and what is left alone (``doveadm force-resync`` makes Dovecot's indexes
agree with the mail files; here the files' content is the truth too):

- a file whose content changed is kept under the name its content has now (its
  messages point there; their cached envelope and structure are dropped): the
  mail stays readable, as damaged as it is, and the damage is reported;
- a file no row knows is moved to ``lost+found/`` beside ``objects/`` (it may be
  mail whose row was lost: an RFC 5322 message, to look at before deleting it);
- a row of no file and no reference is deleted; counts are recomputed; ``uidnext``
  and ``highestmodseq`` are raised past what the mailbox holds; an ``expunged`` row
  of a live UID and rows whose parent is gone that hold no mail are deleted;
- a message whose content file is gone is kept and reported (more often a wrong
  ``blob_dir`` or an unfinished restore than real loss): restore the file, or with
  ``expunge_missing`` it is expunged, as force-resync drops a mail whose file is
  gone, after what the database knows of it (mailbox, UID, flags, date, its header
  block) is written to ``lost+found/BLOB.missing``.  Users, mailboxes and messages
  whose parent row is gone, queued mail whose blob is gone, and duplicate UIDs are
  reported, never repaired: they hold mail, and what to do is the administrator's
  call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lightmail.storage import schema as s
from lightmail.storage.blobs import FilesystemBlobStore, file_digest, is_blob_id
from lightmail.storage.database import Database, now_ms
from lightmail.storage.sqlwrites import SQLWrites

#: Findings of one kind kept for the report (every one is counted).
LIMIT = 1000
#: Blobs whose messages are looked up (missing or damaged content); more are counted.
LOOKUP_LIMIT = 10000
_CHUNK = 500


@dataclass
class Finding:
    """One thing wrong: ``kind`` (see docs/operations.rst), what it is about, and
    what ``--repair`` did about it (``repaired`` None: not asked to repair)."""

    kind: str
    subject: str
    detail: str
    repaired: bool | None = None
    action: str = ""


@dataclass
class Report:
    """What was looked at, and what was found (at most LIMIT details per kind)."""

    repair: bool
    blobs: int = 0
    files: int = 0
    bytes_hashed: int = 0
    mailboxes: int = 0
    messages: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return sum(self.counts.values())

    @property
    def left(self) -> int:
        """Problems not repaired."""
        return self.problems - self.repaired

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["problems"], data["left"] = self.problems, self.left
        data["truncated"] = any(count > LIMIT for count in self.counts.values())
        return data


class ProgressLike(Protocol):
    def advance(self, count: int = 1) -> None: ...
    def close(self) -> None: ...


class _NoProgress:
    def advance(self, count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class StoreCheck:
    """One run of the checks (a worker thread: SQL and files, synchronously).

    ``found`` hears of each finding as it is made (for output while the check
    runs); ``progress(label, total)`` makes a progress meter for a long phase."""

    def __init__(self, db: Database, blobs: FilesystemBlobStore, writes: SQLWrites,
                 grace_seconds: float, *, repair: bool = False,
                 expunge_missing: bool = False,
                 found: Callable[[Finding], None] = lambda finding: None,
                 progress: Callable[[str, int | None], ProgressLike] | None = None) -> None:
        self.db = db
        self.blobs = blobs
        self.writes = writes
        self.grace = grace_seconds
        self.repair = repair
        self.expunge_missing = expunge_missing and repair
        self.found = found
        self.progress = progress or (lambda label, total: _NoProgress())
        self.report = Report(repair=repair)
        self.lost_found = blobs.root / "lost+found"

    # -- findings -----------------------------------------------------------------------

    def _add(self, kind: str, subject: str, detail: str, repaired: bool | None = None,
             action: str = "") -> None:
        if self.repair and repaired is None:
            repaired = False
        if not self.repair:
            action = ""
        finding = Finding(kind, subject, detail, repaired, action)
        self.report.counts[kind] = self.report.counts.get(kind, 0) + 1
        if repaired:
            self.report.repaired += 1
        if self.report.counts[kind] <= LIMIT:
            self.report.findings.append(finding)
        self.found(finding)

    def _rows(self, query: Any) -> Iterator[Any]:
        """The rows of ``query``, streamed: a read transaction of its own, held while
        the caller goes through them (its repairs write on other connections)."""
        with self.db.engine.connect() as conn, conn.begin():
            yield from conn.execute(query.execution_options(yield_per=500))

    # -- the run ------------------------------------------------------------------------

    def run_now(self) -> Report:
        if self.repair:
            moved = self.blobs.recover_now()
            if moved:
                self._add("rename-undone", f"{moved} files",
                          "blobs left at their temporary names by a crash", True,
                          "moved into place")
        self._orphan_rows()
        corrupt, missing = self._walk_blobs()
        for old, new, size in corrupt:
            self._corrupt(old, new, size)
        self._missing(missing)
        self._references_without_row()
        self._refcounts()
        self._mailboxes()
        return self.report

    # -- 1. rows whose parent is gone ---------------------------------------------------

    # (child, its column, parent, the parent's column, label, repairable: holds no mail)
    _PARENTS = (
        (s.users, "domain_id", s.domains, "id", "user without its domain", False),
        (s.aliases, "domain_id", s.domains, "id", "alias without its domain", True),
        (s.mailboxes, "user_id", s.users, "id", "mailbox without its user", False),
        (s.app_passwords, "user_id", s.users, "id", "app password without its user", True),
        (s.subscriptions, "user_id", s.users, "id", "subscription without its user", True),
        (s.messages, "mailbox_id", s.mailboxes, "id", "message without its mailbox", False),
        (s.expunged, "mailbox_id", s.mailboxes, "id", "expunged UID without its mailbox",
         True),
        (s.queue_recipients, "queue_id", s.queue_messages, "id",
         "queue recipient without its message", True),
    )

    def _orphan_rows(self) -> None:
        for child, column, parent, key, label, repairable in self._PARENTS:
            query = (sa.select(*child.primary_key.columns, child.c[column])
                     .outerjoin(parent, parent.c[key] == child.c[column])
                     .where(parent.c[key].is_(None)))
            for row in self._rows(query):
                subject = f"{child.name} {'/'.join(str(v) for v in row[:-1])}"
                detail = f"{label} ({column} {row[-1]} does not exist)"
                if self.repair and repairable:
                    where = sa.and_(*(c == v for c, v in
                                      zip(child.primary_key.columns, row[:-1], strict=True)))
                    self.db.write_now(lambda conn, w=where, t=child:
                                      conn.execute(t.delete().where(w)))
                    self._add("orphan-row", subject, detail, True, "deleted")
                else:
                    self._add("orphan-row", subject, detail,
                              action="" if repairable else "holds mail: not repaired")
        # Queued mail nobody is left to receive: what the queue itself deletes once
        # every recipient is final.  Its blob reference goes with it.
        r, m = s.queue_recipients, s.queue_messages
        query = sa.select(m.c.id).outerjoin(r, r.c.queue_id == m.c.id).where(r.c.id.is_(None))
        for (queue_id,) in self._rows(query):
            detail = "queued message without recipients"
            if self.repair:
                self.db.write_now(lambda conn, q=queue_id:
                                  conn.execute(m.delete().where(m.c.id == q)))
                self._add("orphan-row", f"queue_messages {queue_id}", detail, True,
                          "deleted (its blob reference is recounted below)")
            else:
                self._add("orphan-row", f"queue_messages {queue_id}", detail)

    # -- 2. blob files against their names and rows -------------------------------------

    def _walk_blobs(self) -> tuple[list[tuple[str, str, int]], list[str]]:
        """Every blob file hashed and compared with its fan-out directory's rows.
        Returns the damaged blobs (old id, id of the content, size) and the ids of
        referenced blobs whose file is gone (LOOKUP_LIMIT at most of each)."""
        total = self.db.read_now(lambda conn: conn.execute(
            sa.select(sa.func.count()).select_from(s.blobs)).scalar_one())
        meter = self.progress("blobs", int(total))
        corrupt: list[tuple[str, str, int]] = []
        missing: list[str] = []
        cutoff = time.time() - self.grace
        try:
            for prefix in (f"{n:02x}" for n in range(256)):
                rows = self.db.read_now(_rows_with_prefix, prefix)
                self.report.blobs += len(rows)
                for name, path, stat in _files(self.blobs.objects / prefix, prefix,
                                               self._stray):
                    self.report.files += 1
                    row = rows.pop(name, None)
                    if row is None:
                        meter.advance()
                        if stat.st_mtime < cutoff:
                            self._orphan_file(name, path)
                        continue
                    meter.advance()
                    actual, size = self._hash(path)
                    if actual != name or size != row[0]:
                        self._add_capped(corrupt, (name, actual, size))
                for name, (_, refcount) in sorted(rows.items()):
                    meter.advance()
                    if refcount > 0:
                        self._add_capped(missing, name)
                    else:
                        self._row_without_file(name)
        finally:
            meter.close()
        return corrupt, missing

    def _stray(self, path: str) -> None:
        self._add("stray-file", path, "a file that is not a blob, among the blobs",
                  action="left alone")

    @staticmethod
    def _add_capped(items: list[Any], item: Any) -> None:
        if len(items) < LOOKUP_LIMIT:
            items.append(item)

    def _hash(self, path: str) -> tuple[str, int]:
        digest, size = file_digest(path)
        self.report.bytes_hashed += size
        return digest, size

    def _orphan_file(self, name: str, path: str) -> None:
        detail = "a blob file no row refers to (older than the GC grace period)"
        if not self.repair:
            self._add("orphan-blob", name, detail)
            return
        self.lost_found.mkdir(exist_ok=True)
        os.replace(path, self.lost_found / name)
        self._add("orphan-blob", name, detail, True, f"moved to {self.lost_found / name}")

    def _row_without_file(self, name: str) -> None:
        detail = "a blobs row without its file, referenced by nothing"
        if not self.repair:
            self._add("row-without-file", name, detail)
            return

        def delete(conn: Connection) -> int:
            return int(conn.execute(s.blobs.delete().where(
                (s.blobs.c.id == name) & (s.blobs.c.refcount <= 0))).rowcount)
        done = self.db.write_now(delete) == 1
        self._add("row-without-file", name, detail, done, "row deleted" if done else "")

    def _corrupt(self, old: str, new: str, size: int) -> None:
        holders = self._holders([old]).get(old, [])
        detail = (f"its content has changed: it hashes to {new} ({size} bytes)"
                  + (f"; the content of {', '.join(holders)}" if holders else ""))
        if not self.repair:
            self._add("corrupt-blob", old, detail)
            return
        old_path, new_path = self.blobs.path(old), self.blobs.path(new)
        new_path.parent.mkdir(exist_ok=True)
        if not new_path.exists():
            # A second name first, the rows next, the old name last: a crash at any
            # point leaves the content under a name, and the next fsck finishes.
            os.link(old_path, new_path)
            _fsync_dir(new_path.parent)

        def readdress(conn: Connection) -> None:
            count = _references(conn, old)
            existing = conn.execute(sa.select(s.blobs.c.refcount).where(
                s.blobs.c.id == new)).first()
            if existing is None:
                conn.execute(s.blobs.insert().values(
                    id=new, size=size, refcount=count, created=now_ms(),
                    unreferenced_since=None if count else now_ms(), headers=None))
            else:
                conn.execute(s.blobs.update().where(s.blobs.c.id == new).values(
                    refcount=s.blobs.c.refcount + count, unreferenced_since=None))
            # The parsed caches were made from the old content.
            conn.execute(s.messages.update().where(s.messages.c.blob_id == old).values(
                blob_id=new, size=size, envelope=None, bodystructure=None, headers=None))
            conn.execute(s.queue_messages.update().where(
                s.queue_messages.c.blob_id == old).values(blob_id=new, size=size))
            conn.execute(s.blobs.delete().where(s.blobs.c.id == old))
        self.db.write_now(readdress)
        os.unlink(old_path)
        _fsync_dir(old_path.parent)
        self._add("corrupt-blob", old, detail, True,
                  f"kept as {new}, the name of its content (compare with a backup)")

    def _missing(self, missing: list[str]) -> None:
        if not missing:
            return
        holders = self._holders(missing, details=True)
        for blob_id in missing:
            found = holders.get(blob_id, [])
            detail = ("the file of a referenced blob is gone"
                      + (f": the content of {', '.join(h for h, _ in found)}" if found else ""))
            if not self.expunge_missing:
                self._add("missing-blob", blob_id, detail, action=(
                    f"kept: restore {self.blobs.path(blob_id)} from a backup, or "
                    "fsck --repair --expunge-missing" if self.repair else ""))
                continue
            infos = [info for _, info in found]
            self._write_missing(blob_id, infos)
            expunged = 0
            for info in infos:
                if info.get("mailbox_id") is not None:
                    self.db.write_now(lambda conn, i=info: self.writes.expunge_now(
                        conn, i["mailbox_id"], [i["uid"]]))
                    expunged += 1
            if expunged:            # its row too, now that nothing refers to it
                self.db.write_now(lambda conn, i=blob_id: conn.execute(
                    s.blobs.delete().where((s.blobs.c.id == i) & (s.blobs.c.refcount <= 0))))
            queued = [info["queue_id"] for info in infos if "queue_id" in info]
            action = (f"{expunged} message(s) expunged; what is known of them is in "
                      f"{self.lost_found / (blob_id + '.missing')}")
            if queued:
                action += ("; queued mail left alone: lightmail queue delete "
                           + " ".join(queued))
            self._add("missing-blob", blob_id, detail, not queued, action)

    def _write_missing(self, blob_id: str, infos: list[dict[str, Any]]) -> None:
        headers = self.db.read_now(lambda conn: conn.execute(
            sa.select(s.blobs.c.headers).where(s.blobs.c.id == blob_id)).scalar())
        self.lost_found.mkdir(exist_ok=True)
        lines = [f"blob {blob_id}: its file was gone when lightmail fsck ran"]
        lines += [" ".join(f"{key}={value}" for key, value in info.items())
                  for info in infos]
        text = "\n".join(lines).encode() + b"\n\nheader block kept in SQL:\n" + \
            (headers or b"(none)\n")
        (self.lost_found / f"{blob_id}.missing").write_bytes(text)

    def _holders(self, blob_ids: list[str], details: bool = False
                 ) -> dict[str, list[Any]]:
        """The messages and queued mail that refer to each blob: 'user/mailbox uid N'
        texts (with ``details``: (text, what else is known) pairs)."""
        found: dict[str, list[Any]] = {}
        m, b, u, d = s.messages, s.mailboxes, s.users, s.domains
        q = s.queue_messages
        for start in range(0, len(blob_ids), _CHUNK):
            chunk = blob_ids[start:start + _CHUNK]

            def read(conn: Connection, chunk: list[str] = chunk) -> tuple[Any, Any]:
                messages = conn.execute(
                    sa.select(m.c.blob_id, m.c.mailbox_id, m.c.uid, m.c.flags,
                              m.c.internal_date, m.c.size, b.c.name, u.c.localpart,
                              d.c.name.label("domain"))
                    .join(b, b.c.id == m.c.mailbox_id).join(u, u.c.id == b.c.user_id)
                    .join(d, d.c.id == u.c.domain_id)
                    .where(m.c.blob_id.in_(chunk)).order_by(m.c.mailbox_id, m.c.uid)).all()
                queued = conn.execute(sa.select(q.c.blob_id, q.c.id).where(
                    q.c.blob_id.in_(chunk))).all()
                return messages, queued
            messages, queued = self.db.read_now(read)
            for row in messages:
                text = f"{row.localpart}@{row.domain}/{row.name} uid {row.uid}"
                info = {"mailbox": f"{row.localpart}@{row.domain}/{row.name}",
                        "mailbox_id": row.mailbox_id, "uid": row.uid,
                        "flags": row.flags or "-", "internal_date": row.internal_date,
                        "size": row.size}
                found.setdefault(row.blob_id, []).append((text, info) if details else text)
            for row in queued:
                text = f"queued message {row.id}"
                info = {"queue_id": row.id}
                found.setdefault(row.blob_id, []).append((text, info) if details else text)
        return found

    # -- 3. reference counts ------------------------------------------------------------

    def _references_without_row(self) -> None:
        for table in (s.messages, s.queue_messages):
            query = (sa.select(table.c.blob_id, sa.func.count().label("n"))
                     .outerjoin(s.blobs, s.blobs.c.id == table.c.blob_id)
                     .where(s.blobs.c.id.is_(None)).group_by(table.c.blob_id))
            for blob_id, count in self._rows(query):
                detail = f"{count} {table.name} refer to a blob with no row"
                path = self.blobs.path(blob_id) if is_blob_id(blob_id) else None
                if self.repair and path is not None and path.exists() \
                        and self._hash(str(path))[0] == blob_id:
                    size = path.stat().st_size
                    self.db.write_now(lambda conn, i=blob_id, n=size: conn.execute(
                        s.blobs.insert().values(id=i, size=n, refcount=0,
                                                created=now_ms())))
                    self._add("reference-without-row", blob_id, detail, True,
                              "row made for its file (counted below)")
                else:
                    self._add("reference-without-row", blob_id, detail,
                              action="no file with that content: see missing-blob")

    def _refcounts(self) -> None:
        for blob_id, stored, actual in self._rows(_REFCOUNT_MISMATCHES):
            detail = f"reference count {stored}, referred to by {actual}"
            if not self.repair:
                self._add("refcount", blob_id, detail)
                continue

            def recount(conn: Connection, blob_id: str = blob_id) -> int:
                count = _references(conn, blob_id)
                # At zero, garbage collection takes it after the grace period.
                conn.execute(s.blobs.update().where(s.blobs.c.id == blob_id).values(
                    refcount=count, unreferenced_since=None if count else
                    sa.func.coalesce(s.blobs.c.unreferenced_since, now_ms())))
                return count
            self._add("refcount", blob_id, detail, True,
                      f"set to {self.db.write_now(recount)}")

    # -- 4. UIDs and MODSEQs ------------------------------------------------------------

    def _mailboxes(self) -> None:
        counts = self.db.read_now(lambda conn: (
            conn.execute(sa.select(sa.func.count()).select_from(s.mailboxes)).scalar_one(),
            conn.execute(sa.select(sa.func.count()).select_from(s.messages)).scalar_one()))
        self.report.mailboxes, self.report.messages = int(counts[0]), int(counts[1])
        for row in self._rows(_MAILBOX_BEHIND):
            max_uid = max(row.msg_uid or 0, row.gone_uid or 0)
            max_modseq = max(row.msg_modseq or 0, row.gone_modseq or 0)
            subject = f"mailbox {row.id} ({row.name})"
            problems = []
            if max_uid >= row.uidnext:
                problems.append(("uidnext", f"uidnext {row.uidnext}, but UID {max_uid} "
                                            "exists"))
            if max_modseq > row.highestmodseq:
                problems.append(("highestmodseq", f"highestmodseq {row.highestmodseq}, but "
                                                  f"MODSEQ {max_modseq} exists"))
            if self.repair:
                def raise_(conn: Connection, row: Any = row, max_uid: int = max_uid,
                           max_modseq: int = max_modseq) -> None:
                    box = conn.execute(sa.select(s.mailboxes).where(
                        s.mailboxes.c.id == row.id).with_for_update()).one()
                    conn.execute(s.mailboxes.update().where(s.mailboxes.c.id == row.id)
                                 .values(uidnext=max(box.uidnext, max_uid + 1),
                                         highestmodseq=max(box.highestmodseq, max_modseq)))
                self.db.write_now(raise_)
            for kind, detail in problems:
                self._add(kind, subject, detail, True if self.repair else None,
                          "raised to " + (str(max_uid + 1) if kind == "uidnext"
                                          else str(max_modseq)))
        for row in self._rows(_EXPUNGED_LIVE):
            subject = f"mailbox {row.mailbox_id} uid {row.uid}"
            detail = "the UID is both a message and expunged"
            if self.repair:
                self.db.write_now(lambda conn, r=row: conn.execute(s.expunged.delete().where(
                    (s.expunged.c.mailbox_id == r.mailbox_id)
                    & (s.expunged.c.uid == r.uid))))
                self._add("expunged-live", subject, detail, True,
                          "the expunged row deleted")
            else:
                self._add("expunged-live", subject, detail)
        for kind, query, detail in _REPORT_ONLY:
            for row in self._rows(query):
                self._add(kind, f"mailbox {row[0]}" + (f" uid {row[1]}" if len(row) > 1
                                                        else ""),
                          detail, action="not repaired: see docs/operations.rst")


def _rows_with_prefix(conn: Connection, prefix: str) -> dict[str, tuple[int, int]]:
    """The blobs rows of one fan-out directory: id -> (size, refcount)."""
    upper = f"{int(prefix, 16) + 1:02x}" if prefix != "ff" else "g"
    return {row.id: (row.size, row.refcount) for row in conn.execute(
        sa.select(s.blobs.c.id, s.blobs.c.size, s.blobs.c.refcount).where(
            (s.blobs.c.id >= prefix) & (s.blobs.c.id < upper)))}


def _files(directory: Path, prefix: str, stray: Callable[[str], None]
           ) -> Iterator[tuple[str, str, os.stat_result]]:
    """The blob files of one fan-out directory; anything else there is reported."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            continue            # a format 1 directory the layout upgrade left (not a blob)
        if not (is_blob_id(entry.name) and entry.name.startswith(prefix)
                and entry.is_file(follow_symlinks=False)):
            stray(entry.path)
            continue
        try:
            yield entry.name, entry.path, entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue            # collected meanwhile (a check beside a running server)


def _references(conn: Connection, blob_id: str) -> int:
    return int(conn.execute(sa.select(
        sa.select(sa.func.count()).where(s.messages.c.blob_id == blob_id).scalar_subquery()
        + sa.select(sa.func.count()).where(s.queue_messages.c.blob_id == blob_id)
        .scalar_subquery())).scalar_one())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# One statement each, returning only what is wrong: the database aggregates (one
# pass over messages, in its own memory), the snapshot is one statement's.
def _counts_by_blob(table: sa.Table) -> Any:
    return (sa.select(table.c.blob_id.label("blob_id"), sa.func.count().label("n"))
            .group_by(table.c.blob_id).subquery())


_by_message = _counts_by_blob(s.messages)
_by_queue = _counts_by_blob(s.queue_messages)
_actual = sa.func.coalesce(_by_message.c.n, 0) + sa.func.coalesce(_by_queue.c.n, 0)
_REFCOUNT_MISMATCHES = (
    sa.select(s.blobs.c.id, s.blobs.c.refcount, _actual)
    .outerjoin(_by_message, _by_message.c.blob_id == s.blobs.c.id)
    .outerjoin(_by_queue, _by_queue.c.blob_id == s.blobs.c.id)
    .where(s.blobs.c.refcount != _actual).order_by(s.blobs.c.id))

_live = (sa.select(s.messages.c.mailbox_id.label("mailbox_id"),
                   sa.func.max(s.messages.c.uid).label("uid"),
                   sa.func.max(s.messages.c.modseq).label("modseq"))
         .group_by(s.messages.c.mailbox_id).subquery())
_gone = (sa.select(s.expunged.c.mailbox_id.label("mailbox_id"),
                   sa.func.max(s.expunged.c.uid).label("uid"),
                   sa.func.max(s.expunged.c.modseq).label("modseq"))
         .group_by(s.expunged.c.mailbox_id).subquery())
_MAILBOX_BEHIND = (
    sa.select(s.mailboxes.c.id, s.mailboxes.c.name, s.mailboxes.c.uidnext,
              s.mailboxes.c.highestmodseq, _live.c.uid.label("msg_uid"),
              _live.c.modseq.label("msg_modseq"), _gone.c.uid.label("gone_uid"),
              _gone.c.modseq.label("gone_modseq"))
    .outerjoin(_live, _live.c.mailbox_id == s.mailboxes.c.id)
    .outerjoin(_gone, _gone.c.mailbox_id == s.mailboxes.c.id)
    .where((_live.c.uid >= s.mailboxes.c.uidnext)
           | (_gone.c.uid >= s.mailboxes.c.uidnext)
           | (_live.c.modseq > s.mailboxes.c.highestmodseq)
           | (_gone.c.modseq > s.mailboxes.c.highestmodseq))
    .order_by(s.mailboxes.c.id))
_EXPUNGED_LIVE = (
    sa.select(s.expunged.c.mailbox_id, s.expunged.c.uid)
    .join(s.messages, (s.messages.c.mailbox_id == s.expunged.c.mailbox_id)
          & (s.messages.c.uid == s.expunged.c.uid)))
_REPORT_ONLY = (
    ("uid-range", sa.select(s.messages.c.mailbox_id, s.messages.c.uid).where(
        (s.messages.c.uid < 1) | (s.messages.c.modseq < 1)),
     "a UID or MODSEQ below 1"),
    ("uidvalidity", sa.select(s.mailboxes.c.id).where(
        (s.mailboxes.c.uidvalidity < 1) | (s.mailboxes.c.uidvalidity > 0xFFFFFFFF)),
     "UIDVALIDITY is not a nonzero 32-bit number"),
    ("duplicate-uid", sa.select(s.messages.c.mailbox_id, s.messages.c.uid)
     .group_by(s.messages.c.mailbox_id, s.messages.c.uid)
     .having(sa.func.count() > 1),
     "two messages with one UID (the unique index forbids it)"),
)
