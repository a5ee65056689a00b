"""SEARCH keys: parsing the criteria and matching them against messages.

The grammar is RFC 9051 §6.4.4 (IMAP4rev2) with the IMAP4rev1 keys RFC 9051 dropped
(RFC 3501 §6.4.4: NEW, OLD, RECENT, UNKEYWORD ...), plus:

* ``MODSEQ ["/flags/x" priv|shared|all] n`` -- CONDSTORE (RFC 7162 §3.1.5);
* ``$`` as a sequence set -- the saved result of SEARCHRES (RFC 5182 §2.1);
* ``OLDER n`` / ``YOUNGER n`` -- WITHIN (RFC 5032 §3);
* ``CHARSET`` -- UTF-8 and US-ASCII (RFC 9051 §6.4.4); in a UTF8=ACCEPT session any
  other charset is a BAD command (RFC 6855 §3).

:func:`parse_search` turns the command's arguments (as ``tokens.py`` describes them)
into a tree of small immutable :class:`Key` objects.  :func:`matches` tests one
message; the first call with a given :class:`SearchContext` compiles the tree into
closures with everything that does not depend on the message worked out once
(sequence sets resolved, date bounds in milliseconds), so flag and UID searches over a
large mailbox do no per-message parsing.

String keys match case-insensitively as substrings (Unicode casefold), with runs of
white space counted as one space, against the header values (unfolded and RFC 2047
decoded) or the decoded text of the body parts (``message.py``).  Header keys first
look for the needle in the raw header block (:func:`header_may_hold`) and parse only
the blocks that may hold it.
"""

from __future__ import annotations

import email.utils
import re
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any, ClassVar, NamedTuple, Optional, Protocol

from lightmail.imap.sequence import SequenceSet, parse_sequence_set
from lightmail.imap.tokens import Atom, ParseError, astring

CHARSETS = ("UTF-8", "US-ASCII")
MAX_NESTING = 64            # NOT/OR/parentheses deep enough for any real client
MAX_NUMBER64 = 2**63 - 1    # RFC 9051 §9 number64; RFC 7162 §7 mod-sequence-value


class BadCharset(Exception):
    """The CHARSET is not one we search in (the session answers NO [BADCHARSET])."""


class MessageContent(Protocol):
    """What matching needs of a parsed message (``message.ParsedMessage``)."""

    def head_octets(self) -> bytes: ...

    def header(self, name: str) -> list[str]: ...

    def addresses(self, name: str) -> list[tuple[str, str, str]]: ...

    def header_text(self) -> str: ...

    def body_text(self) -> str: ...

    def date(self) -> Optional[float]: ...


class MessageView(NamedTuple):
    """The per-message facts the session already has without reading the message.

    A named tuple: a SEARCH makes one per message it looks at or finds."""

    seq: int
    uid: int
    flags: frozenset[str]
    internal_date: int          # milliseconds since the epoch, UTC
    size: int
    modseq: int


@dataclass
class SearchContext:
    """The mailbox around one search.  Describes a single search: the compiled keys
    are kept here, so change nothing after the first :func:`matches`."""

    largest_seq: int
    largest_uid: int
    saved: Optional[list[int]] = None       # SEARCHRES result, as UIDs (RFC 5182)
    tz: tzinfo = UTC                        # whose calendar BEFORE/ON/SINCE use
    now: float = field(default_factory=time.time)   # for OLDER/YOUNGER
    _compiled: dict[int, tuple[Key, Test]] = field(
        default_factory=dict, init=False, repr=False, compare=False)


Test = Callable[[MessageView, Optional[MessageContent]], bool]


# -- keys ---------------------------------------------------------------------------

class Key:
    """A parsed search key; ``compile`` gives the predicate for one search."""

    __slots__ = ()
    reads_content: ClassVar[bool] = False
    reads_body: ClassVar[bool] = False      # more than the header (BODY, TEXT)

    def compile(self, ctx: SearchContext) -> Test:
        raise NotImplementedError

    def children(self) -> tuple[Key, ...]:
        return ()


