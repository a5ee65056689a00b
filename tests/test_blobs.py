"""The filesystem blob store: round trips, dedup, streaming, GC helpers, crash safety."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from lightmail.storage import blobs
from lightmail.storage.blobs import FLUSH_THRESHOLD, FilesystemBlobStore
from lightmail.storage.interfaces import BlobMissing, BlobRef, IBlobStore, IBlobWriter

HELPER = Path(__file__).parent / "helpers" / "blob_writer_child.py"
PROJECT = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def data_files(store: FilesystemBlobStore) -> list[Path]:
    """Every file of the store but its ``format`` marker: blobs, whole or not."""
    return files_under(store.objects) + files_under(store.tmp)


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    p = ThreadPool(minthreads=1, maxthreads=4, name="test-blobs")
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def store(tmp_path: Path, pool: ThreadPool) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs", pool)


class ManualPool:
    """Stands in for the thread pool: work runs only when the test says so."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[bool, Any], None], Callable[..., Any], tuple]] = []
        self.calls = 0

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None],
                                 func: Callable[..., Any], *args: Any) -> None:
        self.calls += 1
        self.queue.append((on_result, func, args))

    def run_all(self) -> None:
        while self.queue:
            on_result, func, args = self.queue.pop(0)
            try:
                result = func(*args)
            except BaseException:
                if on_result is not None:
                    on_result(False, Failure())
            else:
                if on_result is not None:
                    on_result(True, result)


class ImmediateReactor:
    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


@pytest.fixture
def manual(tmp_path: Path) -> tuple[FilesystemBlobStore, ManualPool]:
    mp = ManualPool()
    s = FilesystemBlobStore(tmp_path / "blobs", mp,  # type: ignore[arg-type]
                            ImmediateReactor(), flush_threshold=1000)  # type: ignore[arg-type]
    return s, mp


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (a Failure if it failed)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


# -- interface, layout, round trips --------------------------------------------------------

def test_provides_interfaces(store: FilesystemBlobStore) -> None:
    assert verifyObject(IBlobStore, store)
    assert verifyObject(IBlobWriter, store.writer())


def test_layout(store: FilesystemBlobStore, tmp_path: Path) -> None:
    blob_id = sha(b"x")
    assert store.path(blob_id) == tmp_path / "blobs" / "objects" / blob_id[:2] / blob_id
    assert (tmp_path / "blobs" / "tmp").is_dir()
    assert (tmp_path / "blobs" / "format").read_text() == "2\n"


@pytest_twisted.inlineCallbacks
def test_a_format_1_store_is_moved_to_the_flat_layout(tmp_path: Path,
                                                     pool: ThreadPool) -> None:
    """Blobs of the two-level layout (objects/ab/cd/<id>) are moved, once, when the
    store is opened; one already at both names is kept once; foreign files stay."""
    root = tmp_path / "old"
    contents = [b"first message", b"second message", b"third"]
    for data in contents:
        blob_id = sha(data)
        leaf = root / "objects" / blob_id[:2] / blob_id[2:4]
        leaf.mkdir(parents=True, exist_ok=True)
        (leaf / blob_id).write_bytes(data)
    both = sha(contents[0])          # as if a crash came between two moves' steps
    (root / "objects" / both[:2] / both).write_bytes(contents[0])
    stray = root / "objects" / "ee" / "ff"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_bytes(b"not a blob")
    (root / "tmp").mkdir()

    store = FilesystemBlobStore(root, pool)
    assert (root / "format").read_text() == "2\n"
    for data in contents:
        assert (yield store.read(sha(data))) == data
        assert store.path(sha(data)).is_file()
    assert sorted(p.relative_to(root / "objects").as_posix()
                  for p in files_under(root / "objects")) == sorted(
        [f"{sha(d)[:2]}/{sha(d)}" for d in contents] + ["ee/ff/notes.txt"])
    assert sorted((yield store.sweep(time.time() + 3600))) == sorted(map(sha, contents))
    # Opened again: nothing to do, nothing moved.
    (root / "objects" / "ab" / "cd").mkdir(parents=True)
    FilesystemBlobStore(root, pool)
    assert (root / "objects" / "ab" / "cd").is_dir()


@pytest_twisted.inlineCallbacks
def test_put_read_round_trip(store: FilesystemBlobStore) -> None:
    data = b"From: a@example.org\r\n\r\nHello.\r\n"
    ref = yield store.put(data)
    assert ref == BlobRef(sha(data), len(data))
    assert store.path(ref.id).read_bytes() == data
    assert store.exists_now(ref.id)
    assert (yield store.read(ref.id)) == data
    assert files_under(store.tmp) == []


