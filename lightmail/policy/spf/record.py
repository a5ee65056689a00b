"""The text of SPF records (RFC 7208 §4.5, §4.6.1, §5, §6, §7.1, and the ABNF of §12):
choosing a name's one SPF record among its TXT records, and parsing it whole before
anything is evaluated (§4.6: a syntax error anywhere is a permerror, even after a
mechanism that would have matched).

Domain-specs and explanation strings are parsed into :data:`MacroString` tuples (text
and :class:`Macro` pieces) once; ``macros.py`` expands them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Union

__all__ = [
    "DOMAIN_LETTERS",
    "EXPLANATION_LETTERS",
    "Macro",
    "MacroString",
    "Mechanism",
    "Record",
    "SPFSyntaxError",
    "parse_explanation",
    "parse_record",
    "select_record",
]


class SPFSyntaxError(Exception):
    """The record (or an explanation string) breaks RFC 7208's grammar."""


@dataclass(frozen=True)
class Macro:
    """``%{letter digits r delimiters}`` (RFC 7208 §7.1); an upper-case letter asks
    for the value to be URL-escaped."""
    letter: str                 # lower case
    digits: int                 # 0: all the parts
    reverse: bool
    delimiters: str             # "" means "."
    escape: bool


MacroString = tuple[Union[str, Macro], ...]

# §7.1: c, r and t only in explanation text.
DOMAIN_LETTERS = frozenset("slodiphv")
EXPLANATION_LETTERS = DOMAIN_LETTERS | frozenset("crt")
_DELIMITERS = frozenset(".-+,/_=")
# §12: macro-literal is a visible character other than "%".
_LITERAL = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"%"}

# §12 toplabel, tried whole (a greedy match: "xn--zckzah" is one).
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9]")
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4 = re.compile(rf"{_QNUM}(?:\.{_QNUM}){{3}}")
_CIDR4 = re.compile(r"0|[1-9][0-9]?")             # then at most 32
_CIDR6 = re.compile(r"0|[1-9][0-9]{0,2}")         # then at most 128
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9._-]*)=(.*)", re.S)
_MECHANISM = re.compile(r"([+?~-]?)([A-Za-z][A-Za-z0-9]*)(.*)", re.S)
_DUAL_CIDR = re.compile(r"(?:/([0-9]+))?(?://([0-9]+))?\Z")
_VERSION = re.compile(rb"v=spf1(?: |\Z)", re.I)

_DNS_KINDS = frozenset({"include", "a", "mx", "ptr", "exists"})


@dataclass(frozen=True)
class Mechanism:
    qualifier: str              # "+", "-", "~" or "?"
    kind: str                   # all, include, a, mx, ptr, ip4, ip6, exists
    text: str                   # as written in the record, for reports
    domain: Optional[MacroString] = None       # None: the current domain
    network: Optional[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]] = None
    cidr4: int = 32
    cidr6: int = 128

    @property
    def queries_dns(self) -> bool:
        """Counted against the limit of 10 (RFC 7208 §4.6.4)."""
        return self.kind in _DNS_KINDS


@dataclass(frozen=True)
class Record:
    mechanisms: tuple[Mechanism, ...]
    redirect: Optional[MacroString]
    exp: Optional[MacroString]


def select_record(records: list[bytes]) -> Optional[str]:
    """The SPF record among a name's TXT records (§4.5): None when there is none; a
    permerror (SPFSyntaxError) for two or more, or for one that is not ASCII (§3.1).
    TXT records that are not SPF's are none of SPF's business, whatever they hold."""
    found = [record for record in records if _VERSION.match(record)]
    if len(found) > 1:
        raise SPFSyntaxError(f"{len(found)} SPF records")
    if not found:
        return None
    try:
        return found[0].decode("ascii")
    except UnicodeDecodeError:
        raise SPFSyntaxError("the record is not ASCII") from None


