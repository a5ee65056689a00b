"""The S3 blob store: message blobs as objects of a bucket of any S3-compatible service
([storage] blob_backend = s3, the [s3] section).

Layout in the bucket::

    PREFIX/ab/abcd...       one object per blob, named by the lower-case hex SHA-256
                            of its content, fanned out by its first byte

Durability, the filesystem store's contract: a blob is durable once the service has
answered its PUT (or the CompleteMultipartUpload of a large one) with success, and
the service checked what it received against the blob's SHA-256 first: every upload
carries ``x-amz-checksum-sha256`` (of each part, for a multipart upload) and a
mismatch is refused (400 BadDigest); a checksum in the answer is compared with ours
too (lightmail.storage.s3client).  An object only comes into being whole, at its
final key, with the content its key names.  Until then a message is a staged blob
(IStagedBlob): in memory, and past a few hundred KiB in a spool file on local disk
(``[s3] spool_dir``); the write port makes it durable (uploads it) before it commits
the row that refers to it, so SMTP's 250 means stored in S3.  When the service
cannot be reached, the upload fails, nothing is committed and SMTP answers 451.

The writer process: a staged blob is handed over as the path of its spool file and
the octets not yet written there (BlobHandoff); the writer process, which opens the
same store, uploads it in its group, all of a group's uploads in parallel
(:meth:`S3BlobStore.commit_staged_now`).

Content already stored is uploaded again all the same: the new PUT renews the
object's LastModified, which garbage collection takes as the grace period that
protects blobs not yet referenced from SQL (as the filesystem store renews a
file's mtime).

Reads go through a bounded cache of whole blobs (``[s3] read_cache_size``, least
recently used out first); a whole blob read is checked against its SHA-256.

Garbage collection (IBlobStore.sweep and delete_now): the objects under the prefix
whose LastModified is older than the grace period are listed for the collector,
which deletes those that no row refers to; multipart uploads begun before it (left
by a process that died midway) are aborted, and old spool files removed.  Pins
(backups) and collections exclude each other with a lock file in the spool
directory: between the processes of one machine.

Every request is made by a bounded pool of threads of the store's own
(``[s3] threads``), never on the reactor thread.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any, TypeVar, cast

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.config import S3Config
from lightmail.storage.blobs import (
    FLUSH_THRESHOLD,
    BufferedBlobWriter,
    CommitOnce,
    PinLock,
    WriterState,
    copy_digest,
    is_blob_id,
)
from lightmail.storage.interfaces import (
    BlobDamaged,
    BlobHandoff,
    BlobMissing,
    BlobRef,
    IBlobStore,
    IBlobWriter,
    IStagedBlob,
)
from lightmail.storage.s3client import S3Client
from lightmail.storage.threads import WorkerThreads

__all__ = ["ReadCache", "S3BlobStore"]

log = Logger()
_T = TypeVar("_T")


def _check_id(blob_id: object) -> str:
    if not is_blob_id(blob_id):
        raise ValueError(f"not a blob id: {blob_id!r}")
    return cast(str, blob_id)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class ReadCache:
    """Whole blobs recently read, up to ``capacity`` octets, the least recently used
    dropped first; a blob over an eighth of it is not kept (one large message would
    push out many small ones).  Any thread."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, blob_id: str) -> bytes | None:
        with self._lock:
            data = self._items.get(blob_id)
            if data is not None:
                self._items.move_to_end(blob_id)
            return data

    def put(self, blob_id: str, data: bytes) -> None:
        if len(data) > self.capacity // 8:
            return
        with self._lock:
            if blob_id in self._items:
                self._items.move_to_end(blob_id)
                return
            self._items[blob_id] = data
            self.size += len(data)
            while self.size > self.capacity:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)

    def drop(self, blob_id: str) -> None:
        with self._lock:
            data = self._items.pop(blob_id, None)
            if data is not None:
                self.size -= len(data)


