"""The filesystem blob store: immutable, content-addressed message blobs.

Layout under the store's root::

    objects/ab/abcd...      one file per blob, named by the lower-case hex SHA-256
                            of its content, fanned out by its first byte
    tmp/                    blobs being written (same filesystem as objects/)
    format                  "2": the layout above
    pins.lock               locked by backups (pin_now) and garbage collection

One level of 256 fan-out directories, as git keeps loose objects: they all exist after
the first thousand or so messages, where two levels (65,536 directories, the layout
of format 1) made nearly every new message of a young store create a directory, and
so many directories that creating any file became several times slower (on ext4:
0.4 ms a message against 0.09 in all, measured).  A store of format 1 is moved to
format 2 when it is opened (:meth:`FilesystemBlobStore._upgrade_layout`).

Durability: a blob is written to a uniquely named file in ``tmp/``, fsynced, and only
then renamed to its final name; the directory that received it is fsynced as well (and
its fan-out directory the first time this process uses it), and only after all of
that does :meth:`IBlobWriter.finish` fire.  Since a final path can only ever come into
being by an atomic rename of a complete, fsynced file, a crash at any moment leaves
either the whole blob or no blob at its name; what is left behind is a stray file in
``tmp/``, which :meth:`FilesystemBlobStore.sweep` removes later.

Group commit (``blob_sync = auto``, Linux 5.8 and later): the blobs that one grouped
SQL transaction refers to are made durable together (:meth:`FilesystemBlobStore.
commit_pending_many`): each is written to its temporary file, one ``syncfs`` makes
them all durable (contents and the temporary names), and each is renamed - one disk
flush for the group instead of two per blob.  The renames are not flushed before the
commit is reported: the kernel writes them back within seconds, and if a power loss
undoes one first, the blob is still whole and durable at its temporary name.
:meth:`FilesystemBlobStore.recover_now`, run by the storage service at every start
before anything is served, moves each such file to the name that the SHA-256 of its
content gives.  So a final path still only ever holds a complete blob, and a blob that
a committed SQL row refers to is, after any crash and that start, at its final path.
``syncfs`` reports write-back errors from Linux 5.8 on; before that, and elsewhere,
each blob is fsynced alone, rename and directory included.

Several nodes may share one store (a cluster's blob directory): each names its
temporary files after its node id (``blob-TAG-*.tmp``, TAG the start of the id's
SHA-256), and a node's start-up recovery moves its own and untagged ones (an older
LightMail's), never what another node is writing at that moment.

Content that is already stored is not written again: the temporary file is dropped and
the existing file's mtime is refreshed, because garbage collection uses mtimes as the
grace period that protects blobs not yet referenced from SQL.

All file I/O runs on the thread pool given by the caller, never on the reactor thread;
the ``*_now`` methods are synchronous and meant for code already on a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import platform
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from enum import Enum
from pathlib import Path
from typing import IO, Any, TypeVar, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.storage.interfaces import (
    BlobDamaged,
    BlobHandoff,
    BlobMissing,
    BlobRef,
    DurableBlob,
    IBlobStore,
    IBlobWriter,
    IStagedBlob,
)

__all__ = ["FLUSH_THRESHOLD", "HEADER_CAP", "FilesystemBlobStore", "PendingBlob",
           "header_block", "is_blob_id"]

#: Buffered octets after which a writer hands its buffer to the thread pool.
FLUSH_THRESHOLD = 256 * 1024

#: The longest header block kept in SQL (``blobs.headers``; a MariaDB BLOB holds
#: 65,535 octets).  A longer one is recorded as b"": read the blob.
HEADER_CAP = 65535


def _header_end(data: bytes | bytearray, start: int = 0) -> int:
    """The offset just past the blank line that ends the header block, or -1."""
    crlf = data.find(b"\r\n\r\n", start)
    # A bare LF LF counts only before the CR LF CR LF: look no further than that
    # (a CR LF message has none, and the search would read all 64 KB of it).
    lf = data.find(b"\n\n", start, crlf + 3 if crlf >= 0 else len(data))
    if crlf >= 0 and (lf < 0 or crlf + 2 <= lf):
        return crlf + 4
    return lf + 2 if lf >= 0 else -1


def header_block(data: bytes) -> bytes:
    """A message's top-level header block with the blank line that ends it (the whole
    message if it has none), or b"" if that is longer than HEADER_CAP.  Parsed on its
    own, it gives the message's header fields (``ParsedMessage(header_block(raw))``).
    """
    if data.startswith(b"\r\n"):
        return b"\r\n"
    if data.startswith(b"\n"):
        return b"\n"
    end = _header_end(data[:HEADER_CAP + 1])
    if end < 0:
        end = len(data)
    return data[:end] if end <= HEADER_CAP else b""

class HeadCollector:
    """The header block of a message being written, taken from its first writes (a
    bounded copy): ``headers`` once known (see :func:`header_block`), else None."""

    __slots__ = ("_head", "headers")

    def __init__(self) -> None:
        # The message's start, until its header block is complete (then None).
        self._head: bytearray | None = bytearray()
        self.headers: bytes | None = None

    def take(self, data: bytes) -> None:
        head = self._head
        if head is None:
            return
        start = max(0, len(head) - 3)
        head += data[:HEADER_CAP + 2 - len(head)]
        end = 2 if head[:2] == b"\r\n" else 1 if head[:1] == b"\n" else \
            _header_end(head, start)
        if end >= 0:
            self.headers = bytes(head[:end]) if end <= HEADER_CAP else b""
            self._head = None
        elif len(head) > HEADER_CAP:
            self.headers = b""
            self._head = None

    def end(self) -> bytes | None:
        """The message is complete: without a blank line, it is all header block."""
        if self._head is not None:
            self.headers = bytes(self._head) if self._head else b""
            self._head = None
        return self.headers


_BLOB_ID = re.compile(r"[0-9a-f]{64}")
_FANOUT = re.compile(r"[0-9a-f]{2}")
# A node's temporary file: its tag, then tempfile's 8 characters.
_TAGGED = re.compile(r"blob-[0-9a-f]{8}-[a-z0-9_]{8}\.tmp")

_T = TypeVar("_T")

log = Logger()


def is_blob_id(value: object) -> bool:
    """Whether ``value`` is a valid blob id: 64 lower-case hex digits."""
    return isinstance(value, str) and _BLOB_ID.fullmatch(value) is not None


def _check_id(blob_id: object) -> str:
    if not is_blob_id(blob_id):
        raise ValueError(f"not a blob id: {blob_id!r}")
    return cast(str, blob_id)


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _find_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs(2) where it reports write-back errors (Linux 5.8 and later),
    else None: an older kernel's syncfs returns 0 even when a write failed."""
    if platform.system() != "Linux":
        return None
    try:
        major, minor = (int(part) for part in platform.release().split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (5, 8):
        return None
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return cast(Callable[[int], int], syncfs)


_SYNCFS = _find_syncfs()

BLOB_SYNC_MODES = ("auto", "fsync")

#: How long a spare temporary file (see FilesystemBlobStore's ``spare_files``) may wait
#: for a writer; older ones are dropped, well before garbage collection's grace period
#: would let it remove them.
SPARE_MAX_AGE = 60.0


def _close_and_remove(fd: int, path: str) -> None:
    """Close and remove a spare temporary file; each step is tried whatever the other
    did (errors are ignored: a file left behind is swept later)."""
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass


#: What _read_file asks for at once when the length is not given: most messages
#: are smaller, so most reads are one call.
_READ_CHUNK = 256 * 1024


def _read_file(path: str, length: int = -1, offset: int = 0) -> bytes:
    """``length`` octets (all with -1) of the file at ``path`` from ``offset``, in as
    few system calls as there can be: open, read (one for most blobs), close.  Each
    call gives up the GIL and must win it back from a busy reactor thread, and
    Python's ``open().read()`` makes nine of them (fstat, ioctl, lseek...)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if length >= 0:
            parts = []
            while length > 0:
                chunk = os.pread(fd, length, offset)
                parts.append(chunk)
                if len(chunk) < length:     # a regular file's read is short at its end
                    break
                length -= len(chunk)
                offset += len(chunk)
            return b"".join(parts)
        parts = []
        while True:
            chunk = os.pread(fd, _READ_CHUNK, offset)
            parts.append(chunk)
            if len(chunk) < _READ_CHUNK:
                return b"".join(parts) if len(parts) > 1 else chunk
            offset += len(chunk)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class PinLock:
    """IBlobStore's pins: a shared flock on a file in the store (``pins.lock``),
    which a garbage collection's exclusive one excludes, whatever the process; the
    kernel lets go of it when its holder dies, so a killed backup holds nothing
    back."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextlib.contextmanager
    def pin_now(self) -> Iterator[None]:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def collecting_now(self) -> Iterator[bool]:
        fd = self._open()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)