def parse_record(text: str) -> Record:
    """Every term of a ``v=spf1`` record, checked (§4.6.1: terms are separated by
    spaces, and only spaces)."""
    mechanisms: list[Mechanism] = []
    modifiers: dict[str, MacroString] = {}
    for term in text[len("v=spf1"):].split(" "):
        if not term:
            continue
        modifier = _MODIFIER.fullmatch(term)
        if modifier:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name in ("redirect", "exp"):
                if name in modifiers:     # §6: each at most once
                    raise SPFSyntaxError(f"{name}= more than once")
                modifiers[name] = _domain_spec(value, term)
            else:                          # §6: unknown modifiers are ignored, once checked
                _macro_string(value, EXPLANATION_LETTERS, term)
            continue
        mechanisms.append(_mechanism(term))
    return Record(tuple(mechanisms), modifiers.get("redirect"), modifiers.get("exp"))


def parse_explanation(text: str) -> MacroString:
    """An explanation string (§6.2: explain-string, with spaces and c, r, t)."""
    return _macro_string(text, EXPLANATION_LETTERS, "explanation", spaces=True)


def _mechanism(term: str) -> Mechanism:
    found = _MECHANISM.fullmatch(term)
    if not found:
        raise SPFSyntaxError(f"{term!r} is neither a mechanism nor a modifier")
    qualifier, kind, rest = found.group(1) or "+", found.group(2).lower(), found.group(3)
    if kind == "all":
        if rest:
            raise SPFSyntaxError(f"{term!r}: all takes no argument")
        return Mechanism(qualifier, kind, term)
    if kind in ("include", "exists"):
        if not rest.startswith(":"):
            raise SPFSyntaxError(f"{term!r}: {kind} needs a domain")
        return Mechanism(qualifier, kind, term, _domain_spec(rest[1:], term))
    if kind == "ptr":
        if not rest:
            return Mechanism(qualifier, kind, term)
        if not rest.startswith(":"):
            raise SPFSyntaxError(f"{term!r}: ptr takes a domain, nothing else")
        return Mechanism(qualifier, kind, term, _domain_spec(rest[1:], term))
    if kind in ("a", "mx"):
        domain: Optional[MacroString] = None
        if rest.startswith(":"):
            cidr = _DUAL_CIDR.search(rest, 1)
            assert cidr is not None           # it matches the empty string at the end
            domain = _domain_spec(rest[1:cidr.start()], term)
        else:
            cidr = _DUAL_CIDR.match(rest)
            if cidr is None:
                raise SPFSyntaxError(f"{term!r}: bad CIDR length")
        return Mechanism(qualifier, kind, term, domain,
                         cidr4=_cidr(cidr.group(1), _CIDR4, 32, term),
                         cidr6=_cidr(cidr.group(2), _CIDR6, 128, term))
    if kind in ("ip4", "ip6"):
        return Mechanism(qualifier, kind, term, network=_network(kind, rest, term))
    raise SPFSyntaxError(f"unknown mechanism {term!r}")


def _cidr(digits: Optional[str], pattern: re.Pattern[str], most: int, term: str) -> int:
    if digits is None:
        return most
    if not pattern.fullmatch(digits) or int(digits) > most:
        raise SPFSyntaxError(f"{term!r}: bad CIDR length /{digits}")
    return int(digits)


