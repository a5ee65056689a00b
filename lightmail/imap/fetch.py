"""FETCH data items (RFC 9051 §6.4.5, RFC 3516 BINARY, RFC 7162 MODSEQ): what the
client asked for, and the response for one message.

Parsing is separate from answering so that the session knows before it reads anything
whether a message's content is needed at all (FLAGS and UID come from the index) and
whether the fetch sets \\Seen.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from lightmail.imap.message import (
    ParsedMessage,
    Section,
    UnknownCTE,
    format_section,
    parse_section,
)
from lightmail.imap.sequence import MAX_NUMBER
from lightmail.imap.tokens import Atom, ParseError, literal, plist

# Items answered from the index alone.
_SIMPLE = {"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"}
_CONTENT = {"ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_SECTIONED = re.compile(
    r"^(BODY|BODY\.PEEK|BINARY|BINARY\.PEEK|BINARY\.SIZE)\[(.*)\](?:<(\d+)\.(\d+)>)?$",
    re.IGNORECASE | re.DOTALL | re.ASCII)


@dataclass(frozen=True)
class FetchItem:
    name: str                          # UID, FLAGS, ..., BODY[], BINARY[], BINARY.SIZE[]
    section: Optional[Section] = None
    peek: bool = False
    partial: Optional[tuple[int, int]] = None
    binary_part: tuple[int, ...] = ()

    @property
    def needs_content(self) -> bool:
        return self.name not in _SIMPLE

    @property
    def sets_seen(self) -> bool:
        return (self.name in ("BODY[]", "BINARY[]") and not self.peek) or \
            self.name in ("RFC822", "RFC822.TEXT")


def parse_fetch_items(arg: Any) -> list[FetchItem]:
    """The data items of a FETCH: a macro, one item, or a parenthesised list."""
    if isinstance(arg, Atom) and arg.upper() in MACROS:
        return [FetchItem(name) for name in MACROS[arg.upper()]]
    values = arg if isinstance(arg, list) else [arg]
    if not values:
        raise ParseError("FETCH needs data items")
    items = []
    for value in values:
        if not isinstance(value, Atom):
            raise ParseError("FETCH data items are atoms")
        items.append(_parse_item(str(value)))
    return items


def _parse_item(text: str) -> FetchItem:
    upper = text.upper()
    if upper in _SIMPLE or upper in _CONTENT:
        return FetchItem(upper)
    match = _SECTIONED.match(text)
    if match is None:
        raise ParseError(f"unknown FETCH data item {text[:40]!r}")
    kind = match.group(1).upper()
    partial = None
    if match.group(3) is not None:
        if kind == "BINARY.SIZE":
            raise ParseError("BINARY.SIZE takes no partial")
        if any(len(match.group(i).lstrip("0")) > 10 for i in (3, 4)):
            raise ParseError("partial offset or length out of range")
        partial = (int(match.group(3)), int(match.group(4)))
        if max(partial) > MAX_NUMBER:
            raise ParseError("partial offset or length out of range")
        if partial[1] == 0:
            raise ParseError("a partial fetch needs a non-zero length")
    if kind.startswith("BINARY"):
        inner = match.group(2)
        if inner and not re.match(r"^[1-9]\d{0,9}(\.[1-9]\d{0,9})*$", inner, re.ASCII):
            raise ParseError("BINARY takes a part number only")
        part = tuple(int(p) for p in inner.split(".")) if inner else ()
        name = "BINARY.SIZE[]" if kind == "BINARY.SIZE" else "BINARY[]"
        return FetchItem(name, None, kind == "BINARY.PEEK", partial, part)
    return FetchItem("BODY[]", parse_section(match.group(2)), kind == "BODY.PEEK", partial)


def needs_content(items: list[FetchItem]) -> bool:
    return any(item.needs_content for item in items)


_HEADER_SECTIONS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT")


def header_only(items: list[FetchItem]) -> bool:
    """Whether the items need no more of a message than its top-level header block
    (ENVELOPE, RFC822.HEADER, BODY[HEADER], BODY[HEADER.FIELDS (...)]): the block
    kept in SQL then answers them (``IMailStore.headers_for``)."""
    return all(not item.needs_content or item.name in ("ENVELOPE", "RFC822.HEADER")
               or (item.name == "BODY[]" and item.section is not None
                   and not item.section.part and item.section.text in _HEADER_SECTIONS)
               for item in items)


def sets_seen(items: list[FetchItem]) -> bool:
    return any(item.sets_seen for item in items)


def format_flags(flags: frozenset[str] | set[str]) -> bytes:
    return plist([flag.encode("utf-8") for flag in sorted(flags)])


# The system flags a mailbox keeps (RFC 9051 §2.3.2; \Recent is the session's own).
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")

# Flag lists already formatted, by the (shared, see sqlstore) frozenset and whether
# \Recent is added: a FETCH 1:* (FLAGS) formats a handful of distinct sets, not one
# list per message.
_flag_lists: tuple[dict[frozenset[str], bytes], dict[frozenset[str], bytes]] = ({}, {})
FLAG_LISTS_KEPT = 4096


def flag_list(flags: frozenset[str], recent: bool = False) -> bytes:
    """``format_flags(flags)``, with ``\\Recent`` added if ``recent``; cached."""
    cache = _flag_lists[recent]
    out = cache.get(flags)
    if out is None:
        if len(cache) >= FLAG_LISTS_KEPT:
            cache.clear()
        out = cache[flags] = format_flags(flags | {"\\Recent"} if recent else flags)
    return out


# Items answered from a message's MessageInfo alone (no content read).
META_ITEMS = frozenset({"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"})


@lru_cache(maxsize=4096)
def internal_date(ms: int) -> bytes:
    """``"17-Jul-1996 02:44:25 -0700"`` (RFC 9051 date-time), in UTC."""
    return time.strftime('"%d-%b-%Y %H:%M:%S +0000"', time.gmtime(ms / 1000)).encode()


def _partial(data: bytes, partial: Optional[tuple[int, int]]) -> bytes:
    if partial is None:
        return data
    start, length = partial
    return data[start:start + length]


@lru_cache(maxsize=256)
def _body_label(item: FetchItem) -> bytes:
    """``BODY[<section>]<<origin>> `` of a FETCH item: the same for every message a
    command fetches, so formatted once (an item is immutable)."""
    assert item.section is not None
    origin = b"" if item.partial is None else b"<%d>" % item.partial[0]
    return b"BODY[" + format_section(item.section).encode("utf-8") + b"]" + origin + b" "


def content_item(item: FetchItem, message: ParsedMessage) -> bytes:
    """One content item's response (name and value), e.g. ``BODY[TEXT]<0> {5}...``.
    Raises UnknownCTE for BINARY on an encoding we cannot undo."""
    if item.name == "ENVELOPE":
        return b"ENVELOPE " + message.envelope()
    if item.name == "BODYSTRUCTURE":
        return b"BODYSTRUCTURE " + message.bodystructure(True)
    if item.name == "BODY":
        return b"BODY " + message.bodystructure(False)
    if item.name == "RFC822":
        return b"RFC822 " + literal(message.raw)
    if item.name == "RFC822.HEADER":
        return b"RFC822.HEADER " + literal(message.section(Section(text="HEADER")))
    if item.name == "RFC822.TEXT":
        return b"RFC822.TEXT " + literal(message.section(Section(text="TEXT")))
    if item.name == "BODY[]":
        assert item.section is not None
        data = _partial(message.section(item.section), item.partial)
        return _body_label(item) + literal(data)
    origin = b"" if item.partial is None else b"<%d>" % item.partial[0]
    part = ".".join(str(n) for n in item.binary_part).encode()
    decoded = message.binary(item.binary_part)
    if item.name == "BINARY.SIZE[]":
        return b"BINARY.SIZE[" + part + b"] %d" % len(decoded)
    data = _partial(decoded, item.partial)
    # RFC 3516 §4.3: binary content goes as a literal8 when it holds NUL.
    value = (b"~" + literal(data)) if b"\0" in data else literal(data)
    return b"BINARY[" + part + b"]" + origin + b" " + value


__all__ = ["FetchItem", "UnknownCTE", "content_item", "format_flags", "header_only",
           "internal_date", "needs_content", "parse_fetch_items", "sets_seen"]
