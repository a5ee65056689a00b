"""IMAP commands of the selected state (RFC 9051 §6.4): CHECK, CLOSE, UNSELECT,
EXPUNGE, FETCH, STORE, COPY and MOVE, SEARCH, SORT and THREAD."""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Generator
from itertools import compress, filterfalse
from operator import attrgetter
from typing import Any, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from lightmail.imap import fetch as fetching
from lightmail.imap import search as searching
from lightmail.imap import sort as sorting
from lightmail.imap.core import (
    AUTHENTICATED,
    BATCH,
    Bad,
    No,
    Reply,
    breathe,
    flags_of,
    mapping,
    ok,
    parse_number,
    sliced,
)
from lightmail.imap.headcache import HEADERS
from lightmail.imap.mailboxes import MailboxCommands
from lightmail.imap.message import ParsedMessage
from lightmail.imap.parser import (
    Command,
)
from lightmail.imap.selected import STEP, SelectedMailbox, Steps
from lightmail.imap.sequence import (
    format_copyuid,
    format_sequence,
    formatting_sequence,
    parse_sequence_set,
)
from lightmail.imap.tokens import (
    Atom,
    astring,
)
from lightmail.storage.interfaces import (
    MessageInfo,
)

# Blob reads kept in flight while a command walks messages' content: one thread-pool
# round trip waited for per message cost SEARCH and FETCH of content most of their
# time (bench/imap.py: 0.1-0.3 ms a message against ~25 us of parsing).
READ_AHEAD = 16

# Header blocks asked of the store (IMailStore.headers_for) in one query.
HEADERS_BATCH = 500


_uid_of, _modseq_of, _size_of = (attrgetter(name) for name in ("uid", "modseq", "size"))

# Blobs read in one thread hop (small ones: up to READ_BATCH_OCTETS together).
READ_BATCH = 16
READ_BATCH_OCTETS = 256 * 1024


class _ReadAhead:
    """The contents of ``uids`` (of ``selected``) in order, read READ_AHEAD ahead,
    several small blobs per thread hop."""

    def __init__(self, store: Any, selected: SelectedMailbox, uids: list[int]) -> None:
        self.store, self.selected, self.uids = store, selected, uids
        self.next = 0
        self.reads: dict[int, defer.Deferred[bytes]] = {}
        self.read_many: Callable[[list[str]], defer.Deferred[list[Any]]] = \
            store.blobs.read_many

    def read(self, index: int) -> defer.Deferred[bytes]:
        """The content of ``uids[index]`` (not expunged); starts the next reads."""
        self.next = max(self.next, index)
        while self.next < len(self.uids) and self.next < index + READ_AHEAD:
            self._start_batch()
        return self.reads.pop(index)

    def _start_batch(self) -> None:
        indexes: list[int] = []
        blob_ids: list[str] = []
        octets = 0
        info = self.selected.info
        while (self.next < len(self.uids) and len(blob_ids) < READ_BATCH
               and octets < READ_BATCH_OCTETS):
            uid = self.uids[self.next]
            if uid not in self.selected.gone:
                indexes.append(self.next)
                blob_ids.append(info[uid].blob_id)
                octets += info[uid].size
            self.next += 1
        if len(blob_ids) == 1:
            for index, blob_id in zip(indexes, blob_ids, strict=True):
                self.reads[index] = self.store.blobs.read(blob_id)
            return
        if not blob_ids:
            return
        waiting: list[defer.Deferred[bytes]] = []
        for index in indexes:
            d: defer.Deferred[bytes] = defer.Deferred()
            self.reads[index] = d
            waiting.append(d)

        def hand_out(contents: list[Any]) -> None:
            for each, content in zip(waiting, contents, strict=True):
                if isinstance(content, Exception):
                    each.errback(content)
                else:
                    each.callback(content)

        def fail(failure: Failure) -> None:
            for each in waiting:
                each.errback(failure)
        self.read_many(blob_ids).addCallbacks(hand_out, fail)

    def discard(self) -> None:
        """Reads nobody will wait for (the command ended early)."""
        for d in self.reads.values():
            d.addErrback(lambda _: None)
        self.reads.clear()



