"""The storage suite: mailboxes, UIDs/MODSEQs, queue and blob references.

Runs on SQLite, PostgreSQL and MariaDB (the ``stack`` fixture is parametrised).
"""

from __future__ import annotations

import sqlite3
import time
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet import defer, threads

from lightmail.storage import schema as s
from lightmail.storage.interfaces import (
    BlobMissing,
    DurableBlob,
    Envelope,
    Filing,
    FilingTarget,
    MailboxExists,
    NoSuchMailbox,
    QueueRecipient,
)
from lightmail.storage.queuestore import new_queue_id, queue_id_time


def enqueue(stack: Any, envelope: Envelope, ref: Any, queue_id: str | None = None) -> Any:
    """Queue a stored message, as everything does: through the write port."""
    return stack.port.enqueue(envelope, DurableBlob(ref), queue_id)

MESSAGE = b"From: a@example.org\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"


def refcount(stack, blob_id: str) -> int | None:
    with stack.db.engine.connect() as conn:
        return conn.execute(sa.select(s.blobs.c.refcount).where(
            s.blobs.c.id == blob_id)).scalar()


@defer.inlineCallbacks
def make_user(stack, address: str = "bob@example.test"):
    domain = address.split("@")[1]
    if domain not in (yield stack.directory.list_domains()):
        yield stack.directory.add_domain(domain)
    user = yield stack.directory.add_user(address, None)
    return user


@pytest_twisted.inlineCallbacks
def test_mailbox_create_get_list(stack) -> None:
    user = yield make_user(stack)
    inbox = yield stack.mailstore.create_mailbox(user.id, "inbox")
    assert inbox.name == "INBOX" and inbox.uidnext == 1 and inbox.uidvalidity > 0
    yield stack.mailstore.create_mailbox(user.id, "Archive/2026", "\\Archive")
    with pytest.raises(MailboxExists):
        yield stack.mailstore.create_mailbox(user.id, "INBOX")
    found = yield stack.mailstore.get_mailbox(user.id, "InBoX")
    assert found == inbox
    names = [mb.name for mb in (yield stack.mailstore.list_mailboxes(user.id))]
    assert names == ["Archive/2026", "INBOX"]
    assert (yield stack.mailstore.get_mailbox(user.id, "nope")) is None


@pytest_twisted.inlineCallbacks
def test_append_assigns_increasing_uids_and_modseqs_under_concurrency(stack) -> None:
    user = yield make_user(stack)
    box = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    refs = yield defer.gatherResults(
        [stack.blobs.put(MESSAGE + b"%d\r\n" % i) for i in range(12)])
    results = yield defer.gatherResults(
        [stack.mailstore.append(box.id, ref, flags=["\\Seen"]) for ref in refs])
    assert sorted(r.uid for r in results) == list(range(1, 13))
    assert len({r.modseq for r in results}) == 12
    messages = yield stack.mailstore.list_messages(box.id)
    assert [m.uid for m in messages] == list(range(1, 13))
    assert all(m.flags == frozenset({"\\Seen"}) for m in messages)
    box2 = yield stack.mailstore.get_mailbox(user.id, "INBOX")
    assert box2.uidnext == 13
    assert box2.highestmodseq == max(r.modseq for r in results)


@pytest_twisted.inlineCallbacks
def test_select_mailbox_reads_row_and_messages_together(stack) -> None:
    user = yield make_user(stack)
    assert (yield stack.mailstore.select_mailbox(user.id, "INBOX")) is None
    box = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    empty_box, empty = yield stack.mailstore.select_mailbox(user.id, "inbox")
    assert empty_box == box and empty == []
    refs = yield defer.gatherResults(
        [stack.blobs.put(MESSAGE + b"%d\r\n" % i) for i in range(3)])
    for i, ref in enumerate(refs):
        yield stack.mailstore.append(box.id, ref, flags=["\\Seen"] if i else [])
    yield stack.mailstore.set_flags(box.id, [2], ["\\Flagged"], mode="add")
    found, messages = yield stack.mailstore.select_mailbox(user.id, "InBoX")
    assert found == (yield stack.mailstore.get_mailbox(user.id, "INBOX"))
    assert messages == (yield stack.mailstore.list_messages(box.id))
    assert [m.uid for m in messages] == [1, 2, 3]
    assert [m.blob_id for m in messages] == [ref.id for ref in refs]
    assert all(type(v) is int for m in messages
               for v in (m.uid, m.modseq, m.size, m.internal_date))
    assert found.uidnext == 4 and found.highestmodseq == max(m.modseq for m in messages)
    assert messages[1].flags == frozenset({"\\Seen", "\\Flagged"})
    assert messages[0].flags == frozenset() and messages[2].flags == {"\\Seen"}
    assert (yield stack.mailstore.select_mailbox(user.id, "nope")) is None


@pytest_twisted.inlineCallbacks
def test_same_delivery_id_files_once(stack) -> None:
    user = yield make_user(stack)
    box = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    ref = yield stack.blobs.put(MESSAGE)
    filing = Filing((FilingTarget(user.id, user.address),), "q42")
    [first] = yield defer.gatherResults(stack.port.file([filing], DurableBlob(ref)))
    [again] = yield defer.gatherResults(stack.port.file([filing], DurableBlob(ref)))
    assert first.placed == (f"{user.address}/INBOX uid=1",)
    assert again.placed == (f"{user.address}/INBOX uid=1 (already filed)",)
    assert len((yield stack.mailstore.list_messages(box.id))) == 1
    assert refcount(stack, ref.id) == 1


@pytest_twisted.inlineCallbacks
def test_identical_content_is_stored_once_and_counted(stack) -> None:
    user = yield make_user(stack)
    inbox = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    other = yield stack.mailstore.create_mailbox(user.id, "Other")
    ref1 = yield stack.blobs.put(MESSAGE)
    ref2 = yield stack.blobs.put(MESSAGE)
    assert ref1 == ref2
    yield stack.mailstore.append(inbox.id, ref1)
    yield stack.mailstore.append(other.id, ref2)
    assert refcount(stack, ref1.id) == 2


