"""A raw IMAP client for conformance tests: it shows exactly what the server said.

Unlike imaplib it hides nothing: every response line is kept, literals (``{n}``,
``~{n}``) are read as the octets they announce, and a command's literals are sent
synchronising (waiting for the server's ``+``), non-synchronising (``{n+}``, LITERAL+)
or as ``literal8`` (``~{n}``, BINARY) as the test asks.  Responses are parsed into
tokens (:func:`tokens`): atoms are :class:`Atom` (a ``str``), strings are ``bytes``,
NIL is ``None`` and parenthesised lists are ``list``.  ``COMPRESS=DEFLATE`` (RFC 4978)
is supported by switching the connection to raw DEFLATE both ways.

The client is blocking and meant to run in a thread (the in-process LightMail needs
the test thread's reactor).
"""

from __future__ import annotations

import base64
import itertools
import re
import socket
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

_LITERAL_AT_END = re.compile(rb"(~?)\{(\d+)(\+?)\}$")
_CODE = re.compile(r"^\[([^\]]*)\]\s?")


class Atom(str):
    """An atom in a response (a number, a flag, a keyword, NIL is not one)."""


class WireError(AssertionError):
    """The server closed the connection or did not answer in time."""


@dataclass(frozen=True)
class Lit:
    """A literal argument: ``{n}`` (synchronising), ``{n+}`` (``plus``, LITERAL+) or
    ``~{n}`` (``binary``, RFC 3516 literal8, synchronising unless ``plus``)."""

    data: bytes
    plus: bool = False
    binary: bool = False

    def announce(self) -> str:
        return f"{'~' if self.binary else ''}{{{len(self.data)}{'+' if self.plus else ''}}}"


@dataclass
class Line:
    """One response line, literals included: ``pieces`` alternates text and literal."""

    pieces: list[bytes]

    @property
    def raw(self) -> bytes:
        """The line as sent, literals inline (without the final CRLF)."""
        out = b""
        for index, piece in enumerate(self.pieces):
            out += piece if index % 2 == 0 else b"\r\n" + piece
        return out

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")

    @property
    def first(self) -> bytes:
        return self.pieces[0].split(b" ", 1)[0]

    def tokens(self) -> list[Any]:
        return tokens(self.pieces)


@dataclass
class Untagged:
    """``* [number] KIND data``: e.g. ``* 3 EXISTS`` (number 3, kind EXISTS),
    ``* LIST (...) "/" INBOX`` (kind LIST, data the rest), ``* OK [CODE] text``."""

    line: Line
    number: Optional[int]
    kind: str
    data: list[Any]

    @property
    def text(self) -> str:
        return self.line.text

    @property
    def code(self) -> Optional[str]:
        """The response code of an untagged OK/NO/BAD/BYE/PREAUTH, without brackets."""
        if self.kind not in ("OK", "NO", "BAD", "BYE", "PREAUTH"):
            return None
        rest = self.text.split(" ", 2)[2] if self.text.count(" ") >= 2 else ""
        match = _CODE.match(rest)
        return match.group(1) if match else None

    def fetch(self) -> dict[str, Any]:
        """A FETCH response's items by upper-case name (``BODY[]``, ``FLAGS``...)."""
        assert self.kind == "FETCH", self.text
        items = self.data[0]
        assert isinstance(items, list) and len(items) % 2 == 0, self.text
        return {str(items[i]).upper(): items[i + 1] for i in range(0, len(items), 2)}


@dataclass
class Response:
    """A command's answer: the untagged lines before the tagged one, and that one."""

    tag: str
    status: str                       # OK, NO or BAD ("" if the connection closed)
    text: str                         # the tagged line after the status
    untagged: list[Untagged] = field(default_factory=list)
    continuations: list[str] = field(default_factory=list)

    @property
    def code(self) -> Optional[str]:
        match = _CODE.match(self.text)
        return match.group(1) if match else None

    def of(self, kind: str) -> list[Untagged]:
        """The untagged responses of one kind (EXISTS, FETCH, LIST, OK...)."""
        return [u for u in self.untagged if u.kind == kind.upper()]

    def one(self, kind: str) -> Untagged:
        found = self.of(kind)
        assert len(found) == 1, f"expected one {kind}, got {[u.text for u in self.untagged]}"
        return found[0]

    def codes(self) -> list[str]:
        """Response codes of the untagged OK/NO/BAD lines."""
        return [u.code for u in self.untagged if u.code is not None]

    def code_value(self, name: str) -> Optional[str]:
        """The argument of a response code (tagged or untagged), e.g. UIDNEXT -> "4"."""
        for code in [self.code or ""] + self.codes():
            word, _, value = code.partition(" ")
            if word.upper() == name.upper():
                return value
        return None

    def fetches(self) -> dict[int, dict[str, Any]]:
        """FETCH responses by message number (items of several merged)."""
        out: dict[int, dict[str, Any]] = {}
        for u in self.of("FETCH"):
            assert u.number is not None
            out.setdefault(u.number, {}).update(u.fetch())
        return out

    def __str__(self) -> str:
        lines = [u.text for u in self.untagged] + [f"{self.tag} {self.status} {self.text}"]
        return "\n".join(lines)

    def ok(self) -> Response:
        assert self.status == "OK", str(self)
        return self