@pytest_twisted.inlineCallbacks
def test_empty_blob(store: FilesystemBlobStore) -> None:
    ref = yield store.put(b"")
    assert ref == BlobRef(sha(b""), 0)
    assert (yield store.read(ref.id)) == b""


@pytest_twisted.inlineCallbacks
def test_read_range(store: FilesystemBlobStore) -> None:
    data = bytes(range(256)) * 10
    ref = yield store.put(data)
    assert (yield store.read_range(ref.id, 0, 10)) == data[:10]
    assert (yield store.read_range(ref.id, 300, 100)) == data[300:400]
    assert (yield store.read_range(ref.id, len(data) - 5, 100)) == data[-5:]
    assert (yield store.read_range(ref.id, len(data) + 10, 100)) == b""
    assert (yield store.read_range(ref.id, 7, 0)) == b""
    with pytest.raises(ValueError):
        store.read_range(ref.id, -1, 10)
    with pytest.raises(ValueError):
        store.read_range(ref.id, 0, -1)


@pytest_twisted.inlineCallbacks
def test_missing_blob(store: FilesystemBlobStore) -> None:
    blob_id = sha(b"never stored")
    assert not store.exists_now(blob_id)
    with pytest.raises(BlobMissing):
        yield store.read(blob_id)
    with pytest.raises(BlobMissing):
        yield store.read_range(blob_id, 0, 10)