@implementer(IBlobStore)
class FilesystemBlobStore:
    """Blobs as files under ``root``; see the module docstring for layout and guarantees.

    ``pool`` is owned (started and stopped) by the caller; every method that returns a
    Deferred does its file I/O there.
    """

    def __init__(
        self,
        root: Path,
        pool: Any,              # a WorkerThreads (or twisted ThreadPool)
        reactor: IReactorFromThreads | None = None,
        *,
        flush_threshold: int = FLUSH_THRESHOLD,
        sync: str = "auto",
        spare_files: int = 0,
        owner: str = "",
    ) -> None:
        """``owner``: the node whose processes write through this store (``[server]
        node_id``); its temporary files carry its tag, and recover_now moves only
        those.  Empty: one node alone, which recovers every temporary file."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = cast(IReactorFromThreads, default_reactor)
        self.root = Path(root)
        self._pins = PinLock(self.root / "pins.lock")
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        # Plain strings for the per-message path work (pathlib costs more CPU).
        self._objects = str(self.objects)
        self._tmp = str(self.tmp)
        self._tmp_prefix = (f"blob-{hashlib.sha256(owner.encode()).hexdigest()[:8]}-"
                            if owner else "blob-")
        self._owner = owner
        self.pool = pool
        self.reactor = reactor
        self.flush_threshold = flush_threshold
        if sync not in BLOB_SYNC_MODES:
            raise ValueError(f"blob sync mode must be one of {BLOB_SYNC_MODES}, not {sync!r}")
        # syncfs for groups of blobs (see the module docstring), or None: fsync each.
        self._syncfs = _SYNCFS if sync == "auto" else None
        # Temporary files created ahead on the pool, so that creating one (an inode
        # allocation, up to a millisecond on a busy ext4) is not on the path of a
        # group commit: (fd, path, created).  Garbage collection's grace period must
        # be well over SPARE_MAX_AGE (the storage service sees to it).
        self._spare_count = spare_files
        self._spares: deque[tuple[int, str, float]] = deque()
        self._spares_coming = 0
        self._spare_lock = threading.Lock()
        # Fan-out directories whose own directory entry is known to be durable.
        self._durable_dirs: set[str] = set()
        self._dirs_lock = threading.Lock()
        # Makes "refresh the mtime of existing content" and "delete if old" atomic
        # with respect to each other within this process.
        self._gc_lock = threading.Lock()
        for directory in (self.root, self.objects, self.tmp):
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                _fsync_dir(directory.parent)
        self._upgrade_layout()

    # -- helpers ----------------------------------------------------------------------

    def _upgrade_layout(self) -> None:
        """Move the blobs of a format 1 store (``objects/ab/cd/<id>``) to format 2
        (``objects/ab/<id>``), once, when the store is opened (before it serves).

        Each blob is moved by a rename, so at every moment it is whole at one of its
        two names; a crash midway leaves no ``format`` file and the next start goes on
        where this one stopped.  The file is written (and made durable) only once
        every blob is in place.
        """
        marker = self.root / "format"
        if marker.exists():
            return
        for first in self._subdirs(self.objects):
            moved = False
            for second in self._subdirs(Path(first)):
                prefix = Path(first).name + Path(second).name
                with os.scandir(second) as entries:
                    names = [e.name for e in entries
                             if is_blob_id(e.name) and e.name.startswith(prefix)]
                for name in names:
                    target = os.path.join(first, name)
                    if os.path.exists(target):      # same name, so the same content
                        os.unlink(os.path.join(second, name))
                    else:
                        os.rename(os.path.join(second, name), target)
                    moved = True
                if moved:
                    _fsync_dir(first)
                try:
                    os.rmdir(second)
                except OSError:
                    pass            # something else is in it: left alone
            if moved:
                log.info("blob store: moved the blobs of {dir} to the format 2 layout",
                         dir=first)
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, b"2\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.root)

    def path(self, blob_id: str) -> Path:
        """Where the blob with this id lives (pure computation, no I/O)."""
        _check_id(blob_id)
        return self.objects / blob_id[:2] / blob_id

    def _path_str(self, blob_id: str) -> str:
        _check_id(blob_id)
        return f"{self._objects}/{blob_id[:2]}/{blob_id}"

    def _defer(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def new_tmp_file(self) -> tuple[int, str]:
        """A new, empty temporary file for a blob (worker thread): a spare one when
        there is one young enough, else made now.  Asks the pool for more spares."""
        while True:
            with self._spare_lock:
                spare = self._spares.popleft() if self._spares else None
            if spare is None:
                break
            fd, path, created = spare
            if time.monotonic() - created < SPARE_MAX_AGE:
                self._want_spares()
                return fd, path
            _close_and_remove(fd, path)
        self._want_spares()
        return self._make_tmp_file()

    def _make_tmp_file(self) -> tuple[int, str]:
        return tempfile.mkstemp(prefix=self._tmp_prefix, suffix=".tmp", dir=self._tmp)

    def _recoverable(self, name: str) -> bool:
        """Whether the temporary file ``name`` is this node's to recover: its own, or
        none of another node's (an older LightMail's names had no tag)."""
        if not self._owner:
            return True
        return name.startswith(self._tmp_prefix) or _TAGGED.fullmatch(name) is None

    def _want_spares(self) -> None:
        with self._spare_lock:
            missing = self._spare_count - len(self._spares) - self._spares_coming
            if missing <= 0:
                return
            self._spares_coming += missing
        self.pool.callInThreadWithCallback(None, self._make_spares, missing)

    def _make_spares(self, count: int) -> None:
        made = []
        try:
            for _ in range(count):
                fd, path = self._make_tmp_file()
                made.append((fd, path, time.monotonic()))
        finally:
            with self._spare_lock:
                self._spares.extend(made)
                self._spares_coming -= count

    @property
    def location(self) -> str:
        return str(self.root)

    def close(self) -> None:
        """IBlobStore: the spare temporary files go (the pool is the caller's)."""
        self.close_spares()

    def close_spares(self) -> None:
        """Remove the spare temporary files (at shutdown; any thread)."""
        while True:
            with self._spare_lock:
                if not self._spares:
                    return
                fd, path, _ = self._spares.popleft()
            _close_and_remove(fd, path)

    def _ensure_dirs(self, leaf: str, durable: bool = True) -> None:
        """Create the fan-out directory ``objects/ab`` as needed and, if ``durable``,
        make sure its entry is durable (fsync of ``objects``, once per directory and
        process).  A group commit needs no fsync: :meth:`recover_now` makes the
        directory again if a crash loses it."""
        if leaf in self._durable_dirs:      # the common case: known, no lock needed
            return
        try:
            os.mkdir(leaf)
        except FileExistsError:
            pass
        if durable:
            _fsync_dir(os.path.dirname(leaf))
            with self._dirs_lock:
                self._durable_dirs.add(leaf)

    def _commit(self, tmp_path: str, blob_id: str, consumed: Callable[[], None],
                fresh: bool = False, sync_dir: bool = True) -> bool:
        """Move a complete, durable temporary file to its final name (worker thread).

        Returns True if it was renamed, False if the content was there already (the
        temporary file is then removed).  ``consumed`` is called as soon as nothing is
        left at ``tmp_path``.  ``fresh``: the file was written a moment ago, so its
        mtime needs no refreshing.  ``sync_dir``: fsync the directory, so that the
        rename is durable too.  Without it (a group commit, whose syncfs made the
        temporary file and its directory entry durable), a crash may undo the rename,
        and :meth:`recover_now` redoes it at the next start.
        """
        final = self._path_str(blob_id)
        leaf = os.path.dirname(final)
        with self._gc_lock:
            try:
                os.utime(final)
            except FileNotFoundError:
                exists = False
            else:
                exists = True
        if exists:
            os.unlink(tmp_path)
            consumed()
            # Another writer may have renamed it an instant ago and not yet made that
            # durable.  A group commit needs nothing more: that writer's temporary file
            # was durable before its rename, so recover_now would redo it.  Alone,
            # make it durable here too before reporting the blob as stored.
            if sync_dir:
                self._ensure_dirs(leaf)
                _fsync_dir(leaf)
            return False
        self._ensure_dirs(leaf, sync_dir)
        if not fresh:
            # Fresh mtime even if the last write was long ago (GC grace period).
            os.utime(tmp_path)
        os.rename(tmp_path, final)
        consumed()
        if sync_dir:
            _fsync_dir(leaf)
        return True

    @property
    def batches_commits(self) -> bool:
        """Whether a group's blobs are made durable together (syncfs), so that a
        group's worker hop is the best place for a blob's commit even when groups
        are busy (with fsyncs, one after another there, it is not)."""
        return self._syncfs is not None

    def adopt(self, handoff: BlobHandoff) -> PendingBlob:
        """The PendingBlob that another process handed over (``handoff.path`` None:
        its temporary file is made here)."""
        tmp = _TmpFile(self)
        tmp.path = handoff.path
        return PendingBlob(self, tmp, [handoff.data] if handoff.data else [], handoff.ref)

    def commit_staged_now(self, staged: Sequence[IStagedBlob]
                          ) -> list[BaseException | None]:
        """IBlobStore: :meth:`commit_pending_many` of this store's staged blobs."""
        return self.commit_pending_many(cast("list[PendingBlob]", list(staged)))

    def commit_pending_many(self, pendings: Sequence[PendingBlob]
                            ) -> list[BaseException | None]:
        """Make several pending blobs durable at once (worker thread): each is written
        to its temporary file, one syncfs makes all the contents durable, and each is
        renamed to its final name (see the module docstring: the renames are made
        durable by the kernel's write-back, or redone by :meth:`recover_now`).  One
        result per blob: None when it is durable, or the exception that left it out
        (its temporary file removed); the others go on.  Without syncfs, each is
        committed alone.
        """
        if self._syncfs is None:
            return [_outcome(pending.commit_now) for pending in pendings]
        results: list[BaseException | None] = [None] * len(pendings)
        written: list[int] = []
        for index, pending in enumerate(pendings):
            results[index] = _outcome(pending.write_now)
            if results[index] is None:
                written.append(index)
        if not written:
            return results
        try:
            self._syncfs_now()              # the contents, before any rename
        except OSError as exc:
            for index in written:
                results[index] = exc
                pendings[index].discard_now()
            return results
        for index in written:
            results[index] = _outcome(pendings[index].rename_now)
        return results

    def pin_now(self) -> AbstractContextManager[None]:
        return self._pins.pin_now()

    def collecting_now(self) -> AbstractContextManager[bool]:
        return self._pins.collecting_now()

    def recover(self) -> Deferred[int]:
        """:meth:`recover_now` on the pool; logs what it moved."""
        def done(moved: int) -> int:
            if moved:
                log.warn("blob store: {count} blobs whose rename a crash undid were "
                         "moved into place", count=moved)
            return moved
        return self._defer(self.recover_now).addCallback(done)

    def recover_now(self) -> int:
        """Redo the renames that a crash undid (at start-up, before the store serves;
        only in the process that owns the store, so that no writer is at work).

        A group commit's rename is not made durable before the commit is reported (one
        disk flush fewer per group): after a power loss, a blob that the SQL commit
        refers to may be back at its temporary name, whole and durable.  Every
        non-empty temporary file whose final name is missing is moved into place under
        the SHA-256 of what it holds: content addressing makes that right whatever the
        file is (a whole blob, or the start of one whose writer died, which garbage
        collection removes later as it is referenced by nothing).  Returns how many
        files were moved.
        """
        moved = 0
        with os.scandir(self._tmp) as entries:
            names = [entry.path for entry in entries
                     if entry.is_file(follow_symlinks=False)
                     and self._recoverable(entry.name)]
        for path in names:
            try:
                blob_id = self._hash_file(path)
            except FileNotFoundError:
                continue
            if blob_id is None:
                continue
            final = self._path_str(blob_id)
            if os.path.exists(final):
                continue            # the rename held, or the content came again
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._commit(path, blob_id, lambda: None)
            moved += 1
        if moved:
            for leaf in self._subdirs(self.objects):
                _fsync_dir(leaf)
        return moved

    @staticmethod
    def _hash_file(path: str) -> str | None:
        """The SHA-256 of a file's content, or None for an empty file."""
        digest, size = file_digest(path)
        return digest if size else None

    def _syncfs_now(self) -> None:
        assert self._syncfs is not None
        fd = os.open(self._tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            if self._syncfs(fd) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"syncfs of the blob store: {os.strerror(error)}")
        finally:
            os.close(fd)

    # -- IBlobStore ---------------------------------------------------------------------

    def writer(self) -> IBlobWriter:
        return _BlobWriter(self)

    def put(self, data: bytes) -> Deferred[BlobRef]:
        w = self.writer()
        w.write(data)
        return w.finish()

    def read(self, blob_id: str) -> Deferred[bytes]:
        _check_id(blob_id)
        return self._defer(self.read_now, blob_id)

    def read_staged(self, staged: IStagedBlob) -> Deferred[bytes]:
        if not isinstance(staged, PendingBlob):     # finished durable already
            return self.read(staged.ref.id)
        return staged.read()

    def read_range(self, blob_id: str, offset: int, length: int) -> Deferred[bytes]:
        path = self.path(blob_id)
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")

        def read() -> bytes:
            try:
                return _read_file(str(path), length, offset)
            except FileNotFoundError:
                raise BlobMissing(f"blob {blob_id} is missing") from None
        return self._defer(read)

    def read_now(self, blob_id: str, length: int = -1) -> bytes:
        try:
            return _read_file(self._path_str(blob_id), length)
        except FileNotFoundError:
            raise BlobMissing(f"blob {blob_id} is missing") from None

    def read_many(self, blob_ids: Sequence[str]) -> Deferred[list[bytes | BlobMissing]]:
        ids = list(blob_ids)
        for blob_id in ids:
            _check_id(blob_id)

        def read_all() -> list[bytes | BlobMissing]:
            out: list[bytes | BlobMissing] = []
            for blob_id in ids:
                try:
                    out.append(self.read_now(blob_id))
                except BlobMissing as exc:
                    out.append(exc)
            return out
        return self._defer(read_all)

    def exists_now(self, blob_id: str) -> bool:
        return os.path.isfile(self._path_str(blob_id))

    def open_now(self, blob_id: str) -> IO[bytes]:
        try:
            return open(self._path_str(blob_id), "rb")
        except FileNotFoundError:
            raise BlobMissing(f"blob {blob_id} is missing") from None

    def stage_now(self, source: IO[bytes], ref: BlobRef) -> IStagedBlob:
        """IBlobStore: copied into a temporary file of the store and checked; its
        flush and rename are :meth:`commit_pending_many`'s (one syncfs a group)."""
        _check_id(ref.id)
        fd, path = self.new_tmp_file()
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = copy_digest(source, out)
        except BaseException:
            os.unlink(path)
            raise
        if digest != ref.id or size != ref.size:
            os.unlink(path)
            raise BlobDamaged(f"what came for blob {ref.id} hashes to {digest} "
                              f"({size} octets)")
        return self.adopt(BlobHandoff(path, b"", ref))

    def delete_now(self, blob_id: str, older_than: float) -> bool:
        path = self.path(blob_id)
        with self._gc_lock:
            try:
                if os.stat(path).st_mtime >= older_than:
                    return False
                os.unlink(path)
            except FileNotFoundError:
                return False
        return True

    def sweep(self, older_than: float) -> Deferred[list[str]]:
        return self._defer(self._sweep, older_than)

    def _sweep(self, older_than: float) -> list[str]:
        with os.scandir(self.tmp) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and \
                            entry.stat(follow_symlinks=False).st_mtime < older_than:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    pass
        old: list[str] = []
        for first in self._subdirs(self.objects):
            prefix = Path(first).name
            with os.scandir(first) as entries:
                for entry in entries:
                    if not (is_blob_id(entry.name) and entry.name.startswith(prefix)):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if entry.is_file(follow_symlinks=False) and st.st_mtime < older_than:
                        old.append(entry.name)
        return old

    @staticmethod
    def _subdirs(directory: Path) -> list[str]:
        try:
            with os.scandir(directory) as entries:
                return sorted(e.path for e in entries
                              if _FANOUT.fullmatch(e.name) and e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []


class _TmpFile:
    """The temporary file of one writer.  Its methods run on the pool, one at a time."""

    def __init__(self, store: FilesystemBlobStore) -> None:
        self.store = store
        self.fd: int | None = None
        self.path: str | None = None

    @property
    def active(self) -> bool:
        return self.fd is not None or self.path is not None

    def _append(self, chunks: list[bytes]) -> None:
        if self.fd is None:
            if self.path is None:
                self.fd, self.path = self.store.new_tmp_file()
            else:       # adopted from another process (FilesystemBlobStore.adopt)
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if chunks:
            _write_all(self.fd, b"".join(chunks))

    def append(self, chunks: list[bytes]) -> None:
        self._append(chunks)

    def commit(self, chunks: list[bytes], blob_id: str) -> None:
        self._append(chunks)
        assert self.fd is not None and self.path is not None
        os.fsync(self.fd)
        fd, self.fd = self.fd, None
        os.close(fd)
        self.store._commit(self.path, blob_id, self._consumed, fresh=bool(chunks))

    # The two halves of a commit whose fsyncs the caller replaces by a syncfs.
    def write_unsynced(self, chunks: list[bytes]) -> None:
        self._append(chunks)
        assert self.fd is not None
        fd, self.fd = self.fd, None
        os.close(fd)

    def rename(self, blob_id: str, fresh: bool) -> None:
        assert self.path is not None
        self.store._commit(self.path, blob_id, self._consumed, fresh=fresh,
                           sync_dir=False)

    def _consumed(self) -> None:
        self.path = None

    def discard(self) -> None:
        """Close and remove the file; errors are ignored."""
        fd, self.fd = self.fd, None
        path, self.path = self.path, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass


class WriterState(Enum):
    OPEN = "open"
    FINISHING = "finishing"         # FilesystemBlobStore's finish(): the commit runs
    STAGING = "staging"             # S3BlobStore's stage(): waits for an append
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"



class BufferedBlobWriter:
    """What every store's blob writer does on the reactor thread: hash what it is
    given, collect the header block, buffer it until the store's next pool call
    takes it, and wake ``drained()``'s waiters once nothing is held.  A subclass
    decides which pool call runs when (:meth:`_advance`); at most one is in flight
    (``_busy``), so that appends stay in order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._size = 0
        self._buf: list[bytes] = []
        self._buflen = 0
        self._state = WriterState.OPEN
        self._busy = False
        self._flying = 0            # octets in the pool call in flight
        self._error: Failure | None = None
        self._drain_waiters: list[Deferred[None]] = []
        self._head = HeadCollector()

    def write(self, data: bytes) -> None:
        if self._state is not WriterState.OPEN:
            raise RuntimeError(f"write to a blob writer that is {self._state.value}")
        if not data or self._error is not None:
            return
        data = bytes(data)
        self._head.take(data)
        self._hash.update(data)
        self._size += len(data)
        self._buf.append(data)
        self._buflen += len(data)
        self._advance()

    def backlog(self) -> int:
        return self._buflen + self._flying

    def drained(self) -> Deferred[None]:
        """IBlobWriter: what is buffered goes to the pool now, below the threshold."""
        if not self.backlog():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        self._advance()
        return d

    def abort(self) -> None:
        """Drop the partial blob.  A no-op once it is finishing or staged."""
        if self._state is not WriterState.OPEN:
            return
        self._state = WriterState.ABORTED
        self._advance()

    def _take(self) -> list[bytes]:
        chunks, self._buf, self._buflen = self._buf, [], 0
        return chunks

    def _advance(self) -> None:
        raise NotImplementedError

    def _wake_drained(self) -> None:
        if self._drain_waiters and not self.backlog():
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)


@implementer(IBlobWriter)
class _BlobWriter(BufferedBlobWriter):
    """Hashes and buffers on the reactor thread; the pool appends, fsyncs and renames.

    At most one pool call per writer is in flight, so appends stay in order; data that
    arrives meanwhile is buffered and goes in the next call.
    """

    def __init__(self, store: FilesystemBlobStore) -> None:
        super().__init__()
        self._store = store
        self._tmp = _TmpFile(store)
        self._committing = False
        self._finished: Deferred[BlobRef] | None = None

    def finish(self) -> Deferred[BlobRef]:
        if self._state is not WriterState.OPEN:
            raise RuntimeError(f"finish of a blob writer that is {self._state.value}")
        self._head.end()
        self._state = WriterState.FINISHING
        d: Deferred[BlobRef] = Deferred()
        self._finished = d
        self._advance()
        return d

    def stage(self) -> Deferred[IStagedBlob]:
        """IBlobWriter: a :class:`PendingBlob` whose durability step (write what is
        buffered, flush, rename) is left to the write port, which runs it in the
        worker hop of the transaction that refers to the blob.  While a pool call of
        this writer is in flight (or after one failed), the blob is finished as
        :meth:`finish` does instead, and fires as durable."""
        if self._state is not WriterState.OPEN:
            raise RuntimeError(f"finish of a blob writer that is {self._state.value}")
        if self._busy or self._error is not None:
            return self.finish().addCallback(DurableBlob)
        self._head.end()
        self._state = WriterState.FINISHED
        ref = BlobRef(self._hash.hexdigest(), self._size, self._head.headers)
        pending = PendingBlob(self._store, self._tmp, self._take(), ref)
        self._wake_drained()        # what was buffered is the staged blob's now
        return succeed(pending)

    # -- the sequencer (reactor thread) ---------------------------------------------------

    def _take_to_write(self) -> list[bytes]:
        """The buffered chunks, for a pool call that writes them (in flight until it
        returns)."""
        self._flying = self._buflen
        return self._take()

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._busy = True
        d = self._store._defer(fn, *args)
        d.addCallbacks(self._done, self._failed)

    def _done(self, _: None) -> None:
        self._busy = False
        self._flying = 0
        if self._committing:
            self._committing = False
            self._state = WriterState.FINISHED
            d, self._finished = self._finished, None
            assert d is not None
            d.callback(BlobRef(self._hash.hexdigest(), self._size, self._head.headers))
            self._wake_drained()
            return
        self._advance()

    def _failed(self, failure: Failure) -> None:
        self._busy = False
        self._flying = 0
        self._committing = False
        if self._error is None:
            self._error = failure
        else:
            log.failure("discarding a blob's temporary file failed", failure)
        self._advance()

    def _advance(self) -> None:
        """Start the next pool call this writer needs, if any and none is running."""
        if self._busy:
            return
        if self._error is not None or self._state is WriterState.ABORTED:
            self._take()
            if self._tmp.active:
                self._submit(self._tmp.discard)
            elif self._state is WriterState.FINISHING:
                self._state = WriterState.FAILED
                d, self._finished = self._finished, None
                assert d is not None and self._error is not None
                d.errback(self._error)
            self._wake_drained()
            return
        if self._state is WriterState.FINISHING:
            self._committing = True
            self._submit(self._tmp.commit, self._take_to_write(), self._hash.hexdigest())
        elif self._buflen >= self._store.flush_threshold or (
                self._drain_waiters and self._buflen):
            self._submit(self._tmp.append, self._take_to_write())
        self._wake_drained()
class CommitOnce:
    """A staged blob's guard (any thread): committed at most once, and never after
    it was discarded; discarded only while no commit has started."""

    def __init__(self, blob_id: str) -> None:
        self.blob_id = blob_id
        self._lock = threading.Lock()
        self.started = False
        self.discarded = False

    def start(self) -> None:
        """Before a commit (or handoff): raises when it may not begin."""
        with self._lock:
            if self.discarded:
                raise BlobMissing(f"blob {self.blob_id} was discarded before its commit")
            if self.started:
                # Its temporary file is another's now, or gone: never commit that.
                raise RuntimeError(f"blob {self.blob_id} was committed once already")
            self.started = True

    def discard(self) -> bool:
        """Whether the caller may drop the blob now (then never committed)."""
        with self._lock:
            if self.started or self.discarded:
                return False
            self.discarded = True
            return True


@implementer(IStagedBlob)
class PendingBlob:
    """A blob whose content is complete but not yet durable (``_BlobWriter.stage``).

    ``ref`` is what :meth:`IBlobWriter.finish` would give.  Exactly one of
    :meth:`commit_now` (on a worker thread), :meth:`commit` (on the store's pool),
    the store's ``commit_staged_now`` or :meth:`handoff` must be called, once; the
    blob is durable when it returns or fires.  On failure the temporary file is
    removed.  :meth:`discard` drops a blob whose commit never started (the request
    failed first); a commit after it fails.
    """

    def __init__(self, store: FilesystemBlobStore, tmp: _TmpFile, chunks: list[bytes],
                 ref: BlobRef) -> None:
        self._store = store
        self._tmp = tmp
        self._chunks = chunks
        self.ref = ref
        self._once = CommitOnce(ref.id)
        self._fresh = False
        #: IStagedBlob: set once the commit has succeeded here.
        self.durable = False

    @property
    def store(self) -> FilesystemBlobStore:
        return self._store

    def commit_now(self) -> None:
        self._start()
        chunks, self._chunks = self._chunks, []
        try:
            self._tmp.commit(chunks, self.ref.id)
        except BaseException:
            self._tmp.discard()
            raise
        self.durable = True

    def _start(self) -> None:
        self._once.start()

    # commit_pending_many's steps: write_now, then (after a syncfs) rename_now, or
    # discard_now when the syncfs failed.
    def write_now(self) -> None:
        self._start()
        chunks, self._chunks = self._chunks, []
        self._fresh = bool(chunks)
        try:
            self._tmp.write_unsynced(chunks)
        except BaseException:
            self._tmp.discard()
            raise

    def rename_now(self) -> None:
        try:
            self._tmp.rename(self.ref.id, self._fresh)
        except BaseException:
            self._tmp.discard()
            raise
        self.durable = True

    def discard_now(self) -> None:
        self._tmp.discard()

    def handoff(self) -> BlobHandoff:
        """Hand the commit to another process (reactor thread; see
        lightmail.storage.writer), which makes a PendingBlob of it again with the
        store's :meth:`~FilesystemBlobStore.adopt`.  This process lets go of the
        file: its descriptor is closed on the pool."""
        self._start()
        chunks, self._chunks = self._chunks, []
        tmp = self._tmp
        fd, tmp.fd = tmp.fd, None
        path, tmp.path = tmp.path, None
        if fd is not None:
            self._store.pool.callInThreadWithCallback(None, os.close, fd)
        return BlobHandoff(path, b"".join(chunks), self.ref)

    def discard(self) -> None:
        """Close and remove the temporary file, unless a commit has started (any
        thread; a no-op then)."""
        if not self._once.discard():
            return
        self._chunks = []
        self._tmp.discard()

    def commit(self) -> Deferred[BlobRef]:
        return self._store._defer(self.commit_now).addCallback(lambda _: self.ref)

    def read(self) -> Deferred[bytes]:
        """The content (FilesystemBlobStore.read_staged): from memory when none of
        it went to the temporary file yet (a small message: no thread hop), else the
        file on the pool and what is still buffered."""
        chunks = self._chunks
        path = self._tmp.path
        if self._once.started or self._once.discarded:
            return fail(BlobMissing(f"blob {self.ref.id} is no longer staged"))
        if path is None:
            return succeed(b"".join(chunks))
        return self._store._defer(lambda: _read_file(path) + b"".join(chunks))


def _outcome(fn: Callable[..., Any], *args: Any) -> BaseException | None:
    try:
        fn(*args)
    except Exception as exc:
        return exc
    return None


def copy_digest(source: IO[bytes], out: IO[bytes]) -> tuple[str, int]:
    """Copy ``source`` to ``out`` a MiB at a time; the hex SHA-256 and the size of
    what was copied."""
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(1 << 20):
        digest.update(chunk)
        out.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def file_digest(path: str) -> tuple[str, int]:
    """The hex SHA-256 of a file's content and its size, read a MiB at a time."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
