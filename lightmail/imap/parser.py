"""Reading IMAP commands: lines, literals and the tokens of the arguments.

RFC 9051 §2.2 and §4: a command is a line that may be interrupted by literals.  A line
ending in ``{n}`` (synchronising: the server says ``+`` first), ``{n+}`` (LITERAL+,
RFC 7888) or ``~{n}`` (a binary literal, RFC 3516) is followed by ``n`` raw octets and
then the rest of the command.  :class:`CommandReader` collects those pieces with the
limits enforced before any octet is buffered; :func:`tokenize` turns them into the
values described in ``tokens.py``.

After login, the message literal of APPEND (up to ``[imap] max_literal``, tens of
megabytes) goes to a blob writer as it arrives rather than into memory: the command's
argument is then a :class:`StreamedLiteral`.  Other literals stay in memory.

Under COMPRESS=DEFLATE (RFC 4978) the input reaches the reader through
:class:`Inflater`, only as fast as the reader has room for it (:meth:`CommandReader.room`):
a few kilobytes of deflate can expand to gigabytes.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred, succeed

from lightmail.imap.tokens import Atom, ParseError
from lightmail.storage.interfaces import IBlobStore, IBlobWriter, IStagedBlob

# A literal announcement at the end of a line: ~{123}, {123} or {123+} / {123-}.
_LITERAL_AT_END = re.compile(rb"(~?)\{(\d{1,20})([+-]?)\}$")

#: Octets of a streamed literal taken from the input at a time (CommandReader.room).
STREAM_CHUNK = 64 * 1024
#: Octets a streamed literal's blob writer may hold in memory before the session stops
#: reading its input (the writer's pool is behind).
STREAM_BACKLOG = 1024 * 1024


class StreamedLiteral:
    """A literal that went to a blob writer as it arrived: APPEND's message.

    Its command owns it: :meth:`stage` hands the content over to whoever files it;
    otherwise :meth:`discard` (the reader's or the session's, when the command is
    refused, fails or never completes) throws its temporary blob away."""

    def __init__(self, writer: IBlobWriter, size: int) -> None:
        self.writer = writer
        self.size = size
        self._settled = False       # staged or discarded

    def stage(self) -> Deferred[IStagedBlob]:
        """The content, staged: the caller commits or discards it from now on."""
        if self._settled:
            raise RuntimeError("a streamed literal is staged or discarded only once")
        self._settled = True
        return self.writer.stage()

    def discard(self) -> None:
        """Drop the content unless it was staged (then a no-op)."""
        if not self._settled:
            self._settled = True
            self.writer.abort()

    def __repr__(self) -> str:
        return f"StreamedLiteral({self.size} octets)"


# A command's pieces: text, literal, text, literal, ..., text.
Part = Union[bytes, StreamedLiteral]


@dataclass
class Command:
    tag: str
    name: str                          # upper-case; "UID FETCH" for UID commands
    args: list[Any] = field(default_factory=list)
    raw_size: int = 0


class LiteralTooBig(Exception):
    def __init__(self, size: int, sync: bool, first_line: bytes) -> None:
        super().__init__(size)
        self.size = size
        self.sync = sync
        self.first_line = first_line      # to find the command's tag


class LineTooLong(Exception):
    pass


class CommandReader:
    """Collects one command's pieces from the connection's input.

    The session appends its input to :attr:`buffer`; :meth:`next` says what to do
    next: ``("command", parts)`` when a command is complete, ``("continue", size)``
    when a synchronising literal needs the ``+`` go-ahead, ``("wait", None)`` until
    more input comes.

    Once :meth:`stream_appends` gave it a blob store, APPEND's message literal is
    written to a blob writer of that store as it arrives (:class:`StreamedLiteral`).
    The reader owns the streamed literals of a command until it returns the command;
    those of a command it drops (too long, connection lost: :meth:`reset`) it
    discards.
    """

    def __init__(self, max_line: int, max_literal: int, max_command: int) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_command = max_command
        self.buffer = b""
        self.parts: list[Part] = []     # text, literal, text, literal, ..., text
        self.size = 0
        self.literal_left = 0
        self.discard_left = 0            # octets of a refused non-sync literal to drop
        self.skip_line = False           # then the rest of that command's line
        self.blobs: Optional[IBlobStore] = None     # where APPEND's message goes
        self.streaming: Optional[StreamedLiteral] = None   # the literal being streamed

    def stream_appends(self, blobs: IBlobStore) -> None:
        """From now on (the session logged in), APPEND's message literal goes to a
        writer of ``blobs`` as it arrives."""
        self.blobs = blobs

    def reset(self) -> None:
        """Forget the command being read; its streamed literals are thrown away."""
        for part in self.parts:
            if isinstance(part, StreamedLiteral):
                part.discard()
        if self.streaming is not None:
            self.streaming.discard()
        self.parts, self.size, self.literal_left, self.streaming = [], 0, 0, None

    def room(self) -> int:
        """How many more octets the buffer needs before :meth:`next` or
        :meth:`take_line` can act: the rest of the literal being read, else one line
        at its longest (a longer one is refused); for a streamed literal one chunk,
        or none while its blob writer is behind (:meth:`behind`).  Compressed input
        is inflated only this far at a time."""
        if self.streaming is not None:
            if self.behind():
                return 0
            want = min(self.literal_left, STREAM_CHUNK)
        else:
            want = self.literal_left if self.literal_left else self.max_line + 2
        return want - len(self.buffer)

    def behind(self) -> bool:
        """Whether the blob writer of the literal being streamed holds more than
        STREAM_BACKLOG octets: the session reads no more input until it has caught
        up (:meth:`caught_up`)."""
        streaming = self.streaming
        return streaming is not None and streaming.writer.backlog() > STREAM_BACKLOG

    def caught_up(self) -> Deferred[None]:
        """Fires once the writer of the literal being streamed holds nothing."""
        if self.streaming is None:
            return succeed(None)
        return self.streaming.writer.drained()

    def take_line(self) -> Optional[bytes]:
        """A raw line (without CRLF) for SASL responses and IDLE's DONE."""
        if self._skipping():
            return None
        end = self.buffer.find(b"\n")
        if end < 0:
            if len(self.buffer) > self.max_line:
                self._refuse_line()
            return None
        line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
        return line.rstrip(b"\r")

    def _skipping(self) -> bool:
        """Drop the rest of a refused line; True while its end has not come yet."""
        if not self.skip_line:
            return False
        end = self.buffer.find(b"\n")
        if end < 0:
            self.buffer = b""
            return True
        self.buffer, self.skip_line = self.buffer[end + 1:], False
        return False

    def _refuse_line(self) -> None:
        """A line over the limit with no end in sight: drop it up to its end, which
        is not the start of another command."""
        self.buffer = b""
        self.skip_line = True
        self.reset()
        raise LineTooLong()

    def next(self) -> tuple[str, Any]:
        """Advance with what is buffered: ("command", parts), ("continue", size),
        ("wait", None), or raises LineTooLong / LiteralTooBig."""
        while True:
            if self.discard_left:
                dropped = min(self.discard_left, len(self.buffer))
                self.buffer, self.discard_left = self.buffer[dropped:], self.discard_left - dropped
                if self.discard_left:
                    return "wait", None
            if self._skipping():
                return "wait", None
            if self.streaming is not None:
                if not self._stream():
                    return "wait", None
                continue
            if self.literal_left:
                if len(self.buffer) < self.literal_left:
                    return "wait", None
                self.parts.append(self.buffer[:self.literal_left])
                self.buffer = self.buffer[self.literal_left:]
                self.literal_left = 0
                continue
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > self.max_line:
                    self._refuse_line()
                return "wait", None
            line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
            line = line.rstrip(b"\r")
            if len(line) > self.max_line:
                self.reset()
                raise LineTooLong()
            self.size += len(line)
            match = _LITERAL_AT_END.search(line)
            if match is None:
                self.parts.append(line)
                parts, self.parts = self.parts, []    # the caller's now
                self.reset()
                return "command", parts
            size = int(match.group(2))
            sync = match.group(3) != b"+"
            if size > self.max_literal or self.size + size > self.max_command:
                first = self.parts[0] if self.parts else line
                assert isinstance(first, bytes)
                self.reset()
                if not sync:
                    # RFC 7888 §4: the octets come anyway; drop them and the rest
                    # of the command, then answer.
                    self.discard_left, self.skip_line = size, True
                raise LiteralTooBig(size, sync, first)
            self.size += size
            self.parts.append(line)
            self.literal_left = size
            if not size:
                # {0}: the literal is complete already; it still takes its place among
                # the parts (text, literal, text...), or the rest would be misread.
                self.parts.append(b"")
            elif self.blobs is not None and _is_append_message(self.parts):
                self.streaming = StreamedLiteral(self.blobs.writer(), size)
            if sync:
                return "continue", size

    def _stream(self) -> bool:
        """Hand what is buffered of the streamed literal to its writer; True when the
        literal is complete (it is then a part of the command)."""
        streaming = self.streaming
        assert streaming is not None
        if len(self.buffer) <= self.literal_left:       # the usual case: no copy
            taken, self.buffer = self.buffer, b""
        else:
            taken = self.buffer[:self.literal_left]
            self.buffer = self.buffer[self.literal_left:]
        if taken:
            self.literal_left -= len(taken)
            streaming.writer.write(taken)
        if self.literal_left:
            return False
        self.parts.append(streaming)
        self.streaming = None
        return True


