"""Reading IMAP commands: lines, literals and the tokens of the arguments.

RFC 9051 §2.2 and §4: a command is a line that may be interrupted by literals.  A line
ending in ``{n}`` (synchronising: the server says ``+`` first), ``{n+}`` (LITERAL+,
RFC 7888) or ``~{n}`` (a binary literal, RFC 3516) is followed by ``n`` raw octets and
then the rest of the command.  :class:`CommandReader` collects those pieces with the
limits enforced before any octet is buffered; :func:`tokenize` turns them into the
values described in ``tokens.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from lightmail.imap.tokens import Atom, ParseError

# A literal announcement at the end of a line: ~{123}, {123} or {123+} / {123-}.
_LITERAL_AT_END = re.compile(rb"(~?)\{(\d{1,20})([+-]?)\}$")


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

    Feed it bytes with :meth:`feed`; it returns what the session must do next:
    ``("command", parts)`` when a command is complete, ``("continue", None)`` when a
    synchronising literal needs the ``+`` go-ahead, or nothing while it waits.
    """

    def __init__(self, max_line: int, max_literal: int, max_command: int) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_command = max_command
        self.buffer = b""
        self.parts: list[bytes] = []    # text, literal, text, literal, ..., text
        self.size = 0
        self.literal_left = 0
        self.discard_left = 0            # octets of a refused non-sync literal to drop
        self.skip_line = False           # then the rest of that command's line

    def reset(self) -> None:
        self.parts, self.size, self.literal_left = [], 0, 0

    def take_line(self) -> Optional[bytes]:
        """A raw line (without CRLF) for SASL responses and IDLE's DONE."""
        end = self.buffer.find(b"\n")
        if end < 0:
            if len(self.buffer) > self.max_line:
                self.buffer = b""
                raise LineTooLong()
            return None
        line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
        return line.rstrip(b"\r")

    def next(self) -> tuple[str, Any]:
        """Advance with what is buffered: ("command", parts), ("continue", size),
        ("wait", None), or raises LineTooLong / LiteralTooBig."""
        while True:
            if self.discard_left:
                dropped = min(self.discard_left, len(self.buffer))
                self.buffer, self.discard_left = self.buffer[dropped:], self.discard_left - dropped
                if self.discard_left:
                    return "wait", None
            if self.skip_line:
                end = self.buffer.find(b"\n")
                if end < 0:
                    self.buffer = b""
                    return "wait", None
                self.buffer, self.skip_line = self.buffer[end + 1:], False
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
                    self.buffer = b""
                    self.reset()
                    raise LineTooLong()
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
                parts = self.parts
                self.reset()
                return "command", parts
            size = int(match.group(2))
            sync = match.group(3) != b"+"
            if size > self.max_literal or self.size + size > self.max_command:
                first = self.parts[0] if self.parts else line
                self.reset()
                if not sync:
                    # RFC 7888 §4: the octets come anyway; drop them and the rest
                    # of the command, then answer.
                    self.discard_left, self.skip_line = size, True
                raise LiteralTooBig(size, sync, first)
            self.size += size
            self.parts.append(line)
            self.literal_left = size
            if sync:
                return "continue", size


def tag_of(parts: list[bytes]) -> str:
    """The tag of a command, as well as can be told (for BAD replies)."""
    first = parts[0] if parts else b""
    tag = first.split(b" ", 1)[0].decode("ascii", "replace")
    return tag if tag and _valid_tag(tag) else "*"


def _valid_tag(tag: str) -> bool:
    return all(0x20 < ord(ch) < 0x7f and ch not in '(){%*"\\+' for ch in tag)


def parse_command(parts: list[bytes]) -> Command:
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
    return Command(str(tokens[0]), name, args, sum(len(p) for p in parts))


def tokenize(parts: list[bytes]) -> list[Any]:
    """Tokens of a command; literals come from the odd-numbered parts."""
    top: list[Any] = []
    stack: list[list[Any]] = [top]
    for index in range(0, len(parts), 2):
        text = parts[index]
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
        elif char == b"[":
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