@pytest_twisted.inlineCallbacks
def test_flags_and_expunge_bump_modseq_and_release_blobs(stack) -> None:
    user = yield make_user(stack)
    box = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    changes = []
    stack.mailstore.add_listener(type("L", (), {"mailbox_changed":
                                                lambda self, c: changes.append(c)})())
    refs = []
    for i in range(3):
        refs.append((yield stack.blobs.put(MESSAGE + b"%d" % i)))
    for ref in refs:
        yield stack.mailstore.append(box.id, ref)
    changed = yield stack.mailstore.set_flags(box.id, [1, 2], ["\\Seen", "$Label1"], "add")
    assert [m.uid for m in changed] == [1, 2]
    assert changed[0].flags == frozenset({"\\Seen", "$Label1"})
    unchanged = yield stack.mailstore.set_flags(box.id, [1], ["\\Seen"], "add")
    assert unchanged == []
    removed = yield stack.mailstore.set_flags(box.id, [1], ["$Label1"], "remove")
    assert removed[0].flags == frozenset({"\\Seen"})
    gone = yield stack.mailstore.expunge(box.id, [2, 3, 99])
    assert gone == [2, 3]
    left = yield stack.mailstore.list_messages(box.id)
    assert [m.uid for m in left] == [1]
    assert refcount(stack, refs[1].id) == 0
    with stack.db.engine.connect() as conn:
        expunged = conn.execute(sa.select(s.expunged.c.uid).where(
            s.expunged.c.mailbox_id == box.id).order_by(s.expunged.c.uid)).scalars().all()
    assert expunged == [2, 3]
    kinds = [c.kind for c in changes]
    assert kinds == ["appended"] * 3 + ["flags", "flags", "expunged"]
    box_now = yield stack.mailstore.get_mailbox(user.id, "INBOX")
    assert box_now.highestmodseq == changes[-1].modseq
    with pytest.raises(NoSuchMailbox):
        yield stack.mailstore.expunge(999999, [1])


@pytest_twisted.inlineCallbacks
def test_queue_claim_deliver_and_retire(stack) -> None:
    ref = yield stack.blobs.put(MESSAGE)
    envelope = Envelope(mail_from="a@example.org", recipients=[
        QueueRecipient("bob@example.test", orcpt="rfc822;bob@example.test",
                       notify="SUCCESS,FAILURE"),
        QueueRecipient("carol@remote.example", transport="smtp")], envid="E1", ret="HDRS")
    queue_id = yield enqueue(stack, envelope, ref)
    assert abs(queue_id_time(queue_id) - time.time()) < 60
    assert refcount(stack, ref.id) == 1
    items = yield stack.queue.claim("node-a", ["local"], 10, 60)
    assert len(items) == 1
    item = items[0]
    assert item.recipient.address == "bob@example.test"
    assert item.recipient.notify == "SUCCESS,FAILURE"
    assert item.envelope.envid == "E1" and item.envelope.ret == "HDRS"
    assert item.blob == ref
    # Leased: another node gets nothing.
    assert (yield stack.queue.claim("node-b", ["local"], 10, 60)) == []
    yield stack.queue.delivered(item, "node-a")
    rows = yield stack.queue.list_recipients()
    assert [(r["recipient"], r["state"]) for r in rows] == [
        ("bob@example.test", "delivered"), ("carol@remote.example", "queued")]
    smtp_items = yield stack.queue.claim("node-a", ["smtp"], 10, 60)
    yield stack.queue.bounced(smtp_items[0], "node-a", "5.1.1 no such user")
    # All final: the message leaves the queue and drops its blob reference.
    assert (yield stack.queue.list_recipients()) == []
    assert refcount(stack, ref.id) == 0


@pytest_twisted.inlineCallbacks
def test_queue_hold_release_requeue_delete(stack) -> None:
    ref = yield stack.blobs.put(MESSAGE)
    first = yield enqueue(stack, Envelope("a@example.org", [
        QueueRecipient("x@remote.example", "smtp"), QueueRecipient("y@remote.example", "smtp")]),
        ref)
    second = yield enqueue(stack, Envelope("a@example.org", [
        QueueRecipient("z@remote.example", "smtp")]), ref)
    assert refcount(stack, ref.id) == 2
    assert (yield stack.queue.manage("hold", [first])) == 2
    items = yield stack.queue.claim("node-a", ["smtp"], 10, 60)
    assert [i.queue_id for i in items] == [second]           # held mail is not tried
    yield stack.queue.deferred(items[0], "node-a", "4.4.1 down", int(time.time() * 1000)
                               + 3_600_000)
    assert (yield stack.queue.claim("node-a", ["smtp"], 10, 60)) == []
    assert (yield stack.queue.manage("requeue", [second])) == 1     # due now
    assert (yield stack.queue.manage("release", [])) == 2           # all held mail
    items = yield stack.queue.claim("node-a", ["smtp"], 10, 60)
    assert sorted(i.recipient.address for i in items) == [
        "x@remote.example", "y@remote.example", "z@remote.example"]
    assert (yield stack.queue.manage("delete", [])) == 0     # in delivery: left alone
    for item in items:
        yield stack.queue.deferred(item, "node-a", "4.4.1 down", 0)
    assert (yield stack.queue.manage("delete", [first])) == 2
    assert [r["queue_id"] for r in (yield stack.queue.list_recipients())] == [second]
    assert refcount(stack, ref.id) == 1
    assert (yield stack.queue.manage("delete", [])) == 1
    assert refcount(stack, ref.id) == 0


@pytest_twisted.inlineCallbacks
def test_expired_lease_is_taken_over_and_stale_owner_cannot_finish(stack) -> None:
    ref = yield stack.blobs.put(MESSAGE)
    yield enqueue(stack, Envelope("a@example.org", [QueueRecipient("b@example.test")]),
                              ref)
    [item] = yield stack.queue.claim("crashed-node", ["local"], 10, 0.0)
    time.sleep(0.01)  # the zero-length lease has run out
    [again] = yield stack.queue.claim("node-b", ["local"], 10, 60)
    assert again.recipient_id == item.recipient_id
    # The crashed node's late answer changes nothing.
    yield stack.queue.delivered(item, "crashed-node")
    rows = yield stack.queue.list_recipients()
    assert rows[0]["state"] == "active"
    yield stack.queue.deferred(again, "node-b", "4.4.1 timeout", int(time.time() * 1000))
    rows = yield stack.queue.list_recipients(["deferred"])
    assert rows[0]["attempts"] == 1 and rows[0]["last_error"] == "4.4.1 timeout"