class Inflater:
    """COMPRESS=DEFLATE input: raw DEFLATE (RFC 4978 §3), inflated on demand.

    The compressed octets wait here and :meth:`inflate` hands out at most as many
    inflated octets as asked for, so the session never holds more of a deflate bomb
    than its line and literal limits allow (``CommandReader.room``)."""

    STEP = 64 * 1024     # compressed octets given to zlib at a time

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(-15)
        self._input = bytearray()
        self._tail = b""         # what zlib left unconsumed, to give it again

    def feed(self, data: bytes) -> None:
        self._input += data

    def pending(self) -> int:
        """Compressed octets not inflated yet."""
        return len(self._input) + len(self._tail)

    def inflate(self, limit: int) -> bytes:
        """Up to ``limit`` inflated octets, b"" when none are ready (or ``limit`` is
        not positive); zlib.error on corrupt input."""
        out: list[bytes] = []
        while limit > 0:      # never 0 here: zlib takes a max_length of 0 as "no limit"
            if self._zlib.eof and (self._tail or self._input or self._zlib.unused_data):
                # A final block ended the stream, which RFC 4978 never does; zlib
                # would hand what follows back unread at every call, for ever.
                raise zlib.error("data after the end of the compressed stream")
            if not self._tail and self._input:
                # zlib copies its unconsumed tail at every call: keep that short.
                self._tail = bytes(self._input[:self.STEP])
                del self._input[:self.STEP]
            chunk = self._zlib.decompress(self._tail, limit)
            self._tail = self._zlib.unconsumed_tail
            if not chunk and not self._tail and not self._input:
                break
            out.append(chunk)
            limit -= len(chunk)
        return b"".join(out)


