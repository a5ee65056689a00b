"""A POP3 maildrop: a locked snapshot of the INBOX, with deletions kept until QUIT.

Protocol-independent (only IMailStore and IBlobStore), so the rules live in one
place: message numbers are fixed for the session (RFC 1939 §5), deletions touch
nothing until :meth:`Maildrop.commit` (the UPDATE state), and a second POP3 session
of the same user finds the maildrop locked.  Deletions go through the mail store's
expunge, so IMAP sessions see them as EXPUNGE like any other.

UIDLs are the IMAP UID and UIDVALIDITY, formatted as Dovecot's default
(``%08Xu%08Xv``): stable across sessions and shared with IMAP.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Optional

from twisted.internet import defer

from lightmail.storage.interfaces import (
    BlobMissing,
    IBlobStore,
    IMailStore,
    Mailbox,
    MessageInfo,
)
from lightmail.streams import blob_chunks

# Messages up to this size are sent whole, and read ahead in runs of at most this many
# octets: a client that downloads the maildrop in order (fetchmail, getmail, any
# "leave on server" client) then costs one thread hop per run of messages instead of
# one per message, and each RETR is answered with one write.  Larger messages stream
# in chunks with flow control.  What a session holds read ahead is at most this much.
READ_AHEAD = 128 * 1024


class MaildropLocked(Exception):
    """Another POP3 session holds this user's maildrop (RFC 2449 [IN-USE])."""


class LoginTooSoon(Exception):
    """The user logged in less than LOGIN-DELAY ago (RFC 2449 [LOGIN-DELAY])."""


class LockUnavailable(Exception):
    """Whether the maildrop is free cannot be told now (the nodes' Redis does not
    answer): a temporary failure ([SYS/TEMP])."""


class Locks:
    """Which users have a POP3 session open, and when each last logged in.

    In-process: one LightMail process, or the main process for its workers, which
    ask it over their control connection (lightmail.workers).  Several nodes keep
    them in Redis (lightmail.cluster.locks); the interface stays the same.
    """

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.last_login: dict[int, float] = {}

    def acquire(self, user_id: int, login_delay: float) -> defer.Deferred[None]:
        """Fires when the lock is taken; fails MaildropLocked, LoginTooSoon or
        LockUnavailable."""
        return defer.maybeDeferred(self.acquire_now, user_id, login_delay)

    def acquire_now(self, user_id: int, login_delay: float) -> None:
        if user_id in self.held:
            raise MaildropLocked()
        now = time.monotonic()
        last = self.last_login.get(user_id)
        if login_delay and last is not None and now - last < login_delay:
            raise LoginTooSoon()
        self.held.add(user_id)
        self.last_login[user_id] = now

    def release(self, user_id: int) -> defer.Deferred[None]:
        """Fires once the lock is free for any session that asks next."""
        self.held.discard(user_id)
        return defer.succeed(None)


class Maildrop:
    def __init__(self, mailbox: Mailbox, messages: list[MessageInfo], store: IMailStore,
                 blobs: IBlobStore, locks: Locks) -> None:
        self.mailbox = mailbox
        self.messages = messages
        self.store = store
        self.blobs = blobs
        self.locks = locks
        self.deleted: set[int] = set()        # message numbers, 1-based
        self.closed = False
        self._ahead: dict[int, bytes] = {}    # message number -> content read ahead

    @classmethod
    @defer.inlineCallbacks
    def open(cls, user_id: int, store: IMailStore, blobs: IBlobStore, locks: Locks,
             login_delay: float = 0.0) -> Any:
        """Lock and snapshot the user's INBOX; fails MaildropLocked or LoginTooSoon."""
        yield locks.acquire(user_id, login_delay)
        try:
            mailbox = yield store.get_or_create_mailbox(user_id, "INBOX")
            messages = yield store.list_messages(mailbox.id)
        except BaseException:
            locks.release(user_id)
            raise
        return cls(mailbox, messages, store, blobs, locks)

    # -- what the commands ask ------------------------------------------------------

    def get(self, number: int) -> Optional[MessageInfo]:
        """Message ``number``, or None when there is none or it is marked deleted."""
        if 1 <= number <= len(self.messages) and number not in self.deleted:
            return self.messages[number - 1]
        return None

    def live(self) -> list[tuple[int, MessageInfo]]:
        return [(number, message) for number, message in enumerate(self.messages, 1)
                if number not in self.deleted]

    def stat(self) -> tuple[int, int]:
        live = self.live()
        return len(live), sum(message.size for _, message in live)

    def uidl(self, message: MessageInfo) -> str:
        return f"{message.uid:08X}{self.mailbox.uidvalidity:08X}"

    def delete(self, number: int) -> None:
        self.deleted.add(number)
        self._ahead.pop(number, None)

    def reset(self) -> None:
        self.deleted.clear()

    def content(self, message: MessageInfo) -> AsyncIterator[bytes]:
        """The message in chunks, read off the reactor thread one at a time."""
        return blob_chunks(self.blobs, message.blob_id, message.size)

    @staticmethod
    def is_small(message: MessageInfo) -> bool:
        """Whether the message is sent whole (see READ_AHEAD) rather than streamed."""
        return message.size <= READ_AHEAD

    def read_now(self, number: int) -> Optional[bytes]:
        """Message ``number``'s content if it was read ahead (once), else None."""
        return self._ahead.pop(number, None)

    def read(self, number: int) -> defer.Deferred[bytes]:
        """Message ``number``'s whole content (a small message), read off the reactor
        thread together with the small messages after it, up to READ_AHEAD octets in
        all, which :meth:`read_now` then hands out without a thread hop."""
        run: list[int] = []
        total = 0
        for following in range(number, len(self.messages) + 1):
            if following in self.deleted:
                continue
            size = self.messages[following - 1].size
            if run and total + size > READ_AHEAD:
                break
            run.append(following)
            total += size
        self._ahead.clear()       # what was read ahead and skipped goes: bounded memory
        d = self.blobs.read_many([self.messages[n - 1].blob_id for n in run])

        def got(contents: list[bytes | BlobMissing]) -> bytes:
            if not self.closed:
                for following, content in zip(run[1:], contents[1:], strict=True):
                    if not isinstance(content, BlobMissing):
                        self._ahead[following] = content
            first = contents[0]
            if isinstance(first, BlobMissing):
                raise first
            return first
        return d.addCallback(got)

    # -- the end of the session -----------------------------------------------------

    @defer.inlineCallbacks
    def commit(self) -> Any:
        """UPDATE state: expunge what was deleted; fires with the count removed."""
        uids = [self.messages[number - 1].uid for number in sorted(self.deleted)]
        removed = []
        if uids:
            removed = yield self.store.expunge(self.mailbox.id, uids)
        self.deleted.clear()
        return len(removed)

    def close(self) -> defer.Deferred[None]:
        """Release the lock; without commit(), nothing is deleted.  Fires once the
        lock is free (QUIT answers then: see Locks.release)."""
        if self.closed:
            return defer.succeed(None)
        self.closed = True
        self._ahead.clear()
        return self.locks.release(self.mailbox.user_id)
