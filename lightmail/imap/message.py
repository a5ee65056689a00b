"""One stored message as IMAP sees it: ENVELOPE, BODYSTRUCTURE, BODY[section] and
BINARY[part] (RFC 9051 §6.4.5 and §7.5.2, RFC 3516), and decoded header and body
text for SEARCH and SORT.

The message is kept as the stored octets (CRLF lines; bare LF is tolerated) and is
parsed lazily, at most once per :class:`ParsedMessage`:

* the top-level header alone for ENVELOPE, HEADER sections, SEARCH and SORT;
* the MIME tree for BODYSTRUCTURE, part sections and BINARY.  The tree holds byte
  offsets only, found with ``bytes.find`` (RFC 2046 §5.1.1: a boundary delimiter is a
  line that starts with ``--boundary``; the CRLF before it belongs to the delimiter),
  so ``BODY[1.2]`` returns the exact original octets and a 50 MB attachment is never
  copied or scanned line by line.

Malformed MIME never raises: the parser degrades the way Dovecot does (a multipart
without a boundary or without parts shows one empty text/plain part, a missing or
unparseable Content-Type is text/plain; charset=us-ascii, nesting deeper than
:data:`MAX_DEPTH` is opaque data).  Header values stay raw in ENVELOPE and
BODYSTRUCTURE (RFC 2047 words are not decoded there, RFC 9051 §7.5.2); they are
decoded (RFC 2047) for :meth:`ParsedMessage.header`, which SEARCH and SORT use.
"""

from __future__ import annotations

import binascii
import calendar
import re
from dataclasses import dataclass, field
from email.utils import parsedate_tz
from functools import cached_property, lru_cache
from typing import NamedTuple, Optional

from lightmail.imap.tokens import ParseError, nstring, plist, quote

__all__ = ["MAX_DEPTH", "ParsedMessage", "Section", "UnknownCTE", "format_section",
           "parse_section"]

MAX_DEPTH = 100        # nested multipart/message levels parsed (Dovecot's default too)
MAX_PARTS = 10000      # MIME parts parsed in one message; later ones are opaque


class UnknownCTE(Exception):
    """BINARY of a part whose Content-Transfer-Encoding cannot be undone: the session
    answers NO [UNKNOWN-CTE] (RFC 3516 §4.3)."""


# --- section specifications (RFC 9051 §6.4.5) ------------------------------------------

_SECTION_TEXTS = ("HEADER.FIELDS.NOT", "HEADER.FIELDS", "HEADER", "TEXT", "MIME")
_SECTION_PART = re.compile(r"[1-9][0-9]{0,9}(?:\.[1-9][0-9]{0,9})*")
_FIELD_NAME = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s()"\\]+)')


@dataclass(frozen=True)
class Section:
    """A section-spec: ``part`` numbers, then "", HEADER, HEADER.FIELDS,
    HEADER.FIELDS.NOT, TEXT or MIME, and the field names of HEADER.FIELDS(.NOT)."""

    part: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[str, ...] = ()


def parse_section(inner: str) -> Section:
    """The section between the brackets of ``BODY[...]``, e.g. ``1.2.TEXT`` or
    ``HEADER.FIELDS (From "To")``.  Raises ParseError when it is malformed."""
    match = _SECTION_PART.match(inner)
    part = tuple(int(n) for n in match.group(0).split(".")) if match else ()
    rest = inner[match.end():] if match else inner
    if not rest:
        return Section(part)
    if part:
        if not rest.startswith("."):
            raise ParseError(f"invalid section {inner[:40]!r}")
        rest = rest[1:]
    upper = rest.upper()
    text = next((name for name in _SECTION_TEXTS if upper.startswith(name)), None)
    if text is None:
        raise ParseError(f"invalid section {inner[:40]!r}")
    tail = rest[len(text):]
    if text == "MIME" and not part:
        raise ParseError("MIME needs a part number")
    if not text.startswith("HEADER.FIELDS"):
        if tail:
            raise ParseError(f"invalid section {inner[:40]!r}")
        return Section(part, text)
    return Section(part, text, _field_names(tail))


def _field_names(tail: str) -> tuple[str, ...]:
    """The header-list of HEADER.FIELDS: ``" (" astring *(SP astring) ")"``."""
    if not (tail.startswith(" (") and tail.endswith(")")):
        raise ParseError("HEADER.FIELDS needs a parenthesised list of field names")
    body, names, position = tail[2:-1], [], 0
    while position < len(body):
        if body[position] == " ":
            position += 1
            continue
        match = _FIELD_NAME.match(body, position)
        if match is None:
            raise ParseError("invalid header field name")
        quoted = match.group(1)
        names.append(re.sub(r"\\(.)", r"\1", quoted) if quoted is not None
                     else match.group(2))
        position = match.end()
    if not names:
        raise ParseError("HEADER.FIELDS needs at least one field name")
    return tuple(names)


@lru_cache(maxsize=256)
def _lower_names(fields: tuple[str, ...]) -> frozenset[bytes]:
    """HEADER.FIELDS names as header field names compare (once per distinct list)."""
    return frozenset(name.lower().encode("utf-8") for name in fields)


def format_section(s: Section) -> str:
    """The section as the response names it (RFC 9051 §7.5.2 BODY[<section>]): part
    numbers and keywords canonical, field names as the client gave them."""
    out = ".".join(str(n) for n in s.part)
    if s.text:
        out = f"{out}.{s.text}" if out else s.text
    if s.fields:
        out += " (" + " ".join(_field_label(name) for name in s.fields) + ")"
    return out


_NOT_IN_LABEL = set('(){ %*"\\[]')      # atom-specials, and "[" "]" around the section


