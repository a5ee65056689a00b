"""Junk training: what users file into (or out of) Junk over IMAP, taught to the spam
scanner (rspamd's /learnspam and /learnham, spamd's TELL).

An IMAP COPY or MOVE tells the :class:`JunkTrainer` (an ITrainer, chosen at wiring;
:data:`NO_TRAINER` when training is off), which decides what the copies teach —
into Junk from elsewhere: spam; out of Junk into anything but Trash: ham — and
writes one row per message to ``spam_lessons``.  It returns at once: the IMAP
command never waits for the scanner, nor for the row (a row that cannot be written
is logged).  The :class:`LessonRunner`, in the main process only, takes due rows
(each taken one is put off for a while, so that two nodes sharing the database do
not both teach it), reads the message and sends the lesson; one the scanner does
not take is tried again at growing intervals, up to an hour apart, and dropped,
logged, after ``[spam] learn_retry_limit``.  A message whose blob is gone by then
(expunged, and collected after the blob grace period) cannot be taught: dropped,
logged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.policy.interfaces import ISpamScanner, ITrainer
from lightmail.policy.scanclient import ScannerError
from lightmail.storage import schema as s
from lightmail.storage.database import Database, now_ms
from lightmail.storage.interfaces import BlobMissing, IBlobStore, Mailbox

log = Logger(namespace="lightmail.policy")

#: How often the runner looks for due lessons (rows written by worker processes and
#: other nodes; this process's own are sent at once).
POLL_SECONDS = 5.0
#: Lessons taken at a time.
BATCH = 20
#: The first retry's delay; each further one doubles, up to MAX_DELAY.
FIRST_DELAY_MS = 30_000
MAX_DELAY_MS = 3_600_000


@dataclass(frozen=True)
class Lesson:
    id: int
    user_address: str
    blob_id: str
    kind: str                 # spam or ham
    created: int
    attempts: int


def training_on(config: Any) -> bool:
    """Whether Junk training runs: ``[spam] learn``, where some listener scores spam."""
    return bool(config.spam.learn and any("spam" in listener.inbound_checks
                                          for listener in config.listeners))


def lesson_kind(source: Mailbox, target: Mailbox, junk_name: str) -> Optional[str]:
    """What copying from ``source`` to ``target`` teaches: spam, ham or nothing."""
    def junk(box: Mailbox) -> bool:
        return box.special_use == "\\Junk" or box.name == junk_name

    def trash(box: Mailbox) -> bool:
        return box.special_use == "\\Trash" or box.name == "Trash"
    if junk(target) and not junk(source):
        return "spam"
    if junk(source) and not junk(target) and not trash(target):
        return "ham"
    return None


class LessonQueue:
    """The ``spam_lessons`` rows, in the SQL database every process shares."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, user_address: str, kind: str, blob_ids: Sequence[str]) -> Deferred[int]:
        now = now_ms()
        rows = [{"user_address": user_address, "blob_id": blob_id, "kind": kind,
                 "created": now, "next_attempt": now, "attempts": 0}
                for blob_id in blob_ids]

        def add_(conn: Connection) -> int:
            conn.execute(s.spam_lessons.insert(), rows)
            return len(rows)
        return self.db.write(add_)

    def take(self, limit: int, hold_ms: int) -> Deferred[list[Lesson]]:
        """Up to ``limit`` due lessons, each put off by ``hold_ms`` (what a crash in
        the middle of sending them leaves is tried again then)."""
        def take_(conn: Connection) -> list[Lesson]:
            now = now_ms()
            t = s.spam_lessons.c
            rows = conn.execute(
                sa.select(t.id, t.user_address, t.blob_id, t.kind, t.created, t.attempts)
                .where(t.next_attempt <= now).order_by(t.next_attempt).limit(limit)).all()
            if rows:
                conn.execute(s.spam_lessons.update()
                             .where(t.id.in_([row.id for row in rows]))
                             .values(next_attempt=now + hold_ms))
            return [Lesson(*row) for row in rows]
        return self.db.write(take_)

    def done(self, lesson: Lesson) -> Deferred[None]:
        def done_(conn: Connection) -> None:
            conn.execute(s.spam_lessons.delete().where(s.spam_lessons.c.id == lesson.id))
        return self.db.write(done_)

    def retry(self, lesson: Lesson, error: str, next_attempt: int) -> Deferred[None]:
        def retry_(conn: Connection) -> None:
            conn.execute(s.spam_lessons.update().where(s.spam_lessons.c.id == lesson.id)
                         .values(attempts=lesson.attempts + 1, next_attempt=next_attempt,
                                 last_error=error[:500]))
        return self.db.write(retry_)

    def pending(self) -> Deferred[list[dict[str, Any]]]:
        """Every lesson waiting, oldest first (tests, the operator)."""
        def pending_(conn: Connection) -> list[dict[str, Any]]:
            rows = conn.execute(sa.select(s.spam_lessons)
                                .order_by(s.spam_lessons.c.id)).mappings().all()
            return [dict(row) for row in rows]
        return self.db.read(pending_)