@pytest_twisted.inlineCallbacks
def test_delay_warning_is_recorded_once_with_its_notice(stack) -> None:
    """warn_delayed marks recipients warned and queues the notice in one transaction;
    a recipient warned already makes it change nothing, and claims say warned."""
    ref = yield stack.blobs.put(MESSAGE)
    queue_id = yield enqueue(stack, Envelope("a@example.org", [
        QueueRecipient("x@remote.example", "smtp", notify="DELAY"),
        QueueRecipient("y@remote.example", "smtp"),
        QueueRecipient("z@remote.example", "smtp")]), ref)
    items = yield stack.queue.claim("node-a", ["smtp"], 10, 60)
    assert [i.delay_warned for i in items] == [False, False, False]
    by_address = {i.recipient.address: i for i in items}
    for address in ("x@remote.example", "y@remote.example"):
        yield stack.queue.deferred(by_address[address], "node-a", "4.4.1 down", 0)
    # z is still in delivery; a lease given back after a crash is no delay either.
    yield stack.queue.release_leases("node-a")
    rows = yield stack.queue.delayed_recipients(queue_id)
    assert [(r["recipient"], r["notify"], r["last_error"]) for r in rows] == [
        ("x@remote.example", "DELAY", "4.4.1 down"), ("y@remote.example", None, "4.4.1 down")]
    notice_ref = yield stack.blobs.put(b"Subject: delayed\r\n\r\nlate\r\n")
    notice = Envelope("", [QueueRecipient("a@example.org", "smtp")], source="local")
    ids = [r["id"] for r in rows]
    notice_id = yield stack.port.warn_delayed(ids, notice, DurableBlob(notice_ref))
    assert notice_id is not None
    # Warned once: again, or with one more recipient, nothing changes.
    assert (yield stack.port.warn_delayed(ids, notice, DurableBlob(notice_ref))) is None
    z_id = by_address["z@remote.example"].recipient_id
    assert (yield stack.port.warn_delayed([ids[0], z_id], notice,
                                                DurableBlob(notice_ref))) is None
    assert (yield stack.queue.delayed_recipients(queue_id)) == []
    queued = yield stack.queue.list_recipients()
    assert sorted((r["queue_id"], r["recipient"]) for r in queued
                  if r["queue_id"] == notice_id) == [(notice_id, "a@example.org")]
    assert refcount(stack, notice_ref.id) == 1
    with stack.db.engine.connect() as conn:
        warned = {row.recipient: row.delay_warned for row in conn.execute(
            sa.select(s.queue_recipients.c.recipient, s.queue_recipients.c.delay_warned))}
    assert warned["z@remote.example"] is None
    assert abs(warned["x@remote.example"] / 1000 - time.time()) < 60
    # What a node (this one restarted, or another) claims says it was warned.
    yield stack.queue.manage("requeue", [queue_id])
    items = yield stack.queue.claim("node-b", ["smtp"], 10, 60)
    assert {i.recipient.address: i.delay_warned for i in items if i.queue_id == queue_id} \
        == {"x@remote.example": True, "y@remote.example": True, "z@remote.example": False}


@pytest_twisted.inlineCallbacks
def test_garbage_collection_removes_only_unreferenced_old_blobs(stack) -> None:
    user = yield make_user(stack)
    box = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    kept = yield stack.blobs.put(b"kept\r\n")
    dropped = yield stack.blobs.put(b"dropped\r\n")
    orphan = yield stack.blobs.put(b"never referenced\r\n")
    yield stack.mailstore.append(box.id, kept)
    yield stack.mailstore.append(box.id, dropped)
    yield stack.mailstore.expunge(box.id, [2])
    # Inside the grace period nothing goes.
    assert (yield stack.mailstore.collect_garbage(3600)) == 0
    assert stack.blobs.exists_now(dropped.id) and stack.blobs.exists_now(orphan.id)
    time.sleep(0.05)
    removed = yield stack.mailstore.collect_garbage(0)
    assert removed == 2
    assert stack.blobs.exists_now(kept.id)
    assert not stack.blobs.exists_now(dropped.id)
    assert not stack.blobs.exists_now(orphan.id)
    assert refcount(stack, dropped.id) is None


@pytest_twisted.inlineCallbacks
def test_garbage_collection_flushes_the_database_before_deleting(stack, monkeypatch) -> None:
    """An expunge may be committed unsynced: GC puts it on disk before it deletes the
    blob the expunge let go of."""
    user = yield make_user(stack)
    box = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    ref = yield stack.blobs.put(b"expunged unsynced\r\n")
    yield stack.mailstore.append(box.id, ref)
    yield stack.mailstore.expunge(box.id, [1])
    events: list[str] = []
    real_sync, real_delete = stack.db.sync_now, stack.blobs.delete_now
    monkeypatch.setattr(stack.db, "sync_now", lambda: (events.append("sync"), real_sync())[1])
    monkeypatch.setattr(stack.blobs, "delete_now", lambda *a: (events.append("delete"),
                                                               real_delete(*a))[1])
    time.sleep(0.05)
    assert (yield stack.mailstore.collect_garbage(0)) == 1
    assert events[:2] == ["sync", "delete"]


def test_a_connection_whose_flush_level_cannot_be_restored_is_dropped(
        stack, monkeypatch) -> None:
    """After a group of unsynced writes the SQLite connection goes back to FULL; should
    that fail, the connection is invalidated rather than reused for mail."""
    if stack.db.backend != "sqlite":
        return          # the level is SQLite's alone (write_unsynced is write elsewhere)
    from lightmail.storage import database
    from lightmail.storage.database import GroupedWrite
    real = database._synchronous

    def failing(driver: Any, level: str) -> None:
        if level == "FULL":
            raise sqlite3.OperationalError("disk I/O error")
        real(driver, level)
    monkeypatch.setattr(database, "_synchronous", failing)
    seen: list[Any] = []
    request = GroupedWrite(seen.append, (), {}, defer.Deferred(), False, durable=False)
    with pytest.raises(sqlite3.OperationalError):
        stack.db._run_group([request])
    monkeypatch.setattr(database, "_synchronous", real)
    assert seen
    # No pooled connection is left broken or at NORMAL: each next group gets a working
    # one at FULL (the pool hands its connections out in turn).
    for _ in range(stack.db.threads + 2):
        level = stack.db.write_now(
            lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar())
        assert level == 2