class Client:
    """One IMAP connection."""

    _tags = itertools.count(1)

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0,
                 source: Optional[str] = None) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout,
            source_address=(source, 0) if source else None)
        self.buffer = b""
        self.inflate: Any = None
        self.deflate: Any = None
        self.closed = False
        self.sent: list[bytes] = []     # what was sent, for failure messages
        greeting = self.read_line()
        self.greeting = self.untagged_of(greeting)

    # -- low level ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        if self.deflate is not None:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise WireError(f"no answer in time; sent {self.sent[-3:]!r}") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            raise WireError("connection closed by the server")
        if self.inflate is not None:
            chunk = self.inflate.decompress(chunk)
        self.buffer += chunk

    def _read_raw_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_line(self) -> Line:
        """One response line, with the literals it announces."""
        pieces = []
        while True:
            text = self._read_raw_line()
            pieces.append(text)
            match = _LITERAL_AT_END.search(text)
            if match is None or text.startswith(b"+ "):
                return Line(pieces)
            pieces.append(self._read_exact(int(match.group(2))))

    def pending(self, wait: float) -> bool:
        """Whether something arrives within ``wait`` seconds."""
        if self.buffer:
            return True
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return False
        finally:
            self.sock.settimeout(10.0)
        if not chunk:
            self.closed = True
            return True
        if self.inflate is not None:
            chunk = self.inflate.decompress(chunk)
        self.buffer += chunk
        return bool(self.buffer) or self.closed

    @staticmethod
    def untagged_of(line: Line) -> Untagged:
        toks = line.tokens()
        assert toks and toks[0] == "*", line.text
        number = None
        rest = toks[1:]
        if rest and isinstance(rest[0], Atom) and rest[0].isdigit():
            number = int(rest[0])
            rest = rest[1:]
        kind = str(rest[0]).upper() if rest else ""
        return Untagged(line, number, kind, rest[1:])

    # -- commands -----------------------------------------------------------------

    def next_tag(self) -> str:
        return f"t{next(self._tags)}"

    def read_until(self, tag: str, response: Optional[Response] = None) -> Response:
        """Read responses up to and including the tagged one for ``tag``."""
        response = response or Response(tag, "", "")
        while True:
            try:
                line = self.read_line()
            except WireError:
                if self.closed:
                    response.status, response.text = "", "<connection closed>"
                    return response
                raise
            if line.pieces[0].startswith(b"* "):
                response.untagged.append(self.untagged_of(line))
            elif line.pieces[0].startswith(b"+"):
                response.continuations.append(line.text)
            else:
                word, _, rest = line.text.partition(" ")
                status, _, text = rest.partition(" ")
                if word == tag:
                    response.status, response.text = status.upper(), text
                    return response
                raise AssertionError(f"unexpected tagged line {line.text!r} (waiting for "
                                     f"{tag})")

    def cmd(self, *parts: Union[str, Lit], tag: Optional[str] = None) -> Response:
        """Send a command (its pieces joined by spaces, literals as announced) and read
        its answer.  A synchronising literal is sent only after the server's ``+``;
        a tagged answer instead (a refusal) ends the command there."""
        tag = tag or self.next_tag()
        response = Response(tag, "", "")
        line = tag
        for part in parts:
            if isinstance(part, Lit):
                line = _join(line, part.announce())
                self.send(line.encode() + b"\r\n")
                if not part.plus:
                    if not self._await_continuation(tag, response):
                        return response
                self.send(part.data)
                line = ""
            else:
                line = _join(line, part)
        self.send(line.encode() + b"\r\n")
        return self.read_until(tag, response)

    def _await_continuation(self, tag: str, response: Response) -> bool:
        while True:
            line = self.read_line()
            if line.pieces[0].startswith(b"+"):
                response.continuations.append(line.text)
                return True
            if line.pieces[0].startswith(b"* "):
                response.untagged.append(self.untagged_of(line))
                continue
            word, _, rest = line.text.partition(" ")
            status, _, text = rest.partition(" ")
            assert word == tag, line.text
            response.status, response.text = status.upper(), text
            return False

    def raw(self, data: bytes, tag: str) -> Response:
        """Send bytes as they are and read until ``tag``'s tagged line."""
        self.send(data)
        return self.read_until(tag)

    # -- conveniences ---------------------------------------------------------------

    def login(self, user: str, password: str) -> Response:
        return self.cmd("LOGIN", quote(user), quote(password)).ok()

    def capabilities(self) -> set[str]:
        found = self.cmd("CAPABILITY").ok().one("CAPABILITY")
        return {str(c).upper() for c in found.data}

    def select(self, mailbox: str = "INBOX", *params: str) -> Response:
        return self.cmd("SELECT", quote(mailbox), *params).ok()

    def append(self, mailbox: str, message: bytes, flags: str = "",
               date: str = "") -> Response:
        parts: list[Union[str, Lit]] = ["APPEND", quote(mailbox)]
        if flags:
            parts.append(f"({flags})")
        if date:
            parts.append(f'"{date}"')
        parts.append(Lit(message, plus=True))
        return self.cmd(*parts).ok()

    def idle(self) -> str:
        """Start IDLE; returns its tag once the server said ``+``."""
        tag = self.next_tag()
        self.send(f"{tag} IDLE\r\n".encode())
        response = Response(tag, "", "")
        assert self._await_continuation(tag, response), str(response)
        self.idle_before = response.untagged
        return tag

    def wait_for(self, predicate: Callable[[Untagged], bool],
                 timeout: float = 10.0) -> list[Untagged]:
        """Read untagged responses (while idling) until one matches."""
        seen: list[Untagged] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pending(min(0.5, max(0.01, deadline - time.monotonic()))):
                continue
            line = self.read_line()
            untagged = self.untagged_of(line)
            seen.append(untagged)
            if predicate(untagged):
                return seen
        raise AssertionError(f"nothing matched in {timeout}s; got {[u.text for u in seen]}")

    def done(self, tag: str) -> Response:
        self.send(b"DONE\r\n")
        return self.read_until(tag)

    def compress(self) -> Response:
        response = self.cmd("COMPRESS", "DEFLATE")
        if response.status == "OK":
            # RFC 4978 §3: raw DEFLATE from the octet after the tagged OK's CRLF.
            self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
            self.inflate = zlib.decompressobj(-15)
            if self.buffer:
                self.buffer = self.inflate.decompress(self.buffer)
        return response

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _join(line: str, piece: str) -> str:
    if not line or not piece or line.endswith("(") or piece.startswith(")"):
        return line + piece
    return line + " " + piece