@dataclass(frozen=True)
class All(Key):
    def compile(self, ctx: SearchContext) -> Test:
        return lambda msg, content: True


@dataclass(frozen=True)
class And(Key):
    """A parenthesised list, or the keys of the command itself (RFC 9051 §6.4.4)."""

    keys: tuple[Key, ...]

    def children(self) -> tuple[Key, ...]:
        return self.keys

    def compile(self, ctx: SearchContext) -> Test:
        # Keys that need only the view go first: they decide most messages cheaply.
        ordered = sorted(self.keys, key=needs_content)
        tests = [key.compile(ctx) for key in ordered]
        if len(tests) == 1:
            return tests[0]

        def test(msg: MessageView, content: Optional[MessageContent]) -> bool:
            for each in tests:
                if not each(msg, content):
                    return False
            return True
        return test


@dataclass(frozen=True)
class Or(Key):
    left: Key
    right: Key

    def children(self) -> tuple[Key, ...]:
        return (self.left, self.right)

    def compile(self, ctx: SearchContext) -> Test:
        left, right = self.left.compile(ctx), self.right.compile(ctx)
        return lambda msg, content: left(msg, content) or right(msg, content)


@dataclass(frozen=True)
class Not(Key):
    key: Key

    def children(self) -> tuple[Key, ...]:
        return (self.key,)

    def compile(self, ctx: SearchContext) -> Test:
        inner = self.key.compile(ctx)
        return lambda msg, content: not inner(msg, content)


@dataclass(frozen=True)
class Flag(Key):
    """A system flag (``\\Seen``...) or ``\\Recent``, which the session adds."""

    flag: str

    def compile(self, ctx: SearchContext) -> Test:
        flag = self.flag
        return lambda msg, content: flag in msg.flags


@dataclass(frozen=True)
class Keyword(Key):
    """KEYWORD: flag names compare case-insensitively (RFC 9051 §2.3.2)."""

    name: str

    def compile(self, ctx: SearchContext) -> Test:
        name, folded = self.name, self.name.casefold()

        def test(msg: MessageView, content: Optional[MessageContent]) -> bool:
            return name in msg.flags or any(f.casefold() == folded for f in msg.flags)
        return test


@dataclass(frozen=True)
class Size(Key):
    """LARGER n (``larger``) or SMALLER n: RFC822.SIZE strictly above or below n."""

    larger: bool
    octets: int

    def compile(self, ctx: SearchContext) -> Test:
        octets = self.octets
        if self.larger:
            return lambda msg, content: msg.size > octets
        return lambda msg, content: msg.size < octets


@dataclass(frozen=True)
class Arrival(Key):
    """BEFORE/ON/SINCE: the internal date's calendar date, disregarding the time."""

    op: str         # "BEFORE", "ON" or "SINCE"
    day: date

    def compile(self, ctx: SearchContext) -> Test:
        low, high = _bounds(self.op, self.day, ctx.tz)
        return lambda msg, content: low <= msg.internal_date < high


@dataclass(frozen=True)
class Sent(Key):
    """SENTBEFORE/SENTON/SENTSINCE: the Date: header's date in its own zone."""

    reads_content = True
    op: str
    day: date

    def compile(self, ctx: SearchContext) -> Test:
        op, day = self.op, self.day

        def test(msg: MessageView, content: Optional[MessageContent]) -> bool:
            sent = sent_day(_need(content))
            return sent is not None and _compare_day(op, sent, day)
        return test


@dataclass(frozen=True)
class Age(Key):
    """OLDER n (internal date more than n seconds ago) or YOUNGER n (RFC 5032 §3)."""

    older: bool
    seconds: int

    def compile(self, ctx: SearchContext) -> Test:
        cutoff = int((ctx.now - self.seconds) * 1000)
        if self.older:
            return lambda msg, content: msg.internal_date < cutoff
        return lambda msg, content: msg.internal_date >= cutoff


