"""The selected mailbox as one session sees it: message numbers, flags, MODSEQs.

RFC 9051 §2.3.1.2: message sequence numbers are the session's own view, and change
only when the session is told (EXISTS, EXPUNGE/VANISHED).  This class keeps that view
and turns what the store reports (:class:`MailboxChanges`, read by MODSEQ) into the
untagged responses a session owes its client, holding expunges back while a FETCH,
STORE or SEARCH by number is being answered (§7.5.1).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field, replace
from itertools import compress, filterfalse, islice, repeat
from operator import attrgetter, itemgetter, lt
from typing import Any, Optional

from lightmail.imap.fetch import SYSTEM_FLAGS, flag_list
from lightmail.storage.interfaces import Mailbox, MailboxChange, MailboxChanges, MessageInfo

_uid_of = attrgetter("uid")
_modseq_of = itemgetter(2)          # MessageInfo.modseq (a tuple's item: faster)
_flags_of = attrgetter("flags")

# Messages taken in (or told of) between two looks at the clock: the catch-up after
# a COPY or STORE of 300,000 messages runs in steps (see ``core.sliced``), each a few
# milliseconds, and hands the reactor back between them.
STEP = 2000

Steps = Generator[None, None, None]


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

    def with_flag(self, uids: list[int], flag: str, present: bool = True
                  ) -> Generator[None, None, list[int]]:
        """The members of ``uids`` whose flags hold ``flag`` (EXPUNGE's \\Deleted),
        or (``present=False``) do not, in steps (``core.sliced``).  Each distinct flag
        set is asked once, and the rest runs in C: a Python test per message took
        30 ms of the reactor in a mailbox of 200,000."""
        wanted: dict[frozenset[str], bool] = {}
        out: list[int] = []
        for start in range(0, len(uids), 4 * STEP):
            chunk = uids[start:start + 4 * STEP]
            flag_sets = list(map(_flags_of, map(self.info.__getitem__, chunk)))
            for flags in set(flag_sets).difference(wanted):
                wanted[flags] = (flag in flags) == present
            out.extend(compress(chunk, map(wanted.__getitem__, flag_sets)))
            yield
        return out

    def changed_since(self, uids: list[int], modseq: int
                      ) -> Generator[None, None, list[int]]:
        """The members of ``uids`` whose MODSEQ is above ``modseq`` (CHANGEDSINCE,
        UNCHANGEDSINCE), tested in C, in steps."""
        out: list[int] = []
        for start in range(0, len(uids), 4 * STEP):
            chunk = uids[start:start + 4 * STEP]
            modseqs = map(_modseq_of, map(self.info.__getitem__, chunk))
            out.extend(compress(chunk, map(modseq.__lt__, modseqs)))
            yield
        return out

    def present(self, uids: list[int]) -> list[int]:
        """``uids`` without those expunged but not yet told (``gone``)."""
        return list(filterfalse(self.gone.__contains__, uids)) if self.gone else uids

    @property
    def keywords(self) -> list[str]:
        return sorted(self.flags_told.difference(SYSTEM_FLAGS))

    def tell_flags_of(self, flag_sets: Iterable[frozenset[str]]) -> bool:
        """Take the keywords in ``flag_sets`` among those told; True if one is new."""
        told = self.flags_told
        new = False
        # (Messages share a few flag sets: each distinct one is looked at once.)
        for flags in set(flag_sets):
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
        if change.kind == "expunged" and change.uids:
            first = change.modseq
        elif change.kind in ("appended", "flags") and change.messages \
                and len(change.messages) == len(change.uids):
            first = min(map(_modseq_of, change.messages))
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
        expunges: list[tuple[int, ...]] = []
        uidnext = self.uidnext
        for change in self.pending:
            if change.kind == "expunged":
                expunges.append(change.uids)
                if latest:
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
        # An expunge's UIDs come ascending from the store; several are merged.
        expunged = (list(expunges[0]) if len(expunges) == 1 else
                    sorted(set().union(*expunges)))
        return MailboxChanges(mailbox, sorted(latest.values(), key=_uid_of), expunged)

    def apply(self, changes: MailboxChanges, allow_expunge: bool) -> Updates:
        """Take in what changed; returns what to tell the client now."""
        updates = Updates()
        for _ in self.applying(changes, allow_expunge, updates):
            pass
        return updates

    def applying(self, changes: MailboxChanges, allow_expunge: bool,
                 updates: Updates) -> Steps:
        """:meth:`apply` in steps of STEP messages (a generator: the session runs
        it a slice of the reactor's time at a time), filling ``updates``.  It
        consumes ``changes.changed``: each step lets go of the records it is done
        with, so that 300,000 of them are not freed in one go at the end (30 ms)."""
        self.uidnext = max(self.uidnext, changes.mailbox.uidnext)
        updates.new_keywords = self.tell_flags_of(map(_flags_of, changes.changed))
        uids, info, recent, gone = self.uids, self.info, self.recent, self.gone
        changed: list[Any] = changes.changed
        for start in range(0, len(changed), STEP):
            for message in changed[start:start + STEP]:
                uid = message.uid
                known = info.get(uid)
                if known is None:
                    if not uids or uid > uids[-1]:
                        uids.append(uid)        # new mail comes after the rest
                    else:
                        bisect.insort(uids, uid)
                    info[uid] = message
                    if uid >= self.first_recent:
                        recent.add(uid)
                    updates.exists = len(uids)
                elif message.modseq > known.modseq and uid not in gone:
                    # Flags changed, or only the MODSEQ moved (a flag set and unset):
                    # CONDSTORE clients want to hear of that too.
                    info[uid] = message
                    updates.flags.append(message)
            changed[start:start + STEP] = repeat(None, len(changed[start:start + STEP]))
            yield
        expunged = changes.expunged
        for start in range(0, len(expunged), STEP):
            for uid in expunged[start:start + STEP]:
                if uid in info and uid not in gone:
                    gone.add(uid)
                    self.held_expunges.append(uid)
            yield
        self.modseq = max(self.modseq, changes.mailbox.highestmodseq)
        if allow_expunge:
            yield from self.releasing(updates)
        if updates.exists is not None:
            # Counted after the expunges: the client hears them first (sending_updates),
            # so EXISTS must be the count that they leave plus the new messages (a
            # MOVE into the selected mailbox brings both at once).
            updates.exists = len(self.uids)
            updates.recent = len(self.recent)

    def release_expunges(self, updates: Updates) -> None:
        """Remove the held expunges from the view, recording their numbers as they
        are to be sent: each EXPUNGE renumbers the messages after it."""
        for _ in self.releasing(updates):
            pass

    def releasing(self, updates: Updates) -> Steps:
        """:meth:`release_expunges` in steps.  Each message's number is found by
        bisection and the view is rebuilt once: deleting from the list one message
        at a time cost a pass over it each, minutes for 200,000 expunges."""
        held = self.held_expunges
        if not all(map(lt, held, islice(held, 1, None))):   # (ascending, as a rule)
            held = sorted(set(held))
        self.held_expunges = []
        uids, info, recent = self.uids, self.info, self.recent
        leaving: list[int] = []
        for start in range(0, len(held), STEP):
            for uid in held[start:start + STEP]:
                index = bisect.bisect_left(uids, uid)
                if index < len(uids) and uids[index] == uid:
                    # Sent in ascending order, each after those before it left.
                    updates.expunged_numbers.append(index + 1 - len(leaving))
                    leaving.append(uid)
            yield
        updates.expunged.extend(leaving)
        gone = self.gone            # every UID held is in it (apply), and nothing else
        if len(leaving) < 64:
            for uid in reversed(leaving):
                del uids[bisect.bisect_left(uids, uid)]
        else:
            kept: list[int] = []
            for start in range(0, len(uids), 4 * STEP):
                kept.extend(filterfalse(gone.__contains__, uids[start:start + 4 * STEP]))
                yield
            uids[:] = kept
            yield
        for start in range(0, len(leaving), STEP):
            chunk = leaving[start:start + STEP]
            deque(map(info.__delitem__, chunk), maxlen=0)   # (in C)
            if recent:
                recent.difference_update(chunk)
            gone.difference_update(chunk)
            yield
        self.gone = set()           # (emptied already: freeing it costs nothing)

    def dismantling(self) -> Steps:
        """Let go of the view in steps (the session has unselected it): freeing
        300,000 records in one go held the reactor for 20 to 30 ms."""
        info, uids = self.info, self.uids
        while info:
            for _ in range(min(STEP, len(info))):
                info.popitem()
            yield
        while uids:
            del uids[-4 * STEP:]
            yield
        self.recent.clear()
        self.gone.clear()

    def update_flags(self, changed: list[MessageInfo]) -> None:
        """Our own STORE's results (the store announces them too; this keeps us from
        telling the client twice)."""
        for _ in self.updating_flags(changed):
            pass

    def updating_flags(self, changed: list[MessageInfo]) -> Steps:
        """:meth:`update_flags` in steps."""
        info = self.info
        for start in range(0, len(changed), STEP):
            for message in changed[start:start + STEP]:
                if message.uid in info:
                    info[message.uid] = message
            yield