@implementer(IBlobStore)
class S3BlobStore:
    """Blobs as objects of ``config.bucket``; see the module docstring.  Its thread
    pool starts with it; :meth:`close` stops it."""

    #: Uploads are network round trips: made on the store's pool beside a group's
    #: commit, not in the group's worker hop one after another.
    batches_commits = False

    def __init__(self, config: S3Config, spool_dir: Path,
                 reactor: IReactorFromThreads | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = cast(IReactorFromThreads, default_reactor)
        self.reactor = reactor
        self.client = S3Client(config, config.threads)
        self.prefix = config.prefix
        self.multipart_threshold = config.multipart_threshold
        self.part_size = config.part_size
        self.flush_threshold = FLUSH_THRESHOLD
        self.cache = ReadCache(config.read_cache_size)
        self.spool_dir = Path(spool_dir)
        # A backup's pin holds collections back on this machine only (operations.rst).
        self._pins = PinLock(self.spool_dir / "pins.lock")
        # Messages wait here: for LightMail's user only (as the filesystem store's).
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._spool = str(self.spool_dir)
        where = f" at {config.endpoint}" if config.endpoint else ""
        self.location = f"s3://{config.bucket}/{config.prefix}{where}"
        self.pool: Any = WorkerThreads(config.threads, "lightmail-s3")
        self.pool.start()

    def key(self, blob_id: str) -> str:
        """The object's key of a blob (no I/O)."""
        _check_id(blob_id)
        return f"{self.prefix}{blob_id[:2]}/{blob_id}"

    def _defer(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def _each_now(self, calls: Sequence[Callable[[], Any]]) -> list[BaseException | None]:
        """Run ``calls`` on the pool at once and wait for them all (a worker thread
        that is not the pool's); None for each that returned, else its exception."""
        if not calls:
            return []
        if len(calls) == 1:
            try:
                calls[0]()
            except Exception as exc:
                return [exc]
            return [None]
        results: list[BaseException | None] = [None] * len(calls)
        left = [len(calls)]
        lock = threading.Lock()
        done = threading.Event()

        def finished(index: int, ok: bool, result: Any) -> None:
            if not ok:
                results[index] = cast(Failure, result).value
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()
        for index, call in enumerate(calls):
            self.pool.callInThreadWithCallback(functools.partial(finished, index), call)
        done.wait()
        return results

    # -- uploads (worker threads) ----------------------------------------------------------

    def upload_now(self, ref: BlobRef, path: str | None, chunks: list[bytes]) -> None:
        """Store the blob whose content is the spool file at ``path`` (if any) and then
        ``chunks``; returns once the service has it, checked (see the module
        docstring)."""
        key = self.key(ref.id)
        if ref.size < self.multipart_threshold:
            body = (Path(path).read_bytes() if path is not None else b"") + b"".join(chunks)
            if len(body) != ref.size:
                raise BlobDamaged(f"blob {ref.id} has {len(body)} octets, not {ref.size}")
            self.client.put(key, body, bytes.fromhex(ref.id))
        else:
            self.client.put_parts(key, self._parts(ref, path, chunks))

    def _parts(self, ref: BlobRef, path: str | None,
               chunks: list[bytes]) -> Iterator[bytes]:
        """The content in parts of ``part_size`` (the last one shorter); raises after
        the last one if the whole does not hash to the blob's id (the upload is then
        aborted before its completion)."""
        digest = hashlib.sha256()
        buf = bytearray()
        size = self.part_size

        def pieces() -> Iterator[bytes]:
            if path is not None:
                with open(path, "rb") as spooled:
                    while piece := spooled.read(1 << 20):
                        yield piece
            yield from chunks
        for piece in pieces():
            digest.update(piece)
            buf += piece
            while len(buf) >= size:
                yield bytes(buf[:size])
                del buf[:size]
        if buf:
            yield bytes(buf)
        if digest.hexdigest() != ref.id:
            raise BlobDamaged(f"the spooled content of blob {ref.id} hashes to "
                              f"{digest.hexdigest()}")

    # -- IBlobStore ------------------------------------------------------------------------

    def writer(self) -> IBlobWriter:
        return _S3Writer(self)

    def put(self, data: bytes) -> Deferred[BlobRef]:
        w = self.writer()
        w.write(data)
        return w.finish()

    def read(self, blob_id: str) -> Deferred[bytes]:
        _check_id(blob_id)
        cached = self.cache.get(blob_id)
        if cached is not None:
            return succeed(cached)
        return self._defer(self.read_now, blob_id)

    def read_now(self, blob_id: str, length: int = -1) -> bytes:
        cached = self.cache.get(_check_id(blob_id))
        if cached is not None:
            return cached if length < 0 else cached[:length]
        try:
            data = self.client.get(self.key(blob_id), 0, length)
        except BlobMissing:
            raise BlobMissing(f"blob {blob_id} is missing") from None
        if length < 0:
            if hashlib.sha256(data).hexdigest() != blob_id:
                raise BlobDamaged(f"blob {blob_id} in S3 is damaged: its content does "
                                  "not hash to its name")
            self.cache.put(blob_id, data)
        return data

    def read_range(self, blob_id: str, offset: int, length: int) -> Deferred[bytes]:
        _check_id(blob_id)
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        cached = self.cache.get(blob_id)
        if cached is not None:
            return succeed(cached[offset:offset + length])

        def read() -> bytes:
            try:
                return self.client.get(self.key(blob_id), offset, length)
            except BlobMissing:
                raise BlobMissing(f"blob {blob_id} is missing") from None
        return self._defer(read)

    def read_staged(self, staged: IStagedBlob) -> Deferred[bytes]:
        if not isinstance(staged, _S3Staged):       # durable already
            return self.read(staged.ref.id)
        return staged.read()

    def read_many(self, blob_ids: Sequence[str]) -> Deferred[list[bytes | BlobMissing]]:
        def missing(failure: Failure) -> BlobMissing:
            failure.trap(BlobMissing)
            return cast(BlobMissing, failure.value)
        reads = [self.read(blob_id).addErrback(missing) for blob_id in blob_ids]
        d: Deferred[list[bytes | BlobMissing]] = gatherResults(reads, consumeErrors=True)

        def first_error(failure: Failure) -> Failure:
            first: Failure = failure.value.subFailure  # type: ignore[union-attr]
            return first
        return d.addErrback(first_error)

    def exists_now(self, blob_id: str) -> bool:
        return self.client.modified(self.key(blob_id)) is not None

    def open_now(self, blob_id: str) -> IO[bytes]:
        try:
            return cast(IO[bytes], self.client.open(self.key(blob_id)))
        except BlobMissing:
            raise BlobMissing(f"blob {blob_id} is missing") from None

    def stage_now(self, source: IO[bytes], ref: BlobRef) -> IStagedBlob:
        """IBlobStore: copied into a spool file and checked; uploaded by
        :meth:`commit_staged_now`."""
        _check_id(ref.id)
        fd, path = self._new_spool_file()
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = copy_digest(source, out)
        except BaseException:
            _unlink_quietly(path)
            raise
        if digest != ref.id or size != ref.size:
            _unlink_quietly(path)
            raise BlobDamaged(f"what came for blob {ref.id} hashes to {digest} "
                              f"({size} octets)")
        return _S3Staged(self, ref, path, [])

    def _new_spool_file(self) -> tuple[int, str]:
        return tempfile.mkstemp(prefix="blob-", suffix=".tmp", dir=self._spool)

    def delete_now(self, blob_id: str, older_than: float) -> bool:
        key = self.key(blob_id)
        modified = self.client.modified(key)
        if modified is None or modified >= older_than:
            return False
        self.client.delete(key)
        self.cache.drop(blob_id)
        return True

    def sweep(self, older_than: float) -> Deferred[list[str]]:
        return self._defer(self._sweep, older_than)

    def _sweep(self, older_than: float) -> list[str]:
        with os.scandir(self._spool) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    if entry.name.endswith(".tmp") and entry.is_file() and \
                            entry.stat().st_mtime < older_than:
                        os.unlink(entry.path)
        aborted = self.client.abort_uploads_before(self.prefix, older_than)
        if aborted:
            log.info("blob store: aborted {count} multipart uploads left unfinished",
                     count=aborted)
        old = []
        for key in self.client.list_before(self.prefix, older_than):
            name = key[len(self.prefix):]
            blob_id = name[3:]
            if is_blob_id(blob_id) and name[:3] == blob_id[:2] + "/":
                old.append(blob_id)
        return old

    def commit_staged_now(self, staged: Sequence[IStagedBlob]
                          ) -> list[BaseException | None]:
        """IBlobStore: the uploads of a group, in parallel on the pool."""
        blobs = cast("list[_S3Staged]", list(staged))
        return self._each_now([blob.commit_now for blob in blobs])

    def adopt(self, handoff: BlobHandoff) -> IStagedBlob:
        return _S3Staged(self, handoff.ref, handoff.path,
                         [handoff.data] if handoff.data else [])

    # Pins (IBlobStore.pin_now): as the filesystem store's, a shared flock on a file
    # that a collection's exclusive one excludes (the processes of this machine).
    def pin_now(self) -> AbstractContextManager[None]:
        return self._pins.pin_now()

    def collecting_now(self) -> AbstractContextManager[bool]:
        return self._pins.collecting_now()

    def recover(self) -> Deferred[int]:
        """IBlobStore: nothing to put right (an object exists only once whole); the
        spool files a crash left are swept with the garbage."""
        return succeed(0)

    def close(self) -> None:
        self.pool.stop()


@implementer(IBlobWriter)
class _S3Writer(BufferedBlobWriter):
    """Hashes and buffers on the reactor thread; past FLUSH_THRESHOLD buffered, the
    pool appends to the writer's spool file.  At most one pool call per writer is in
    flight, so that appends stay in order."""

    def __init__(self, store: S3BlobStore) -> None:
        super().__init__()
        self._store = store
        self._path: str | None = None       # the spool file, from the first append
        self._staging: Deferred[IStagedBlob] | None = None

    def finish(self) -> Deferred[BlobRef]:
        return self.stage().addCallback(lambda staged: staged.commit())

    def stage(self) -> Deferred[IStagedBlob]:
        """IBlobWriter: an :class:`_S3Staged` (at once, or once an append in flight
        is done), uploaded by the write port."""
        if self._state is not WriterState.OPEN:
            raise RuntimeError(f"finish of a blob writer that is {self._state.value}")
        self._state = WriterState.STAGING
        d: Deferred[IStagedBlob] = Deferred()
        self._staging = d
        self._advance()
        return d

    def _advance(self) -> None:
        if self._busy:
            return
        if self._error is not None or self._state is WriterState.ABORTED:
            self._take()
            path, self._path = self._path, None
            if path is not None:
                self._store.pool.callInThreadWithCallback(None, _unlink_quietly, path)
            if self._state is WriterState.STAGING:
                self._state = WriterState.FAILED
                d, self._staging = self._staging, None
                assert d is not None and self._error is not None
                d.errback(self._error)
        elif self._state is WriterState.STAGING:
            self._state = WriterState.FINISHED
            ref = BlobRef(self._hash.hexdigest(), self._size, self._head.end())
            staged = _S3Staged(self._store, ref, self._path, self._take())
            self._path = None
            d, self._staging = self._staging, None
            assert d is not None
            d.callback(staged)
        elif self._buflen >= self._store.flush_threshold or (
                self._drain_waiters and self._buflen):
            self._busy = True
            self._flying = self._buflen
            self._store._defer(self._append, self._path, self._take()).addCallbacks(
                self._appended, self._failed)
        self._wake_drained()

    def _append(self, path: str | None, chunks: list[bytes]) -> str:
        """Append to the spool file (made first if ``path`` is None); its path.
        On the pool."""
        made = path is None
        if path is None:
            fd, path = self._store._new_spool_file()
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(b"".join(chunks))
        except BaseException:
            if made:
                _unlink_quietly(path)
            raise
        return path

    def _appended(self, path: str) -> None:
        self._busy = False
        self._flying = 0
        self._path = path
        self._advance()

    def _failed(self, failure: Failure) -> None:
        self._busy = False
        self._flying = 0
        self._error = failure
        self._advance()



@implementer(IStagedBlob)
class _S3Staged:
    """A blob whose content is complete and not yet in S3: its spool file (None when
    it all fits in memory) and the octets after it.  Exactly one of
    :meth:`commit_now`, :meth:`commit`, the store's ``commit_staged_now`` or
    :meth:`handoff`, once; :meth:`discard` drops one whose commit never started.  The
    spool file is removed when the upload is done, or failed."""

    def __init__(self, store: S3BlobStore, ref: BlobRef, path: str | None,
                 chunks: list[bytes]) -> None:
        self._store = store
        self.ref = ref
        self._path = path
        self._chunks = chunks
        self._once = CommitOnce(ref.id)
        #: IStagedBlob: set once the upload has succeeded.
        self.durable = False

    @property
    def store(self) -> S3BlobStore:
        return self._store

    def _start(self) -> None:
        self._once.start()

    def commit_now(self) -> None:
        self._start()
        chunks, self._chunks = self._chunks, []
        path, self._path = self._path, None
        try:
            self._store.upload_now(self.ref, path, chunks)
        finally:
            if path is not None:
                _unlink_quietly(path)
        self.durable = True

    def commit(self) -> Deferred[BlobRef]:
        return self._store._defer(self.commit_now).addCallback(lambda _: self.ref)

    def discard(self) -> None:
        if not self._once.discard():
            return
        self._chunks = []
        path, self._path = self._path, None
        if path is not None:
            _unlink_quietly(path)

    def handoff(self) -> BlobHandoff:
        """IStagedBlob: the spool file is the other process's now (it removes it)."""
        self._start()
        chunks, self._chunks = self._chunks, []
        path, self._path = self._path, None
        return BlobHandoff(path, b"".join(chunks), self.ref)

    def read(self) -> Deferred[bytes]:
        if self._once.started or self._once.discarded:
            return fail(BlobMissing(f"blob {self.ref.id} is no longer staged"))
        path, chunks = self._path, self._chunks
        if path is None:
            return succeed(b"".join(chunks))
        return self._store._defer(lambda: Path(path).read_bytes() + b"".join(chunks))