def _is_append_message(parts: list[Part]) -> bool:
    """Whether the literal announced at the end of the last of ``parts`` (the
    command so far) is APPEND's message: the command is APPEND (its name is the
    second word of the first line) and the literal is not its first argument, the
    mailbox name.  The message is the only other literal APPEND has, with or
    without RFC 6855's ``UTF8 (~{n})`` around it (LightMail has no MULTIAPPEND or
    CATENATE); any further one makes the command BAD, and it is streamed and
    dropped all the same."""
    first = parts[0]
    assert isinstance(first, bytes)
    words = first.split(None, 2)
    if len(words) < 2 or words[1].upper() != b"APPEND":
        return False
    if len(parts) > 1:
        return True             # a literal came before: the mailbox name
    rest = words[2] if len(words) > 2 else b""
    match = _LITERAL_AT_END.search(rest)
    assert match is not None
    return bool(rest[:match.start()].strip())


def streamed_literals(parts: list[Part]) -> list[StreamedLiteral]:
    return [part for part in parts if isinstance(part, StreamedLiteral)]


def tag_of(parts: list[Part]) -> str:
    """The tag of a command, as well as can be told (for BAD replies)."""
    first = parts[0] if parts else b""
    assert isinstance(first, bytes)
    tag = first.split(b" ", 1)[0].decode("ascii", "replace")
    return tag if tag and _valid_tag(tag) else "*"


# tag = 1*<any ASTRING-CHAR except "+"> (RFC 9051 §9): printable ASCII but for the
# atom-specials and "+".
_TAG = re.compile(r'[^\x00-\x20\x7f-\U0010ffff(){%*"\\+]+')


def _valid_tag(tag: str) -> bool:
    return _TAG.fullmatch(tag) is not None