@implementer(ITrainer)
class JunkTrainer:
    """Queues the lessons of IMAP copies and moves (see the module docstring);
    ``kick`` has this process's runner send them at once (none in a worker)."""

    def __init__(self, queue: LessonQueue, junk_name: Callable[[], str]) -> None:
        self.queue = queue
        self.junk_name = junk_name
        self.kick: Callable[[], None] = lambda: None

    def filed(self, user_address: str, source: Mailbox, target: Mailbox,
              blob_ids: Sequence[str]) -> None:
        kind = lesson_kind(source, target, self.junk_name())
        if kind is None or not blob_ids:
            return
        d = self.queue.add(user_address, kind, blob_ids)

        def queued(count: int) -> None:
            log.info("spam training: {count} {kind} lessons queued for {user} "
                     "({source} -> {target})", count=count, kind=kind, user=user_address,
                     source=source.name, target=target.name)
            self.kick()

        def lost(failure: Any) -> None:
            log.error("spam training: could not queue {count} {kind} lessons for "
                      "{user}: {error}", count=len(blob_ids), kind=kind,
                      user=user_address, error=failure.getErrorMessage())
        d.addCallbacks(queued, lost)


@implementer(ITrainer)
class NoTrainer:
    """Training off ([spam] learn = no, or no listener scores spam)."""

    def filed(self, user_address: str, source: Mailbox, target: Mailbox,
              blob_ids: Sequence[str]) -> None:
        pass


NO_TRAINER = NoTrainer()


class LessonRunner(Service):
    """Sends the queued lessons to the scanner (main process only)."""

    name = "spam-lessons"

    def __init__(self, queue: LessonQueue, scanner: ISpamScanner, blobs: IBlobStore,
                 ready: Deferred[Any], settings: Callable[[], Any],
                 reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.queue = queue
        self.scanner = scanner
        self.blobs = blobs
        self.ready = ready
        self.settings = settings            # the current [spam] section
        self.reactor = reactor
        self._loop: Optional[task.LoopingCall] = None
        self._busy: Optional[Deferred[Any]] = None
        self._again = False

    def startService(self) -> None:
        super().startService()
        loop = self._loop = task.LoopingCall(self.kick)
        loop.clock = self.reactor

        def start(_: Any) -> None:
            if self.running and self._loop is loop:
                loop.start(POLL_SECONDS, now=True)
        self.ready.addCallback(start)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        busy = self._busy
        return busy if busy is not None else defer.succeed(None)

    def kick(self) -> None:
        """Look for due lessons now (once more after the current round if busy)."""
        if not self.running:
            return
        if self._busy is not None:
            self._again = True
            return
        self._busy = Deferred.fromCoroutine(self._round())

        def finished(result: Any) -> None:
            self._busy = None
            if isinstance(result, Failure):
                log.failure("spam training: a round failed", result)
            if self._again and self.running:
                self._again = False
                self.kick()
        self._busy.addBoth(finished)

    async def _round(self) -> None:
        cfg = self.settings()
        hold_ms = int((cfg.timeout * 2 + 60) * 1000)
        while self.running:
            lessons = await self.queue.take(BATCH, hold_ms)
            for lesson in lessons:
                await self._teach(lesson, cfg)
            if len(lessons) < BATCH:
                return

    async def _teach(self, lesson: Lesson, cfg: Any) -> None:
        fields = {"kind": lesson.kind, "user": lesson.user_address,
                  "blob_id": lesson.blob_id, "backend": self.scanner.name}
        try:
            data = await self.blobs.read(lesson.blob_id)
        except BlobMissing:
            log.warn("spam training: {kind} lesson for {user} dropped: the message is "
                     "gone", **fields)
            await self.queue.done(lesson)
            return
        try:
            await self.scanner.learn(lesson.kind, data, lesson.user_address)
        except ScannerError as exc:
            now = now_ms()
            if now - lesson.created > cfg.learn_retry_limit * 1000:
                log.error("spam training: {kind} lesson for {user} dropped after "
                          "{attempts} attempts: {error}", attempts=lesson.attempts + 1,
                          error=str(exc), **fields)
                await self.queue.done(lesson)
                return
            delay = min(FIRST_DELAY_MS * 2 ** min(lesson.attempts, 20), MAX_DELAY_MS)
            log.warn("spam training: {backend} did not take a {kind} lesson for {user} "
                     "(attempt {attempts}), retrying in {delay} s: {error}",
                     attempts=lesson.attempts + 1, delay=delay // 1000, error=str(exc),
                     **fields)
            await self.queue.retry(lesson, str(exc), now + delay)
            return
        log.info("spam training: {backend} learnt a {kind} for {user}", **fields)
        await self.queue.done(lesson)