@dataclass(frozen=True)
class Header(Key):
    """HEADER field string, and BCC/CC/FROM/SUBJECT/TO: a substring of a value;
    an empty string matches any message that has the field (RFC 9051 §6.4.4)."""

    reads_content = True
    name: str
    text: str

    def compile(self, ctx: SearchContext) -> Test:
        name, needle = self.name, fold(self.text)
        may_hold, match = header_may_hold(needle), matcher(needle)

        def test(msg: MessageView, content: Optional[MessageContent]) -> bool:
            parsed = _need(content)
            # Most messages are ruled out by their raw header, without a parse.
            if not may_hold(parsed.head_octets()):
                return False
            return any(match(value) for value in parsed.header(name))
        return test


@dataclass(frozen=True)
class Address(Header):
    """BCC, CC, FROM, TO: a substring of the field as written, or of its addresses
    as they read once comments are dropped and each is written ``name <box@domain>``
    (a group ``name:``), so that ``FROM user@domain.org`` finds
    ``<user (comment)@ domain.org>`` and ``=?utf-8?q?Ren=C3=A9?= <r@x>`` is found by
    its name, as Dovecot finds them.  An empty string: the field is there."""

    def compile(self, ctx: SearchContext) -> Test:
        if not self.text:
            return super().compile(ctx)
        name, needle = self.name, fold(self.text)
        match = matcher(needle)
        # Dropping comments and white space joins pieces of the raw field, never
        # makes new ones: each piece of the needle between those is in the block.
        pieces = [header_may_hold(piece) for piece in _ADDRESS_BREAKS.split(needle)
                  if piece]

        def test(msg: MessageView, content: Optional[MessageContent]) -> bool:
            parsed = _need(content)
            head = parsed.head_octets()
            if not all(may_hold(head) for may_hold in pieces):
                return False
            values = parsed.header(name)
            if not values:
                return False
            return any(match(value) for value in values) \
                or match(written_addresses(parsed.addresses(name)))
        return test


_ADDRESS_BREAKS = re.compile(r'[\s@<>(),:;"\\]+')


def written_addresses(addresses: list[tuple[str, str, str]]) -> str:
    out = []
    for display, mailbox, host in addresses:
        if not host and not display and mailbox:
            out.append(f"{mailbox}:")                     # a group's name (or a
            continue                                       # bare local part)
        spec = f"{mailbox}@{host}" if host else mailbox
        out.append(f"{display} <{spec}>" if display else spec)
    return ", ".join(out)


@dataclass(frozen=True)
class Body(Key):
    """BODY: the decoded text of the body; TEXT (``with_header``): header or body."""

    reads_content = True
    reads_body = True
    text: str
    with_header: bool = False

    def compile(self, ctx: SearchContext) -> Test:
        needle, with_header = fold(self.text), self.with_header
        match = matcher(needle)
        # header_text() writes each field as "name: value": a needle without white
        # space or colon lies within one name or value, as header_may_hold assumes.
        may_hold = header_may_hold(needle) if " " not in needle and ":" not in needle \
            else _always

        def test(msg: MessageView, content: Optional[MessageContent]) -> bool:
            parsed = _need(content)
            if with_header and may_hold(parsed.head_octets()) \
                    and match(parsed.header_text()):
                return True
            return match(parsed.body_text())
        return test


@dataclass(frozen=True)
class Numbers(Key):
    """A sequence set of message numbers, or ``UID set``; ``$`` is the saved result,
    which holds UIDs whichever way it is written (RFC 5182 §2.1)."""

    numbers: SequenceSet
    uid: bool = False

    def compile(self, ctx: SearchContext) -> Test:
        if self.numbers.saved:
            saved = frozenset(ctx.saved or ())
            return lambda msg, content: msg.uid in saved
        largest = ctx.largest_uid if self.uid else ctx.largest_seq
        member = _Ranges(self.numbers.resolve(largest))
        if self.uid:
            return lambda msg, content: member.contains(msg.uid)
        return lambda msg, content: member.contains(msg.seq)