def _field_label(name: str) -> str:
    """A field name as an atom when it can be one, else a quoted string."""
    if name and all(" " < ch != "\x7f" and ch not in _NOT_IN_LABEL for ch in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- structured header values (RFC 5322 §3.2, RFC 2045 §5.1) ---------------------------

_ATOM, _QUOTED, _COMMENT, _SPECIAL, _DOMAIN_LITERAL = range(5)
_Token = tuple[int, bytes]
_WSP = b" \t\r\n"
_TSPECIALS = b'()<>@,;:\\"/[]?='             # RFC 2045 §5.1
_ADDRESS_SPECIALS = b'()<>[]:;@\\,"'         # RFC 5322 §3.2.3, "." kept in atoms


def _lex(data: bytes, specials: bytes, domain_literals: bool = False) -> list[_Token]:
    """Tokens of a structured header value; never raises (unterminated quoted strings,
    comments and domain literals run to the end)."""
    tokens: list[_Token] = []
    position, end = 0, len(data)
    while position < end:
        char = data[position]
        if char in _WSP:
            position += 1
        elif char == 0x22:
            text, position = _quoted_string(data, position + 1)
            tokens.append((_QUOTED, text))
        elif char == 0x28:
            text, position = _comment(data, position + 1)
            tokens.append((_COMMENT, text))
        elif char == 0x5B and domain_literals:
            close = data.find(b"]", position)
            close = end - 1 if close < 0 else close
            tokens.append((_DOMAIN_LITERAL, _unfold(data[position:close + 1])))
            position = close + 1
        elif char in specials:
            tokens.append((_SPECIAL, data[position:position + 1]))
            position += 1
        else:
            start = position
            while position < end and data[position] not in _WSP and \
                    data[position] not in specials and data[position] not in b'"(':
                position += 1
            tokens.append((_ATOM, data[start:position]))
    return tokens


def _quoted_string(data: bytes, position: int) -> tuple[bytes, int]:
    out = bytearray()
    while position < len(data) and data[position] != 0x22:
        if data[position] == 0x5C and position + 1 < len(data):
            position += 1
        if data[position] not in b"\r\n":          # folding inside the string
            out.append(data[position])
        position += 1
    return bytes(out), position + 1


def _comment(data: bytes, position: int) -> tuple[bytes, int]:
    """A comment's text (nested comments kept with their parentheses)."""
    out, depth = bytearray(), 1
    while position < len(data):
        char = data[position]
        if char == 0x5C and position + 1 < len(data):
            position += 1
            char = data[position]
        elif char == 0x28:
            depth += 1
        elif char == 0x29:
            depth -= 1
            if depth == 0:
                return _clean(bytes(out)), position + 1
        if char not in b"\r\n":
            out.append(char)
        position += 1
    return _clean(bytes(out)), position


def _is(token: Optional[_Token], special: bytes) -> bool:
    return token is not None and token[0] == _SPECIAL and token[1] == special


_FOLD = re.compile(rb"(?:[ \t]*\r?\n)+[ \t]*")


def _unfold(value: bytes) -> bytes:
    """RFC 5322 §2.2.3 unfolding: remove the CRLF of folded lines."""
    return value.replace(b"\r\n", b"").replace(b"\n", b"")


def _clean(value: bytes) -> bytes:
    """A header value on one line as ENVELOPE and BODYSTRUCTURE show it (as Dovecot
    does): each fold and the white space around it becomes one space, tabs become
    spaces, and the ends are trimmed."""
    return _FOLD.sub(b" ", value).replace(b"\t", b" ").strip(b" ")


# --- MIME header fields (RFC 2045 §5, RFC 2231, RFC 2183, RFC 3282) --------------------

_Params = list[tuple[bytes, bytes]]


def _content_type(value: bytes) -> Optional[tuple[bytes, bytes, _Params]]:
    """type, subtype and parameters, or None when the value is not a media type
    (RFC 2045 §5.2: then the default applies).  A type without a subtype keeps an
    empty subtype, as Dovecot shows it."""
    tokens = [t for t in _lex(value, _TSPECIALS) if t[0] != _COMMENT]
    if not tokens or tokens[0][0] != _ATOM:
        return None
    if len(tokens) == 1 or _is(tokens[1], b";"):
        return tokens[0][1], b"", _parameters(tokens, 1)
    if _is(tokens[1], b"/") and len(tokens) > 2 and tokens[2][0] == _ATOM and \
            (len(tokens) == 3 or _is(tokens[3], b";")):
        return tokens[0][1], tokens[2][1], _parameters(tokens, 3)
    return None


def _disposition(value: bytes) -> Optional[tuple[bytes, _Params]]:
    """Content-Disposition (RFC 2183): the type and its parameters."""
    tokens = [t for t in _lex(value, _TSPECIALS) if t[0] != _COMMENT]
    if not tokens or tokens[0][0] != _ATOM:
        return None
    return tokens[0][1], _parameters(tokens, 1)


def _parameters(tokens: list[_Token], index: int) -> _Params:
    """``; name=value`` pairs.  A value runs to the next ";" so that the common
    unquoted ``boundary=----=_Part_1`` survives; malformed pairs are skipped."""
    params: _Params = []
    while index < len(tokens):
        stop = index
        while stop < len(tokens) and not _is(tokens[stop], b";"):
            stop += 1
        item = tokens[index:stop]
        if len(item) >= 3 and item[0][0] == _ATOM and _is(item[1], b"="):
            value = item[2][1] if item[2][0] == _QUOTED else b"".join(t[1] for t in item[2:])
            params.append((item[0][1], value))
        index = stop + 1
    return _rfc2231_join(params)


_CONTINUATION = re.compile(rb"^(.+?)\*([0-9]{1,3})(\*?)$")


def _rfc2231_join(params: _Params) -> _Params:
    """RFC 2231 §3: ``name*0``, ``name*1``... joined into ``name`` (``name*`` when a
    segment is charset/percent-encoded); values stay encoded."""
    out: list[tuple[bytes, list[tuple[int, bytes, bool]]]] = []
    joined: dict[bytes, list[tuple[int, bytes, bool]]] = {}
    for name, value in params:
        match = _CONTINUATION.match(name)
        if match is None:
            out.append((name, [(0, value, False)]))
            continue
        base = match.group(1)
        if base.lower() not in joined:
            joined[base.lower()] = []
            out.append((base, joined[base.lower()]))
        joined[base.lower()].append((int(match.group(2)), value, bool(match.group(3))))
    result: _Params = []
    for name, segments in out:
        segments.sort(key=lambda segment: segment[0])
        extended = any(segment[2] for segment in segments)
        result.append((name + b"*" if extended else name,
                       b"".join(segment[1] for segment in segments)))
    return result


def _param(params: _Params, name: bytes) -> Optional[bytes]:
    return next((value for key, value in params if key.lower() == name), None)


# --- header fields ---------------------------------------------------------------------

class _Field(NamedTuple):
    """(A named tuple: a header block has dozens, built at every FETCH and SEARCH.)"""

    name: bytes          # as written, without the colon
    start: int           # offset of the field's first line
    value_start: int     # offset after the colon
    end: int             # offset after the field's last line (and its line break)


# A field (RFC 5322 §2.2): a line that does not start with white space and has a
# colon, with the continuation lines (starting with white space) that follow it.  A
# line without a colon is no field, and continuation lines after it belong to none.
_FIELD = re.compile(rb"^([^ \t\n:][^:\n]*):[^\n]*\n?(?:[ \t][^\n]*\n?)*", re.M)


def _parse_fields(raw: bytes, start: int, end: int) -> list[_Field]:
    """The header fields in raw[start:end], which starts at the start of a line."""
    return [_Field(m[1].rstrip(b" \t"), m.start(), m.end(1) + 1, m.end())
            for m in _FIELD.finditer(raw, start, end)]


def _field_text(raw: bytes, item: _Field) -> bytes:
    """A field's raw value: folding kept, the final line break dropped."""
    value = raw[item.value_start:item.end]
    if value.endswith(b"\n"):
        value = value[:-2] if value.endswith(b"\r\n") else value[:-1]
    return value


# --- the MIME tree ---------------------------------------------------------------------

_IDENTITY = ("", "7bit", "8bit", "binary")     # RFC 2045 §6.2: nothing to undo


@dataclass(eq=False)
class _Entity:
    """A message or body part: offsets into the raw message and its MIME headers.

    raw[start:header_end] is the header, raw[header_end:body_start] the blank line
    (if any), raw[body_start:end] the body (RFC 2045 §2.4 "entity")."""

    start: int
    header_end: int
    body_start: int
    end: int
    fields: list[_Field]
    type: bytes
    subtype: bytes
    params: _Params
    children: list[_Entity] = field(default_factory=list)
    message: Optional[_Entity] = None          # the encapsulated message/rfc822

    @property
    def is_multipart(self) -> bool:
        return self.type.lower() == b"multipart"

    @property
    def is_rfc822(self) -> bool:
        return self.type.lower() == b"message" and self.subtype.lower() == b"rfc822"

    @property
    def is_text(self) -> bool:
        return self.type.lower() == b"text"


@dataclass(frozen=True)
class _Boundary:
    """A boundary delimiter line found at raw[start:line_end] (RFC 2046 §5.1.1)."""

    start: int
    line_end: int
    level: int           # index into the boundary stack: which multipart it closes
    close: bool          # "--boundary--": the close delimiter


class _Parser:
    """Builds the MIME tree of a message (RFC 2045, RFC 2046 §5) in one forward pass,
    as Dovecot's message-parser does: a line is a delimiter when it starts with
    ``--`` and the boundary of an open multipart, the innermost one first.  Each
    line is looked at once (by the header scan, or by the search for the delimiter
    that ends a body), so the work is linear in the size times the nesting depth."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.parts = 0

    def entity(self, start: int, header_end: int, body_start: int,
               default: tuple[bytes, bytes]) -> _Entity:
        """The entity whose header is raw[start:header_end], no children yet."""
        fields = _parse_fields(self.raw, start, header_end)
        type_, subtype = default
        params: _Params = []
        value = self.first(fields, b"content-type")
        parsed = _content_type(value) if value is not None else None
        if parsed is not None:
            type_, subtype, params = parsed
        elif value is not None:
            type_, subtype = b"text", b"plain"     # RFC 2045 §5.2
        return _Entity(start, header_end, body_start, len(self.raw), fields, type_,
                       subtype, params)

    def first(self, fields: list[_Field], name: bytes) -> Optional[bytes]:
        item = next((f for f in fields if f.name.lower() == name), None)
        return None if item is None else _field_text(self.raw, item)

    def head(self) -> _Entity:
        """The top-level entity, header only."""
        header_end, body_start, _ = self.split(0, ())
        return self.entity(0, header_end, body_start, (b"text", b"plain"))

    def split(self, start: int, stack: tuple[bytes, ...],
              ) -> tuple[int, int, Optional[_Boundary]]:
        """Where the header starting at ``start`` ends and where the body starts,
        after the blank line (RFC 5322 §2.1).  A header cut short by a delimiter
        line has no body and ends before the delimiter's line break; that
        delimiter is returned too."""
        raw = self.raw
        if not stack:                              # nothing can cut it: find the blank line
            for blank in (b"\r\n", b"\n"):
                if raw.startswith(blank, start):
                    return start, start + len(blank), None
            crlf = raw.find(b"\n\r\n", start)
            lf = raw.find(b"\n\n", start, len(raw) if crlf < 0 else crlf + 2)
            if crlf >= 0 and (lf < 0 or crlf < lf):
                return crlf + 1, crlf + 3, None
            return (lf + 1, lf + 2, None) if lf >= 0 else (len(raw), len(raw), None)
        position = start
        while position < len(raw):
            if raw[position] == 0x0A:
                return position, position + 1, None
            if raw.startswith(b"\r\n", position):
                return position, position + 2, None
            hit = self.boundary_at(position, stack)
            if hit is not None:
                end = self.end_before(hit, start)
                return end, end, hit
            newline = raw.find(b"\n", position)
            if newline < 0:
                break
            position = newline + 1
        return len(raw), len(raw), None

    def parse(self, start: int, stack: tuple[bytes, ...], default: tuple[bytes, bytes],
              depth: int = 0) -> tuple[_Entity, Optional[_Boundary]]:
        """The entity starting at ``start`` and its children, and the delimiter line
        (of an enclosing multipart) that ended it."""
        header_end, body_start, hit = self.split(start, stack)
        entity = self.entity(start, header_end, body_start, default)
        self.parts += 1
        deep = depth >= MAX_DEPTH or self.parts >= MAX_PARTS
        if entity.is_multipart and deep:
            entity.type, entity.subtype, entity.params = b"application", b"octet-stream", []
        if hit is not None:                        # no body at all
            entity.end = body_start
        elif entity.is_multipart:
            hit = self.multipart(entity, stack, depth)
        elif entity.is_rfc822 and not deep and self.cte(entity) in _IDENTITY:
            # RFC 2046 §5.2.1: only 7bit, 8bit or binary; an encoded one stays opaque.
            entity.message, hit = self.parse(body_start, stack, (b"text", b"plain"),
                                             depth + 1)
            entity.end = entity.message.end
        else:
            hit = self.next_boundary(body_start, stack)
            entity.end = self.end_before(hit, body_start)
        return entity, hit

    def multipart(self, entity: _Entity, stack: tuple[bytes, ...], depth: int,
                  ) -> Optional[_Boundary]:
        """Parse the parts of a multipart (RFC 2046 §5.1.1): the preamble, parts
        between delimiter lines, and the epilogue after the close delimiter."""
        boundary = _param(entity.params, b"boundary")
        own = len(stack)
        inner = (*stack, b"--" + boundary) if boundary else stack
        default = (b"message", b"rfc822") if entity.subtype.lower() == b"digest" \
            else (b"text", b"plain")                 # RFC 2046 §5.1.5
        hit = self.next_boundary(entity.body_start, inner)
        while hit is not None and hit.level == own and not hit.close:
            child, hit = self.parse(hit.line_end, inner, default, depth + 1)
            entity.children.append(child)
        floor = entity.children[-1].end if entity.children else entity.body_start
        if hit is not None and hit.level == own:      # close delimiter, then epilogue
            floor = hit.line_end
            hit = self.next_boundary(hit.line_end, stack)
        entity.end = self.end_before(hit, floor)
        return hit

    def next_boundary(self, position: int, stack: tuple[bytes, ...]) -> Optional[_Boundary]:
        """The first delimiter line at or after ``position`` (a line start)."""
        if not stack:
            return None
        raw = self.raw
        candidate = position if raw.startswith(b"--", position) else \
            raw.find(b"\n--", position)
        while candidate >= 0:
            if raw[candidate] == 0x0A:
                candidate += 1
            hit = self.boundary_at(candidate, stack)
            if hit is not None:
                return hit
            candidate = raw.find(b"\n--", candidate)
        return None

    def boundary_at(self, position: int, stack: tuple[bytes, ...]) -> Optional[_Boundary]:
        """The delimiter line at ``position``, if the line there is one: it starts
        with ``--boundary`` (so ``stack`` holds ``--boundary`` strings)."""
        raw = self.raw
        if not raw.startswith(b"--", position):
            return None
        for level in range(len(stack) - 1, -1, -1):
            if raw.startswith(stack[level], position):
                newline = raw.find(b"\n", position)
                return _Boundary(position, len(raw) if newline < 0 else newline + 1, level,
                                 raw.startswith(b"--", position + len(stack[level])))
        return None

    def end_before(self, hit: Optional[_Boundary], floor: int) -> int:
        """Where content ends before a delimiter line: the line break in front of
        it is part of the delimiter (RFC 2046 §5.1.1), unless already consumed."""
        if hit is None:
            return len(self.raw)
        end = hit.start
        if end >= 2 and self.raw.startswith(b"\r\n", end - 2):
            end -= 2
        elif end >= 1 and self.raw.startswith(b"\n", end - 1):
            end -= 1
        return max(end, floor)

    def cte(self, entity: _Entity) -> str:
        return _cte(self.first(entity.fields, b"content-transfer-encoding"))


def _cte(value: Optional[bytes]) -> str:
    """The Content-Transfer-Encoding mechanism, lower-case ("" when absent)."""
    if value is None:
        return ""
    tokens = [t for t in _lex(value, _TSPECIALS) if t[0] == _ATOM]
    return tokens[0][1].decode("latin-1").lower() if tokens else ""


# --- transfer decoding (RFC 2045 §6) ---------------------------------------------------

_BASE64_JUNK = bytes(c for c in range(256)
                     if not (chr(c).isascii() and (chr(c).isalnum() or chr(c) in "+/")))
_QP_TRAILING = re.compile(rb"[ \t]+(?=\r?\n|\Z)")


def _transfer_decode(data: bytes, cte: str) -> bytes:
    """Undo a Content-Transfer-Encoding; UnknownCTE when it is not one of RFC 2045's."""
    if cte in _IDENTITY:
        return data
    if cte == "base64":
        return _base64(data)
    if cte == "quoted-printable":
        # RFC 2045 §6.7 (3): trailing white space on a line is not data.
        return binascii.a2b_qp(_QP_TRAILING.sub(b"", data))
    raise UnknownCTE(cte)


def _base64(data: bytes) -> bytes:
    """Lenient base64 (RFC 2045 §6.8): characters outside the alphabet are ignored,
    a truncated final quantum is completed."""
    clean = data.translate(None, _BASE64_JUNK)
    clean = clean[:len(clean) - len(clean) % 4 if len(clean) % 4 == 1 else len(clean)]
    try:
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))
    except binascii.Error:
        return b""


