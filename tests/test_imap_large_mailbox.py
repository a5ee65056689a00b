"""IMAP on a mailbox of 100,000 messages: the reactor is never held for long.

The long fuzzing run grew a user's INBOX to 295,000 messages (``COPY 1:* INBOX``
doubles it), and then ``COPY 5:* INBOX`` answered with every UID listed one by one
(megabytes of COPYUID) and held the reactor for 310 ms of CPU in one iteration;
SELECT held it for 57 ms.  Here a mailbox of N messages is written straight into
SQL (quick), and the commands that touch every message go through a real session
(imaplib, over TCP, against the in-process server), while a second session has the
mailbox selected and hears of every change.  Each reactor iteration is timed in CPU
time of the reactor thread, as the fuzzing oracle does (``tests/fuzzing/play.py``):
``runUntilCurrent`` (timers, storage's answers) and ``doIteration`` (reading and
writing the sockets).  The longest may not pass BOUND.

Garbage collection is timed apart and taken out of the figure: a full collection
walks every object of the process, wherever it is triggered (a storage thread's
allocations can make the reactor pay for it), so it measures the heap's size, not
what the command did.  The heap is frozen before timing, as the oracle does.
"""

from __future__ import annotations

import gc
import imaplib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import test_imap
from inprocess import in_thread, start
from test_imap import ok
from twisted.internet import defer

from lightmail.storage import schema as s

N = 100_000
BOUND = 0.050               # seconds of the reactor thread's CPU in one iteration
IMAP = ("[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[directory]\nauth_over_plaintext = yes\n")
CONTENT = b"From: a@example.org\r\nSubject: big\r\n\r\nbody\r\n"


class ReactorMeter:
    """The longest reactor iteration in CPU time of the reactor thread, without the
    garbage collector's pauses (kept apart in ``gc_longest``)."""

    def __init__(self) -> None:
        self.longest = self.gc_longest = 0.0
        self._gc_total = self._gc_started = 0.0
        self._saved: dict[str, Any] = {}

    def reset(self) -> None:
        self.longest = self.gc_longest = 0.0

    def _timed(self, original: Callable[..., None]) -> Callable[..., None]:
        def timed(*args: Any) -> None:
            started, gc_before = time.thread_time(), self._gc_total
            try:
                original(*args)
            finally:
                spent = time.thread_time() - started
                in_gc = self._gc_total - gc_before
                self.longest = max(self.longest, spent - in_gc)
                self.gc_longest = max(self.gc_longest, in_gc)
        return timed

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the thread that collects: only the reactor thread's count here.
        if threading.current_thread() is not threading.main_thread():
            return
        if phase == "start":
            self._gc_started = time.thread_time()
        else:
            self._gc_total += time.thread_time() - self._gc_started

    def install(self) -> None:
        from twisted.internet import reactor
        for name in ("runUntilCurrent", "doIteration"):
            original = getattr(reactor, name)
            self._saved[name] = original
            setattr(reactor, name, self._timed(original))
        gc.callbacks.append(self._gc)

    def uninstall(self) -> None:
        from twisted.internet import reactor
        for name in self._saved:
            delattr(reactor, name)
        gc.callbacks.remove(self._gc)


@pytest.fixture
def long_lines() -> Iterator[None]:
    """imaplib refuses lines over 1 MB: SEARCH-sized answers are longer here."""
    saved = imaplib._MAXLINE  # type: ignore[attr-defined]
    imaplib._MAXLINE = 100_000_000  # type: ignore[attr-defined]
    yield
    imaplib._MAXLINE = saved  # type: ignore[attr-defined]


def fill(conn: Any, mailbox_id: int, blob_id: str, count: int) -> None:
    """``count`` messages (one content, every tenth unseen) in one transaction."""
    conn.execute(s.blobs.insert().values(id=blob_id, size=len(CONTENT), refcount=count,
                                         created=1_700_000_000_000))
    conn.execute(s.messages.insert(), [
        {"mailbox_id": mailbox_id, "uid": uid, "modseq": uid, "blob_id": blob_id,
         "size": len(CONTENT), "internal_date": 1_700_000_000_000,
         "flags": "\\Seen" if uid % 10 else ""} for uid in range(1, count + 1)])
    conn.execute(s.mailboxes.update().where(s.mailboxes.c.id == mailbox_id)
                 .values(uidnext=count + 1, highestmodseq=count + 1))


def login(port: int) -> imaplib.IMAP4:
    return test_imap.login(port, timeout=600)


