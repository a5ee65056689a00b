"""``lightmail import`` (from a Maildir or an mbox file) and ``lightmail export`` (to a
Maildir): one user's mail, moved through the storage interfaces as the server's own
protocols move it.

Import streams each message into the blob store (IBlobWriter) and files it with the
write port (IWritePort.append_many: a batch of messages in one transaction, in order,
with consecutive UIDs), keeping flags, keywords and internal dates.  Export reads a
mailbox a page at a time (IMailStore.messages_page) and each message from the blob
store.  Neither holds more than one batch (200 messages, 8 MB; a larger message is
streamed on its own), so a mailbox of 100,000 messages takes the memory of one of 100.

Line ends: messages are stored with CRLF, as IMAP serves them (RFC 5322 §2.3); the
bare LF lines that Maildir and mbox files usually hold become CRLF on import.  Export
writes what is stored.  Quotas do not apply: the administrator is moving mail, not
receiving it.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from lightmail.admin import maildir, mbox
from lightmail.admin.datatools import (
    Loader,
    Progress,
    ToolError,
    remove_partial,
    report,
    sync_filesystem,
    with_storage,
)
from lightmail.storage.database import now_ms
from lightmail.storage.interfaces import IStagedBlob, Mailbox, MessageInfo

#: A batch: filed in one transaction.
BATCH_MESSAGES = 200
BATCH_OCTETS = 8 << 20
#: A message longer than this is streamed into its blob, a chunk at a time.
LARGE = 1 << 20
_CHUNK = 256 << 10
#: Messages read from the store at a time by export.
PAGE = 500
_BARE_LF = re.compile(rb"(?<!\r)\n")


def run_import(args: argparse.Namespace, load: Loader) -> dict[str, Any]:
    source = Path(args.source)
    if not source.exists():
        raise ToolError(f"{source} does not exist")
    progress = Progress()
    summary = with_storage(load(args), lambda services: Importer(
        services, progress).run(args.address, source, args.mailbox))
    report(summary, args.json,
           f"imported {summary['messages']} messages ({summary['octets']} octets) for "
           f"{summary['user']}: " + ", ".join(f"{name} {count}" for name, count
                                              in summary["mailboxes"].items()))
    return summary


def run_export(args: argparse.Namespace, load: Loader) -> dict[str, Any]:
    dest = Path(args.dest).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ToolError(f"{dest} exists already: give a new directory")
    progress = Progress()
    summary = with_storage(load(args), lambda services: Exporter(
        services, progress).run(args.address, dest, args.mailbox or []))
    dropped = summary["keywords_dropped"]
    report(summary, args.json,
           f"exported {summary['messages']} messages ({summary['octets']} octets) of "
           f"{summary['user']} to {dest}: " + ", ".join(
               f"{name} {count}" for name, count in summary["mailboxes"].items())
           + (f"; keywords beyond Maildir's 26 letters left out: {', '.join(dropped)}"
              if dropped else ""))
    return summary


# --- reading the sources (I/O pool threads) -------------------------------------------

@dataclass
class Incoming:
    """A message to import: its flags and date, its content (CRLF lines), or for a
    large one its start and the rest, read before the next message is."""

    flags: list[str]
    internal_date: int
    head: bytes
    rest: Iterator[bytes] | None = None


class _CRLF:
    """Bare LF -> CRLF across chunk boundaries (a CR at the end of one chunk and an LF
    at the start of the next are one line end)."""

    def __init__(self) -> None:
        self.after_cr = False

    def __call__(self, chunk: bytes) -> bytes:
        out = _BARE_LF.sub(b"\r\n", chunk)
        if self.after_cr and chunk[:1] == b"\n":
            out = out[1:]
        self.after_cr = chunk[-1:] == b"\r"
        return out


def _from_maildir(folder: Path) -> Generator[Incoming, None, None]:
    for found in maildir.messages(folder):
        try:
            source = found.path.open("rb")
        except FileNotFoundError:       # moved meanwhile by a server using the Maildir
            continue
        crlf = _CRLF()
        head = source.read(LARGE)
        if len(head) < LARGE:
            source.close()
            yield Incoming(list(found.flags), found.internal_date, crlf(head))
        else:
            yield Incoming(list(found.flags), found.internal_date, crlf(head),
                           _rest(source, crlf))


def _rest(source: Any, crlf: _CRLF) -> Iterator[bytes]:
    with source:
        while chunk := source.read(_CHUNK):
            yield crlf(chunk)


def _from_mbox(path: Path) -> Generator[Incoming, None, None]:
    with path.open("rb") as source:
        for message in mbox.read(source, now_ms()):
            head = bytearray(message.head)
            for line in message.body:
                head += line
                if len(head) >= LARGE:
                    yield Incoming(message.flags, message.internal_date, bytes(head),
                                   message.body)
                    break
            else:
                yield Incoming(message.flags, message.internal_date, bytes(head))


def _take_batch(items: Iterator[Incoming]) -> list[Incoming]:
    """The next batch: up to BATCH_MESSAGES or BATCH_OCTETS, ending at a large message
    (whose rest is read before anything else)."""
    batch: list[Incoming] = []
    octets = 0
    for item in items:
        batch.append(item)
        octets += len(item.head)
        if (item.rest is not None or len(batch) >= BATCH_MESSAGES
                or octets >= BATCH_OCTETS):
            break
    return batch


def _count_files(folders: list[tuple[str, Path]]) -> int:
    count = 0
    for _, folder in folders:
        for sub in ("new", "cur"):
            with os.scandir(folder / sub) as entries:
                count += sum(1 for entry in entries if not entry.name.startswith("."))
    return count


# --- import ----------------------------------------------------------------------------

class Importer:
    """Files one user's messages, batch after batch: the next batch is read and
    staged while the last one commits."""

    def __init__(self, services: Any, progress: Progress) -> None:
        self.services = services
        self.store = services.mailstore
        self.blobs = services.blobs
        self.port = services.write_port
        self.pool = services.storage.io_pool
        self.progress = progress
        self.filed: dict[str, int] = {}
        self.octets = 0

    def _in_thread(self, fn: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, self.pool, fn, *args)  # type: ignore[arg-type]

    async def run(self, address: str, source: Path, into: str | None) -> dict[str, Any]:
        user = await self.services.directory.get_user(address)
        if user is None:
            raise ToolError(f"no user {address}")
        try:
            if source.is_dir():
                folders = await self._in_thread(lambda: list(maildir.folders(source)))
                if not folders:
                    raise ToolError(f"{source} is no Maildir (no cur/ and new/, no "
                                    ".Folder in it)")
                self.progress.start("messages", await self._in_thread(_count_files,
                                                                      folders))
                for name, folder in folders:
                    target = name if not into else (
                        into if name == "INBOX" else f"{into}/{name}")
                    await self._file(user.id, target, _from_maildir(folder))
            else:
                self.progress.start("messages")
                await self._file(user.id, into or "INBOX", _from_mbox(source))
        except ToolError:
            raise
        except (OSError, ValueError) as exc:
            raise ToolError(f"import stopped: {exc}; {self._so_far()}") from None
        except Exception as exc:
            raise ToolError(f"import stopped: {exc.__class__.__name__}: {exc}; "
                            f"{self._so_far()}") from None
        finally:
            self.progress.finish()
        return {"ok": True, "user": user.address, "mailboxes": self.filed,
                "messages": sum(self.filed.values()), "octets": self.octets}

    def _so_far(self) -> str:
        done = ", ".join(f"{name} {count}" for name, count in self.filed.items())
        return f"what was filed before stays filed ({done or 'nothing'})"

    async def _file(self, user_id: int, name: str,
                    items: Generator[Incoming, None, None]) -> None:
        mailbox: Mailbox = await self.store.get_or_create_mailbox(user_id, name)
        self.filed.setdefault(mailbox.name, 0)
        committing: Deferred[Any] | None = None
        try:
            while batch := await self._in_thread(_take_batch, items):
                staged = await self._stage(batch)
                if committing is not None:
                    done, committing = committing, None
                    await done
                committing = self.port.append_many(mailbox.id, staged)
                committing.addCallback(self._filed, mailbox.name,
                                       sum(blob.ref.size for blob, _, _ in staged))
            if committing is not None:
                done, committing = committing, None
                await done
        finally:
            if committing is not None:      # the next batch failed: this one stands
                try:
                    await committing
                except Exception:
                    pass
            await self._in_thread(items.close)   # its open file, if any

    def _filed(self, appended: list[Any], name: str, octets: int) -> None:
        self.filed[name] += len(appended)
        self.octets += octets
        self.progress.advance(len(appended))

    async def _stage(self, batch: list[Incoming]
                     ) -> list[tuple[IStagedBlob, list[str], int]]:
        staged: list[tuple[IStagedBlob, list[str], int]] = []
        try:
            for item in batch:
                writer = self.blobs.writer()
                try:
                    writer.write(item.head)
                    if item.rest is not None:
                        while (chunk := await self._in_thread(next, item.rest, None)):
                            writer.write(chunk)
                            if writer.backlog() >= LARGE:
                                await writer.drained()
                except BaseException:
                    writer.abort()
                    raise
                staged.append((await writer.stage(), item.flags, item.internal_date))
        except BaseException:
            for blob, _, _ in staged:
                blob.discard()
            raise
        return staged


# --- export ----------------------------------------------------------------------------

class Exporter:
    """Writes one user's mailboxes as a Maildir++ tree, a page of messages at a time."""

    def __init__(self, services: Any, progress: Progress) -> None:
        self.services = services
        self.store = services.mailstore
        self.blobs = services.blobs
        self.pool = services.storage.io_pool
        self.progress = progress
        self.written: dict[str, int] = {}
        self.octets = 0
        self.dropped: set[str] = set()

    def _in_thread(self, fn: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, self.pool, fn, *args)  # type: ignore[arg-type]

    async def run(self, address: str, dest: Path, names: list[str]) -> dict[str, Any]:
        user = await self.services.directory.get_user(address)
        if user is None:
            raise ToolError(f"no user {address}")
        boxes: list[Mailbox] = await self.store.list_mailboxes(user.id)
        if names:
            known = {box.name for box in boxes}
            unknown = [name for name in names if name not in known]
            if unknown:
                raise ToolError(f"{address} has no mailbox {', '.join(unknown)}")
            boxes = [box for box in boxes if box.name in names]
        total = 0
        for box in boxes:
            total += (await self.store.status(box.id)).messages
        made = not dest.exists()
        try:
            await self._in_thread(maildir.make_root, dest)
            self.progress.start("messages", total)
            for box in boxes:
                await self._export(box, dest)
            await self._in_thread(sync_filesystem, dest)
        except BaseException as exc:
            self.progress.finish()
            await self._in_thread(remove_partial, dest, made)
            if isinstance(exc, OSError):
                raise ToolError(f"export failed: {exc}; the partial export {dest} was "
                                "removed") from None
            raise
        self.progress.finish()
        return {"ok": True, "user": user.address, "path": str(dest),
                "mailboxes": self.written, "messages": sum(self.written.values()),
                "octets": self.octets, "keywords_dropped": sorted(self.dropped)}

    async def _export(self, box: Mailbox, dest: Path) -> None:
        path = dest if box.name == "INBOX" else dest / maildir.directory_name(box.name)
        folder = await self._in_thread(maildir.MaildirFolder, path, box.uidvalidity,
                                       box.uidnext)
        self.written[box.name] = 0
        try:
            after = 0
            while True:
                page: list[MessageInfo] = await self.store.messages_page(box.id, after, PAGE)
                # Only what the mailbox held when the export began.
                page = [info for info in page if info.uid < box.uidnext]
                if not page:
                    break
                octets = await self._in_thread(self._write, folder, page)
                self.written[box.name] += len(page)
                self.octets += octets
                self.progress.advance(len(page))
                after = page[-1].uid
        finally:
            await self._in_thread(folder.close)
            self.dropped |= folder.dropped

    def _write(self, folder: maildir.MaildirFolder, page: list[MessageInfo]) -> int:
        octets = 0
        for info in page:
            content = self.blobs.read_now(info.blob_id)
            folder.add(content, info.uid, info.flags, info.internal_date)
            octets += len(content)
        return octets

