"""Waking the running queue runner from another process, as Postfix's qmgr FIFO does.

The server keeps a FIFO, ``state_dir/queue.wake`` (mode 0600: only its owner, and
root, may write to it), open for reading.  ``lightmail queue requeue|release`` (a
separate process) writes one byte to it after changing the queue, and the runner
looks for due work at once instead of at its next poll.  A byte is only a nudge:
what to do is in the database, so bytes that pile up, or a wake-up that finds nobody
listening (the server is not running), lose nothing.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

WAKE_NAME = "queue.wake"


def wake(path: Path) -> bool:
    """Nudge the server listening on the FIFO at ``path``.  False when nobody
    listens (no FIFO, or no server has it open) or the path is not our FIFO."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:          # ENOENT: never started; ENXIO: not running; ELOOP: a link
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        try:
            os.write(fd, b"w")
        except BlockingIOError:
            pass             # full: plenty of wake-ups are pending already
        return True
    finally:
        os.close(fd)


def listening(path: Path) -> bool:
    """Whether a server has the FIFO at ``path`` open (it runs, on this state
    directory), without waking it: what commands that must not run beside a server
    (``lightmail db downgrade``, ``lightmail fsck --repair``) ask."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:          # ENXIO: nobody has it open for reading
        return False
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


@implementer(IReadDescriptor)
class WakeFIFO:
    """The server's end: calls ``callback`` (on the reactor thread) when woken."""

    log = Logger()

    def __init__(self, path: Path, callback: Callable[[], None], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.path = path
        self.callback = callback
        self.reactor = reactor
        self.fd = -1

    def start(self) -> bool:
        """Make (or reuse) the FIFO and listen; False, with a warning, if it cannot."""
        try:
            self.fd = _open_fifo(self.path)
        except OSError as exc:
            self.log.warn("no queue wake-ups at {path} ({error}): lightmail queue "
                          "changes take effect at the next poll",
                          path=str(self.path), error=exc.strerror or str(exc))
            return False
        self.reactor.addReader(self)
        return True

    def stop(self) -> None:
        if self.fd >= 0:
            self.reactor.removeReader(self)
            os.close(self.fd)
            self.fd = -1

    # IReadDescriptor
    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        # One bounded read: a writer that never stops cannot hold the reactor here
        # (what is left makes the FIFO readable again, for the next iteration).
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            pass
        self.callback()

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return WAKE_NAME


def _open_fifo(path: Path) -> int:
    """Open the FIFO at ``path`` for reading, making it first when needed.  Opened
    read-write, so that it never reads as closed when no writer is left (Linux and
    the BSDs allow this on FIFOs) and the reactor never sees it readable for
    nothing.  Anything else at the path, or a FIFO that others could write to or
    that is not ours, is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            if not _ours(os.lstat(path)):
                os.unlink(path)
        except FileNotFoundError:
            pass
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                continue         # replaced meanwhile: again
            raise
        if _ours(os.fstat(fd)):
            return fd
        os.close(fd)
    raise OSError(errno.EEXIST, f"{path} keeps being something else than our FIFO")


def _ours(info: os.stat_result) -> bool:
    return (stat.S_ISFIFO(info.st_mode) and info.st_uid == os.geteuid()
            and not info.st_mode & 0o077)