# --- RFC 2047 encoded words ------------------------------------------------------------

_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def _decode_words(value: bytes) -> str:
    """A header value with RFC 2047 encoded words decoded; white space between
    adjacent encoded words is dropped (§6.2), and adjacent words in one charset are
    decoded together so a character split across them survives."""
    out: list[str] = []
    pending: list[tuple[str, bytes]] = []    # decoded octets of adjacent encoded words
    position = 0
    for match in _ENCODED_WORD.finditer(value):
        gap = value[position:match.start()]
        if gap.strip(_WSP) or not pending:
            _flush(pending, out)
            out.append(_text(gap))
        charset = match.group(1).split(b"*")[0].decode("ascii", "replace")
        octets = _base64(match.group(3)) if match.group(2) in b"bB" else \
            binascii.a2b_qp(match.group(3).replace(b"_", b" "))
        if pending and pending[-1][0].lower() == charset.lower():
            pending[-1] = (charset, pending[-1][1] + octets)
        else:
            pending.append((charset, octets))
        position = match.end()
    _flush(pending, out)
    out.append(_text(value[position:]))
    return "".join(out)


def _flush(pending: list[tuple[str, bytes]], out: list[str]) -> None:
    out.extend(_decode_charset(octets, charset) for charset, octets in pending)
    pending.clear()