BAD_IDS = [
    "",
    "../" * 21 + "a",
    "../../../../../../../../etc/passwd",
    "/" + "a" * 63,
    "a" * 62 + "/.",
    "aa/../" + "a" * 58,
    "A" * 64,
    "g" * 64,
    "a" * 63,
    "a" * 65,
    "a" * 64 + "\n",
    " " + "a" * 63,
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_ids_rejected(store: FilesystemBlobStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.path(bad)
    with pytest.raises(ValueError):
        store.read(bad)
    with pytest.raises(ValueError):
        store.read_range(bad, 0, 1)
    with pytest.raises(ValueError):
        store.exists_now(bad)
    with pytest.raises(ValueError):
        store.delete_now(bad, time.time() + 100)


def test_non_string_id_rejected(store: FilesystemBlobStore) -> None:
    with pytest.raises(ValueError):
        store.path(b"a" * 64)  # type: ignore[arg-type]


# -- dedup -------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_dedup_keeps_one_file_and_refreshes_mtime(store: FilesystemBlobStore) -> None:
    data = b"the same message\r\n" * 100
    first = yield store.put(data)
    path = store.path(first.id)
    old = time.time() - 10_000
    os.utime(path, (old, old))
    second = yield store.put(data)
    assert second == first
    assert path.stat().st_mtime > old + 5_000
    assert files_under(store.objects) == [path]
    assert files_under(store.tmp) == []
    assert path.read_bytes() == data


@pytest_twisted.inlineCallbacks
def test_concurrent_writes_of_same_content(store: FilesystemBlobStore) -> None:
    data = os.urandom(300_000)
    refs = yield defer.gatherResults([store.put(data) for _ in range(6)])
    assert set(refs) == {BlobRef(sha(data), len(data))}
    assert files_under(store.objects) == [store.path(sha(data))]
    assert files_under(store.tmp) == []


# -- streaming writer ----------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_writer_many_small_chunks(store: FilesystemBlobStore) -> None:
    lines = [b"line %06d of a message body, long enough to matter\r\n" % i
             for i in range(20_000)]                    # about 1 MB, above the threshold
    data = b"".join(lines)
    assert len(data) > FLUSH_THRESHOLD
    writer = store.writer()
    for line in lines:
        writer.write(line)
    ref = yield writer.finish()
    assert ref == BlobRef(sha(data), len(data))
    assert (yield store.read(ref.id)) == data
    assert files_under(store.tmp) == []


@pytest_twisted.inlineCallbacks
def test_writer_large_blob(store: FilesystemBlobStore) -> None:
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 17)
    writer = store.writer()
    rng = random.Random(8)
    offset = 0
    while offset < len(data):
        step = rng.randrange(1, 100_000)
        writer.write(data[offset:offset + step])
        offset += step
    ref = yield writer.finish()
    assert ref.id == sha(data) and ref.size == len(data)
    assert store.path(ref.id).read_bytes() == data
    assert (yield store.read_range(ref.id, 2_000_000, 1000)) == data[2_000_000:2_001_000]
    assert files_under(store.tmp) == []


@pytest_twisted.inlineCallbacks
def test_put_large_blob(store: FilesystemBlobStore) -> None:
    data = os.urandom(1_000_000)
    ref = yield store.put(data)
    assert ref == BlobRef(sha(data), len(data))
    assert (yield store.read(ref.id)) == data


def test_small_blob_takes_one_pool_call(manual: tuple[FilesystemBlobStore, ManualPool]) -> None:
    s, mp = manual
    writer = s.writer()
    for _ in range(9):
        writer.write(b"x" * 100)
    assert mp.calls == 0                            # below the threshold: only buffered
    d = writer.finish()
    assert mp.calls == 1
    assert data_files(s) == []                # no I/O until the pool runs it
    mp.run_all()
    assert result_of(d) == BlobRef(sha(b"x" * 900), 900)
    assert mp.calls == 1
    assert files_under(s.objects) == [s.path(sha(b"x" * 900))]


def test_background_appends_are_ordered(manual: tuple[FilesystemBlobStore, ManualPool]) -> None:
    s, mp = manual
    rng = random.Random(3)
    chunks = [rng.randbytes(rng.randrange(1, 700)) for _ in range(200)]
    writer = s.writer()
    for i, chunk in enumerate(chunks):
        writer.write(chunk)
        assert len(mp.queue) <= 1                   # one pool call in flight at a time
        if i % 7 == 0:
            mp.run_all()
    d = writer.finish()
    mp.run_all()
    data = b"".join(chunks)
    assert result_of(d) == BlobRef(sha(data), len(data))
    assert s.path(sha(data)).read_bytes() == data
    assert mp.calls > 10
    assert files_under(s.tmp) == []


def test_write_after_finish_or_abort_raises(store: FilesystemBlobStore) -> None:
    writer = store.writer()
    writer.write(b"a")
    writer.finish()
    with pytest.raises(RuntimeError):
        writer.write(b"b")
    with pytest.raises(RuntimeError):
        writer.finish()
    writer.abort()                                  # too late to abort: a no-op

    writer = store.writer()
    writer.write(b"a")
    writer.abort()
    with pytest.raises(RuntimeError):
        writer.write(b"b")
    with pytest.raises(RuntimeError):
        writer.finish()


def test_abort_removes_tmp(manual: tuple[FilesystemBlobStore, ManualPool]) -> None:
    s, mp = manual
    writer = s.writer()
    writer.write(b"a" * 1500)
    mp.run_all()
    assert len(files_under(s.tmp)) == 1             # the first append made the tmp file
    writer.write(b"b" * 500)
    writer.abort()
    mp.run_all()
    assert data_files(s) == []


def test_abort_while_append_in_flight(manual: tuple[FilesystemBlobStore, ManualPool]) -> None:
    s, mp = manual
    writer = s.writer()
    writer.write(b"a" * 1500)
    assert len(mp.queue) == 1
    writer.abort()
    mp.run_all()                                    # the append, then the discard
    assert data_files(s) == []


def test_abort_before_any_io(manual: tuple[FilesystemBlobStore, ManualPool]) -> None:
    s, mp = manual
    writer = s.writer()
    writer.write(b"a" * 10)
    writer.abort()
    mp.run_all()
    assert mp.calls == 0 and data_files(s) == []


def test_backlog_and_drained(manual: tuple[FilesystemBlobStore, ManualPool]) -> None:
    """backlog() counts what is buffered and what a pool call is writing; drained()
    hands what is buffered to the pool (below the flush threshold too) and fires
    once nothing is held (issue 17: APPEND stops reading its input meanwhile)."""
    s, mp = manual
    writer = s.writer()
    assert writer.backlog() == 0 and result_of(writer.drained()) is None
    writer.write(b"a" * 1500)                       # over the threshold: to the pool
    writer.write(b"b" * 10)
    assert writer.backlog() == 1510 and mp.calls == 1
    drained = writer.drained()
    assert not drained.called
    mp.run_all()                                    # the 1500, then the 10 it asked for
    assert writer.backlog() == 0 and result_of(drained) is None
    assert mp.calls == 2                            # the two appends
    writer.write(b"c" * 10)
    drained = writer.drained()
    staging = writer.stage()            # the 10 in flight: it is made durable alone
    mp.run_all()
    assert result_of(drained) is None and result_of(staging).durable
    aborted = s.writer()
    aborted.write(b"d" * 1500)
    drained = aborted.drained()
    aborted.abort()
    mp.run_all()
    assert result_of(drained) is None and aborted.backlog() == 0


@pytest_twisted.inlineCallbacks
def test_abort_with_real_pool(tmp_path: Path) -> None:
    one = ThreadPool(minthreads=1, maxthreads=1, name="test-blobs-one")
    one.start()
    try:
        store = FilesystemBlobStore(tmp_path / "blobs", one)
        writer = store.writer()
        writer.write(os.urandom(2 * FLUSH_THRESHOLD))   # an append goes to the pool
        writer.abort()
        # One worker runs calls in order: the first no-op comes back after the append
        # has, which queued the discard; the second after the discard.
        yield threads.deferToThreadPool(store.reactor, one, lambda: None)
        yield threads.deferToThreadPool(store.reactor, one, lambda: None)
        assert data_files(store) == []
    finally:
        one.stop()


def _disk_full(fd: int, data: bytes) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_background_write_error_fails_finish(
        manual: tuple[FilesystemBlobStore, ManualPool],
        monkeypatch: pytest.MonkeyPatch) -> None:
    s, mp = manual
    monkeypatch.setattr(blobs, "_write_all", _disk_full)
    writer = s.writer()
    writer.write(b"a" * 1500)
    mp.run_all()                                    # append fails, tmp file removed
    assert data_files(s) == []
    writer.write(b"b" * 5000)                       # dropped: the blob is lost anyway
    d = writer.finish()
    mp.run_all()
    failure = result_of(d)
    assert isinstance(failure, Failure) and failure.check(OSError)
    assert isinstance(failure.value, OSError) and failure.value.errno == errno.ENOSPC
    assert data_files(s) == []


def test_final_write_error_fails_finish(
        manual: tuple[FilesystemBlobStore, ManualPool],
        monkeypatch: pytest.MonkeyPatch) -> None:
    s, mp = manual
    monkeypatch.setattr(blobs, "_write_all", _disk_full)
    writer = s.writer()
    writer.write(b"a" * 10)
    d = writer.finish()
    mp.run_all()
    failure = result_of(d)
    assert isinstance(failure, Failure) and failure.check(OSError)
    assert data_files(s) == []


@pytest_twisted.inlineCallbacks
def test_write_error_with_real_pool(store: FilesystemBlobStore,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobs, "_write_all", _disk_full)
    writer = store.writer()
    writer.write(os.urandom(FLUSH_THRESHOLD + 1))
    writer.write(b"more")
    with pytest.raises(OSError):
        yield writer.finish()
    assert data_files(store) == []


def test_stage_leaves_the_commit_to_the_caller(
        manual: tuple[FilesystemBlobStore, ManualPool]) -> None:
    s, mp = manual
    writer = s.writer()
    writer.write(b"Subject: x\r\n\r\nbody")
    pending = result_of(writer.stage())
    assert isinstance(pending, blobs.PendingBlob) and mp.calls == 0
    assert not pending.durable and pending.store is s
    data = b"Subject: x\r\n\r\nbody"
    assert pending.ref == BlobRef(sha(data), len(data))
    assert pending.ref.headers == b"Subject: x\r\n\r\n"
    assert data_files(s) == []                # nothing written yet
    writer.abort()                                  # a no-op now, as after finish()
    with pytest.raises(RuntimeError):
        writer.write(b"more")
    pending.commit_now()                            # on the caller's worker thread
    assert pending.durable
    with pytest.raises(RuntimeError):
        pending.commit_now()                        # once only
    assert files_under(s.objects) == [s.path(sha(data))]
    assert s.path(sha(data)).read_bytes() == data
    assert files_under(s.tmp) == [] and mp.calls == 0


def test_stage_while_an_append_is_in_flight_finishes_the_blob(
        manual: tuple[FilesystemBlobStore, ManualPool]) -> None:
    s, mp = manual
    writer = s.writer()
    writer.write(b"x" * 1500)                       # over the threshold: a pool call
    assert mp.calls == 1
    d = writer.stage()                              # finish() as usual, then staged
    mp.run_all()
    staged = result_of(d)
    assert staged.durable and staged.ref == BlobRef(sha(b"x" * 1500), 1500)
    assert s.path(staged.ref.id).read_bytes() == b"x" * 1500


def test_stage_after_background_appends(
        manual: tuple[FilesystemBlobStore, ManualPool]) -> None:
    s, mp = manual
    writer = s.writer()
    writer.write(b"x" * 1500)
    mp.run_all()
    writer.write(b"y" * 10)
    pending = result_of(writer.stage())
    d = pending.commit()                            # on the store's pool instead
    mp.run_all()
    data = b"x" * 1500 + b"y" * 10
    assert result_of(d) == BlobRef(sha(data), len(data))
    assert s.path(sha(data)).read_bytes() == data
    assert files_under(s.tmp) == []


@pytest.mark.parametrize("background", [False, True])
def test_a_pending_blob_handed_off_is_committed_where_it_is_adopted(
        manual: tuple[FilesystemBlobStore, ManualPool], background: bool) -> None:
    """The writer process's way (lightmail.storage.writer): this process hands off the
    pending blob (the path of its temporary file, if any, and the bytes not written
    yet) and lets go of its file; the other adopts it and commits it with a group."""
    s, mp = manual
    head = b"x" * (1500 if background else 500)     # the flush threshold is 1000
    writer = s.writer()
    writer.write(head)
    mp.run_all()                                    # over it: in the file already
    writer.write(b"y" * 10)
    pending = result_of(writer.stage())
    handoff = pending.handoff()
    path, rest, ref = handoff.path, handoff.data, handoff.ref
    assert (path is not None) is background
    assert rest == (b"y" * 10 if background else head + b"y" * 10)
    mp.run_all()                                    # this process closes its descriptor
    pending.discard()                               # too late: a no-op, file kept
    other = FilesystemBlobStore(s.root, ManualPool(),  # type: ignore[arg-type]
                                ImmediateReactor())  # type: ignore[arg-type]
    adopted = other.adopt(handoff)
    assert other.commit_staged_now([adopted, *_pendings(other, [b"another"])]) == \
        [None, None]
    data = head + b"y" * 10
    assert ref == BlobRef(sha(data), len(data)) and s.path(ref.id).read_bytes() == data
    assert files_under(s.tmp) == []


def test_failed_pending_commit_removes_the_tmp_file(
        manual: tuple[FilesystemBlobStore, ManualPool],
        monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = manual
    writer = s.writer()
    writer.write(b"a" * 10)
    pending = result_of(writer.stage())
    monkeypatch.setattr(os, "fsync", lambda fd: _disk_full(fd, b""))
    with pytest.raises(OSError):
        pending.commit_now()
    assert data_files(s) == []


# -- garbage collection helpers ---------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_delete_now_respects_older_than(store: FilesystemBlobStore) -> None:
    ref = yield store.put(b"delete me")
    path = store.path(ref.id)
    t0 = time.time() - 1000
    os.utime(path, (t0, t0))
    assert not store.delete_now(ref.id, t0 - 1)
    assert not store.delete_now(ref.id, t0)
    assert path.exists()
    assert store.delete_now(ref.id, t0 + 1)
    assert not path.exists() and not store.exists_now(ref.id)
    assert not store.delete_now(ref.id, t0 + 1)     # missing: nothing removed
    with pytest.raises(BlobMissing):
        yield store.read(ref.id)
    again = yield store.put(b"delete me")           # can be stored again
    assert again == ref and path.exists()


@pytest_twisted.inlineCallbacks
def test_sweep(store: FilesystemBlobStore) -> None:
    now = time.time()
    old, cutoff = now - 10_000, now - 5_000
    old_tmp, new_tmp = store.tmp / "blob-old.tmp", store.tmp / "blob-new.tmp"
    old_tmp.write_bytes(b"partial")
    new_tmp.write_bytes(b"partial, still being written")
    os.utime(old_tmp, (old, old))
    old_ref = yield store.put(b"old blob")
    new_ref = yield store.put(b"new blob")
    os.utime(store.path(old_ref.id), (old, old))
    junk = store.objects / "zz" / "junk"             # not a blob: ignored, left alone
    junk.parent.mkdir()
    junk.write_bytes(b"?")
    os.utime(junk, (old, old))

    found = yield store.sweep(cutoff)
    assert found == [old_ref.id]
    assert not old_tmp.exists() and new_tmp.exists()
    assert store.exists_now(old_ref.id) and store.exists_now(new_ref.id)
    assert junk.exists()

    found = yield store.sweep(now + 100)
    assert sorted(found) == sorted([old_ref.id, new_ref.id])
    assert files_under(store.tmp) == []


# -- crash safety ----------------------------------------------------------------------------

def _run_child_and_kill(root: Path, seed: int, log: Path, delay: float) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT), env.get("PYTHONPATH", "")) if p)
    with open(log, "ab") as stderr:
        proc = subprocess.Popen([sys.executable, str(HELPER), str(root), str(seed)],
                                stdout=subprocess.PIPE, stderr=stderr, env=env)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else b""
        assert line == b"ready\n", f"the child did not start: {log.read_text()}"
        time.sleep(delay)
        assert proc.poll() is None, f"the child died: {log.read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest_twisted.inlineCallbacks
