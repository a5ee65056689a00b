"""The selected mailbox as one session sees it: message numbers, flags, MODSEQs.

RFC 9051 §2.3.1.2: message sequence numbers are the session's own view, and change
only when the session is told (EXISTS, EXPUNGE/VANISHED).  This class keeps that view
and turns what the store reports (:class:`MailboxChanges`, read by MODSEQ) into the
untagged responses a session owes its client, holding expunges back while a FETCH,
STORE or SEARCH by number is being answered (§7.5.1).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Optional

from lightmail.imap.fetch import SYSTEM_FLAGS, flag_list
from lightmail.storage.interfaces import Mailbox, MailboxChange, MailboxChanges, MessageInfo

_uid_of = attrgetter("uid")


@dataclass
class Updates:
    """What to tell the client after a catch-up."""

    expunged: list[int] = field(default_factory=list)          # UIDs, now gone
    expunged_numbers: list[int] = field(default_factory=list)  # their numbers, as sent
    flags: list[MessageInfo] = field(default_factory=list)     # re-flagged, still here
    exists: Optional[int] = None                                # new count, if it grew
    recent: Optional[int] = None
    new_keywords: bool = False        # a keyword the client has not been told of


class SelectedMailbox:
    def __init__(self, mailbox: Mailbox, messages: list[MessageInfo], readonly: bool,
                 first_recent: int) -> None:
        self.mailbox = mailbox
        self.id = mailbox.id
        self.readonly = readonly
        # (Built with map/zip, not comprehensions: this runs over every message of the
        # mailbox at each SELECT.)
        self.uids: list[int] = list(map(_uid_of, messages))
        self.info: dict[int, MessageInfo] = dict(zip(self.uids, messages, strict=True))
        self.modseq = mailbox.highestmodseq
        self.uidnext = mailbox.uidnext
        self.first_recent = first_recent
        self.recent: set[int] = set(
            self.uids[bisect.bisect_left(self.uids, first_recent):])
        # The flags the client was told of (FLAGS): system flags and keywords in use.
        # RFC 9051 §7.3.5: a keyword is announced before a FETCH shows it.
        self.flags_told: set[str] = set(SYSTEM_FLAGS)
        self.dirty = False                    # changes_since must be read
        # Changes announced with their content and contiguous with what this view
        # knows (each one's MODSEQ follows the last): taken in at the next catch-up
        # without reading the store.  ``heard`` is the MODSEQ they bring us to.
        self.pending: list[MailboxChange] = []
        self.heard = self.modseq
        self.reading = False                  # a changes_since read is in flight
        self.held_expunges: list[int] = []    # UIDs gone in the store, not yet told
        self.gone: set[int] = set()           # the same, for FETCH to skip

    # -- numbers and UIDs -----------------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self.uids)

    def number_of(self, uid: int) -> int:
        """The message number of ``uid`` (0 if not in the view)."""
        index = bisect.bisect_left(self.uids, uid)
        return index + 1 if index < len(self.uids) and self.uids[index] == uid else 0

    def uid_of(self, number: int) -> int:
        return self.uids[number - 1]

    @property
    def largest_uid(self) -> int:
        return self.uids[-1] if self.uids else 0

    def flags_of(self, uid: int) -> frozenset[str]:
        flags = self.info[uid].flags
        return flags | {"\\Recent"} if uid in self.recent else flags

    def flag_list(self, uid: int) -> bytes:
        """``flags_of(uid)`` formatted as a FETCH response's flag list."""
        return flag_list(self.info[uid].flags, uid in self.recent)

    @property
    def keywords(self) -> list[str]:
        return sorted(self.flags_told.difference(SYSTEM_FLAGS))

    def tell_flags_of(self, flag_sets: Iterable[frozenset[str]]) -> bool:
        """Take the keywords in ``flag_sets`` among those told; True if one is new."""
        told = self.flags_told
        new = False
        for flags in flag_sets:
            if not flags <= told:
                told.update(flags)
                new = True
        return new

    # -- catching up ----------------------------------------------------------------

    def hear(self, change: MailboxChange) -> None:
        """An announced change: kept for the next catch-up when it carries what it
        changed and follows what we know without a gap (no other change came in
        between), else the next catch-up reads the store."""
        if self.dirty or self.reading:
            self.dirty = True
            return
        if change.kind == "expunged":
            first = change.modseq
        elif change.kind in ("appended", "flags") and change.messages \
                and len(change.messages) == len(change.uids):
            first = min(m.modseq for m in change.messages)
            if change.kind == "appended" and first != change.modseq:
                first = -1
        else:
            first = -1
        if first != self.heard + 1 or change.modseq < first:
            self.dirty = True
            self.pending.clear()
            return
        self.pending.append(change)
        self.heard = change.modseq

    def take_pending(self) -> MailboxChanges:
        """The pending changes as one catch-up: messages (the last state of each,
        none that was expunged meanwhile) and expunged UIDs."""
        latest: dict[int, MessageInfo] = {}
        expunged: list[int] = []
        uidnext = self.uidnext
        for change in self.pending:
            if change.kind == "expunged":
                expunged.extend(change.uids)
                for uid in change.uids:
                    latest.pop(uid, None)
                continue
            for info in change.messages:
                if change.kind == "flags" and info.uid not in self.info \
                        and info.uid not in latest:
                    continue        # flags never add a message
                latest[info.uid] = info
                if change.kind == "appended":
                    uidnext = max(uidnext, info.uid + 1)
        self.pending.clear()
        mailbox = replace(self.mailbox, uidnext=uidnext, highestmodseq=self.heard)
        return MailboxChanges(mailbox, sorted(latest.values(), key=lambda i: i.uid),
                              sorted(set(expunged)))

    def apply(self, changes: MailboxChanges, allow_expunge: bool) -> Updates:
        """Take in what changed; returns what to tell the client now."""
        updates = Updates()
        self.uidnext = max(self.uidnext, changes.mailbox.uidnext)
        updates.new_keywords = self.tell_flags_of(info.flags for info in changes.changed)
        for info in changes.changed:
            known = self.info.get(info.uid)
            if known is None:
                bisect.insort(self.uids, info.uid)
                self.info[info.uid] = info
                if info.uid >= self.first_recent:
                    self.recent.add(info.uid)
                updates.exists = len(self.uids)
            elif info.modseq > known.modseq and info.uid not in self.gone:
                # Flags changed, or only the MODSEQ moved (a flag set and unset):
                # CONDSTORE clients want to hear of that too.
                self.info[info.uid] = info
                updates.flags.append(info)
        for uid in changes.expunged:
            if uid in self.info and uid not in self.gone:
                self.gone.add(uid)
                self.held_expunges.append(uid)
        self.modseq = max(self.modseq, changes.mailbox.highestmodseq)
        if allow_expunge:
            self.release_expunges(updates)
        if updates.exists is not None:
            # Counted after the expunges: the client hears them first (send_updates),
            # so EXISTS must be the count that they leave plus the new messages (a
            # MOVE into the selected mailbox brings both at once).
            updates.exists = len(self.uids)
            updates.recent = len(self.recent)
        return updates

    def release_expunges(self, updates: Updates) -> None:
        """Remove the held expunges from the view, recording their numbers as they
        are to be sent: each EXPUNGE renumbers the messages after it."""
        for uid in sorted(self.held_expunges):
            number = self.number_of(uid)
            if number:
                del self.uids[number - 1]
                del self.info[uid]
                self.recent.discard(uid)
                updates.expunged.append(uid)
                updates.expunged_numbers.append(number)
        self.held_expunges.clear()
        self.gone.clear()

    def update_flags(self, changed: list[MessageInfo]) -> None:
        """Our own STORE's results (the store announces them too; this keeps us from
        telling the client twice)."""
        for info in changed:
            if info.uid in self.info:
                self.info[info.uid] = info