def quote(text: str) -> str:
    """An IMAP quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plain(user: str, password: str) -> str:
    """A SASL PLAIN initial response (RFC 4616), base64."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# -- response tokens ------------------------------------------------------------------


def tokens(pieces: list[bytes]) -> list[Any]:
    """Tokens of a response line (``pieces`` alternate text and literal octets)."""
    top: list[Any] = []
    stack = [top]
    for index in range(0, len(pieces), 2):
        text = pieces[index]
        literal = pieces[index + 1] if index + 1 < len(pieces) else None
        if literal is not None:
            match = _LITERAL_AT_END.search(text)
            assert match is not None
            text = text[:match.start()]
        _scan(text, stack)
        if literal is not None:
            stack[-1].append(literal)
    return top


# FETCH items after which "[" opens a section; elsewhere it is part of an atom.
_SECTIONED = {b"BODY", b"BINARY", b"BINARY.SIZE"}


def _scan(text: bytes, stack: list[list[Any]]) -> None:
    position = 0
    while position < len(text):
        char = text[position:position + 1]
        if char == b" ":
            position += 1
        elif char == b"(":
            new: list[Any] = []
            stack[-1].append(new)
            stack.append(new)
            position += 1
        elif char == b")":
            if len(stack) > 1:
                stack.pop()
            position += 1
        elif char == b'"':
            out = bytearray()
            position += 1
            while position < len(text) and text[position:position + 1] != b'"':
                if text[position:position + 1] == b"\\":
                    position += 1
                out += text[position:position + 1]
                position += 1
            stack[-1].append(bytes(out))
            position += 1
        elif char == b"[" and len(stack) == 1 and stack[-1] and stack[-1][-1] in (
                "OK", "NO", "BAD", "BYE", "PREAUTH"):
            # A response code: kept as one atom with its brackets.
            end = text.find(b"]", position)
            end = len(text) - 1 if end < 0 else end
            stack[-1].append(Atom(text[position:end + 1].decode("utf-8", "replace")))
            position = end + 1
        else:
            start = position
            depth = 0
            while position < len(text):
                c = text[position:position + 1]
                if c == b"[" and (depth or text[start:position].upper() in _SECTIONED):
                    depth += 1
                elif c == b"]" and depth:
                    depth -= 1
                elif depth == 0 and c in (b" ", b"(", b")"):
                    break
                position += 1
            word = text[start:position].decode("utf-8", "replace")
            stack[-1].append(None if word.upper() == "NIL" else Atom(word))


def flags_of(value: Iterable[Any]) -> set[str]:
    """A FLAGS list as a set of case-folded names (flags are case-insensitive)."""
    return {str(flag).lower() for flag in value}


def seq_expand(text: str) -> list[int]:
    """``1:3,7`` -> [1, 2, 3, 7] (no ``*``)."""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        a, b = int(low), int(high or low)
        out.extend(range(min(a, b), max(a, b) + 1))
    return out