@dataclass(frozen=True)
class ModSeq(Key):
    """MODSEQ: messages changed at or after ``value`` (RFC 7162 §3.1.5).  There is
    one mod-sequence per message, so the entry name and type only get checked."""

    value: int
    entry: Optional[str] = None
    entry_type: Optional[str] = None

    def compile(self, ctx: SearchContext) -> Test:
        value = self.value
        return lambda msg, content: msg.modseq >= value


class _Ranges:
    """Membership in merged, sorted (low, high) ranges by bisection."""

    __slots__ = ("highs", "lows")

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for low, high in sorted(ranges):
            if merged and low <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        self.lows = [low for low, _ in merged]
        self.highs = [high for _, high in merged]

    def contains(self, number: int) -> bool:
        index = bisect_right(self.lows, number) - 1
        return index >= 0 and number <= self.highs[index]


# -- matching -----------------------------------------------------------------------

def matches(key: Key, msg: MessageView, ctx: SearchContext,
            content: Optional[MessageContent] = None) -> bool:
    """Whether ``msg`` satisfies ``key``; ``content`` is needed when
    :func:`needs_content` says so."""
    entry = ctx._compiled.get(id(key))
    if entry is None or entry[0] is not key:
        entry = ctx._compiled[id(key)] = (key, key.compile(ctx))
    return entry[1](msg, content)


def needs_content(key: Key) -> bool:
    """Whether matching reads the message (header, body, text or sent-date keys)."""
    return any(node.reads_content for node in walk(key))


def flags_only(key: Key) -> bool:
    """Whether matching looks at nothing but a message's flags: then a search tests
    each distinct flag set once (``matches_flags``)."""
    return all(isinstance(node, (All, And, Or, Not, Flag, Keyword)) for node in walk(key))


def matches_flags(key: Key, flags: frozenset[str], ctx: SearchContext) -> bool:
    """For a :func:`flags_only` key: whether a message with ``flags`` matches."""
    return matches(key, MessageView(0, 0, flags, 0, 0, 0), ctx)


def needs_body(key: Key) -> bool:
    """Whether matching reads more of a message than its header block (BODY, TEXT):
    if not, the header blocks kept in SQL (``IMailStore.headers_for``) do."""
    return any(node.reads_body for node in walk(key))


def uses_modseq(key: Key) -> bool:
    """Whether the search has a MODSEQ key (RFC 7162 §3.1.5: reply with MODSEQ)."""
    return any(isinstance(node, ModSeq) for node in walk(key))


def walk(key: Key) -> Iterator[Key]:
    """``key`` and all the keys inside it."""
    stack = [key]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children())


def fold(text: str) -> str:
    """Text as string keys compare it: casefolded, white space runs as one space.

    str.split() splits where the regular expression \\s+ would match (both go by
    str.isspace) and is several times faster on a message body."""
    inner = " ".join(text.split())
    if not inner:
        return " " if text else ""
    if text[0].isspace():
        inner = " " + inner
    if text[-1].isspace():
        inner += " "
    return inner.casefold()


def matcher(needle: str) -> Callable[[str], bool]:
    """Whether a text, folded, holds the folded ``needle``.  For a needle without
    white space casefolding the text is enough: casefold turns white space into
    white space only and anything else into no white space, so folding the runs of
    white space cannot make or break a match."""
    if " " in needle:
        return lambda text: needle in fold(text)
    return lambda text: needle in text.casefold()


