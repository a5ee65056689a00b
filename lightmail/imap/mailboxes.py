"""IMAP commands of the authenticated state (RFC 9051 §6.3): SELECT and EXAMINE,
CREATE, DELETE, RENAME, SUBSCRIBE, LIST and LSUB (with LIST-EXTENDED and
LIST-STATUS), STATUS, NAMESPACE, APPEND, IDLE and QUOTA."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import threads
from twisted.internet.defer import Deferred

from lightmail.imap.core import (
    AUTHENTICATED,
    FLAG_RE,
    SELECTED,
    SYSTEM_FLAGS,
    Bad,
    No,
    Reply,
    SessionCore,
    flags_of,
    ok,
    parse_date_time,
    parse_number,
    sliced,
    use_name,
)
from lightmail.imap.names import (
    DELIMITER,
    BadName,
    ListPattern,
    decode_name,
    encode_name,
    parents,
)
from lightmail.imap.parser import (
    Command,
    StreamedLiteral,
)
from lightmail.imap.selected import STEP, SelectedMailbox, Steps
from lightmail.imap.sequence import SequenceSet, formatting_sequence, parse_sequence_set
from lightmail.imap.tokens import (
    Atom,
    astring,
    astring_out,
)
from lightmail.storage.interfaces import IStagedBlob, MailboxExists

# Mailboxes with more messages than this have their view built in a thread (SELECT).
VIEW_IN_THREAD = 5000


def _open_view(box: Any, messages: list[Any], readonly: bool, first_recent: int
               ) -> tuple[SelectedMailbox, set[frozenset[str]], Optional[int]]:
    """(The view of a mailbox being selected, its distinct flag sets, the number of
    its first unseen message or None): in a thread, for a mailbox of any size."""
    selected = SelectedMailbox(box, messages, readonly, first_recent)
    # Messages share a few flag sets (see sqlstore): their keywords are those of the
    # distinct sets.
    flag_sets = set(map(flags_of, messages))
    unseen = None
    if any("\\Seen" not in flags for flags in flag_sets):
        unseen = next((n for n, m in enumerate(messages, 1) if "\\Seen" not in m.flags),
                      None)
    return selected, flag_sets, unseen


class MailboxCommands(SessionCore):
    # -- authenticated: mailboxes ---------------------------------------------------

    def _name(self, value: Any) -> str:
        try:
            return decode_name(astring(value, "mailbox name"), self.utf8)
        except BadName as exc:
            raise No(f"[CANNOT] {exc}") from None

    def _show(self, name: str) -> bytes:
        return astring_out(encode_name(name, self.utf8))

    async def _mailbox(self, name: str) -> Any:
        box = await self.store.get_mailbox(self.user.id, name)
        if box is None:
            raise No("[NONEXISTENT] No such mailbox")
        return box

    async def do_SELECT(self, cmd: Command) -> Reply:
        return await self._select(cmd, readonly=False)

    async def do_EXAMINE(self, cmd: Command) -> Reply:
        return await self._select(cmd, readonly=True)

    async def _select(self, cmd: Command, readonly: bool) -> Reply:
        if not cmd.args or len(cmd.args) > 2:
            raise Bad(f"{cmd.name} needs a mailbox name")
        qresync = self._select_params(cmd.args[1] if len(cmd.args) == 2 else None)
        if self.selected is not None:
            self._unselect()
            self.state = AUTHENTICATED
            if "QRESYNC" in self.enabled or self.rev2:
                self.untagged("OK [CLOSED] Previous mailbox closed")
        name = self._name(cmd.args[0])
        # The mailbox row and its messages in one read; the changes announced while it
        # ran, before this session watches the mailbox, are looked up in the hub.
        mark = self.hub.announced
        found = await self.store.select_mailbox(self.user.id, name)
        if found is None:
            raise No("[NONEXISTENT] No such mailbox")
        box, messages = found
        first_recent = await (self.hub.peek_recent(box.id, box.uidnext) if readonly
                              else self.hub.claim_recent(box.id, box.uidnext))
        # IMAP4rev2 has no \Recent (RFC 9051 §2.3.2): nothing is recent to this session,
        # though it still claims the recent messages from rev1 sessions.
        # A large mailbox's view is built in a thread: it is new, nothing else holds it
        # yet, and indexing 300,000 messages held the reactor for 50 ms.  A small one's
        # costs less than the thread hop (the IMAP mix's SELECT went from 5.6 to 7.4 ms
        # at 10 clients when every view took it).
        recent_from = first_recent if not self.rev2 else 1 << 62
        if len(messages) > VIEW_IN_THREAD:
            selected, flag_sets, unseen = await threads.deferToThread(
                _open_view, box, messages, readonly, recent_from)
        else:
            selected, flag_sets, unseen = _open_view(box, messages, readonly, recent_from)
        if self.closing:            # (gone meanwhile: watching would leak the session)
            return ok(f"{cmd.name} completed")
        self.selected, self.state = selected, SELECTED
        self.saved_search = None
        self.hub.watch(box.id, self)
        missed = self.hub.missed_since(mark, box.id, box.highestmodseq)
        selected.tell_flags_of(flag_sets)
        self.untagged(f"{selected.exists} EXISTS")
        if not self.rev2:
            self.untagged(f"{len(selected.recent)} RECENT")
        self.tell_flags()
        if not self.rev2 and unseen is not None:
            self.untagged(f"OK [UNSEEN {unseen}] First unseen")
        self.untagged(f"OK [UIDVALIDITY {box.uidvalidity}] UIDs valid")
        self.untagged(f"OK [UIDNEXT {box.uidnext}] Predicted next UID")
        self.untagged(f"OK [HIGHESTMODSEQ {box.highestmodseq}] Highest")
        if self.rev2:
            self.untagged(b"LIST () \"/\" " + self._show(box.name))
        if qresync is not None:
            await self._qresync(selected, *qresync)
        # The listing holds every change up to the mailbox's MODSEQ (maybe later ones
        # too): later changes are heard as they are announced, unless one was announced
        # before this session watched the mailbox, which calls for a read.
        if missed:
            selected.dirty = True
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        return ok(f"[{mode}] {cmd.name} completed")

    def _select_params(self, params: Any) -> Optional[tuple[int, int, Optional[SequenceSet]]]:
        """SELECT's (CONDSTORE) or (QRESYNC (uidvalidity modseq [known-uids]))."""
        if params is None:
            return None
        if not isinstance(params, list):
            raise Bad("SELECT parameters must be a list")
        result = None
        index = 0
        while index < len(params):
            name = astring(params[index]).upper()
            if name == "CONDSTORE":
                self.enabled.add("CONDSTORE")
                index += 1
            elif name == "QRESYNC":
                if "QRESYNC" not in self.enabled:
                    raise Bad("QRESYNC must be enabled first (ENABLE QRESYNC)")
                value = params[index + 1] if index + 1 < len(params) else None
                if not isinstance(value, list) or len(value) < 2:
                    raise Bad("QRESYNC needs (uidvalidity modseq [known-uids])")
                known = parse_sequence_set(astring(value[2])) if len(value) > 2 else None
                result = (parse_number(value[0]), parse_number(value[1], allow_zero=False), known)
                index += 2
            else:
                raise Bad(f"unknown SELECT parameter {name[:20]}")
        return result

    async def _qresync(self, selected: SelectedMailbox, uidvalidity: int, modseq: int,
                       known: Optional[SequenceSet]) -> None:
        """RFC 7162 §3.2.5: what changed since the client's last visit."""
        if uidvalidity != selected.mailbox.uidvalidity:
            return
        changes = await self.store.changes_since(selected.id, modseq)
        gone = changes.expunged         # ascending, as the store gives them
        if known is not None:
            gone = known.select_sorted(gone, selected.largest_uid or 1)
        if gone:
            text = await sliced(formatting_sequence(gone, 4 * STEP))
            self.untagged(f"VANISHED (EARLIER) {text}")
        await sliced(self._telling_flags(selected, changes.changed))

    def _telling_flags(self, selected: SelectedMailbox, changed: list[Any]) -> Steps:
        """FETCH (UID FLAGS MODSEQ) of the messages changed, in steps (``sliced``)."""
        for start in range(0, len(changed), STEP):
            for info in changed[start:start + STEP]:
                number = selected.number_of(info.uid)
                if number:
                    self.untagged(self._flags_fetch(number, selected.info[info.uid]))
            yield


    async def do_CREATE(self, cmd: Command) -> Reply:
        if not cmd.args or len(cmd.args) > 2:
            raise Bad("CREATE needs a mailbox name")
        raw = astring(cmd.args[0])
        name = self._name(raw.rstrip(DELIMITER) or raw)
        use = None
        if len(cmd.args) == 2:
            opts = cmd.args[1]
            if (not isinstance(opts, list) or len(opts) != 2
                    or astring(opts[0]).upper() != "USE" or not isinstance(opts[1], list)):
                raise Bad("CREATE takes (USE (\\Special-use))")
            uses = [astring(u) for u in opts[1]]
            if len(uses) > 1:
                raise No("[USEATTR] One special use per mailbox")
            if uses:
                use = use_name(uses[0])
                if use is None:
                    raise No("[USEATTR] Unknown special use")
        if name == "INBOX":
            raise No("[ALREADYEXISTS] INBOX exists")
        existing = {box.name for box in await self.store.list_mailboxes(self.user.id)}
        if name in existing:
            raise No("[ALREADYEXISTS] Mailbox exists")
        # RFC 9051 §6.3.4: the missing superiors are created too.
        for parent in parents(name):
            if parent not in existing and parent != "INBOX":
                try:
                    await self.store.create_mailbox(self.user.id, parent, subscribed=False)
                except MailboxExists:
                    pass
        try:
            await self.store.create_mailbox(self.user.id, name, use, subscribed=False)
        except MailboxExists:
            raise No("[ALREADYEXISTS] Mailbox exists") from None
        return ok("CREATE completed")

    async def do_DELETE(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1:
            raise Bad("DELETE needs a mailbox name")
        name = self._name(cmd.args[0])
        if name == "INBOX":
            raise No("[CANNOT] INBOX cannot be deleted")
        boxes = await self.store.list_mailboxes(self.user.id)
        if not any(box.name == name for box in boxes):
            raise No("[NONEXISTENT] No such mailbox")
        if any(box.name.startswith(name + DELIMITER) for box in boxes):
            # A mailbox with children and no \Noselect support: refuse, as Dovecot.
            raise No("[INUSE] Mailbox has children, delete them first")
        if self.selected is not None and self.selected.mailbox.name == name:
            self._unselect()
            self.state = AUTHENTICATED
        await self.store.delete_mailbox(self.user.id, name)
        return ok("DELETE completed")

    async def do_RENAME(self, cmd: Command) -> Reply:
        if len(cmd.args) != 2:
            raise Bad("RENAME needs two mailbox names")
        old, new = self._name(cmd.args[0]), self._name(cmd.args[1])
        if new == "INBOX":
            raise No("[ALREADYEXISTS] INBOX exists")
        boxes = {box.name for box in await self.store.list_mailboxes(self.user.id)}
        if old not in boxes:
            raise No("[NONEXISTENT] No such mailbox")
        if new in boxes:
            raise No("[ALREADYEXISTS] Mailbox exists")
        if new.startswith(old + DELIMITER):
            raise No("[CANNOT] A mailbox cannot be moved into itself")
        for parent in parents(new):
            if parent not in boxes:
                await self.store.create_mailbox(self.user.id, parent, subscribed=False)
        try:
            await self.store.rename_mailbox(self.user.id, old, new)
        except MailboxExists:
            raise No("[ALREADYEXISTS] Mailbox exists") from None
        return ok("RENAME completed")

    async def do_SUBSCRIBE(self, cmd: Command) -> Reply:
        return await self._subscribe(cmd, True)

    async def do_UNSUBSCRIBE(self, cmd: Command) -> Reply:
        return await self._subscribe(cmd, False)

    async def _subscribe(self, cmd: Command, subscribed: bool) -> Reply:
        if len(cmd.args) != 1:
            raise Bad(f"{cmd.name} needs a mailbox name")
        name = self._name(cmd.args[0])
        box = await self.store.get_mailbox(self.user.id, name)
        if box is not None:
            await self.store.set_subscribed(box.id, subscribed)
        elif subscribed or not await self.store.unsubscribe_name(self.user.id, name):
            # (A deleted mailbox's name stays subscribed until UNSUBSCRIBE.)
            raise No("[NONEXISTENT] No such mailbox")
        return ok(f"{cmd.name} completed")

    async def do_LIST(self, cmd: Command) -> Reply:
        return await self._list(cmd, lsub=False)

    async def do_LSUB(self, cmd: Command) -> Reply:
        return await self._list(cmd, lsub=True)

    async def _list(self, cmd: Command, lsub: bool) -> Reply:
        args = list(cmd.args)
        select: set[str] = set()
        if args and isinstance(args[0], list) and not lsub:
            select = {astring(a).upper() for a in args.pop(0)}
            unknown = select - {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
            if unknown:
                raise Bad(f"unknown LIST selection option {sorted(unknown)[0]}")
            # RFC 5258 §3: RECURSIVEMATCH needs a selection option it refines; REMOTE
            # only widens the set, so it does not count.
            if "RECURSIVEMATCH" in select and not select - {"RECURSIVEMATCH", "REMOTE"}:
                raise Bad("RECURSIVEMATCH needs another selection option")
        if len(args) < 2:
            raise Bad(f"{cmd.name} needs a reference and a mailbox pattern")
        reference = astring(args[0])
        patterns = args[1] if isinstance(args[1], list) and not lsub else [args[1]]
        returns: set[str] = set()
        status_items: list[str] = []
        if len(args) > 2:
            if (len(args) != 4 or astring(args[2]).upper() != "RETURN"
                    or not isinstance(args[3], list)):
                raise Bad("LIST ... RETURN (options)")
            opts = args[3]
            index = 0
            while index < len(opts):
                opt = astring(opts[index]).upper()
                if opt == "STATUS":
                    if index + 1 >= len(opts) or not isinstance(opts[index + 1], list):
                        raise Bad("RETURN (STATUS (items))")
                    status_items = [astring(i).upper() for i in opts[index + 1]]
                    index += 1
                elif opt not in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                    raise Bad(f"unknown LIST return option {opt[:20]}")
                returns.add(opt)
                index += 1
        boxes = await self.store.list_mailboxes(self.user.id)
        by_name = {box.name: box for box in boxes}
        regexes = []
        for pattern in patterns:
            text = astring(pattern)
            if not lsub and not text and len(patterns) == 1 and not select:
                # RFC 9051 §6.3.9: the delimiter and the root of the reference.
                self.untagged(b'LIST (\\Noselect) "/" ""')
                return ok("LIST completed")
            try:
                ref = decode_name(reference, self.utf8) if reference else ""
            except BadName:
                ref = reference
            if not self.utf8 and "&" in text:
                try:
                    text = text.encode("ascii").decode("imap4-utf-7")
                except (UnicodeError, ValueError):
                    pass
            regexes.append(ListPattern(ref, text))
        subscribed_only = lsub or "SUBSCRIBED" in select
        names = set(by_name)
        # Subscribed names: of mailboxes, and of mailboxes deleted since (RFC 9051
        # §6.3.7), which LSUB and LIST (SUBSCRIBED) still show.
        kept = set(await self.store.subscriptions_without_mailbox(self.user.id)) \
            if subscribed_only else set()
        subscribed = {name for name, box in by_name.items() if box.subscribed} | kept
        # Superiors that exist only as the path of a child are listed as
        # \NonExistent (LIST-EXTENDED) or \Noselect (rev1), when they match.
        phantom = {p for name in names | kept for p in parents(name) if p not in by_name}
        for name in sorted(names | phantom | kept, key=lambda n: (n != "INBOX", n)):
            if not any(regex.match(name) for regex in regexes):
                continue
            box = by_name.get(name)
            # Subscribed descendants that the patterns do not reach themselves.
            unreached = name not in subscribed and any(
                other.startswith(name + DELIMITER)
                and not any(regex.match(other) for regex in regexes)
                for other in subscribed)
            if lsub and unreached:
                # RFC 3501 §6.3.9: LSUB "%" names the unsubscribed superior of a
                # subscribed mailbox that the pattern does not reach, as \Noselect.
                self.untagged(b'LSUB (\\Noselect) "/" ' + self._show(name))
                continue
            # RFC 5258 §3.5: with (SUBSCRIBED RECURSIVEMATCH), a mailbox that is not
            # subscribed itself is listed with CHILDINFO ("SUBSCRIBED") for a
            # subscribed descendant that is not listed in its own right.
            childinfo = "SUBSCRIBED" in select and "RECURSIVEMATCH" in select and unreached
            attrs = []
            if box is None:
                if (subscribed_only or select) and not childinfo and name not in kept:
                    continue
                attrs.append("\\NonExistent" if self.rev2 or select else "\\Noselect")
            if subscribed_only and name not in subscribed and not childinfo:
                continue
            if "SPECIAL-USE" in select and not (box and box.special_use):
                continue
            children = any(other.startswith(name + DELIMITER) for other in names)
            attrs.append("\\HasChildren" if children else "\\HasNoChildren")
            if name in subscribed and ("SUBSCRIBED" in returns or subscribed_only):
                attrs.append("\\Subscribed")
            if box is not None and box.special_use and not lsub:
                attrs.append(box.special_use)
            word = "LSUB" if lsub else "LIST"
            self.untagged(f"{word} ({' '.join(attrs)}) \"/\" ".encode() + self._show(name)
                          + (b' ("CHILDINFO" ("SUBSCRIBED"))' if childinfo else b""))
            if status_items and box is not None:
                await self._status_response(box, status_items)
        return ok(f"{cmd.name} completed")

    async def do_STATUS(self, cmd: Command) -> Reply:
        if len(cmd.args) != 2 or not isinstance(cmd.args[1], list) or not cmd.args[1]:
            raise Bad("STATUS needs a mailbox name and a list of items")
        box = await self._mailbox(self._name(cmd.args[0]))
        await self._status_response(box, [astring(i).upper() for i in cmd.args[1]])
        return ok("STATUS completed")

    async def _status_response(self, box: Any, items: list[str]) -> None:
        allowed = {"MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE",
                   "RECENT", "HIGHESTMODSEQ", "APPENDLIMIT"}
        bad = [item for item in items if item not in allowed]
        if bad:
            raise Bad(f"unknown STATUS item {bad[0][:20]}")
        first_recent = (await self.hub.peek_recent(box.id, box.uidnext)
                        if "RECENT" in items else None)
        status = await self.store.status(box.id, first_recent)
        mailbox = status.mailbox
        values = {
            "MESSAGES": status.messages, "UIDNEXT": mailbox.uidnext,
            "UIDVALIDITY": mailbox.uidvalidity, "UNSEEN": status.unseen,
            "DELETED": status.deleted, "SIZE": status.size,
            "HIGHESTMODSEQ": mailbox.highestmodseq, "APPENDLIMIT": self.cfg.max_literal,
        }
        if first_recent is not None:
            values["RECENT"] = status.from_uid
        if "HIGHESTMODSEQ" in items:
            self.enable_condstore()
        body = " ".join(f"{item} {values[item]}" for item in items)
        self.untagged(b"STATUS " + self._show(box.name) + f" ({body})".encode())

    async def do_NAMESPACE(self, cmd: Command) -> Reply:
        self._no_args(cmd)
        self.untagged('NAMESPACE (("" "/")) NIL NIL')
        return ok("NAMESPACE completed")

    async def do_APPEND(self, cmd: Command) -> Reply:
        args = list(cmd.args)
        if len(args) < 2:
            raise Bad("APPEND needs a mailbox name and a message")
        name = self._name(args.pop(0))
        flags: list[str] = []
        date: Optional[int] = None
        if args and isinstance(args[0], list):
            flags = self._flags(args.pop(0))
        # The date-time is a quoted string (a plain str; an Atom such as UTF8 is not).
        if len(args) > 1 and isinstance(args[0], str) and not isinstance(args[0], Atom):
            date = parse_date_time(astring(args.pop(0)))
        if len(args) == 2 and isinstance(args[0], Atom) and args[0].upper() == "UTF8" \
                and isinstance(args[1], list):
            # RFC 6855 §4: UTF8 (literal8) when UTF8=ACCEPT is on.
            args = args[1]
        if len(args) != 1 or not isinstance(args[0], (bytes, StreamedLiteral)):
            raise Bad("APPEND needs the message as a literal")
        message = args[0]
        size = message.size if isinstance(message, StreamedLiteral) else len(message)
        box = await self.store.get_mailbox(self.user.id, name)
        if box is None:
            raise No("[TRYCREATE] No such mailbox")
        if self.user.quota_bytes:
            used = await self.store.usage(self.user.id)
            if used + size > self.user.quota_bytes:
                raise No("[OVERQUOTA] Quota exceeded")
        # Staged only now: a streamed message refused above is still the session's,
        # which drops its temporary blob when the command ends.
        staging = self._stage(message)
        staged = None
        try:
            staged = await staging
            refused = await self.factory.append_check.check(staged, self.conn_id)
            if refused is not None:
                raise No(refused)
            appended = await self.store.append(box.id, staged, flags, date)
        except BaseException:
            if staged is None:
                staging.addCallback(_drop).addErrback(lambda _: None)
            else:
                staged.discard()          # its temporary file, unless its commit began
            raise
        return ok(f"[APPENDUID {appended.uidvalidity} {appended.uid}] APPEND completed")

    def _stage(self, message: bytes | StreamedLiteral) -> Deferred[IStagedBlob]:
        """The message, staged, not yet durable: the write port makes it durable in
        the worker hop of the transaction that files it, with the other blobs of its
        group.  A message streamed to its blob writer as it came (parser.py) is
        staged from there; one still in memory (an empty literal) is written here."""
        if isinstance(message, StreamedLiteral):
            return message.stage()
        writer = self.store.blobs.writer()
        writer.write(message)
        return writer.stage()

    def _flags(self, values: Any) -> list[str]:
        if not isinstance(values, list):
            values = [values]
        flags = []
        for value in values:
            flag = astring(value)
            if not FLAG_RE.match(flag) or flag.upper() == "\\RECENT":
                raise Bad(f"invalid flag {flag[:30]}")
            if flag.startswith("\\"):
                proper = next((f for f in SYSTEM_FLAGS if f.upper() == flag.upper()), None)
                if proper is None:
                    raise Bad(f"unknown system flag {flag[:30]}")
                flag = proper
            flags.append(flag)
        return flags

    async def do_IDLE(self, cmd: Command) -> Optional[Reply]:
        self._no_args(cmd)
        if self.selected is not None:
            await self.catch_up(allow_expunge=True)
        self.idling = cmd.tag
        self.write(b"+ idling\r\n")
        return None

    def _idle_line(self, line: bytes) -> None:
        tag, self.idling = self.idling, None
        assert tag is not None
        if line.strip().upper() != b"DONE":
            self.tagged(tag, "BAD", "Expected DONE")
            self._error()
            return
        self.tagged(tag, "OK", "IDLE terminated")

    async def do_GETQUOTAROOT(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1:
            raise Bad("GETQUOTAROOT needs a mailbox name")
        box = await self._mailbox(self._name(cmd.args[0]))
        roots = ' ""' if self.user.quota_bytes else ""
        self.untagged(b"QUOTAROOT " + self._show(box.name) + roots.encode())
        if self.user.quota_bytes:
            await self._quota_response()
        return ok("GETQUOTAROOT completed")

    async def do_GETQUOTA(self, cmd: Command) -> Reply:
        if len(cmd.args) != 1:
            raise Bad("GETQUOTA needs a quota root")
        if astring(cmd.args[0]) != "" or not self.user.quota_bytes:
            raise No("[NONEXISTENT] No such quota root")
        await self._quota_response()
        return ok("GETQUOTA completed")

    async def _quota_response(self) -> None:
        used = await self.store.usage(self.user.id)
        # RFC 9208 §5.1: STORAGE is in units of 1024 octets.
        self.untagged(f'QUOTA "" (STORAGE {(used + 1023) // 1024} '
                      f'{self.user.quota_bytes // 1024})')

    async def do_SETQUOTA(self, cmd: Command) -> Reply:
        raise No("[NOPERM] Quotas are set by the administrator")


def _drop(blob: IStagedBlob | None) -> None:
    """Discard a staged blob that nothing will file (None: already taken)."""
    if blob is not None:
        blob.discard()
