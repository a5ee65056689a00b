"""The IMAP sessions of one LightMail process, and the mailbox changes they hear of.

The mail store announces every committed change (IChangeListener); the hub passes it
to the sessions that have that mailbox selected, which then catch up from the store
(by MODSEQ) and tell their clients.  Several nodes ([cluster] redis) hear of each
other's changes through lightmail.cluster.hub, which passes them here too.

It also keeps how many sessions each user has open, and which messages are \\Recent
(RFC 3501 §2.3.2: recent in exactly one session; IMAP4rev2 dropped the flag).  With
worker processes the main process's hub keeps those for all of them, and relays the
changes between them (lightmail.workers).  The \\Recent mark is not persisted: after a
restart the messages that arrived before it are no longer recent.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from lightmail.storage.interfaces import ANY_MAILBOX, IChangeListener, MailboxChange

# Announcements remembered for SELECT (see MailboxHub.missed_since).
RECENT_CHANGES = 1024


@implementer(IChangeListener)
class MailboxHub:
    # Whether changes committed by other processes reach this hub after their commit
    # (worker processes): then NOOP and CHECK read the store (see SessionCore.poll).
    announced_late = False

    def __init__(self) -> None:
        # Every announcement is counted; the last RECENT_CHANGES are kept as
        # (mailbox id, MODSEQ), so that a SELECT can tell whether a change was
        # announced while it read the mailbox, before it watched it.
        self.announced = 0
        self.recent_changes: deque[tuple[int, int]] = deque(maxlen=RECENT_CHANGES)
        self.watchers: dict[int, set[Any]] = {}
        self.user_sessions: Counter[int] = Counter()
        self.recent_from: dict[int, int] = {}     # mailbox id -> first UID still recent
        # Users whose INBOX and special-use mailboxes were made sure of since start-up:
        # a login costs no mailbox listing after the first.
        self.provisioned: set[int] = set()
        # Who else hears of the changes committed on other nodes (add_relay).
        self.relays: list[IChangeListener] = []

    def add_relay(self, listener: IChangeListener) -> None:
        """Pass the changes committed on other nodes to ``listener`` too (the main
        process's WorkerPool, for its workers' sessions).  Those of this node reach
        it from the store; a hub without other nodes has nothing to pass on."""
        self.relays.append(listener)

    def mailbox_changed(self, change: MailboxChange) -> None:
        self.announced += 1
        self.recent_changes.append((change.mailbox_id, change.modseq))
        if change.mailbox_id == ANY_MAILBOX:
            # Any mailbox may have changed unheard: every selected one is read again.
            for mailbox_id in list(self.watchers):
                self._tell(replace(change, mailbox_id=mailbox_id))
            return
        if change.kind == "created":
            # Everything that arrives in a new mailbox is new.  (Set, not defaulted:
            # SQLite gives a deleted mailbox's id to the next one made.)
            self.recent_from[change.mailbox_id] = 1
        elif change.kind == "deleted":
            self.recent_from.pop(change.mailbox_id, None)
        elif change.kind == "appended" and change.uids:
            # First sight of a mailbox: what arrives from now on is recent.
            self.recent_from.setdefault(change.mailbox_id, min(change.uids))
        self._tell(change)

    def _tell(self, change: MailboxChange) -> None:
        for watcher in list(self.watchers.get(change.mailbox_id, ())):
            watcher.mailbox_changed(change)

    def missed_since(self, mark: int, mailbox_id: int, modseq: int) -> bool:
        """Whether a change to ``mailbox_id`` after ``modseq`` may have been announced
        since ``announced`` was ``mark`` (True too when too many were to tell)."""
        count = self.announced - mark
        if count <= 0:
            return False
        if count > len(self.recent_changes):
            return True
        return any(box in (mailbox_id, ANY_MAILBOX) and (seq > modseq or not seq)
                   for box, seq in list(self.recent_changes)[-count:])

    def watch(self, mailbox_id: int, watcher: Any) -> None:
        self.watchers.setdefault(mailbox_id, set()).add(watcher)

    def unwatch(self, mailbox_id: int, watcher: Any) -> None:
        watchers = self.watchers.get(mailbox_id)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self.watchers[mailbox_id]

    # The answers below are Deferreds: a worker process asks the main process, which
    # keeps them for all (lightmail.workers); here they are known at once.

    def peek_recent(self, mailbox_id: int, uidnext: int) -> Deferred[int]:
        """The first UID that is still recent, without claiming (EXAMINE, STATUS)."""
        return succeed(self.peek_recent_now(mailbox_id, uidnext))

    def claim_recent(self, mailbox_id: int, uidnext: int) -> Deferred[int]:
        """Claim the recent messages below ``uidnext`` for one session: the first
        recent UID; no other session will see those as recent."""
        return succeed(self.claim_recent_now(mailbox_id, uidnext))

    def login(self, user_id: int, limit: int) -> Deferred[bool]:
        """Count a session of ``user_id``; False if it has ``limit`` already."""
        return succeed(self.login_now(user_id, limit))

    def logout(self, user_id: int) -> None:
        self.logout_now(user_id)

    def peek_recent_now(self, mailbox_id: int, uidnext: int) -> int:
        return self.recent_from.setdefault(mailbox_id, uidnext)

    def claim_recent_now(self, mailbox_id: int, uidnext: int) -> int:
        first = self.recent_from.setdefault(mailbox_id, uidnext)
        self.recent_from[mailbox_id] = max(first, uidnext)
        return first

    def login_now(self, user_id: int, limit: int) -> bool:
        if self.user_sessions[user_id] >= limit:
            return False
        self.user_sessions[user_id] += 1
        return True

    def logout_now(self, user_id: int) -> None:
        self.user_sessions[user_id] -= 1
        if self.user_sessions[user_id] <= 0:
            del self.user_sessions[user_id]