def header_may_hold(needle: str) -> Callable[[bytes], bool]:
    """A test of a raw header block that is False only when none of its fields can
    hold the folded ``needle``: then the block need not be parsed.

    Without RFC 2047 words (``=?``) a field's value is its own octets, decoded as
    UTF-8 (else Latin-1) and unfolded by removing line breaks that white space
    follows (``message.py``).  Folded, the value is then a substring of the whole
    block folded, decoded the same way.  Encoded words can decode to anything: a
    block with ``=?`` is parsed.  The test may say yes for the wrong field or for a
    line that is not a field: the parsed header decides."""
    octets, match = needle.encode("utf-8"), matcher(needle)
    words = [word for word in octets.split(b" ") if word]
    spaced = words != [octets]

    def test(head: bytes) -> bool:
        # Most blocks have no "?" at all, and one octet is found faster than two.
        if b"?" in head and b"=?" in head:
            return True
        if head.isascii():
            # An ASCII block folds to ASCII: bytes methods do it (a non-ASCII
            # needle is then never found, rightly).
            head = head.lower()
            if not spaced:
                return octets in head
            # Each word first: cheaper than folding the white space.
            return all(word in head for word in words) and \
                octets in _ASCII_WHITE_SPACE.sub(b" ", head)
        return any(match(text) for text in _header_texts(head))
    return test


def _header_texts(head: bytes) -> tuple[str, ...]:
    """The block as its fields decode: UTF-8, else Latin-1, field by field.  When
    the block is not UTF-8 throughout, both: decoding with replacement characters
    leaves its valid UTF-8 fields as they are (ASCII octets end any broken
    sequence, and every field starts after one)."""
    try:
        return (head.decode("utf-8"),)
    except UnicodeDecodeError:
        return head.decode("utf-8", "replace"), head.decode("latin-1")


def _always(head: bytes) -> bool:
    return True


def sent_day(content: MessageContent) -> Optional[date]:
    """The calendar date of the Date: header in the header's own zone (RFC 9051
    §6.4.4 SENT*: "disregarding time and timezone"); when the header's fields cannot
    be read but ``date()`` can, the UTC date of that instant."""
    for value in content.header("Date")[:1]:
        parts = email.utils.parsedate_tz(value)
        if parts is not None:
            try:
                return date(parts[0], parts[1], parts[2])
            except ValueError:
                pass
    when = content.date()
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).date()


def _need(content: Optional[MessageContent]) -> MessageContent:
    if content is None:
        raise TypeError("this search key needs the message content")
    return content


def _compare_day(op: str, day: date, wanted: date) -> bool:
    if op == "BEFORE":
        return day < wanted
    if op == "ON":
        return day == wanted
    return day >= wanted


# The ASCII characters str.isspace() (and so fold) takes for white space.
_ASCII_WHITE_SPACE = re.compile(rb"[\t\n\x0b\x0c\r\x1c-\x1f ]+")
_FOREVER = 2**63


def _bounds(op: str, day: date, tz: tzinfo) -> tuple[int, int]:
    """Internal-date milliseconds [low, high) for a date key in zone ``tz``."""
    start = _midnight_ms(day, tz)
    if op == "BEFORE":
        return -_FOREVER, start
    if op == "ON":
        return start, _midnight_ms(day + timedelta(days=1), tz)
    return start, _FOREVER


def _midnight_ms(day: date, tz: tzinfo) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000)


# -- parsing ------------------------------------------------------------------------

# Keys without arguments (RFC 9051 §6.4.4, RFC 3501 §6.4.4 for NEW/OLD/RECENT).
_SEEN, _RECENT = Flag("\\Seen"), Flag("\\Recent")
_SIMPLE: dict[str, Key] = {
    "ALL": All(),
    "ANSWERED": Flag("\\Answered"), "UNANSWERED": Not(Flag("\\Answered")),
    "DELETED": Flag("\\Deleted"), "UNDELETED": Not(Flag("\\Deleted")),
    "DRAFT": Flag("\\Draft"), "UNDRAFT": Not(Flag("\\Draft")),
    "FLAGGED": Flag("\\Flagged"), "UNFLAGGED": Not(Flag("\\Flagged")),
    "SEEN": _SEEN, "UNSEEN": Not(_SEEN),
    "RECENT": _RECENT, "OLD": Not(_RECENT),
    "NEW": And((_RECENT, Not(_SEEN))),       # RFC 3501: RECENT UNSEEN
}
_ADDRESS_HEADERS = {"BCC": "Bcc", "CC": "Cc", "FROM": "From", "TO": "To"}
_DATE_KEYS = {"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"}
_DATE = re.compile(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})\Z", re.ASCII)
_MONTHS = {name: number for number, name in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
    1)}