def _network(kind: str, rest: str, term: str
             ) -> Union[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    if not rest.startswith(":"):
        raise SPFSyntaxError(f"{term!r}: {kind} needs a network")
    address, slash, length = rest[1:].partition("/")
    if kind == "ip4":
        if not _IP4.fullmatch(address):
            raise SPFSyntaxError(f"{term!r}: bad IPv4 address")
        prefix = _cidr(length if slash else None, _CIDR4, 32, term)
        return ipaddress.IPv4Network(f"{address}/{prefix}", strict=False)
    # RFC 4291 §2.2 text, as the ipaddress module reads it (but no "%zone")
    if not re.fullmatch(r"[0-9A-Fa-f:.]+", address):
        raise SPFSyntaxError(f"{term!r}: bad IPv6 address")
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise SPFSyntaxError(f"{term!r}: bad IPv6 address") from None
    prefix = _cidr(length if slash else None, _CIDR6, 128, term)
    return ipaddress.IPv6Network(f"{address}/{prefix}", strict=False)


def _domain_spec(text: str, term: str) -> MacroString:
    """domain-spec = macro-string domain-end; domain-end = ( "." toplabel [ "." ] ) /
    macro-expand (§7.1): checked as written, not after expansion."""
    if not text:
        raise SPFSyntaxError(f"{term!r}: empty domain")
    pieces = _macro_string(text, DOMAIN_LETTERS, term)
    tail = _literal_tail(text)
    if tail is None:                       # ends with a macro-expand
        return pieces
    if tail.endswith("."):
        tail = tail[:-1]
    _, dot, last = tail.rpartition(".")
    if not dot or not _TOPLABEL.fullmatch(last):
        raise SPFSyntaxError(f"{term!r}: the domain does not end with a valid top label")
    return pieces


def _literal_tail(text: str) -> Optional[str]:
    """The text after the last macro-expand (``%{...}``, ``%%``, ``%_``, ``%-``), or
    None when the text ends with one.  The text is known to be well-formed."""
    position, end_of_last = 0, 0
    while True:
        percent = text.find("%", position)
        if percent < 0:
            break
        close = text.index("}", percent) + 1 if text[percent + 1] == "{" else percent + 2
        position = end_of_last = close
    return None if end_of_last == len(text) else text[end_of_last:]


def _macro_string(text: str, letters: frozenset[str], where: str,
                  spaces: bool = False) -> MacroString:
    pieces: list[Union[str, Macro]] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "%":
            if char not in _LITERAL and not (spaces and char == " "):
                raise SPFSyntaxError(f"{where!r}: character {char!r} not allowed")
            literal.append(char)
            i += 1
            continue
        following = text[i + 1:i + 2]
        if following in ("%", "_", "-"):   # §7.1: "%%", "%_" (space), "%-" ("%20")
            literal.append({"%": "%", "_": " ", "-": "%20"}[following])
            i += 2
            continue
        if following != "{":
            raise SPFSyntaxError(f"{where!r}: '%' must start a macro")
        close = text.find("}", i)
        if close < 0:
            raise SPFSyntaxError(f"{where!r}: unterminated macro")
        if literal:
            pieces.append("".join(literal))
            literal = []
        pieces.append(_macro(text[i + 2:close], letters, where))
        i = close + 1
    if literal:
        pieces.append("".join(literal))
    return tuple(pieces)


def _macro(body: str, letters: frozenset[str], where: str) -> Macro:
    """macro-letter transformers *delimiter; transformers = *DIGIT [ "r" ]."""
    found = re.fullmatch(r"([A-Za-z])([0-9]*)([rR]?)(.*)", body, re.S)
    if not found or found.group(1).lower() not in letters:
        raise SPFSyntaxError(f"{where!r}: bad macro %{{{body}}}")
    letter, digits, reverse, delimiters = found.groups()
    if digits and not digits.strip("0"):   # §7.3: the number of parts is not zero
        raise SPFSyntaxError(f"{where!r}: %{{{body}}} keeps zero parts")
    if any(d not in _DELIMITERS for d in delimiters):
        raise SPFSyntaxError(f"{where!r}: bad delimiter in %{{{body}}}")
    # More parts than a name can have (127) mean all of them; the cap also keeps a
    # number of thousands of digits from reaching int().
    parts = min(int(digits.lstrip("0")[:4] or 0), 999)
    return Macro(letter.lower(), parts, bool(reverse), delimiters, letter.isupper())
