"""Maildir as Dovecot, Courier and mutt keep it: reading one for ``lightmail import``,
writing one for ``lightmail export``.  Files only: no storage here.

The layout is Maildir++ (Courier's, Dovecot's default)::

    Maildir/{cur,new,tmp}           INBOX
    Maildir/.Sub.Folder/{cur,...}   the mailbox Sub/Folder (names in modified UTF-7)
    <folder>/dovecot-keywords       Dovecot's keyword letters: "0 $Label1" is 'a'
    <folder>/dovecot-uidlist        Dovecot's UIDs (written by export)

A message is one file; its name ends with ``:2,`` and its flags, in ASCII order:
``D`` draft, ``F`` flagged, ``P`` passed (forwarded), ``R`` replied, ``S`` seen,
``T`` trashed (IMAP's \\Deleted), and Dovecot's keywords as the letters ``a``-``z``.
Its modification time is its IMAP internal date.  (https://cr.yp.to/proto/maildir.html,
https://doc.dovecot.org/admin_manual/mailbox_formats/maildir/)
"""

from __future__ import annotations

import heapq
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import twisted.mail.imap4  # noqa: F401  (registers the imap4-utf-7 codec)

#: Maildir's flag letters and the IMAP flags they stand for.  P has no IMAP system
#: flag; "$Forwarded" is the keyword clients use for it (RFC 5788's registry).
FLAG_LETTERS = {"D": "\\Draft", "F": "\\Flagged", "P": "$Forwarded", "R": "\\Answered",
                "S": "\\Seen", "T": "\\Deleted"}
LETTER_OF = {flag: letter for letter, flag in FLAG_LETTERS.items()}
KEYWORD_LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: Names listed at once before they are sorted on disk (bounded memory).
SORT_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class MaildirMessage:
    path: Path
    flags: tuple[str, ...]
    internal_date: int          # ms since the epoch: the file's mtime
    size: int


def is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() and (path / "new").is_dir()


def folders(root: Path) -> Iterator[tuple[str, Path]]:
    """(mailbox name, folder path) of a Maildir++ tree: INBOX first, then the
    ``.Name`` folders in name order, ``.`` becoming LightMail's ``/``."""
    if is_maildir(root):
        yield "INBOX", root
    names = sorted(entry.name for entry in os.scandir(root)
                   if entry.name.startswith(".") and entry.name not in (".", "..")
                   and entry.is_dir() and is_maildir(Path(entry.path)))
    for name in names:
        yield folder_name(name), root / name


def folder_name(directory: str) -> str:
    """``.Sub.Caf&AOk-`` -> ``Sub/Café`` (Maildir++ keeps IMAP's modified UTF-7)."""
    parts = directory[1:].split(".")
    decoded = []
    for part in parts:
        try:
            decoded.append(part.encode("ascii").decode("imap4-utf-7") if "&" in part
                           else part)
        except (UnicodeError, ValueError):
            decoded.append(part)
    name = "/".join(decoded)
    if name.upper() == "INBOX" or name[:6].upper() == "INBOX/":
        name = "INBOX" + name[5:]
    return name


def directory_name(name: str) -> str:
    """``Sub/Café`` -> ``.Sub.Caf&AOk-``.  A ``.`` inside a name would split it in
    Maildir++, so it becomes ``_``."""
    return "." + ".".join(part.replace(".", "_").encode("imap4-utf-7").decode("ascii")
                          for part in name.split("/"))


def read_keywords(folder: Path) -> dict[str, str]:
    """Dovecot's ``dovecot-keywords``: letter -> keyword (none if there is no file)."""
    letters: dict[str, str] = {}
    try:
        text = (folder / "dovecot-keywords").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return letters
    for line in text.splitlines():
        number, _, keyword = line.partition(" ")
        if number.isdigit() and int(number) < len(KEYWORD_LETTERS) and keyword:
            letters[KEYWORD_LETTERS[int(number)]] = keyword.strip()
    return letters