def test_queue_ids_are_unique_and_carry_their_time() -> None:
    ids = [new_queue_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert all(set(id_) <= set("0123456789BCDFGHJKLMNPQRSTVWXYZ") for id_ in ids)
    before = new_queue_id()
    time.sleep(0.01)
    after = new_queue_id()
    assert queue_id_time(before) < queue_id_time(after)
    assert len(before) == len(after) and before < after  # sortable as text


@pytest_twisted.inlineCallbacks
def test_a_restarted_node_takes_back_its_own_leases_at_once(stack) -> None:
    ref = yield stack.blobs.put(MESSAGE)
    yield enqueue(stack, Envelope("a@example.org", [QueueRecipient("b@example.test")]),
                              ref)
    [item] = yield stack.queue.claim("node-1", ["local"], 10, 3600)
    assert (yield stack.queue.claim("node-1", ["local"], 10, 3600)) == []
    assert (yield stack.queue.release_leases("node-2")) == 0   # not node-2's to give
    assert (yield stack.queue.release_leases("node-1")) == 1
    [again] = yield stack.queue.claim("node-1", ["local"], 10, 3600)
    assert again.recipient_id == item.recipient_id


@pytest_twisted.inlineCallbacks
def test_group_commit_isolates_a_failing_member(stack) -> None:
    """Grouped writes commit together; one that fails rolls back alone."""
    yield stack.directory.add_domain("example.test")

    def add(conn, name: str) -> str:
        conn.execute(s.domains.insert().values(name=name, created=0))
        return name

    def boom(conn) -> None:
        conn.execute(s.domains.insert().values(name="half.test", created=0))
        raise RuntimeError("this member fails")

    results = yield defer.DeferredList(
        [stack.db.write_grouped(add, f"d{i}.test") for i in range(5)]
        + [stack.db.write_grouped(boom)]
        + [stack.db.write_grouped(add, "example.test")]   # unique violation
        + [stack.db.write_grouped(add, "last.test")], consumeErrors=True)
    oks = [ok for ok, _ in results]
    assert oks == [True] * 5 + [False, False, True]
    assert results[5][1].check(RuntimeError)
    names = set((yield stack.directory.list_domains()))
    assert names == {"example.test", "last.test"} | {f"d{i}.test" for i in range(5)}


@pytest_twisted.inlineCallbacks
def test_group_commit_runs_before_once_and_first(stack) -> None:
    """``write_grouped_after``: ``before`` runs once, ahead of its transaction, on the
    same worker thread; when it fails, its request is left out (and only it)."""
    import threading
    events: list[tuple[str, str, int]] = []

    class Store:
        """Makes its staged blobs durable together (as a blob store's
        commit_staged_now does): one call for the group's."""

        def commit_staged_now(self, staged: list[Any]) -> list[Any]:
            events.append(("together", ",".join(b.name for b in staged), 0))
            outcomes: list[Any] = []
            for blob in staged:
                events.append(("before", blob.name, threading.get_ident()))
                outcomes.append(OSError("disk full") if blob.fail else None)
            return outcomes

    store = Store()

    def before(name: str, fail: bool = False) -> Any:
        return SimpleNamespace(name=name, fail=fail, store=store, durable=False)

    def add(conn, name: str) -> str:
        events.append(("add", name, threading.get_ident()))
        conn.execute(s.domains.insert().values(name=name, created=0))
        return name

    def boom(conn) -> None:
        raise RuntimeError("this member fails")   # the group then runs again

    results = yield defer.DeferredList(
        [stack.db.write_grouped_after(before("a.test"), add, "a.test"),
         stack.db.write_grouped_after(before("b.test", fail=True), add, "b.test"),
         stack.db.write_grouped(boom),
         stack.db.write_grouped_after(before("c.test"), add, "c.test")],
        consumeErrors=True)
    assert [ok for ok, _ in results] == [True, False, False, True]
    assert results[1][1].check(OSError)
    # (Servers run groups in parallel: in any order, but each once.)
    assert sorted(e[:2] for e in events if e[0] == "before") == [
        ("before", "a.test"), ("before", "b.test"), ("before", "c.test")]
    assert ("add", "b.test") not in [e[:2] for e in events]
    for name in ("a.test", "c.test"):
        first_add = next(e for e in events if e[:2] == ("add", name))
        assert first_add[2] == next(e for e in events if e[:2] == ("before", name))[2]
    names = set((yield stack.directory.list_domains()))
    assert {"a.test", "c.test"} <= names and "b.test" not in names


@pytest_twisted.inlineCallbacks
def test_local_delivery_is_one_transaction_and_exactly_once(stack) -> None:
    from lightmail.delivery.local import LocalDeliveryAgent
    user = yield make_user(stack, "bob@example.test")
    yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    yield stack.mailstore.create_mailbox(user.id, "lists")
    agent = LocalDeliveryAgent(stack.directory, stack.port, "node-1")
    ref = yield stack.blobs.put(MESSAGE)
    yield enqueue(stack, Envelope("a@example.org", [
        QueueRecipient("bob+lists@example.test"), QueueRecipient("bob@example.test"),
        QueueRecipient("gone@example.test")]), ref)
    items = yield stack.queue.claim("node-1", ["local"], 10, 600)
    results = []
    for item in items:
        results.append((yield agent.deliver(item)))
    assert [r.status for r in results] == ["delivered", "delivered", "bounced"]
    # Filed and recorded in one transaction; the bounce is the runner's to record.
    assert [r.recorded for r in results] == [True, True, False]
    yield stack.queue.bounced(items[2], "node-1", results[2].detail)
    # Handing the same item over again (a retry after a crash) files nothing more.
    again = yield agent.deliver(items[0])
    assert "already filed" in again.detail
    lists = yield stack.mailstore.get_mailbox(user.id, "lists")
    inbox = yield stack.mailstore.get_mailbox(user.id, "INBOX")
    assert len((yield stack.mailstore.list_messages(lists.id))) == 1
    assert len((yield stack.mailstore.list_messages(inbox.id))) == 1
    assert (yield stack.queue.list_recipients()) == []   # all final: retired
    assert refcount(stack, ref.id) == 2                   # the two filed copies


@pytest_twisted.inlineCallbacks
def test_every_new_message_is_filed_although_row_ids_are_reused(stack) -> None:
    """Retired queue rows are deleted and SQLite reuses their ids: delivery ids must
    still tell a new message from a retried one (this lost mail once)."""
    from lightmail.delivery.local import LocalDeliveryAgent
    user = yield make_user(stack, "bob@example.test")
    agent = LocalDeliveryAgent(stack.directory, stack.port, "node-1")
    for number in range(3):
        ref = yield stack.blobs.put(MESSAGE + b"message %d\r\n" % number)
        yield enqueue(stack, Envelope("a@example.org",
                                           [QueueRecipient("bob@example.test")]), ref)
        [item] = yield stack.queue.claim("node-1", ["local"], 10, 600)
        result = yield agent.deliver(item)
        assert "already filed" not in result.detail
    inbox = yield stack.mailstore.get_mailbox(user.id, "INBOX")
    assert [m.uid for m in (yield stack.mailstore.list_messages(inbox.id))] == [1, 2, 3]


@pytest_twisted.inlineCallbacks
def test_filing_at_acceptance_is_all_or_nothing(stack) -> None:
    from lightmail.delivery.local import LocalDeliveryAgent
    from lightmail.storage.interfaces import NotFiled
    bob = yield make_user(stack, "bob@example.test")
    yield stack.mailstore.get_or_create_mailbox(bob.id, "INBOX")
    lists = yield stack.mailstore.create_mailbox(bob.id, "lists")
    carol = yield stack.directory.add_user("carol@example.test", None)   # no INBOX yet
    yield stack.directory.add_user("small@example.test", None, quota_bytes=10)
    agent = LocalDeliveryAgent(stack.directory, stack.port, "node-1")
    ref = yield stack.blobs.put(MESSAGE)
    results = yield agent.deliver_at_acceptance(
        ["bob+lists@example.test", "bob@example.test", "carol@example.test"],
        DurableBlob(ref), "Q1")
    assert [r.status for r in results] == ["delivered"] * 3
    assert results[0].detail == "2.0.0 bob@example.test/lists uid=1"
    assert results[2].detail == "2.0.0 carol@example.test/INBOX uid=1"
    again = yield agent.deliver_at_acceptance(["bob+lists@example.test"], DurableBlob(ref),
                                              "Q2")
    assert again[0].detail == "2.0.0 bob@example.test/lists uid=2"
    box = yield stack.mailstore.get_mailbox(bob.id, "lists")
    assert (box.uidnext, box.highestmodseq) == (3, lists.highestmodseq + 2)
    messages = yield stack.mailstore.list_messages(box.id)
    assert [(m.uid, m.modseq) for m in messages] == [(1, lists.highestmodseq + 1),
                                                     (2, lists.highestmodseq + 2)]
    assert (yield stack.mailstore.get_mailbox(carol.id, "INBOX")) is not None
    assert refcount(stack, ref.id) == 4
    # One address that cannot be filed now (over quota, unknown): nothing is filed.
    for bad in ("small@example.test", "nobody@example.test"):
        with pytest.raises(NotFiled, match=bad):
            yield agent.deliver_at_acceptance(["bob@example.test", bad], DurableBlob(ref),
                                              "Q3")
    inbox = yield stack.mailstore.get_mailbox(bob.id, "INBOX")
    assert len((yield stack.mailstore.list_messages(inbox.id))) == 1
    assert refcount(stack, ref.id) == 4


@pytest_twisted.inlineCallbacks
def test_copy_move_status_and_changes_since_share_blobs(stack) -> None:
    """What IMAP COPY/MOVE, STATUS and CONDSTORE/QRESYNC catch-up rest on."""
    user = yield make_user(stack)
    inbox = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    archive = yield stack.mailstore.create_mailbox(user.id, "Archive", "\\Archive")
    refs = []
    for i in range(4):
        refs.append((yield stack.blobs.put(MESSAGE + b"%d" % i)))
        yield stack.mailstore.append(inbox.id, refs[-1], flags=["\\Seen"] if i == 0 else [])
    yield stack.mailstore.set_flags(inbox.id, [2], ["\\Deleted"], "add")
    status = yield stack.mailstore.status(inbox.id)
    assert (status.messages, status.unseen, status.deleted) == (4, 3, 1)
    assert status.size == sum(ref.size for ref in refs)
    before = (yield stack.mailstore.get_mailbox(user.id, "INBOX")).highestmodseq

    copied = yield stack.mailstore.copy(inbox.id, [1, 2], archive.id)
    assert copied.uidvalidity == archive.uidvalidity and copied.pairs == ((1, 1), (2, 2))
    assert refcount(stack, refs[0].id) == 2           # one blob, two messages
    moved = yield stack.mailstore.copy(inbox.id, [3, 4], archive.id, move=True)
    assert moved.pairs == ((3, 3), (4, 4))
    assert refcount(stack, refs[2].id) == 1           # moved, not copied
    in_archive = yield stack.mailstore.list_messages(archive.id)
    assert [(m.uid, m.blob_id) for m in in_archive] == [
        (1, refs[0].id), (2, refs[1].id), (3, refs[2].id), (4, refs[3].id)]
    assert in_archive[0].flags == frozenset({"\\Seen"})    # flags travel along

    yield stack.mailstore.set_flags(inbox.id, [1], ["$Done"], "add")
    changes = yield stack.mailstore.changes_since(inbox.id, before)
    assert [m.uid for m in changes.changed] == [1]
    assert changes.expunged == [3, 4]
    assert changes.mailbox.highestmodseq > before
    nothing = yield stack.mailstore.changes_since(inbox.id, changes.mailbox.highestmodseq)
    assert nothing.changed == [] and nothing.expunged == []


@pytest_twisted.inlineCallbacks
def test_rename_delete_and_subscribe_mailboxes(stack) -> None:
    user = yield make_user(stack)
    inbox = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    yield stack.mailstore.create_mailbox(user.id, "Work")
    yield stack.mailstore.create_mailbox(user.id, "Work/2026")
    ref = yield stack.blobs.put(MESSAGE)
    yield stack.mailstore.append(inbox.id, ref)

    yield stack.mailstore.rename_mailbox(user.id, "Work", "Jobs")
    names = [mb.name for mb in (yield stack.mailstore.list_mailboxes(user.id))]
    assert names == ["INBOX", "Jobs", "Jobs/2026"]   # children move along
    with pytest.raises(MailboxExists):
        yield stack.mailstore.rename_mailbox(user.id, "Jobs", "INBOX")
    with pytest.raises(NoSuchMailbox):
        yield stack.mailstore.rename_mailbox(user.id, "Nope", "Other")

    # Renaming INBOX moves its messages and leaves an empty INBOX (RFC 9051 §6.3.6).
    yield stack.mailstore.rename_mailbox(user.id, "INBOX", "Old")
    old = yield stack.mailstore.get_mailbox(user.id, "Old")
    assert len((yield stack.mailstore.list_messages(old.id))) == 1
    assert (yield stack.mailstore.list_messages(inbox.id)) == []

    lists = yield stack.mailstore.create_mailbox(user.id, "Lists", subscribed=False)
    assert not lists.subscribed
    yield stack.mailstore.set_subscribed(old.id, False)
    assert not (yield stack.mailstore.get_mailbox(user.id, "Old")).subscribed
    yield stack.mailstore.set_subscribed(old.id, True)
    assert (yield stack.mailstore.get_mailbox(user.id, "Old")).subscribed

    yield stack.mailstore.delete_mailbox(user.id, "Old")
    assert (yield stack.mailstore.get_mailbox(user.id, "Old")) is None
    assert refcount(stack, ref.id) == 0                # its message went with it
    with pytest.raises(NoSuchMailbox):
        yield stack.mailstore.delete_mailbox(user.id, "Old")

    # A subscription is to the name: it outlives DELETE (RFC 9051 §6.3.7), comes
    # back with a mailbox made under the name, or is forgotten by name.
    kept = stack.mailstore.subscriptions_without_mailbox
    assert (yield kept(user.id)) == ["Old"]
    yield stack.mailstore.delete_mailbox(user.id, "Lists")     # not subscribed
    assert (yield kept(user.id)) == ["Old"]
    again = yield stack.mailstore.create_mailbox(user.id, "Old", subscribed=False)
    assert again.subscribed and (yield kept(user.id)) == []
    yield stack.mailstore.delete_mailbox(user.id, "Old")
    jobs = yield stack.mailstore.get_mailbox(user.id, "Jobs/2026")
    yield stack.mailstore.set_subscribed(jobs.id, False)
    yield stack.mailstore.rename_mailbox(user.id, "Jobs/2026", "Old")
    assert (yield stack.mailstore.get_mailbox(user.id, "Old")).subscribed
    yield stack.mailstore.delete_mailbox(user.id, "Old")
    assert (yield stack.mailstore.unsubscribe_name(user.id, "Old")) is True
    assert (yield stack.mailstore.unsubscribe_name(user.id, "Old")) is False
    assert (yield kept(user.id)) == []


def stored_headers(stack, blob_id: str) -> bytes | None:
    with stack.db.engine.connect() as conn:
        value = conn.execute(sa.select(s.blobs.c.headers).where(
            s.blobs.c.id == blob_id)).scalar()
    return None if value is None else bytes(value)


@pytest_twisted.inlineCallbacks
def test_header_blocks_kept_per_blob_and_read_in_batches(stack) -> None:
    """SEARCH/SORT/FETCH of header fields read headers_for, not the blobs: the header
    block is kept with the blob row when it is first referenced (the writer saw it),
    shared by copies, and filled from the blob for rows that lack it."""
    from lightmail.storage.blobs import HEADER_CAP
    user = yield make_user(stack)
    inbox = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    archive = yield stack.mailstore.create_mailbox(user.id, "Archive")
    head = MESSAGE.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    ref = yield stack.blobs.put(MESSAGE)
    assert ref.headers == head
    yield stack.mailstore.append(inbox.id, ref)
    assert stored_headers(stack, ref.id) == head
    yield stack.mailstore.copy(inbox.id, [1], archive.id)
    # An older message: its blob row has no header block yet (a BlobRef made from a
    # queue row, as local delivery does, carries none either).
    old = b"Subject: old\nX: y\n\nbody\n"
    old_ref = yield stack.blobs.put(old)
    yield stack.mailstore.append(inbox.id, type(old_ref)(old_ref.id, old_ref.size))
    assert stored_headers(stack, old_ref.id) is None
    # Too long to keep: recorded as empty, and left out of the answer.
    big = b"Subject: big\r\nX-Long: " + b"x" * HEADER_CAP + b"\r\n\r\nbody\r\n"
    big_ref = yield stack.blobs.put(big)
    assert big_ref.headers == b""
    yield stack.mailstore.append(inbox.id, big_ref)

    found = yield stack.mailstore.headers_for(inbox.id, [1, 2, 3, 99])
    assert found == {1: head, 2: b"Subject: old\nX: y\n\n"}
    assert stored_headers(stack, old_ref.id) == b"Subject: old\nX: y\n\n"   # kept
    assert stored_headers(stack, big_ref.id) == b""
    assert (yield stack.mailstore.headers_for(archive.id, [1])) == {1: head}
    # The same content delivered again keeps its block; and many UIDs in batches.
    yield stack.mailstore.append(inbox.id, type(ref)(ref.id, ref.size))
    assert stored_headers(stack, ref.id) == head
    many = list(range(1, 1200))
    assert (yield stack.mailstore.headers_for(inbox.id, many)) == {
        1: head, 2: b"Subject: old\nX: y\n\n", 4: head}


@pytest_twisted.inlineCallbacks
def test_copies_and_deliveries_are_announced_with_their_messages(stack) -> None:
    """An IMAP session takes announced messages in without reading the store: the
    announcement must hold them exactly as listed."""
    from lightmail.delivery.local import LocalDeliveryAgent

    class Heard:
        def __init__(self) -> None:
            self.changes: list = []

        def mailbox_changed(self, change) -> None:
            self.changes.append(change)

    heard = Heard()
    stack.mailstore.add_listener(heard)
    user = yield make_user(stack, "bob@example.test")
    inbox = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    archive = yield stack.mailstore.create_mailbox(user.id, "Archive")
    agent = LocalDeliveryAgent(stack.directory, stack.port, "node-1")
    ref = yield stack.blobs.put(MESSAGE)
    yield agent.deliver_at_acceptance(["bob@example.test"], DurableBlob(ref), "Q1")  # fresh
    yield enqueue(stack, Envelope("a@example.org",
                                       [QueueRecipient("bob@example.test")]), ref)
    [item] = yield stack.queue.claim("node-1", ["local"], 10, 600)
    yield agent.deliver(item)                                               # queued
    yield stack.mailstore.set_flags(inbox.id, [1], ["\\Seen"], "add")
    yield stack.mailstore.copy(inbox.id, [1, 2], archive.id)
    appended = [c for c in heard.changes if c.kind == "appended"]
    assert [(c.mailbox_id, c.uids) for c in appended] == [
        (inbox.id, (1,)), (inbox.id, (2,)), (archive.id, (1, 2))]
    listed = {inbox.id: (yield stack.mailstore.list_messages(inbox.id)),
              archive.id: (yield stack.mailstore.list_messages(archive.id))}
    assert appended[2].messages == tuple(listed[archive.id])
    assert appended[2].messages[0].flags == {"\\Seen"}
    first, second = listed[inbox.id]
    assert appended[0].messages == (first._replace(modseq=appended[0].modseq,
                                                   flags=frozenset()),)
    assert appended[1].messages == (second,)
    assert all(c.modseq == c.messages[0].modseq for c in appended)


def test_sql_threads_default_follows_the_backend(tmp_path) -> None:
    """[storage] sql_threads = 0: two threads for SQLite, eight for a server."""
    from lightmail.storage.database import Database
    assert Database(f"sqlite:///{tmp_path}/x.db").threads == 2
    assert Database(f"sqlite:///{tmp_path}/y.db", threads=5).threads == 5
    assert Database("postgresql+psycopg://root@127.0.0.1/test").threads == 8


@pytest_twisted.inlineCallbacks
def test_group_makes_its_pending_blobs_durable_together(stack, monkeypatch) -> None:
    """PendingBlobs as ``before``: one ``commit_pending_many`` for the group (one syncfs
    call), and a blob that cannot be committed leaves out only its own request."""
    import threading

    from lightmail.storage import blobs as blob_module
    real = blob_module._SYNCFS
    assert real is not None, "this kernel has no syncfs that reports errors"
    calls: list[int] = []
    monkeypatch.setattr(stack.blobs, "_syncfs", lambda fd: (calls.append(fd), real(fd))[1])
    monkeypatch.setattr(stack.db, "_max_groups", 1)

    def pending(data: bytes):
        writer = stack.blobs.writer()
        writer.write(data)
        return writer.stage().result        # fires at once: nothing in flight

    def add(conn, name: str) -> str:
        conn.execute(s.domains.insert().values(name=name, created=0))
        return name
    # A first request runs a group at once and is held there; the next ones wait
    # meanwhile, and then go together.
    entered, release = threading.Event(), threading.Event()

    def held(conn, name: str) -> str:
        entered.set()
        assert release.wait(10)
        return add(conn, name)
    first = stack.db.write_grouped(held, "first.test")
    yield threads.deferToThread(entered.wait, 10)
    pendings = [pending(f"message {n}".encode()) for n in range(4)]
    pendings[2].discard()
    results = defer.DeferredList(
        [stack.db.write_grouped_after(p, add, f"p{n}.test") for n, p in enumerate(pendings)],
        consumeErrors=True)
    assert not stack.db.groups_idle()
    release.set()
    results = yield results
    yield first
    assert [ok for ok, _ in results] == [True, True, False, True]
    assert results[2][1].check(BlobMissing)
    assert len(calls) == 1
    for n in (0, 1, 3):
        assert stack.blobs.path(pendings[n].ref.id).read_bytes() == f"message {n}".encode()
    names = set((yield stack.directory.list_domains()))
    assert {"p0.test", "p1.test", "p3.test"} <= names and "p2.test" not in names


def test_run_direct_matches_sqlalchemy_and_skips_it_on_sqlite(stack) -> None:
    """``run_direct`` (the filing path's statements): the same rows as
    ``conn.execute``, through the driver's cursor on SQLite, through SQLAlchemy on
    the servers; type processing (LargeBinary headers) is kept."""
    from lightmail.storage.database import run_direct
    from lightmail.storage.sqlstore import _INSERT_MESSAGE, _upsert_stmt
    headers = b"Subject: \xe9t\xe9\r\n\r\n"
    ids = ["a" * 64, "b" * 64]
    with stack.db.engine.connect() as conn:
        conn.execution_options(lightmail_write=True)
        with conn.begin():
            for blob_id in ids + ids[:1]:           # the second upsert counts one more
                result = run_direct(conn, _upsert_stmt(conn.dialect.name), {
                    "b_id": blob_id, "b_size": 7, "b_created": 1, "b_headers": headers})
                assert isinstance(result, sa.CursorResult) == (stack.db.backend != "sqlite")
            rows = conn.execute(sa.select(s.blobs.c.id, s.blobs.c.refcount, s.blobs.c.headers)
                                .order_by(s.blobs.c.id)).all()
            assert [tuple(row) for row in rows] == [(ids[0], 2, headers), (ids[1], 1, headers)]
            box = conn.execute(s.domains.insert().values(name="d.test", created=0))
            domain_id = box.inserted_primary_key[0]
            user_id = conn.execute(s.users.insert().values(
                domain_id=domain_id, localpart="u", created=0)).inserted_primary_key[0]
            mailbox_id = conn.execute(s.mailboxes.insert().values(
                user_id=user_id, name="INBOX", uidvalidity=1, created=0)
            ).inserted_primary_key[0]
            run_direct(conn, _INSERT_MESSAGE, {
                "mailbox_id": mailbox_id, "uid": 1, "modseq": 2, "blob_id": ids[1],
                "size": 7, "internal_date": 5, "flags": "\\Seen", "delivery_id": "x"})
            row = conn.execute(sa.select(s.messages.c.uid, s.messages.c.blob_id,
                                         s.messages.c.flags, s.messages.c.delivery_id)).one()
            assert tuple(row) == (1, ids[1], "\\Seen", "x")


def test_rows_direct_and_executemany_and_expanding_fallback(stack) -> None:
    """rows_direct gives rows with their columns as attributes; a list of parameter
    sets is an executemany; a statement with an expanding IN goes through SQLAlchemy
    (its text depends on the list) and still works."""
    from lightmail.storage.database import rows_direct, run_direct
    from lightmail.storage.sqlstore import _BY_UIDS, _COUNTS, _INSERT_EXPUNGED
    with stack.db.engine.connect() as conn:
        conn.execution_options(lightmail_write=True)
        with conn.begin():
            domain_id = conn.execute(s.domains.insert().values(
                name="d.test", created=0)).inserted_primary_key[0]
            user_id = conn.execute(s.users.insert().values(
                domain_id=domain_id, localpart="u", created=0)).inserted_primary_key[0]
            box = conn.execute(s.mailboxes.insert().values(
                user_id=user_id, name="INBOX", uidvalidity=1, created=0)
            ).inserted_primary_key[0]
            run_direct(conn, _INSERT_EXPUNGED, [
                {"mailbox_id": box, "uid": uid, "modseq": 3} for uid in (4, 5, 6)])
            assert [tuple(r) for r in conn.execute(
                sa.select(s.expunged.c.uid).order_by(s.expunged.c.uid))] == [(4,), (5,), (6,)]
            [counts] = rows_direct(conn, _COUNTS, {"b_box": box, "b_from_uid": 1})
            assert tuple(counts) == (0, 0, 0, 0, 0)
            assert rows_direct(conn, _BY_UIDS, {"b_box": box, "b_uids": [1, 2]}) == []
            users = rows_direct(conn, sa.select(s.users).where(
                s.users.c.id == sa.bindparam("b_id")), {"b_id": user_id})
            assert [(u.id, u.localpart) for u in users] == [(user_id, "u")]


@pytest_twisted.inlineCallbacks
def test_sqlite_writes_have_connections_that_never_sleep_in_the_busy_handler(
        sqlite_stack) -> None:
    """On SQLite the Database writes through connections of its own, whose
    busy_timeout is 0 (one statement to begin, retried by LightMail itself, not in
    SQLite's millisecond sleeps); reads keep the long timeout.  A write still waits
    for a lock that another process holds, and goes through once it is released."""
    import sqlite3
    import threading
    db = sqlite_stack.db
    assert db.write_engine is not db.engine
    with db.write_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 0
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60000
    other = sqlite3.connect(db.engine.url.database, isolation_level=None,
                            check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")          # as another process's writer would
    threading.Timer(0.3, other.execute, ["COMMIT"]).start()

    def add(conn, name: str) -> str:
        conn.execute(s.domains.insert().values(name=name, created=0))
        return name
    started = time.monotonic()
    assert (yield db.write_grouped(add, "late.test")) == "late.test"
    assert time.monotonic() - started >= 0.25
    assert "late.test" in (yield sqlite_stack.directory.list_domains())
    other.close()


@pytest_twisted.inlineCallbacks
def test_unsynced_writes_skip_the_flush_only_in_a_group_of_their_own(stack) -> None:
    """write_unsynced (flag changes, expunges): on SQLite its group commits with
    synchronous=NORMAL (no WAL flush); a group with any other write is flushed
    (FULL), and the connection is back to FULL after.  Elsewhere it is write."""
    def level(conn) -> int | None:
        if stack.db.backend != "sqlite":
            return None
        return int(conn.exec_driver_sql("PRAGMA synchronous").scalar())

    alone = yield stack.db.write_unsynced(level)
    # The first write's group runs at once; the two after it wait and go together.
    _, *mixed = yield defer.gatherResults([stack.db.write_grouped(level),
                                           stack.db.write_unsynced(level),
                                           stack.db.write_grouped(level)])
    after = yield stack.db.write_grouped(level)
    if stack.db.backend == "sqlite":
        assert (alone, mixed, after) == (1, [2, 2], 2)       # 1 NORMAL, 2 FULL
    else:
        assert (alone, mixed, after) == (None, [None, None], None)


@pytest_twisted.inlineCallbacks
def test_flag_changes_and_expunges_are_unsynced_unless_configured(stack, monkeypatch) -> None:
    user = yield make_user(stack)
    box = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    ref = yield stack.blobs.put(MESSAGE)
    calls: list[str] = []
    for name in ("write", "write_unsynced"):
        real = getattr(stack.db, name)
        monkeypatch.setattr(stack.db, name, lambda *a, _n=name, _r=real, **k:
                            (calls.append(_n), _r(*a, **k))[1])
    for sync in (False, True):
        stack.port.sync_flag_changes = sync
        info = yield stack.mailstore.append(box.id, ref)
        yield stack.mailstore.set_flags(box.id, [info.uid], ["\\Deleted"], "add")
        yield stack.mailstore.expunge(box.id, [info.uid])
    # Elsewhere than on SQLite, write_unsynced is write (which it calls).
    unsynced = ["write_unsynced"] if stack.db.backend == "sqlite" else \
        ["write_unsynced", "write"]
    assert calls == ["write", *unsynced, *unsynced, "write", "write", "write"]


@pytest_twisted.inlineCallbacks
def test_many_uids_go_in_chunks(stack, monkeypatch) -> None:
    """STORE, COPY, MOVE and EXPUNGE of more UIDs than one statement may bind (SQLite:
    32,766 or 250,000; PostgreSQL and MariaDB: 65,535) run in chunks; here chunks of
    2 stand in for IN_CHUNK's 10,000.  And COPY counts one reference per message."""
    from lightmail.storage import sqlstore
    monkeypatch.setattr(sqlstore, "IN_CHUNK", 2)
    user = yield make_user(stack)
    inbox = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    archive = yield stack.mailstore.create_mailbox(user.id, "Archive")
    ref = yield stack.blobs.put(MESSAGE)
    for _ in range(5):
        yield stack.mailstore.append(inbox.id, ref)
    changed = yield stack.mailstore.set_flags(inbox.id, [5, 1, 2, 3, 4], ["\\Seen"], "add")
    assert [m.uid for m in changed] == [1, 2, 3, 4, 5]
    copied = yield stack.mailstore.copy(inbox.id, [1, 2, 4, 5], archive.id)
    assert (copied.source, copied.target) == (((1, 2), (4, 5)), ((1, 4),))
    assert refcount(stack, ref.id) == 9
    moved = yield stack.mailstore.copy(inbox.id, [1, 2, 3, 4, 5], archive.id, move=True)
    assert (moved.source, moved.target) == (((1, 5),), ((5, 9),))
    assert (yield stack.mailstore.list_messages(inbox.id)) == []
    gone = yield stack.mailstore.expunge(archive.id, [1, 2, 3, 4, 5, 6, 7])
    assert gone == [1, 2, 3, 4, 5, 6, 7]
    assert refcount(stack, ref.id) == 2
    assert [m.uid for m in (yield stack.mailstore.list_messages(archive.id))] == [8, 9]


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "again"])
@pytest_twisted.inlineCallbacks
def test_two_writers_filing_a_first_message_make_one_inbox(stack, fresh: bool) -> None:
    """Two nodes' writers file a user's first messages at once: both find no INBOX,
    and the second one's INSERT meets the first's once it commits.  The second files
    into the INBOX the first made (one "created" change, UIDs 1 and 2), instead of
    failing its delivery for a retry minutes later.  The same content both times:
    the blob's reference row is made by both as well."""
    import threading

    from twisted.internet import reactor, task
    user = yield make_user(stack)
    ref = yield stack.blobs.put(MESSAGE)
    target = (FilingTarget(user.id, user.address),)
    first_filed, let_go = threading.Event(), threading.Event()

    def node(conn: Any, delivery_id: str, first: bool) -> Any:
        outcome = stack.writes.file_now(conn, Filing(target, delivery_id, fresh), ref)
        if first:
            first_filed.set()
            let_go.wait(10)             # the other's transaction runs into ours
        return outcome
    # Each a write transaction of the database's pool, as a writer runs them (SQLite
    # queues its writes behind each other: one writer, no race there).
    a = stack.db.write(node, "qa", True)
    yield threads.deferToThread(first_filed.wait, 10)
    b = stack.db.write(node, "qb", False)
    yield task.deferLater(reactor, 0.5, lambda: None)
    let_go.set()
    (filed_a, changes_a), (filed_b, changes_b) = yield defer.gatherResults([a, b])
    assert filed_a.placed == (f"{user.address}/INBOX uid=1",)
    assert filed_b.placed == (f"{user.address}/INBOX uid=2",)
    created = [c for c in changes_a + changes_b if c.kind == "created"]
    assert len(created) == 1
    boxes = yield stack.mailstore.list_mailboxes(user.id)
    assert [box.name for box in boxes] == ["INBOX"]
    assert len((yield stack.mailstore.list_messages(boxes[0].id))) == 2
    assert refcount(stack, ref.id) == 2


@pytest_twisted.inlineCallbacks
def test_two_first_logins_at_once_make_one_inbox(stack) -> None:
    """A first IMAP or POP3 login on two nodes at once: each asks for the user's
    INBOX, made if missing; the second gets the one the first made, not an error."""
    import threading

    from twisted.internet import reactor, task

    from lightmail.storage.sqlstore import create_mailbox_now
    user = yield make_user(stack)
    made, let_go = threading.Event(), threading.Event()

    def first_login(conn: Any) -> Any:
        box = create_mailbox_now(conn, user.id, "INBOX")
        made.set()
        let_go.wait(10)                 # the other's transaction runs into ours
        return box
    first = stack.db.write(first_login)
    yield threads.deferToThread(made.wait, 10)
    second = stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    yield task.deferLater(reactor, 0.5, lambda: None)
    let_go.set()
    box_a, box_b = yield defer.gatherResults([first, second])
    assert box_a.id == box_b.id
    assert [box.name for box in (yield stack.mailstore.list_mailboxes(user.id))] == ["INBOX"]
