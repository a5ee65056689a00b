"""The change feed: where every committed mailbox change is announced.

One feed per storage: the mail store's own changes (mailboxes created, renamed,
deleted) and the write port's (mail filed, flags, expunges, copies) reach the same
IChangeListeners (the IMAP hub, a worker's publisher) on the reactor thread, after
their commit.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.logger import Logger

from lightmail.storage.interfaces import IChangeListener, MailboxChange


class ChangeFeed:
    log = Logger()

    def __init__(self) -> None:
        self._listeners: list[IChangeListener] = []

    def add_listener(self, listener: IChangeListener) -> None:
        self._listeners.append(listener)

    def announce(self, changes: Iterable[MailboxChange]) -> None:
        """Tell every listener of ``changes`` (committed), in order; a listener that
        fails is logged and the others still hear of it."""
        for change in changes:
            for listener in list(self._listeners):
                try:
                    listener.mailbox_changed(change)
                except Exception:
                    self.log.failure("change listener {listener!r} failed",
                                     listener=listener)
