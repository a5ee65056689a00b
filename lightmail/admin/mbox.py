"""Reading an mbox file for ``lightmail import``: messages one after another, each
read as it goes (no file is ever held whole).

The format is mboxrd (https://www.loc.gov/preservation/digital/formats/fdd/fdd000385.shtml,
RFC 4155): a message begins with a ``From `` line (the sender and the date of
delivery), at the start of the file or after an empty line, and body lines that
began with ``From `` were written with a ``>`` in front (``>>From`` for ``>From``),
which comes off again here.  mboxo files (Python's ``mailbox``, old mutt) read the
same way, except that a ``>From`` the author typed loses its ``>``.

Flags are in the headers that mail readers add: ``Status:`` (``R`` read, ``O`` old)
and ``X-Status:`` (``A`` answered, ``F`` flagged, ``T`` draft, ``D`` deleted), as mutt,
Pine and Dovecot write them, and Dovecot's ``X-Keywords:``.  Those headers, and
Dovecot's ``X-UID``, ``X-IMAP`` and ``X-IMAPbase``, are kept out of the message: they
are the mbox's bookkeeping, not the message's.
"""

from __future__ import annotations

import calendar
import email.utils
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

#: Status and X-Status letters.
_STATUS = {"R": "\\Seen"}
_X_STATUS = {"A": "\\Answered", "F": "\\Flagged", "T": "\\Draft", "D": "\\Deleted"}
_BOOKKEEPING = (b"status", b"x-status", b"x-keywords", b"x-uid", b"x-imap", b"x-imapbase")
_QUOTED_FROM = re.compile(rb"^>+From ")
#: The longest header block read before the body (then the rest is body).
HEADER_LIMIT = 1 << 20
_KEYWORD = re.compile(r"[^\x00-\x20\x7f(){%*\"\\\]]+")


@dataclass
class MboxMessage:
    """One message: its flags and date, its header block (CRLF lines), and the
    rest of it, which must be read to the end before the next message is asked for."""

    flags: list[str]
    internal_date: int                  # ms since the epoch
    head: bytes
    body: Iterator[bytes] = field(repr=False)


def from_line_date(line: bytes) -> int | None:
    """The date of a ``From sender Thu Jan  1 00:00:00 2020`` line (ms), or None."""
    parts = line.decode("latin-1").split()
    if len(parts) < 7:
        return None
    # asctime (ctime) format, possibly followed by a zone, e.g. +0000 or UTC.
    try:
        when = time.strptime(" ".join(parts[2:7]), "%a %b %d %H:%M:%S %Y")
    except ValueError:
        parsed = email.utils.parsedate_tz(" ".join(parts[2:]))
        if parsed is None:
            return None
        return int(email.utils.mktime_tz(parsed) * 1000)
    offset = 0
    if len(parts) > 7 and re.fullmatch(r"[+-]\d{4}", parts[7]):
        sign = -1 if parts[7][0] == "+" else 1
        offset = sign * (int(parts[7][1:3]) * 3600 + int(parts[7][3:5]) * 60)
    return (calendar.timegm(when) + offset) * 1000


def _crlf(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line
    if line.endswith(b"\n"):
        return line[:-1] + b"\r\n"
    return line


def read(source: BinaryIO, default_date: int) -> Iterator[MboxMessage]:
    """The messages of an open mbox file, in order.  ``default_date``: for a From_
    line whose date cannot be read."""
    lines = _Lines(source)
    first = lines.next()
    while first is not None and first.strip() == b"":
        first = lines.next()
    if first is None:
        return
    if not first.startswith(b"From "):
        raise ValueError("not an mbox file: it does not begin with a 'From ' line")
    while first is not None:
        date = from_line_date(first.rstrip(b"\r\n")) or default_date
        message = _message(lines, date)
        yield message
        for _ in message.body:         # whatever the caller left unread
            pass
        first = lines.separator


def _message(lines: _Lines, date: int) -> MboxMessage:
    head: list[bytes] = []
    size = 0
    status = x_status = ""
    keywords: list[str] = []
    skipping = False
    ended = False
    while True:
        line = lines.body_line()
        if line is None:
            ended = True
            break
        if line in (b"\n", b"\r\n"):
            head.append(b"\r\n")
            break
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                head.append(_crlf(line))
            continue
        name = line.split(b":", 1)[0].strip().lower()
        skipping = name in _BOOKKEEPING
        value = line.split(b":", 1)[1].decode("latin-1").strip() if b":" in line else ""
        if name == b"status":
            status += value
        elif name == b"x-status":
            x_status += value
        elif name == b"x-keywords":
            keywords += [k for k in re.split(r"[\s,]+", value) if _KEYWORD.fullmatch(k)]
        if not skipping:
            head.append(_crlf(_unquote(line)))
            size += len(line)
            if size > HEADER_LIMIT:
                break
    flags = [flag for letter, flag in _STATUS.items() if letter in status]
    flags += [flag for letter, flag in _X_STATUS.items() if letter in x_status]
    flags += keywords
    return MboxMessage(flags, date, b"".join(head),
                       iter(()) if ended else _body(lines))


def _body(lines: _Lines) -> Iterator[bytes]:
    while (line := lines.body_line()) is not None:
        yield _crlf(_unquote(line))


def _unquote(line: bytes) -> bytes:
    return line[1:] if _QUOTED_FROM.match(line) else line


class _Lines:
    """The file's lines, with one line of look-ahead after an empty line: it shows
    whether that line ends the message (a ``From `` line follows, or the end of the
    file: the empty line is then the mbox's, not the message's) or belongs to it."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.separator: bytes | None = None     # the From_ line that ended a message
        self._peeked: bytes | None = None

    def next(self) -> bytes | None:
        if self._peeked is not None:
            line, self._peeked = self._peeked, None
            return line
        return self.source.readline() or None

    def body_line(self) -> bytes | None:
        """The message's next line, or None at its end (``separator`` then holds the
        next message's From_ line, or None at the end of the file)."""
        line = self.next()
        if line is not None and line in (b"\n", b"\r\n"):
            after = self.source.readline() or None
            if after is None or after.startswith(b"From "):
                line = None
            else:
                self._peeked = after
            if line is None:
                self.separator = after
                return None
            return line
        if line is None:
            self.separator = None
        return line