def test_sigkill_never_leaves_partial_blobs(tmp_path: Path, pool: ThreadPool) -> None:
    root = tmp_path / "crash"
    rng = random.Random()
    log = tmp_path / "child.log"
    for i in range(5):
        _run_child_and_kill(root, rng.randrange(2**32) + i, log, rng.uniform(0.05, 0.5))

    objects, tmp = root / "objects", root / "tmp"
    for path in files_under(root):
        rel = path.relative_to(root).parts
        assert rel[0] in ("objects", "tmp", "format"), path
        if rel[0] == "objects":
            assert len(rel) == 3 and blobs.is_blob_id(rel[2]), path
            assert rel[1] == rel[2][:2], path
            assert sha(path.read_bytes()) == rel[2], f"partial blob visible at {path}"
        else:
            assert len(rel) == (2 if rel[0] == "tmp" else 1), path
    complete = sorted(p.name for p in files_under(objects))

    store = FilesystemBlobStore(root, pool)
    found = yield store.sweep(time.time() + 3600)
    assert sorted(found) == complete
    assert files_under(tmp) == []
    assert sorted(p.name for p in files_under(objects)) == complete


def test_header_block() -> None:
    from lightmail.storage.blobs import HEADER_CAP, header_block
    assert header_block(b"A: b\r\nC: d\r\n\r\nbody\r\n\r\n") == b"A: b\r\nC: d\r\n\r\n"
    assert header_block(b"A: b\nC: d\n\nbody\n") == b"A: b\nC: d\n\n"
    assert header_block(b"A: b\r\n") == b"A: b\r\n"           # no body at all
    assert header_block(b"\r\nbody") == b"\r\n"
    assert header_block(b"") == b""
    assert header_block(b"A: " + b"x" * HEADER_CAP + b"\r\n\r\n") == b""