def _text(data: bytes) -> str:
    """Unencoded header text: UTF-8 (RFC 6532), else Latin-1."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_charset(data: bytes, charset: Optional[str]) -> str:
    name = (charset or "").strip().lower()
    if name in ("", "us-ascii", "ascii", "unknown-8bit"):
        name = "utf-8"                   # a superset; mislabelled 8-bit text is common
    try:
        return data.decode(name, errors="replace")
    except (LookupError, ValueError, TypeError):     # unknown or not a text codec
        return data.decode("utf-8", errors="replace")


# --- the message -----------------------------------------------------------------------

_NIL_ENVELOPE = b"(" + b" ".join([b"NIL"] * 10) + b")"
_DEFAULT_CHARSET = (b"charset", b"us-ascii")


_FIELDS_KEPT = 4      # HEADER.FIELDS(.NOT) answers a ParsedMessage keeps (section)


class ParsedMessage:
    """A stored message, parsed on demand for FETCH, SEARCH and SORT."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.size = len(raw)

    # --- parsing ---------------------------------------------------------------------

    @cached_property
    def _head(self) -> _Entity:
        """The top-level entity with its header only (no MIME tree)."""
        if "_root" in self.__dict__:
            return self._root
        return _Parser(self.raw).head()

    @cached_property
    def _root(self) -> _Entity:
        """The top-level entity with the whole MIME tree."""
        return _Parser(self.raw).parse(0, (), (b"text", b"plain"))[0]

    def _first(self, entity: _Entity, name: str) -> Optional[bytes]:
        lower = name.lower().encode("latin-1")
        item = next((f for f in entity.fields if f.name.lower() == lower), None)
        return None if item is None else _field_text(self.raw, item)

    def _resolve(self, part: tuple[int, ...]) -> Optional[_Entity]:
        """The entity a part number names (RFC 9051 §6.4.5), as Dovecot finds it:
        the parts of a multipart count from 1; a part that is not a multipart has
        only a part 1, itself (so part 1 of a non-multipart message is its body);
        numbers after a message/rfc822 part go into the encapsulated message."""
        node: Optional[_Entity] = self._root
        for index, number in enumerate(part):
            assert node is not None
            more = index + 1 < len(part)
            if node.is_multipart:
                node = node.children[number - 1] if 1 <= number <= len(node.children) \
                    else None
            elif number != 1 or (more and node.message is None):
                node = None
            if node is None:
                return None
            if more and node.message is not None:
                node = node.message
        return node

    # --- ENVELOPE (RFC 9051 §7.5.2) --------------------------------------------------

    def envelope(self) -> bytes:
        return self._envelope(self._head)

    def _envelope(self, entity: _Entity) -> bytes:
        strings: dict[bytes, bytes] = {}
        addresses: dict[bytes, list[bytes]] = {}
        for item in entity.fields:
            name = item.name.lower()
            if name in (b"date", b"subject", b"in-reply-to", b"message-id"):
                strings[name] = _clean(_field_text(self.raw, item))   # the last, as Dovecot
            elif name in (b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc"):
                addresses.setdefault(name, []).extend(
                    _addresses(_field_text(self.raw, item)))
        from_ = addresses.get(b"from", [])
        # "If the Sender or Reply-To lines are absent ... or are present but empty,
        # the server sets the corresponding member ... to be the same value as from".
        sender = addresses.get(b"sender") or from_
        reply_to = addresses.get(b"reply-to") or from_
        items = [nstring(strings.get(b"date")), nstring(strings.get(b"subject"))]
        items += [b"(" + b"".join(x) + b")" if x else b"NIL" for x in (
            from_, sender, reply_to, addresses.get(b"to"), addresses.get(b"cc"),
            addresses.get(b"bcc"))]
        items += [nstring(strings.get(b"in-reply-to")), nstring(strings.get(b"message-id"))]
        return b"(" + b" ".join(items) + b")"

    # --- BODYSTRUCTURE and BODY (RFC 9051 §7.5.2) -------------------------------------

    def bodystructure(self, extended: bool = True) -> bytes:
        """BODYSTRUCTURE (``extended``) or BODY: the MIME structure."""
        return self._structure(self._root, extended)

    def _structure(self, entity: _Entity, extended: bool) -> bytes:
        if entity.is_multipart:
            return self._multipart_structure(entity, extended)
        return self._part_structure(entity, extended)

    def _multipart_structure(self, entity: _Entity, extended: bool) -> bytes:
        # body-type-mpart = 1*body SP media-subtype [SP body-ext-mpart]
        kids = b"".join(self._structure(kid, extended) for kid in entity.children)
        out = (kids or _empty_body(extended)) + b" " + quote(entity.subtype)
        if extended:
            out += b" " + _param_list(entity.params) + b" " + self._extension(entity)
        return b"(" + out + b")"

    def _part_structure(self, entity: _Entity, extended: bool) -> bytes:
        # body-type-1part = (body-type-basic / body-type-msg / body-type-text)
        #                   [SP body-ext-1part]
        items = [self._body_fields(entity)]
        lines = b"%d" % self.raw.count(b"\n", entity.body_start, entity.end)
        if entity.is_rfc822:                 # body-type-msg: envelope, body, lines
            inner = entity.message
            if inner is None:                # not parsed (encoded): as Dovecot shows it
                items += [_NIL_ENVELOPE, _empty_body(extended), lines]
            else:
                items += [self._envelope(inner), self._structure(inner, extended), lines]
        elif entity.is_text:                 # body-type-text: lines
            items.append(lines)
        if extended:                         # body-ext-1part
            items += [self._nstring(entity, "Content-MD5"), self._extension(entity)]
        return b"(" + b" ".join(items) + b")"

    def _body_fields(self, entity: _Entity) -> bytes:
        """media type SP body-fields: params, id, description, encoding, octets."""
        if entity.is_rfc822:
            media = b'"message" "rfc822"'
        else:
            media = quote(entity.type) + b" " + quote(entity.subtype)
        params = entity.params
        if entity.is_text and _param(params, b"charset") is None:
            params = [*params, _DEFAULT_CHARSET]        # RFC 2045 §5.2 default
        value = self._first(entity, "Content-Transfer-Encoding")
        encoding = _first_atom(value) if value is not None else None
        return b" ".join([media, _param_list(params), self._nstring(entity, "Content-ID"),
                          self._nstring(entity, "Content-Description"),
                          quote(encoding) if encoding else b'"7bit"',
                          b"%d" % (entity.end - entity.body_start)])

    def _extension(self, entity: _Entity) -> bytes:
        """body-fld-dsp SP body-fld-lang SP body-fld-loc (RFC 2183, 3282, 2557)."""
        value = self._first(entity, "Content-Disposition")
        parsed = _disposition(value) if value is not None else None
        dsp = b"(" + quote(parsed[0]) + b" " + _param_list(parsed[1]) + b")" \
            if parsed else b"NIL"
        value = self._first(entity, "Content-Language")
        tags = [t[1] for t in _lex(value, _TSPECIALS) if t[0] == _ATOM] if value else []
        lang = plist([quote(tag) for tag in tags]) if tags else b"NIL"
        return dsp + b" " + lang + b" " + self._nstring(entity, "Content-Location")

    def _nstring(self, entity: _Entity, name: str) -> bytes:
        value = self._first(entity, name)
        return nstring(None if value is None else _clean(value))

    # --- BODY[section] (RFC 9051 §6.4.5) ---------------------------------------------

    def section(self, s: Section) -> bytes:
        """The octets of a section; empty when the part does not exist."""
        if not s.part:
            if not s.text:
                return self.raw
            if s.text.startswith("HEADER.FIELDS"):
                # A client lists its mail with the same few fields at every sync,
                # and this message is shared through the header cache: keep them.
                memo: dict[Section, bytes] = self.__dict__.setdefault("_fields", {})
                found = memo.get(s)
                if found is None:
                    if len(memo) >= _FIELDS_KEPT:
                        memo.clear()
                    found = memo[s] = self._message_section(self._head, s)
                return found
            return self._message_section(self._head, s)
        node = self._resolve(s.part)
        if node is None:
            return b""
        if not s.text:
            return self.raw[node.body_start:node.end]
        if s.text == "MIME":
            return self.raw[node.start:node.body_start]
        # HEADER, HEADER.FIELDS(.NOT) and TEXT of a part are of a message/rfc822.
        embedded = node.message
        if embedded is None:
            return b""
        if s.text == "HEADER" and not embedded.fields and embedded.body_start >= embedded.end:
            # A message/rfc822 part with nothing in it: the line end there belongs
            # to the boundary after it, as Dovecot reads it, so no header at all.
            return b""
        return self._message_section(embedded, s)

    def _message_section(self, entity: _Entity, s: Section) -> bytes:
        raw = self.raw
        if s.text == "HEADER":
            return raw[entity.start:entity.body_start]
        if s.text == "TEXT":
            return raw[entity.body_start:entity.end]
        if s.text not in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            return b""
        wanted = _lower_names(s.fields)
        keep = s.text == "HEADER.FIELDS"
        out = []
        for item in entity.fields:
            if (item.name.lower() in wanted) == keep:
                text = raw[item.start:item.end]
                out.append(text if text.endswith(b"\n") else text + b"\r\n")
        # "the blank line is included in all header fetches, except in the case of a
        # message which has no body and no blank line" (RFC 9051 §6.4.5): a subset
        # of fields ends with one in any case, as Dovecot sends it, so that a client
        # can tell where the fields end.
        out.append(raw[entity.header_end:entity.body_start] or b"\r\n")
        return b"".join(out)

    # --- BINARY[part] (RFC 3516) ------------------------------------------------------

    def binary(self, part: tuple[int, ...]) -> bytes:
        """A part with its Content-Transfer-Encoding undone.  ``()`` is the whole
        message, each part decoded and its Content-Transfer-Encoding field changed to
        binary (as Dovecot does); a message/rfc822 part is converted the same way.
        Raises UnknownCTE."""
        if not part:
            return self._convert(self._root)
        node = self._resolve(part)
        if node is None:
            return b""
        if node.message is not None:
            return self._convert(node.message)
        return self._convert_body(node)

    def _convert(self, entity: _Entity) -> bytes:
        """Header and body of an entity with every part's transfer encoding undone
        and, where that changed the body, "Content-Transfer-Encoding: binary"."""
        raw = self.raw
        header = raw[entity.start:entity.body_start]
        item = next((f for f in entity.fields
                     if f.name.lower() == b"content-transfer-encoding"), None)
        leaf = not entity.is_multipart and entity.message is None
        if leaf and item is not None and _cte(_field_text(raw, item)) not in _IDENTITY:
            line = raw[item.start:item.end]
            header = raw[entity.start:item.start] + b"Content-Transfer-Encoding: binary" + \
                line[len(line.rstrip(b"\r\n")):] + raw[item.end:entity.body_start]
        return header + self._convert_body(entity)

    def _convert_body(self, entity: _Entity) -> bytes:
        raw = self.raw
        if entity.message is not None:
            return self._convert(entity.message)
        if entity.is_multipart:
            out, position = [], entity.body_start
            for kid in entity.children:
                out += [raw[position:kid.start], self._convert(kid)]
                position = kid.end
            out.append(raw[position:entity.end])
            return b"".join(out)
        body = raw[entity.body_start:entity.end]
        return _transfer_decode(body, _cte(self._first(entity, "Content-Transfer-Encoding")))

    # --- decoded text for SEARCH and SORT --------------------------------------------

    def head_octets(self) -> bytes:
        """Octets that hold the whole top-level header, as stored, found without
        parsing it: SEARCH looks for its needle there before it parses.  Up to the
        first CRLF blank line (one search; a header of bare LF lines may end before)."""
        crlf = self.raw.find(b"\n\r\n")
        if crlf < 0:
            return self.raw[:_Parser(self.raw).split(0, ())[0]]
        return self.raw[:crlf + 1]

    def header(self, name: str) -> list[str]:
        """The values of the top-level fields called ``name`` (any case), unfolded
        and RFC 2047-decoded."""
        lower = name.lower().encode("utf-8", "replace")
        return [self._decoded(item) for item in self._head.fields
                if item.name.lower() == lower]

    def addresses(self, name: str) -> list[tuple[str, str, str]]:
        """The addresses in the top-level fields called ``name``, read as ENVELOPE
        reads them (comments and routes dropped): (display name, RFC 2047-decoded;
        local part; domain), "" for what is missing.  A group comes as ("", its
        name, "") before its members; its end is left out."""
        lower = name.lower().encode("utf-8", "replace")
        out: list[tuple[str, str, str]] = []
        for item in self._head.fields:
            if item.name.lower() != lower:
                continue
            for display, _adl, mailbox, host in _AddressParser(
                    _unfold(_field_text(self.raw, item))).parse():
                if mailbox is None:
                    continue                        # the end of a group
                out.append((_decode_words(display) if display else "",
                            "" if mailbox == _NO_MAILBOX else _text(mailbox),
                            "" if host in (None, _NO_DOMAIN) else _text(host or b"")))
        return out

    def header_text(self) -> str:
        """The whole top-level header, one decoded field a line."""
        return "".join(f"{_text(item.name)}: {self._decoded(item)}\r\n"
                       for item in self._head.fields)

    def _decoded(self, item: _Field) -> str:
        return _decode_words(_unfold(_field_text(self.raw, item)).strip(b" \t"))

    def body_text(self) -> str:
        """The text of every text/* part (and of a multipart that has no parts),
        transfer- and charset-decoded with replacement characters for junk."""
        out: list[str] = []
        self._collect_text(self._root, out)
        return "\n".join(out)

    def _collect_text(self, entity: _Entity, out: list[str]) -> None:
        if entity.message is not None:
            self._collect_text(entity.message, out)
            return
        for kid in entity.children:
            self._collect_text(kid, out)
        # A multipart without parts is shown as one text part: search it as one.
        if entity.children or not (entity.is_text or entity.is_multipart):
            return
        body = self.raw[entity.body_start:entity.end]
        try:
            body = _transfer_decode(body, _cte(self._first(entity, "Content-Transfer-Encoding")))
        except UnknownCTE:
            pass
        charset = _param(entity.params, b"charset")
        out.append(_decode_charset(body, charset.decode("latin-1") if charset else None))

    def date(self) -> Optional[float]:
        """The Date: field as a UNIX time (RFC 5322 §3.3), None when it is missing or
        cannot be read."""
        value = self._first(self._head, "Date")
        if value is None:
            return None
        try:
            parsed = parsedate_tz(_unfold(value).decode("latin-1"))
            if parsed is None:
                return None
            return float(calendar.timegm(parsed[:9]) - (parsed[9] or 0))
        except (ValueError, OverflowError, TypeError, IndexError):
            return None


def _empty_body(extended: bool) -> bytes:
    """An empty text/plain part: what Dovecot shows for a multipart without parts
    (RFC 9051 requires at least one) and for an encoded message/rfc822."""
    fields = b'"text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0'
    return b"(" + fields + (b" NIL NIL NIL NIL)" if extended else b")")


def _first_atom(value: bytes) -> Optional[bytes]:
    tokens = [t for t in _lex(value, _TSPECIALS) if t[0] == _ATOM]
    return tokens[0][1] if tokens else None


def _param_list(params: _Params) -> bytes:
    """body-fld-param: ("name" "value" ...) or NIL."""
    if not params:
        return b"NIL"
    return plist([quote(item) for pair in params for item in pair])


# --- addresses (RFC 5322 §3.4, as RFC 9051 §7.5.2 ENVELOPE shows them) ----------------

_NO_MAILBOX, _NO_DOMAIN = b"MISSING_MAILBOX", b"MISSING_DOMAIN"   # Dovecot's placeholders
_Address = tuple[Optional[bytes], Optional[bytes], Optional[bytes], Optional[bytes]]


def _addresses(value: bytes) -> list[bytes]:
    """An address-list as ENVELOPE address structures: (name adl mailbox host), a
    group as (NIL NIL "name" NIL) ... (NIL NIL NIL NIL)."""
    return [b"(" + b" ".join(nstring(item) for item in address) + b")"
            for address in _AddressParser(value).parse()]


class _AddressParser:
    """A forgiving RFC 5322 address-list parser: it never raises; what it cannot read
    becomes a placeholder or is skipped."""

    def __init__(self, value: bytes) -> None:
        self.tokens = _lex(value, _ADDRESS_SPECIALS, domain_literals=True)
        self.index = 0
        self.out: list[_Address] = []
        self.group = False

    def peek(self) -> Optional[_Token]:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def parse(self) -> list[_Address]:
        while self.index < len(self.tokens):
            token = self.tokens[self.index]
            if _is(token, b";") and self.group:
                self.out.append((None, None, None, None))       # end of group
                self.group = False
                self.index += 1
            elif _is(token, b",") or _is(token, b";") or _is(token, b":"):
                self.index += 1
            else:
                before = self.index
                self.address()
                if self.index == before:            # nothing usable: skip the token
                    self.index += 1
        if self.group:
            self.out.append((None, None, None, None))
        return self.out

    def address(self) -> None:
        """A mailbox, or the start of a group (RFC 5322 §3.4)."""
        words, comments = self.phrase()
        token = self.peek()
        if _is(token, b":") and not self.group:
            self.index += 1
            self.out.append((None, None, b" ".join(words), None))
            self.group = True
        elif _is(token, b"<"):
            self.index += 1
            self.angle_addr(b" ".join(words) or None)
        elif _is(token, b"@"):
            self.index += 1
            domain, more = self.domain()
            comments += more
            name = comments[-1] if comments and comments[-1] else None
            self.out.append((name, None, b"".join(words) or _NO_MAILBOX, domain or _NO_DOMAIN))
        elif words:
            name = comments[-1] if comments and comments[-1] else None
            self.out.append((name, None, b"".join(words), _NO_DOMAIN))

    def phrase(self) -> tuple[list[bytes], list[bytes]]:
        """Words (atoms, quoted strings) and comments up to a structural special."""
        words: list[bytes] = []
        comments: list[bytes] = []
        while (token := self.peek()) is not None:
            if token[0] == _SPECIAL and token[1] in b"<:@,;":
                break
            if token[0] == _COMMENT:
                comments.append(token[1])
            elif token[0] != _SPECIAL:
                words.append(token[1])
            self.index += 1
        return words, comments

    def domain(self) -> tuple[bytes, list[bytes]]:
        """A domain (dot-atom or domain literal, "." may stand apart); what follows
        it up to the end of the address is skipped, its comments kept."""
        parts: list[bytes] = []
        comments: list[bytes] = []
        done = False
        while (token := self.peek()) is not None and not _is(token, b",") and \
                not _is(token, b">") and not (_is(token, b";") and self.group):
            if token[0] == _COMMENT:
                comments.append(token[1])
            elif token[0] == _SPECIAL or (parts and not parts[-1].endswith(b".") and
                                          not token[1].startswith(b".")):
                done = True
            elif not done:
                parts.append(token[1])
            self.index += 1
        return b"".join(parts), comments

    def angle_addr(self, name: Optional[bytes]) -> None:
        """``<[route:]local@domain>``; the route (obs-route) becomes the adl."""
        adl: Optional[bytes] = None
        if _is(self.peek(), b"@"):
            route = []
            while (token := self.peek()) is not None and not _is(token, b":") \
                    and not _is(token, b">"):
                if token[0] != _COMMENT:
                    route.append(token[1])
                self.index += 1
            adl = b"".join(route)
            if _is(self.peek(), b":"):
                self.index += 1
        local: list[bytes] = []
        while (token := self.peek()) is not None and token[0] != _SPECIAL:
            if token[0] != _COMMENT:
                local.append(token[1])
            self.index += 1
        domain = b""
        if _is(self.peek(), b"@"):
            self.index += 1
            domain, _ = self.domain()
        # Skip to the end of this address.
        while (token := self.peek()) is not None and not _is(token, b",") \
                and not (_is(token, b";") and self.group):
            self.index += 1
        self.out.append((name, adl, b"".join(local) or _NO_MAILBOX, domain or _NO_DOMAIN))
