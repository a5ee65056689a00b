"""IMAP values on the wire: what the command parser produces and how replies quote.

The parser (``parser.py``) turns a command's arguments into Python values:

* :class:`Atom` -- an unquoted atom (``FLAGS``, ``1:*``, ``NIL``, ``\\Seen``,
  ``BODY.PEEK[HEADER.FIELDS (FROM)]<0.100>``; a section in brackets stays in the atom);
* ``str`` -- a quoted string (RFC 9051 §4.3), already unescaped;
* ``bytes`` -- a literal (``{n}`` or ``{n+}``/``~{n}``), raw octets;
* ``StreamedLiteral`` (``parser.py``) -- APPEND's message after login: a literal that
  went to a blob writer as it arrived, rather than into memory;
* ``list`` -- a parenthesised list of the above.

An *astring* (RFC 9051 §9) is any of Atom, str or bytes: :func:`astring` reads one.
Replies are built from Python values by :func:`quote`, :func:`nstring` and
:func:`literal`, which pick the form the value needs.
"""

from __future__ import annotations

from typing import Any, Optional, Union


class Atom(str):
    """An unquoted atom, distinct from a quoted string of the same text."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str(self)!r})"


Token = Union[Atom, str, bytes, list]


class ParseError(ValueError):
    """The command is malformed: the session answers BAD with this text."""


def astring(value: Any, what: str = "argument") -> str:
    """The text of an astring argument (atom, quoted string or literal)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError(f"{what} is not UTF-8") from None
    if isinstance(value, str):
        return str(value)
    raise ParseError(f"{what} must be a string")


def is_nil(value: Any) -> bool:
    return isinstance(value, Atom) and value.upper() == "NIL"


# Characters that force a quoted string or a literal (RFC 9051 §9 atom-specials),
# and "[": legal in an atom, but many clients take it for the start of a section or
# a response code, so names holding it are sent quoted.
_SPECIALS = set('(){ %*"\\[]') | {chr(c) for c in range(0x20)} | {"\x7f"}


def quote(text: Union[str, bytes]) -> bytes:
    """``text`` as a quoted string, or as a literal when quoting cannot carry it:
    CR, LF, NUL, or 8-bit octets in ``bytes`` (raw header values, which only a
    UTF8=ACCEPT session could take quoted).  A ``str`` with non-ASCII characters is a
    UTF-8 mailbox name or string the session already decided it may send quoted."""
    if isinstance(text, str):
        data = text.encode("utf-8")
        eight_bit = False
    else:
        data = text
        eight_bit = not data.isascii()
    if eight_bit or b"\r" in data or b"\n" in data or b"\0" in data or len(data) > 1024:
        return literal(data)
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def nstring(value: Optional[Union[str, bytes]]) -> bytes:
    """NIL for None, else a quoted string or literal."""
    return b"NIL" if value is None else quote(value)


def literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def astring_out(text: str) -> bytes:
    """A mailbox name or other astring in a reply: bare when it is a plain atom."""
    if text and not any(ch in _SPECIALS for ch in text) and text.upper() != "NIL":
        return text.encode("utf-8")
    return quote(text)


def plist(items: list[bytes]) -> bytes:
    """A parenthesised list of already-encoded items."""
    return b"(" + b" ".join(items) + b")"