def _flag_hits(selected: SelectedMailbox, key: Any, context: Any
               ) -> Generator[None, None, list[int]]:
    """The places of the messages a flags-only search key matches (``sliced``): each
    distinct flag set (with or without \\Recent) is tested once, and the rest runs
    in C, STEP messages a step."""
    uids, infos, recent, gone = selected.uids, selected.info, selected.recent, \
        selected.gone
    decided: dict[Any, bool] = {}
    hits: list[int] = []
    for start in range(0, len(uids), STEP):
        chunk = uids[start:start + STEP]
        flag_sets: list[Any] = list(map(flags_of, map(infos.__getitem__, chunk)))
        if recent:
            flag_sets = list(zip(flag_sets, map(recent.__contains__, chunk), strict=True))
        for flags in set(flag_sets).difference(decided):
            # (With \\Recent in the view, each is (flags, whether recent).)
            effective = (flags[0] | {"\\Recent"} if flags[1] else flags[0]) if recent \
                else flags
            decided[flags] = searching.matches_flags(key, effective, context)
        hits.extend(compress(range(start, start + len(chunk)),
                             map(decided.__getitem__, flag_sets)))
        yield
    if gone:
        hits = [place for place in hits if uids[place] not in gone]
    return hits


class MessageCommands(MailboxCommands):
    # -- selected state -------------------------------------------------------------

    def _sel(self) -> SelectedMailbox:
        assert self.selected is not None
        return self.selected

    def _resolve(self, text: Any, uid: bool) -> list[int]:
        """The UIDs a sequence set names, in ascending order."""
        selected = self._sel()
        if not isinstance(text, Atom):
            raise Bad("expected a sequence set")
        seqset = parse_sequence_set(text)
        if seqset.saved:
            saved = set(self.saved_search or ())
            return list(filter(saved.__contains__, selected.uids))
        if uid:
            largest = selected.largest_uid
            return seqset.select_sorted(selected.uids, largest) if largest else []
        count = selected.exists
        if count == 0 and any(-1 in r for r in seqset.ranges):
            return []       # "*" in an empty mailbox: nothing, as Dovecot answers
        ranges = sorted(seqset.resolve(count))
        if any(high > count for _, high in ranges):
            raise Bad("Invalid message sequence number")
        # Numbers are positions in the (ascending) UIDs: each range is a slice.
        uids: list[int] = []
        taken = 0           # numbers up to this are decided
        for low, high in ranges:
            if high > taken:
                uids.extend(selected.uids[max(low, taken + 1) - 1:high])
                taken = high
        return uids

    async def do_CHECK(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        self.poll()
        return ok("CHECK completed")

    async def do_CLOSE(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        selected = self._sel()
        if not selected.readonly:
            deleted = await sliced(selected.with_flag(selected.uids, "\\Deleted"))
            if deleted:
                await self.store.expunge(selected.id, deleted)
        self._unselect()
        self.state = AUTHENTICATED
        return ok("CLOSE completed")

    async def do_UNSELECT(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        self._unselect()
        self.state = AUTHENTICATED
        return ok("UNSELECT completed")

    async def do_EXPUNGE(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        return await self._expunge(None)

    async def do_UID_EXPUNGE(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1:
            raise Bad("UID EXPUNGE needs a UID set")
        return await self._expunge(set(self._resolve(cmd.args[0], uid=True)))

    async def _expunge(self, only: Optional[set[int]]) -> Reply:
        selected = self._sel()
        if selected.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        await self.catch_up(allow_expunge=True)
        deleted = await sliced(selected.with_flag(selected.uids, "\\Deleted"))
        if only is not None:
            deleted = list(filter(only.__contains__, deleted))
        if deleted:
            await self.store.expunge(selected.id, deleted)
        return ok("EXPUNGE completed")

    async def do_FETCH(self, cmd: Command) -> Reply:
        return await self._fetch(cmd, uid=False)

    async def do_UID_FETCH(self, cmd: Command) -> Reply:
        return await self._fetch(cmd, uid=True)

    async def _fetch(self, cmd: Command, uid: bool) -> Reply:
        if len(cmd.args) not in (2, 3):
            raise Bad("FETCH needs a sequence set and data items")
        selected = self._sel()
        uids = self._resolve(cmd.args[0], uid)
        items = fetching.parse_fetch_items(cmd.args[1])
        changed_since: Optional[int] = None
        vanished = False
        if len(cmd.args) == 3:
            changed_since, vanished = self._fetch_modifiers(cmd.args[2], uid)
        if uid and not any(item.name == "UID" for item in items):
            items.insert(0, fetching.FetchItem("UID"))
        if changed_since is not None and not any(i.name == "MODSEQ" for i in items):
            items.append(fetching.FetchItem("MODSEQ"))
        if any(item.name == "MODSEQ" for item in items):
            self.enable_condstore()
        if changed_since is not None:
            if vanished:
                changes = await self.store.changes_since(selected.id, changed_since)
                expunged = changes.expunged         # ascending, as the store gives them
                gone = expunged[bisect.bisect_left(expunged, uids[0]):
                                bisect.bisect_right(expunged, uids[-1])] if uids else []
                if gone:
                    text = await sliced(formatting_sequence(gone, 4 * STEP))
                    self.untagged(f"VANISHED (EARLIER) {text}")
            uids = await sliced(selected.changed_since(uids, changed_since))
        seen = fetching.sets_seen(items) and not selected.readonly
        if seen:
            unseen = await sliced(selected.with_flag(uids, "\\Seen", present=False))
            if unseen:
                changed = await self.store.set_flags(selected.id, unseen, ["\\Seen"], "add")
                await sliced(selected.updating_flags(changed))
                if not any(item.name == "FLAGS" for item in items):
                    items.append(fetching.FetchItem("FLAGS"))
                if self._condstore:
                    # RFC 7162 §3.1: a FETCH that sets \Seen implicitly reports the
                    # UID and MODSEQ too once CONDSTORE is on (IMAPClient expects it).
                    if not any(item.name == "UID" for item in items):
                        items.insert(0, fetching.FetchItem("UID"))
                    if not any(item.name == "MODSEQ" for item in items):
                        items.append(fetching.FetchItem("MODSEQ"))
        content = fetching.needs_content(items)
        if not content and all(item.name in fetching.META_ITEMS for item in items):
            await self._fetch_meta(selected, uids, [item.name for item in items])
            return ok(f"{cmd.name} completed")
        # Header items only: the header blocks kept in SQL, HEADERS_BATCH a query.
        header_only = content and fetching.header_only(items)
        heads: dict[int, ParsedMessage] = {}
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        count = 0
        ahead = _ReadAhead(self.store, selected, uids)
        try:
            for index, message_uid in enumerate(uids):
                if self.closing or self.selected is not selected:
                    break
                if header_only and index % HEADERS_BATCH == 0:
                    heads = await self._headers(selected, uids[index:index + HEADERS_BATCH])
                if message_uid in selected.gone:
                    continue     # expunged meanwhile; not told yet (RFC 9051 §7.5.1)
                info = selected.info[message_uid]
                parsed = None
                if header_only:
                    parsed = heads[message_uid]
                elif content:
                    raw = await ahead.read(index)
                    parsed = ParsedMessage(raw)
                self._write_fetch(selected, info, items, parsed)
                count += 1
                if self._paused is not None:
                    await self._paused
                elif count % BATCH == 0:
                    await breathe()
        finally:
            ahead.discard()
            if self.transport is not None:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]
        return ok(f"{cmd.name} completed")

    async def _fetch_meta(self, selected: SelectedMailbox, uids: list[int],
                          names: list[str]) -> None:
        """FETCH of items a MessageInfo answers (UID, FLAGS, INTERNALDATE,
        RFC822.SIZE, MODSEQ): BATCH responses formatted in one loop and written
        together, flag lists formatted once per distinct flag set."""
        info, recent, gone = selected.info, selected.recent, selected.gone
        flag_list, date = fetching.flag_list, fetching.internal_date
        # All the messages (FETCH 1:*): message numbers are positions.
        every = len(uids) == selected.exists
        number_of = selected.number_of
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        try:
            for start in range(0, len(uids), BATCH):
                if self.closing or self.selected is not selected:
                    break
                lines = []
                for index in range(start, min(start + BATCH, len(uids))):
                    message_uid = uids[index]
                    if message_uid in gone:
                        continue     # expunged meanwhile; not told yet (RFC 9051 §7.5.1)
                    m = info[message_uid]
                    parts = []
                    for name in names:
                        if name == "FLAGS":
                            parts.append(b"FLAGS " + flag_list(m.flags, message_uid in recent))
                        elif name == "UID":
                            parts.append(b"UID %d" % message_uid)
                        elif name == "MODSEQ":
                            parts.append(b"MODSEQ (%d)" % m.modseq)
                        elif name == "RFC822.SIZE":
                            parts.append(b"RFC822.SIZE %d" % m.size)
                        else:
                            parts.append(b"INTERNALDATE " + date(m.internal_date))
                    lines.append(b"* %d FETCH (%s)\r\n" % (
                        index + 1 if every else number_of(message_uid), b" ".join(parts)))
                self.write(b"".join(lines))
                if self._paused is not None:
                    await self._paused
                elif start + BATCH < len(uids):
                    await breathe()
        finally:
            if self.transport is not None:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]

    def _fetch_modifiers(self, value: Any, uid: bool) -> tuple[Optional[int], bool]:
        if not isinstance(value, list):
            raise Bad("FETCH modifiers must be a list")
        changed_since, vanished = None, False
        index = 0
        while index < len(value):
            name = astring(value[index]).upper()
            if name == "CHANGEDSINCE" and index + 1 < len(value):
                changed_since = parse_number(value[index + 1])
                index += 2
            elif name == "VANISHED":
                if not uid or "QRESYNC" not in self.enabled:
                    raise Bad("VANISHED needs UID FETCH with QRESYNC enabled")
                vanished = True
                index += 1
            else:
                raise Bad(f"unknown FETCH modifier {name[:20]}")
        if vanished and changed_since is None:
            raise Bad("VANISHED needs CHANGEDSINCE")
        return changed_since, vanished

    def _write_fetch(self, selected: SelectedMailbox, info: MessageInfo,
                     items: list[fetching.FetchItem], parsed: Optional[ParsedMessage]) -> None:
        out = []
        for item in items:
            if item.name == "UID":
                out.append(b"UID %d" % info.uid)
            elif item.name == "FLAGS":
                out.append(b"FLAGS " + selected.flag_list(info.uid))
            elif item.name == "INTERNALDATE":
                out.append(b"INTERNALDATE " + fetching.internal_date(info.internal_date))
            elif item.name == "RFC822.SIZE":
                out.append(b"RFC822.SIZE %d" % info.size)
            elif item.name == "MODSEQ":
                out.append(b"MODSEQ (%d)" % info.modseq)
            else:
                assert parsed is not None
                try:
                    out.append(fetching.content_item(item, parsed))
                except fetching.UnknownCTE:
                    raise No("[UNKNOWN-CTE] Cannot decode the part's "
                             "Content-Transfer-Encoding") from None
        number = selected.number_of(info.uid)
        self.untagged(b"%d FETCH (" % number + b" ".join(out) + b")")

    async def do_STORE(self, cmd: Command) -> Reply:
        return await self._store(cmd, uid=False)

    async def do_UID_STORE(self, cmd: Command) -> Reply:
        return await self._store(cmd, uid=True)

    async def _store(self, cmd: Command, uid: bool) -> Reply:
        args = list(cmd.args)
        if len(args) < 3:
            raise Bad("STORE needs a sequence set, an action and flags")
        selected = self._sel()
        uids = self._resolve(args.pop(0), uid)
        unchanged_since = None
        if isinstance(args[0], list):
            mods = args.pop(0)
            if len(mods) != 2 or astring(mods[0]).upper() != "UNCHANGEDSINCE":
                raise Bad("STORE modifier must be (UNCHANGEDSINCE n)")
            unchanged_since = parse_number(mods[1])
            self.enable_condstore()
        action = astring(args.pop(0)).upper()
        match = re.match(r"^([+-]?)FLAGS(\.SILENT)?$", action)
        if match is None or not args:
            raise Bad("STORE action must be [+|-]FLAGS[.SILENT]")
        flags = self._flags(args if len(args) > 1 else args[0])
        if selected.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        mode = {"": "replace", "+": "add", "-": "remove"}[match.group(1)]
        modified: list[int] = []
        if unchanged_since is not None:
            # Checked against this session's view after a catch-up; a concurrent
            # change in the same instant may slip through (not atomic in the store).
            await self.catch_up(allow_expunge=False)
            modified = await sliced(selected.changed_since(uids, unchanged_since))
            if modified:
                uids = list(filterfalse(set(modified).__contains__, uids))
        uids = selected.present(uids)
        changed = await self.store.set_flags(selected.id, uids, flags, mode) if uids else []
        await sliced(selected.updating_flags(changed))
        if selected.tell_flags_of(map(flags_of, changed)):
            self.tell_flags()
        silent = match.group(2) is not None
        if not silent or self._condstore:
            await sliced(self._storing(selected, uids, changed, silent, uid))
        if modified:
            numbers = modified if uid else [selected.number_of(u) for u in modified]
            return ok(f"[MODIFIED {format_sequence(numbers)}] Conditional STORE failed "
                       "for some messages")
        return ok(f"{cmd.name} completed")

    def _storing(self, selected: SelectedMailbox, uids: list[int],
                 changed: list[MessageInfo], silent: bool, uid: bool) -> Steps:
        """STORE's untagged FETCH responses, in steps (``sliced``): STORE 1:* names
        every message of the mailbox."""
        changed_uids = set(map(_uid_of, changed)) if silent else set()
        for start in range(0, len(uids), STEP):
            for message_uid in uids[start:start + STEP]:
                if silent and message_uid not in changed_uids:
                    continue
                info = selected.info[message_uid]
                number = selected.number_of(message_uid)
                parts = [] if silent else [b"FLAGS " + selected.flag_list(message_uid)]
                # RFC 7162 §3.2.4: with CONDSTORE on, every untagged FETCH a STORE
                # causes carries both UID and MODSEQ.
                if uid or self._condstore:
                    parts.insert(0, b"UID %d" % message_uid)
                if self._condstore:
                    parts.append(b"MODSEQ (%d)" % info.modseq)
                if parts:
                    self.untagged(b"%d FETCH (" % number + b" ".join(parts) + b")")
            yield

    async def do_COPY(self, cmd: Command) -> Reply:
        return await self._copy(cmd, uid=False, move=False)

    async def do_UID_COPY(self, cmd: Command) -> Reply:
        return await self._copy(cmd, uid=True, move=False)

    async def do_MOVE(self, cmd: Command) -> Reply:
        return await self._copy(cmd, uid=False, move=True)

    async def do_UID_MOVE(self, cmd: Command) -> Reply:
        return await self._copy(cmd, uid=True, move=True)

    async def _copy(self, cmd: Command, uid: bool, move: bool) -> Reply:
        if len(cmd.args) != 2:
            raise Bad(f"{cmd.name} needs a sequence set and a mailbox name")
        selected = self._sel()
        uids = selected.present(self._resolve(cmd.args[0], uid))
        target = await self.store.get_mailbox(self.user.id, self._name(cmd.args[1]))
        if target is None:
            raise No("[TRYCREATE] No such mailbox")
        if move and selected.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        if self.user.quota_bytes and uids and not move:
            used = await self.store.usage(self.user.id)
            size = sum(map(_size_of, map(selected.info.__getitem__, uids)))
            if used + size > self.user.quota_bytes:
                raise No("[OVERQUOTA] Quota exceeded")
        blob_ids = [selected.info[one].blob_id for one in uids]
        copied = await self.store.copy(selected.id, uids, target.id, move=move)
        self.factory.trainer.filed(self.user.address, selected.mailbox, target, blob_ids)
        code = ""
        if copied.source:
            code = (f"[COPYUID {copied.uidvalidity} "
                    f"{format_copyuid(copied.source, copied.target)}] ")
        if move:
            if code:
                self.untagged(f"OK {code}Moved")
            return ok(f"{cmd.name} completed")
        return ok(f"{code}{cmd.name} completed")

    # -- SEARCH, SORT, THREAD ---------------------------------------------------------

    async def do_SEARCH(self, cmd: Command) -> Reply:
        return await self._search(cmd, uid=False)

    async def do_UID_SEARCH(self, cmd: Command) -> Reply:
        return await self._search(cmd, uid=True)

    async def _matching(self, args: list[Any]) -> tuple[list[int], Any,
                                                         dict[int, ParsedMessage]]:
        """The messages that match search keys, as their places in the view (message
        number - 1, ascending), with their parsed content if read.  Places, not a
        record per message: SEARCH ALL of 300,000 made as many, and the garbage
        collector then spent 160 ms of the reactor on them."""
        selected = self._sel()
        try:
            key, _charset = searching.parse_search(args, utf8=self.utf8)
        except searching.BadCharset:
            raise No("[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset") from None
        context = searching.SearchContext(
            largest_seq=selected.exists, largest_uid=selected.largest_uid,
            saved=self.saved_search)
        content_needed = searching.needs_content(key)
        # Header keys only: the header blocks kept in SQL, HEADERS_BATCH a query.
        header_only = content_needed and not searching.needs_body(key)
        heads: dict[int, ParsedMessage] = {}
        found: list[int] = []
        parsed: dict[int, ParsedMessage] = {}
        if searching.flags_only(key):
            return await sliced(_flag_hits(selected, key, context)), key, parsed
        ahead = _ReadAhead(self.store, selected, selected.uids)
        for number, message_uid in enumerate(selected.uids, 1):
            if header_only and (number - 1) % HEADERS_BATCH == 0:
                heads = await self._headers(
                    selected, selected.uids[number - 1:number - 1 + HEADERS_BATCH])
            if message_uid in selected.gone:
                continue
            info = selected.info[message_uid]
            view = searching.MessageView(number, message_uid, selected.flags_of(message_uid),
                                         info.internal_date, info.size, info.modseq)
            content = None
            if header_only:
                content = heads[message_uid]
            elif content_needed:
                try:
                    content = ParsedMessage(await ahead.read(number - 1))
                except BaseException:
                    ahead.discard()
                    raise
            if searching.matches(key, view, context, content):
                found.append(number - 1)
                if content is not None:     # kept for SORT and THREAD: matches only
                    parsed[message_uid] = content
            if number % BATCH == 0:
                await breathe()
        return found, key, parsed

    @staticmethod
    def _views(selected: SelectedMailbox, places: list[int]) -> list[searching.MessageView]:
        """The MessageViews of messages at ``places`` in the view (SORT, THREAD)."""
        views = []
        for place in places:
            message_uid = selected.uids[place]
            info = selected.info[message_uid]
            views.append(searching.MessageView(
                place + 1, message_uid, selected.flags_of(message_uid),
                info.internal_date, info.size, info.modseq))
        return views

    async def _search(self, cmd: Command, uid: bool) -> Reply:
        args = list(cmd.args)
        returns: Optional[list[str]] = None
        if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "RETURN":
            if not isinstance(args[1], list):
                raise Bad("SEARCH RETURN needs a list of options")
            returns = [astring(a).upper() for a in args[1]] or ["ALL"]
            bad = set(returns) - {"MIN", "MAX", "ALL", "COUNT", "SAVE"}
            if bad:
                raise Bad(f"unknown SEARCH RETURN option {sorted(bad)[0]}")
            args = args[2:]
        elif self.rev2:
            # IMAP4rev2 has no SEARCH response: ESEARCH as for RETURN (ALL) (RFC 9051
            # §6.4.4).
            returns = ["ALL"]
        found, key, _ = await self._matching(args)
        selected = self._sel()
        uids = await sliced(mapping(selected.uids.__getitem__, found))
        numbers = uids if uid else await sliced(mapping((1).__add__, found))
        modseq = None
        if searching.uses_modseq(key):
            self.enable_condstore()
            # RFC 7162 §3.1.5: the highest MODSEQ of the messages the answer names:
            # all of them with ALL or COUNT (or plain SEARCH), else MIN's and MAX's.
            named = uids
            if returns is not None and not {"ALL", "COUNT"} & set(returns):
                named = (uids[:1] if "MIN" in returns else []) + \
                    (uids[-1:] if "MAX" in returns else [])
            modseq = max(map(_modseq_of, map(selected.info.__getitem__, named)), default=0)
        if returns is None:
            await sliced(self._writing_search(numbers, modseq))
            return ok(f"{cmd.name} completed")
        if "SAVE" in returns:
            saved = uids
            if set(returns) - {"SAVE"}:
                picks = set(returns) - {"SAVE", "COUNT"}
                if picks and "ALL" not in picks:
                    saved = ((uids[:1] if "MIN" in picks else []) +
                             (uids[-1:] if "MAX" in picks else []))
            self.saved_search = saved
            if set(returns) == {"SAVE"}:
                return ok(f"{cmd.name} completed")
        parts = [f'(TAG "{cmd.tag}")']
        if uid:
            parts.append("UID")
        if numbers:
            if "MIN" in returns:
                parts.append(f"MIN {numbers[0]}")
            if "MAX" in returns:
                parts.append(f"MAX {numbers[-1]}")
            if "ALL" in returns:
                parts.append(f"ALL {await sliced(formatting_sequence(numbers, 4 * STEP))}")
        if "COUNT" in returns:
            parts.append(f"COUNT {len(numbers)}")
        if modseq and numbers:
            parts.append(f"MODSEQ {modseq}")
        self.untagged("ESEARCH " + " ".join(parts))
        return ok(f"{cmd.name} completed")

    def _writing_search(self, numbers: list[int], modseq: Optional[int]) -> Steps:
        """The SEARCH response, one line written in pieces (``sliced``): SEARCH ALL
        in a mailbox of 300,000 messages is 2 MB of numbers."""
        self.write(b"* SEARCH")
        for start in range(0, len(numbers), STEP):
            self.write(b"".join([b" %d" % n for n in numbers[start:start + STEP]]))
            yield
        if modseq and numbers:
            self.write(b" (MODSEQ %d)" % modseq)
        self.write(b"\r\n")

    async def do_SORT(self, cmd: Command) -> Reply:
        return await self._sort(cmd, uid=False)

    async def do_UID_SORT(self, cmd: Command) -> Reply:
        return await self._sort(cmd, uid=True)

    async def _sort(self, cmd: Command, uid: bool) -> Reply:
        if len(cmd.args) < 3 or not isinstance(cmd.args[0], list):
            raise Bad("SORT needs (criteria) charset search-keys")
        criteria = sorting.parse_sort_criteria(cmd.args[0])
        found, _, parsed = await self._with_content(
            [Atom("CHARSET"), cmd.args[1]] + list(cmd.args[2:]))
        ordered = sorting.sort_messages([(v, parsed[v.uid]) for v in found], criteria)
        self.untagged("SORT" + "".join(f" {v.uid if uid else v.seq}" for v in ordered))
        return ok(f"{cmd.name} completed")

    async def do_THREAD(self, cmd: Command) -> Reply:
        return await self._thread(cmd, uid=False)

    async def do_UID_THREAD(self, cmd: Command) -> Reply:
        return await self._thread(cmd, uid=True)

    async def _thread(self, cmd: Command, uid: bool) -> Reply:
        if len(cmd.args) < 3:
            raise Bad("THREAD needs an algorithm, a charset and search keys")
        algorithm = astring(cmd.args[0]).upper()
        if algorithm not in ("ORDEREDSUBJECT", "REFERENCES"):
            raise Bad("THREAD algorithms: ORDEREDSUBJECT, REFERENCES")
        found, _, parsed = await self._with_content(
            [Atom("CHARSET"), cmd.args[1]] + list(cmd.args[2:]))
        threads = sorting.thread_messages(algorithm, [(v, parsed[v.uid]) for v in found])
        self.untagged(b"THREAD " + sorting.format_threads(threads, uid))
        return ok(f"{cmd.name} completed")

    async def _with_content(self, args: list[Any]) -> tuple[list[searching.MessageView],
                                                            Any, dict[int, ParsedMessage]]:
        places, key, parsed = await self._matching(args)
        selected = self._sel()
        found = self._views(selected, places)
        # SORT and THREAD read header fields only: the header blocks kept in SQL.
        missing = [view.uid for view in found if view.uid not in parsed]
        for start in range(0, len(missing), HEADERS_BATCH):
            parsed.update(await self._headers(selected, missing[start:start + HEADERS_BATCH]))
        return found, key, parsed

    async def _headers(self, selected: SelectedMailbox,
                       uids: list[int]) -> dict[int, ParsedMessage]:
        """The parsed header blocks of ``uids``: from the process's cache, else from
        the store's SQL copies (one query), else (no copy yet) from the blobs."""
        found: dict[int, ParsedMessage] = {}
        missing = []
        for message_uid in uids:
            cached = HEADERS.get(selected.info[message_uid].blob_id)
            if cached is not None:
                found[message_uid] = cached
            else:
                missing.append(message_uid)
        if missing:
            heads = await self.store.headers_for(selected.id, missing)
            for message_uid in missing:
                blob_id = selected.info[message_uid].blob_id
                head = heads.get(message_uid)
                found[message_uid] = (HEADERS.put(blob_id, ParsedMessage(head))
                                      if head is not None else
                                      ParsedMessage(await self.store.blobs.read(blob_id)))
        return found