_ENTRY_TYPES = ("PRIV", "SHARED", "ALL")     # RFC 7162 §7 entry-type-req


def parse_search(args: list[Any], *, utf8: bool) -> tuple[Key, str]:
    """The search key of a SEARCH command's arguments, and the charset it named.

    Raises :class:`BadCharset` for a charset other than UTF-8 or US-ASCII and
    :class:`ParseError` for anything malformed.
    """
    tokens = list(args)
    charset = "UTF-8" if utf8 else "US-ASCII"
    if tokens and _is_atom(tokens[0], "CHARSET"):
        if len(tokens) < 2:
            raise ParseError("CHARSET needs a charset name")
        charset = _charset(tokens[1], utf8)
        tokens = tokens[2:]
    return _parse_keys(tokens, "SEARCH"), charset


def _charset(token: Any, utf8: bool) -> str:
    name = astring(token, "charset").upper()
    if name in CHARSETS:
        return name
    if utf8:
        # RFC 6855 §3: with UTF8=ACCEPT a charset other than UTF-8 conflicts.
        raise ParseError(f"charset {name[:30]} conflicts with UTF8=ACCEPT")
    raise BadCharset(name)


def _parse_keys(tokens: list[Any], where: str, depth: int = 0) -> Key:
    """One or more keys, ANDed together."""
    if not tokens:
        raise ParseError(f"{where} needs at least one search key")
    reader = _Reader(tokens, depth)
    keys = []
    while not reader.done():
        keys.append(reader.key())
    return keys[0] if len(keys) == 1 else And(tuple(keys))


class _Reader:
    """Reads search keys from a list of tokens, left to right."""

    def __init__(self, tokens: list[Any], depth: int) -> None:
        if depth > MAX_NESTING:
            raise ParseError("search keys nested too deeply")
        self.tokens = tokens
        self.pos = 0
        self.depth = depth

    def done(self) -> bool:
        return self.pos >= len(self.tokens)

    def take(self, what: str) -> Any:
        if self.done():
            raise ParseError(f"missing {what}")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def key(self) -> Key:
        token = self.take("search key")
        if isinstance(token, list):
            return _parse_keys(token, "a parenthesised list", self.depth + 1)
        if not isinstance(token, Atom):
            raise ParseError("a search key must be an atom")
        name = token.upper()
        if name in _SIMPLE:
            return _SIMPLE[name]
        if token[:1].isdigit() or token[:1] in ("*", "$"):
            return Numbers(parse_sequence_set(str(token)))
        reader = _READERS.get(name)
        if reader is None:
            raise ParseError(f"unknown search key {token[:30]}")
        return reader(self, name)

    def nested(self) -> Key:
        """A key inside NOT or OR."""
        inner = _Reader(self.tokens, self.depth + 1)
        inner.pos = self.pos
        key = inner.key()
        self.pos = inner.pos
        return key

    def string(self, what: str) -> str:
        return astring(self.take(what), what)

    def number(self, what: str, limit: int = MAX_NUMBER64, zero: bool = True) -> int:
        token = self.take(what)
        if not isinstance(token, Atom) or not token.isascii() or not token.isdigit():
            raise ParseError(f"{what} must be a number")
        # Checked before int(): Python refuses to convert very long digit strings.
        if len(token.lstrip("0")) > len(str(limit)):
            raise ParseError(f"{what} out of range")
        value = int(token)
        if value > limit or (value == 0 and not zero):
            raise ParseError(f"{what} out of range")
        return value

    def day(self, what: str) -> date:
        return _parse_date(self.string(what))


def _read_not(reader: _Reader, name: str) -> Key:
    return Not(reader.nested())


def _read_or(reader: _Reader, name: str) -> Key:
    return Or(reader.nested(), reader.nested())