def parse_command(parts: list[Part]) -> Command:
    """Tag, command name and argument tokens of a complete command."""
    tokens = tokenize(parts)
    if not tokens or not isinstance(tokens[0], Atom) or not _valid_tag(tokens[0]):
        raise ParseError("Missing or invalid tag")
    if len(tokens) < 2 or not isinstance(tokens[1], Atom):
        raise ParseError("Missing command")
    name = tokens[1].upper()
    args = tokens[2:]
    if name == "UID":
        if not args or not isinstance(args[0], Atom):
            raise ParseError("UID needs a command")
        name = "UID " + args[0].upper()
        args = args[1:]
    size = sum(p.size if isinstance(p, StreamedLiteral) else len(p) for p in parts)
    return Command(str(tokens[0]), name, args, size)


def tokenize(parts: list[Part]) -> list[Any]:
    """Tokens of a command; literals come from the odd-numbered parts."""
    top: list[Any] = []
    stack: list[list[Any]] = [top]
    for index in range(0, len(parts), 2):
        text = parts[index]
        assert isinstance(text, bytes)
        literal = parts[index + 1] if index + 1 < len(parts) else None
        if literal is not None:
            match = _LITERAL_AT_END.search(text)
            assert match is not None
            text = text[:match.start()]
        _tokenize_text(text, stack)
        if literal is not None:
            if text and not text.endswith((b" ", b"(")):
                raise ParseError("A literal must follow a space or an opening parenthesis")
            stack[-1].append(literal)
    if len(stack) != 1:
        raise ParseError("Unbalanced parentheses")
    return top


def _tokenize_text(text: bytes, stack: list[list[Any]]) -> None:
    position, end = 0, len(text)
    expect_space = False
    while position < end:
        char = text[position:position + 1]
        if char == b" ":
            position += 1
            expect_space = False
            continue
        if char == b")":
            if len(stack) == 1:
                raise ParseError("Unexpected ')'")
            stack.pop()
            position += 1
            expect_space = True
            continue
        if expect_space:
            raise ParseError("Missing space between arguments")
        if char == b"(":
            new: list[Any] = []
            stack[-1].append(new)
            stack.append(new)
            position += 1
            continue
        if char == b'"':
            value, position = _quoted(text, position)
            stack[-1].append(value)
            expect_space = True
            continue
        atom, position = _atom(text, position)
        stack[-1].append(Atom(atom))
        expect_space = True


def _quoted(text: bytes, position: int) -> tuple[str, int]:
    out = bytearray()
    position += 1
    while position < len(text):
        char = text[position]
        if char == 0x5C:                # backslash: quotes only " and \
            if position + 1 >= len(text) or text[position + 1] not in b'"\\':
                raise ParseError("Invalid escape in quoted string")
            out.append(text[position + 1])
            position += 2
            continue
        if char == 0x22:
            try:
                return out.decode("utf-8"), position + 1
            except UnicodeDecodeError:
                raise ParseError("Quoted string is not UTF-8") from None
        out.append(char)
        position += 1
    raise ParseError("Unterminated quoted string")


# The fetch attributes after which ``[`` opens a section (RFC 9051 §9: section,
# section-binary).  Anywhere else ``[`` is an ATOM-CHAR, and ``]`` an ASTRING-CHAR,
# as in a mailbox named ``a[b`` or ``x]``.
_SECTION_OWNERS = frozenset({b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.PEEK",
                             b"BINARY.SIZE"})


def _atom(text: bytes, position: int) -> tuple[str, int]:
    """An atom; a ``[...]`` section (which may hold spaces, lists and quoted field
    names) and a ``<...>`` partial stay inside it, as in BODY[HEADER.FIELDS (A B)]<0.9>."""
    start = position
    depth = 0
    while position < len(text):
        char = text[position:position + 1]
        if depth:
            if char == b'"':
                _, position = _quoted(text, position)
                continue
            if char == b"]":
                depth -= 1
        elif char in (b" ", b"(", b")"):
            break
        elif char == b"[" and text[start:position].upper() in _SECTION_OWNERS:
            depth += 1
        elif char in (b'"', b"{") or text[position] < 0x20 or text[position] == 0x7F:
            raise ParseError("Invalid character in atom")
        position += 1
    if depth:
        raise ParseError("Unterminated '['")
    try:
        return text[start:position].decode("utf-8"), position
    except UnicodeDecodeError:
        raise ParseError("Atom is not UTF-8") from None