@pytest_twisted.inlineCallbacks
def test_writer_sees_the_header_block_across_writes(store: FilesystemBlobStore) -> None:
    from lightmail.storage.blobs import HEADER_CAP
    message = b"Subject: split\r\nFrom: a@b.test\r\n\r\nbody\r\n\r\nmore\r\n"
    for cut in range(1, len(message)):
        w = store.writer()
        for piece in (message[:cut], message[cut:cut + 1], message[cut + 1:]):
            w.write(piece)
        ref = yield w.finish()
        assert ref.headers == b"Subject: split\r\nFrom: a@b.test\r\n\r\n", cut
    ref = yield store.put(b"Subject: no body\r\n")
    assert ref.headers == b"Subject: no body\r\n"
    w = store.writer()
    w.write(b"X: " + b"y" * 1000)
    for _ in range(70):
        w.write(b"z" * 1000)
    assert (yield w.finish()).headers == b""
    assert len(b"z" * 70000) > HEADER_CAP
    refs = [(yield store.put(b"one")), (yield store.put(b"two"))]
    assert (yield store.read_many([r.id for r in refs])) == [b"one", b"two"]
    gone = "0" * 64
    one, missing, two = yield store.read_many([refs[0].id, gone, refs[1].id])
    assert (one, two) == (b"one", b"two") and isinstance(missing, BlobMissing)
    assert store.read_now(refs[1].id, 2) == b"tw"