def _read_address(reader: _Reader, name: str) -> Key:
    return Address(_ADDRESS_HEADERS[name], reader.string(f"{name} string"))


def _read_subject(reader: _Reader, name: str) -> Key:
    return Header("Subject", reader.string("SUBJECT string"))


def _read_header(reader: _Reader, name: str) -> Key:
    field_name = reader.string("header field name")
    if not field_name or any(ch <= " " or ch == ":" or ch > "~" for ch in field_name):
        raise ParseError("invalid header field name")
    return Header(field_name, reader.string("HEADER string"))


def _read_body(reader: _Reader, name: str) -> Key:
    return Body(reader.string(f"{name} string"), with_header=name == "TEXT")


def _read_keyword(reader: _Reader, name: str) -> Key:
    token = reader.take("keyword")
    if not isinstance(token, Atom) or not token:
        raise ParseError(f"{name} needs a flag keyword")
    key = Keyword(str(token))
    return key if name == "KEYWORD" else Not(key)


def _read_size(reader: _Reader, name: str) -> Key:
    return Size(name == "LARGER", reader.number(f"{name} size"))


def _read_date(reader: _Reader, name: str) -> Key:
    day = reader.day(f"{name} date")
    if name.startswith("SENT"):
        return Sent(name[4:], day)
    return Arrival(name, day)


def _read_age(reader: _Reader, name: str) -> Key:
    # RFC 5032 §4: interval = nz-number (seconds).
    return Age(name == "OLDER", reader.number(f"{name} interval", zero=False))


def _read_uid(reader: _Reader, name: str) -> Key:
    token = reader.take("UID set")
    if not isinstance(token, Atom):
        raise ParseError("UID needs a sequence set")
    return Numbers(parse_sequence_set(str(token)), uid=True)


def _read_modseq(reader: _Reader, name: str) -> Key:
    # RFC 7162 §7: "MODSEQ" [SP entry-name SP entry-type-req] SP mod-sequence-valzer
    if not reader.done() and not isinstance(reader.tokens[reader.pos], (Atom, list)):
        entry = reader.string("MODSEQ entry name")
        if not entry.lower().startswith("/flags/") or len(entry) <= len("/flags/"):
            raise ParseError("MODSEQ entry name must be /flags/<flag>")
        kind = reader.take("MODSEQ entry type")
        if not isinstance(kind, Atom) or kind.upper() not in _ENTRY_TYPES:
            raise ParseError("MODSEQ entry type must be priv, shared or all")
        return ModSeq(reader.number("MODSEQ value"), entry, kind.lower())
    return ModSeq(reader.number("MODSEQ value"))


_READERS: dict[str, Callable[[_Reader, str], Key]] = {
    "NOT": _read_not, "OR": _read_or, "HEADER": _read_header,
    "BODY": _read_body, "TEXT": _read_body, "UID": _read_uid, "MODSEQ": _read_modseq,
    "KEYWORD": _read_keyword, "UNKEYWORD": _read_keyword,
    "LARGER": _read_size, "SMALLER": _read_size,
    "OLDER": _read_age, "YOUNGER": _read_age,
    **{name: _read_address for name in _ADDRESS_HEADERS},
    "SUBJECT": _read_subject,
    **{name: _read_date for name in _DATE_KEYS},
}


def _is_atom(token: Any, word: str) -> bool:
    return isinstance(token, Atom) and token.upper() == word


def _parse_date(text: str) -> date:
    """RFC 9051 §9 ``date``: d-Mon-yyyy (the quotes, if any, are already gone)."""
    match = _DATE.match(text)
    month = _MONTHS.get(match.group(2).upper()) if match else None
    if match is None or month is None:
        raise ParseError(f"invalid date {text[:30]!r}: expected d-Mon-yyyy")
    try:
        return date(int(match.group(3)), month, int(match.group(1)))
    except ValueError:
        raise ParseError(f"invalid date {text[:30]!r}") from None