@pytest_twisted.inlineCallbacks
def test_commands_over_a_big_mailbox_hand_the_reactor_back(
        tmp_path: Path, long_lines: None) -> Any:
    server = yield start(tmp_path, IMAP)
    parts = server.parts
    bob = yield parts.directory.get_user("bob@example.test")
    inbox = yield parts.mailstore.get_or_create_mailbox(bob.id, "INBOX")
    archive = yield parts.mailstore.create_mailbox(bob.id, "Archive")
    blob = yield parts.blobs.put(CONTENT)
    yield parts.storage.db.write(fill, inbox.id, blob.id, N)
    port = server.ports["imap"]
    watcher = yield in_thread(login, port)
    imap = yield in_thread(login, port)
    meter = ReactorMeter()
    longest: dict[str, tuple[float, float, float]] = {}

    @defer.inlineCallbacks
    def timed(name: str, command: Callable[[], Any]) -> Any:
        meter.reset()
        started = time.monotonic()
        result = yield in_thread(command)
        longest[name] = (meter.longest, meter.gc_longest, time.monotonic() - started)
        return result

    gc.collect()
    gc.freeze()
    meter.install()
    try:
        assert ok((yield timed("SELECT (the other session)",
                               lambda: watcher.select("INBOX")))) == [b"%d" % N]
        assert ok((yield timed("SELECT", lambda: imap.select("INBOX")))) == [b"%d" % N]
        flags = ok((yield timed("FETCH 1:* (FLAGS)", lambda: imap.fetch("1:*", "(FLAGS)"))))
        assert len(flags) == N and flags[-2:] == [b"%d (FLAGS (\\Seen))" % (N - 1),
                                                  b"%d (FLAGS ())" % N]
        ok((yield timed("STORE 1:* +FLAGS (\\Flagged)",
                        lambda: imap.store("1:*", "+FLAGS.SILENT", "(\\Flagged)"))))
        ok((yield timed("NOOP (the other session: FETCH FLAGS of each)", watcher.noop)))
        assert len(watcher.untagged_responses.pop("FETCH", [])) == N

        # The fuzzing run's case, and RFC 4315's uid-sets in ranges, both of them in
        # the same order.
        copied = ok((yield timed("COPY 5:* INBOX", lambda: imap.copy("5:*", "INBOX"))))
        assert copied == [b"[COPYUID %d 5:%d %d:%d] COPY completed"
                          % (inbox.uidvalidity, N, N + 1, 2 * N - 4)]
        ok((yield timed("NOOP (the other session: EXISTS)", watcher.noop)))
        assert watcher.untagged_responses.pop("EXISTS")[-1] == b"%d" % (2 * N - 4)

        moved = yield timed(f"UID MOVE 1:{N} Archive",
                            lambda: imap.uid("MOVE", f"1:{N}", "Archive"))
        ok(moved)
        assert imap.untagged_responses.pop("OK")[-1] == (
            b"[COPYUID %d 1:%d 1:%d] Moved" % (archive.uidvalidity, N, N))
        assert imap.untagged_responses.pop("EXPUNGE") == [b"1"] * N
        ok((yield timed("NOOP (the other session: EXPUNGE)", watcher.noop)))
        assert watcher.untagged_responses.pop("EXPUNGE") == [b"1"] * N

        left = N - 4
        ok((yield timed("STORE 1:* +FLAGS (\\Deleted)",
                        lambda: imap.store("1:*", "+FLAGS.SILENT", "(\\Deleted)"))))
        assert ok((yield timed("EXPUNGE", imap.expunge))) == [b"1"] * left
        ok((yield timed("NOOP (the other session: EXPUNGE of the rest)", watcher.noop)))
        assert watcher.untagged_responses.pop("EXPUNGE") == [b"1"] * left
        status = ok((yield timed("STATUS", lambda: imap.status("Archive", "(MESSAGES)"))))
        assert status == [b"Archive (MESSAGES %d)" % N]
        assert ok((yield timed("EXAMINE", lambda: imap.select("Archive", True)))) == [
            b"%d" % N]
        found = ok((yield timed("SEARCH UNSEEN", lambda: imap.search(None, "UNSEEN"))))
        assert found[0].split() == [b"%d" % n for n in range(10, N + 1, 10)]
    finally:
        meter.uninstall()
        gc.unfreeze()
        yield in_thread(lambda: (watcher.logout(), imap.logout()))
        yield server.stop()
    report = "\n".join(f"{name}: {cpu * 1000:.1f} ms (garbage collection {in_gc * 1000:.1f}"
                       f" ms; the command took {wall:.1f} s)"
                       for name, (cpu, in_gc, wall) in longest.items())
    print(report)
    over = [name for name, (cpu, _, _) in longest.items() if cpu > BOUND]
    assert not over, f"held the reactor over {BOUND * 1000:.0f} ms:\n{report}"