# -- group commit of pending blobs (syncfs) ---------------------------------------------

def _pendings(s: FilesystemBlobStore, contents: list[bytes]) -> list[blobs.PendingBlob]:
    out = []
    for data in contents:
        writer = s.writer()
        writer.write(data)
        out.append(result_of(writer.stage()))
    return out


def _count_syncfs(s: FilesystemBlobStore, monkeypatch: pytest.MonkeyPatch,
                  fail: int = 0) -> list[int]:
    """Record the store's syncfs calls (each still syncs); the call numbered ``fail``
    (1-based) fails with EIO instead."""
    real = blobs._SYNCFS
    assert real is not None, "this kernel has no syncfs that reports errors"
    calls: list[int] = []

    def syncfs(fd: int) -> int:
        calls.append(fd)
        if len(calls) == fail:
            import ctypes
            ctypes.set_errno(errno.EIO)
            return -1
        return real(fd)
    monkeypatch.setattr(s, "_syncfs", syncfs)
    return calls


def test_pending_blobs_of_a_group_are_made_durable_with_one_syncfs(
        manual: tuple[FilesystemBlobStore, ManualPool],
        monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = manual
    calls = _count_syncfs(s, monkeypatch)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    contents = [f"Subject: {n}\r\n\r\nbody {n}".encode() for n in range(5)]
    contents.append(contents[0])                    # the same content twice
    pendings = _pendings(s, contents)
    discarded = _pendings(s, [b"never committed"])[0]
    discarded.discard()
    assert s.batches_commits and all(p.store is s for p in pendings)
    results = s.commit_staged_now([*pendings[:3], discarded, *pendings[3:]])
    assert [r is None for r in results] == [True, True, True, False, True, True, True]
    assert isinstance(results[3], BlobMissing)
    assert len(calls) == 1 and fsyncs == []         # one flush, no fsync at all
    for data in contents:
        assert s.path(sha(data)).read_bytes() == data
    assert files_under(s.tmp) == []
    assert len(files_under(s.objects)) == 5
    # The fan-out directories made on the way are not taken as durable (nothing
    # fsynced them): a commit alone into one of them fsyncs it.
    assert os.path.dirname(s._path_str(sha(contents[1]))) not in s._durable_dirs
    assert s.commit_pending_many(_pendings(s, [b"alone"])) == [None]
    assert len(calls) == 2 and fsyncs == []         # a group of one: a syncfs too


def test_a_blob_whose_rename_a_crash_undid_is_moved_into_place_at_start(
        manual: tuple[FilesystemBlobStore, ManualPool]) -> None:
    """What a power loss can leave after a group commit (renames not flushed): the
    blob whole at its temporary name; recover_now (run at every start) moves it."""
    s, _ = manual
    contents = [b"Subject: a\r\n\r\nfirst", b"Subject: b\r\n\r\nsecond"]
    assert s.commit_pending_many(_pendings(s, contents)) == [None, None]
    # The crash: one rename undone, and the fan-out directory of the other lost too.
    first, second = (s.path(sha(data)) for data in contents)
    os.rename(first, s.tmp / "blob-crashed1.tmp")
    os.rename(second, s.tmp / "blob-crashed2.tmp")
    os.rmdir(second.parent) if not any(second.parent.iterdir()) else None
    # Also left in tmp/: an empty spare, the start of a message whose writer died,
    # and a copy of content that is already in place.
    (s.tmp / "blob-spare.tmp").write_bytes(b"")
    (s.tmp / "blob-partial.tmp").write_bytes(b"Subject: c\r\n\r\nthe st")
    third = s.commit_pending_many(_pendings(s, [b"third", b"fourth"]))
    assert third == [None, None]
    (s.tmp / "blob-copy.tmp").write_bytes(b"third")
    s._durable_dirs.clear()                         # a new process

    reopened = FilesystemBlobStore(s.root, ManualPool(),  # type: ignore[arg-type]
                                   ImmediateReactor())  # type: ignore[arg-type]
    assert reopened.recover_now() == 3
    assert first.read_bytes() == contents[0] and second.read_bytes() == contents[1]
    # Content addressing: the partial file is a blob of what it holds, which nothing
    # refers to (garbage collection removes it later).
    assert s.path(sha(b"Subject: c\r\n\r\nthe st")).exists()
    assert sorted(p.name for p in files_under(s.tmp)) == ["blob-copy.tmp",
                                                           "blob-spare.tmp"]
    assert reopened.recover_now() == 0              # nothing left to do


@pytest_twisted.inlineCallbacks
def test_the_storage_service_recovers_the_blob_store_before_it_is_ready(
        tmp_path: Path) -> Any:
    from lightmail.config import load_config
    from lightmail.storage.service import StorageService
    conf = tmp_path / "lightmail.conf"
    conf.write_text(f"[server]\nstate_dir = {tmp_path / 'state'}\n")
    config = load_config(conf)
    data = b"Subject: lost rename\r\n\r\nbody"
    blob_id = sha(data)
    # The first start makes the schema; a worker's storage (not primary) must not
    # recover: the main process's writers are at work.
    for primary, found in ((True, False), (False, False), (True, True)):
        storage = StorageService(config, primary=primary)
        if found is False and primary is False:
            (storage.blobs.tmp / "blob-x.tmp").write_bytes(data)
        storage.startService()
        try:
            yield storage.ready
            assert storage.blobs.path(blob_id).exists() is found
        finally:
            yield storage.stopService()


def test_a_failed_syncfs_fails_the_whole_group_and_leaves_no_tmp_file(
        manual: tuple[FilesystemBlobStore, ManualPool],
        monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = manual
    _count_syncfs(s, monkeypatch, fail=1)
    contents = [f"failing message {n}".encode() for n in range(3)]
    results = s.commit_pending_many(_pendings(s, contents))
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    assert files_under(s.tmp) == []
    assert not any(s.path(sha(data)).exists() for data in contents)


def test_blob_sync_fsync_commits_each_blob_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = FilesystemBlobStore(tmp_path / "blobs", ManualPool(),  # type: ignore[arg-type]
                            ImmediateReactor(), sync="fsync")  # type: ignore[arg-type]
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    pendings = _pendings(s, [b"one", b"two"])
    assert not s.batches_commits
    assert s.commit_pending_many(pendings) == [None, None]
    assert len(fsyncs) >= 4                         # each file and its directory
    assert s.path(sha(b"two")).read_bytes() == b"two"
    with pytest.raises(ValueError):
        FilesystemBlobStore(tmp_path / "other", ManualPool(),  # type: ignore[arg-type]
                            ImmediateReactor(), sync="never")  # type: ignore[arg-type]


@pytest_twisted.inlineCallbacks
def test_spare_tmp_files_are_used_renewed_and_dropped_when_old(
        tmp_path: Path, pool: ThreadPool) -> None:
    s = FilesystemBlobStore(tmp_path / "blobs", pool, spare_files=3)

    def settled() -> defer.Deferred[None]:
        # Spares are made on the pool: wait until none is on its way.
        def wait() -> None:
            deadline = time.monotonic() + 10
            while s._spares_coming and time.monotonic() < deadline:
                time.sleep(0.005)
        return threads.deferToThreadPool(reactor_(), pool, wait)

    first = yield s.put(b"no spare yet")              # made at once; asks for 3
    yield settled()
    spares = [path for _, path, _ in s._spares]
    assert len(spares) == 3 and all(os.path.getsize(p) == 0 for p in spares)
    yield s.put(b"takes the oldest spare")
    yield settled()
    assert not os.path.exists(spares[0])              # renamed to the blob
    assert s.path(sha(b"takes the oldest spare")).read_bytes() == b"takes the oldest spare"
    assert len(s._spares) == 3 and spares[1] in [p for _, p, _ in s._spares]
    # A spare that waited too long (GC could take it) is removed, not used.
    s._spares = type(s._spares)((fd, path, created - blobs.SPARE_MAX_AGE)
                                for fd, path, created in s._spares)
    old = [path for _, path, _ in s._spares]
    yield s.put(b"after a long pause")
    yield settled()
    assert not any(os.path.exists(path) for path in old)
    assert s.path(first.id).exists()
    s.close_spares()
    assert list(s.tmp.iterdir()) == []


def reactor_() -> Any:
    from twisted.internet import reactor
    return reactor


def test_header_end_looks_for_a_bare_blank_line_only_before_the_crlf_one() -> None:
    """The LF LF search stops at the CR LF CR LF (it used to read a whole 64 KB head);
    the answer is the same as searching everything, on random inputs."""
    from lightmail.storage.blobs import _header_end

    def everywhere(data: bytes, start: int) -> int:
        crlf = data.find(b"\r\n\r\n", start)
        lf = data.find(b"\n\n", start)
        if crlf >= 0 and (lf < 0 or crlf + 2 <= lf):
            return crlf + 4
        return lf + 2 if lf >= 0 else -1
    rng = random.Random(7)
    for _ in range(50000):
        data = bytes(rng.choice(b"\r\nab") for _ in range(rng.randrange(12)))
        start = rng.randrange(len(data) + 1)
        assert _header_end(data, start) == everywhere(data, start), (data, start)
    assert _header_end(b"A: b\r\n\r\n" + b"x\r\n" * 20000) == 8