def parse_flags(filename: str, keywords: dict[str, str]) -> tuple[str, ...]:
    """The IMAP flags of a message file's name (``...:2,FRSab``)."""
    _, sep, info = filename.rpartition(":2,")
    if not sep:
        return ()
    flags = []
    for letter in info:
        if letter in FLAG_LETTERS:
            flags.append(FLAG_LETTERS[letter])
        elif letter in keywords:
            flags.append(keywords[letter])
    return tuple(flags)


def messages(folder: Path) -> Iterator[MaildirMessage]:
    """The folder's messages (``new`` and ``cur``) in the order they arrived: those
    that Dovecot's ``dovecot-uidlist`` lists in the order of their UIDs there, then
    the others by the time of delivery their names begin with.  The listings are
    sorted on disk in pieces of SORT_CHUNK, so memory does not grow with the folder."""
    keywords = read_keywords(folder)
    arrival = _arrival(_sorted_on_disk(_listing(folder)),
                       _sorted_on_disk(_uidlist(folder)))
    for line in _sorted_on_disk(arrival):
        _, base, relative = line.split("\t", 2)
        path = folder / relative
        try:
            st = path.stat()
        except FileNotFoundError:
            # A server using the Maildir renamed it since (new flags, or new/ to cur/),
            # or expunged it.
            renamed = _renamed(folder, base)
            if renamed is None:
                continue
            path, st = renamed, renamed.stat()
        yield MaildirMessage(path, parse_flags(path.name, keywords),
                             st.st_mtime_ns // 1_000_000, st.st_size)


def _uidlist(folder: Path) -> Iterator[str]:
    """``base\tUID`` for each message ``dovecot-uidlist`` names (its versions 1 and
    3: ``UID BASE`` or ``UID [FIELDS] :BASE`` after a header line)."""
    try:
        lines = (folder / "dovecot-uidlist").open(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return
    with lines:
        lines.readline()
        for line in lines:
            uid, _, rest = line.rstrip("\n").partition(" ")
            name = rest.partition(" :")[2] if " :" in rest else \
                rest[1:] if rest.startswith(":") else rest.rpartition(" ")[2]
            base = name.partition(":")[0]
            if uid.isdigit() and base and "\t" not in base:
                yield f"{base}\t{int(uid)}"


def _arrival(listing: Iterator[str], uids: Iterator[str]) -> Iterator[str]:
    """``key\tbase\trelative path`` for each file: both inputs sorted by base name,
    joined as they go (a merge join)."""
    def entry(line: str | None) -> tuple[str, str] | None:
        if line is None:
            return None
        base, _, uid = line.partition("\t")
        return base, uid

    known = entry(next(uids, None))
    for line in listing:
        base, _, relative = line.partition("\t")
        while known is not None and known[0] < base:
            known = entry(next(uids, None))
        if known is not None and known[0] == base:
            key = f"0{int(known[1]):012d}"
        else:
            key = "1" + _time_key(base)
        yield f"{key}\t{base}\t{relative}"


_TIMED = re.compile(r"(\d+)\.(?:M(\d+)P(\d+))?(.*)", re.DOTALL)


def _time_key(base: str) -> str:
    """A base name as a key that sorts by its time: ``secs.M<usec>P<pid>.host``
    (Dovecot's, Courier's) with the numbers at fixed widths; ``secs.rest`` by its
    seconds; anything else as it is."""
    match = _TIMED.fullmatch(base)
    if match is None:
        return base
    seconds, micro, pid, rest = match.groups()
    if micro is None:
        return f"{int(seconds):012d}.{rest}"
    return f"{int(seconds):012d}.{int(micro):06d}.{int(pid):010d}{rest}"


def _renamed(folder: Path, base: str) -> Path | None:
    with os.scandir(folder / "cur") as entries:
        for entry in entries:
            if entry.name.partition(":")[0] == base:
                return Path(entry.path)
    return None


def _listing(folder: Path) -> Iterator[str]:
    for sub in ("new", "cur"):
        with os.scandir(folder / sub) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or "\t" in name or "\n" in name:
                    continue
                if entry.is_file():
                    yield f"{name.partition(':')[0]}\t{sub}/{name}"


def _sorted_on_disk(lines: Iterable[str]) -> Iterator[str]:
    """``lines`` sorted, holding SORT_CHUNK of them at a time: each piece is sorted
    into a temporary file, and the files are merged."""
    runs: list[IO[str]] = []
    try:
        chunk: list[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) >= SORT_CHUNK:
                runs.append(_run(chunk))
                chunk = []
        if not runs:
            yield from sorted(chunk)
            return
        if chunk:
            runs.append(_run(chunk))
        for line in heapq.merge(*((line.rstrip("\n") for line in run) for run in runs)):
            yield line
    finally:
        for run in runs:
            run.close()


def _run(chunk: list[str]) -> IO[str]:
    run = tempfile.TemporaryFile("w+", encoding="utf-8", errors="surrogateescape")
    chunk.sort()
    run.writelines(line + "\n" for line in chunk)
    run.seek(0)
    return run


def make_root(root: Path) -> None:
    """A Maildir's top (INBOX), ready even when INBOX gets no message; made for its
    owner only (mode 0700), as Maildirs are."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)


class MaildirFolder:
    """One folder being written by export: messages go to ``cur`` (through ``tmp``)
    under unique names, their keywords into ``dovecot-keywords`` (26 at most: Dovecot's
    letters), their UIDs into ``dovecot-uidlist`` so that Dovecot keeps them."""

    def __init__(self, path: Path, uidvalidity: int, uidnext: int) -> None:
        self.path = path
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        self.keywords: dict[str, str] = {}      # keyword -> letter
        self.dropped: set[str] = set()          # keywords past the 26th
        self._uidlist = (path / "dovecot-uidlist").open("w", encoding="utf-8")
        self._uidlist.write(f"3 V{uidvalidity} N{uidnext}\n")
        self._host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        self._count = 0

    def add(self, content: bytes, uid: int, flags: Iterable[str], internal_date: int) -> None:
        letters = []
        for flag in flags:
            if flag in LETTER_OF:
                letters.append(LETTER_OF[flag])
            elif flag.startswith("\\"):
                continue        # \Recent and the like: nothing to keep
            else:
                letter = self._letter(flag)
                if letter:
                    letters.append(letter)
        self._count += 1
        now = time.time()
        base = (f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{self._count}"
                f".{self._host},S={len(content)}")
        name = f"{base}:2,{''.join(sorted(set(letters)))}"
        tmp = self.path / "tmp" / base
        with tmp.open("wb") as out:
            out.write(content)
        os.utime(tmp, ns=(internal_date * 1_000_000, internal_date * 1_000_000))
        tmp.rename(self.path / "cur" / name)
        self._uidlist.write(f"{uid} :{base}\n")

    def _letter(self, keyword: str) -> str | None:
        letter = self.keywords.get(keyword)
        if letter is None:
            if len(self.keywords) >= len(KEYWORD_LETTERS) or not _ATOM.fullmatch(keyword):
                self.dropped.add(keyword)
                return None
            letter = self.keywords[keyword] = KEYWORD_LETTERS[len(self.keywords)]
        return letter

    def close(self) -> None:
        self._uidlist.close()
        if self.keywords:
            with (self.path / "dovecot-keywords").open("w", encoding="utf-8") as out:
                for keyword, letter in self.keywords.items():
                    out.write(f"{KEYWORD_LETTERS.index(letter)} {keyword}\n")


#: What a keyword may hold (IMAP's atom, without the specials).
_ATOM = re.compile(r"[^\x00-\x20\x7f(){%*\"\\\]]+")
