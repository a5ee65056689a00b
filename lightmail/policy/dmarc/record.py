"""A DMARC policy record (RFC 7489 §6.3, §6.4; ``np`` from RFC 9091), read with the
leniency §6.6.3 asks of a receiver.

* A record is a TXT record that starts with ``v=DMARC1`` (§6.4: the version tag
  first, its value as written); :func:`is_dmarc_record` tells which of a name's TXT
  records are candidates, and discovery (``discovery.py``) keeps one.
* Unknown tags are ignored (§6.3), and so is a known tag whose value is not valid:
  the default stands in (§6.6.3: "syntax errors in the remainder of the record
  SHOULD be discarded in favor of default values"); :attr:`DMARCRecord.problems`
  says what was set aside.  A tag given twice keeps its first value.
* A record without a valid ``p`` (or with an ``sp`` that is not valid) is read as
  ``p=none`` when it names at least one valid report URI, and is no policy at all
  (:class:`DMARCSyntaxError`) otherwise (§6.6.3 step 6).
* ``rua``/``ruf`` are comma-separated URIs, each with an optional ``!size`` (§6.2:
  a count, then k, m, g or t, powers of two); a URI that is not one is skipped.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from dataclasses import dataclass
from typing import Optional

POLICIES = ("none", "quarantine", "reject")
ALIGNMENTS = ("r", "s")
FAILURE_OPTIONS = ("0", "1", "d", "s")
KNOWN_TAGS = ("v", "p", "sp", "np", "adkim", "aspf", "pct", "rua", "ruf", "fo", "rf", "ri")
# §6.2: the units of a URI's size limit are powers of two.
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

# §6.4: dmarc-version = "v" *WSP "=" *WSP %x44 %x4d %x41 %x52 %x43 %x31 (the value is
# case-sensitive, the tag name is not), then a separator or the end.
_VERSION = re.compile(r"[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|$)")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")
_SIZE = re.compile(r"(\d{1,15})([kmgtKMGT]?)")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")


class DMARCSyntaxError(ValueError):
    """The text is no usable DMARC record; the message says why."""


@dataclass(frozen=True)
class ReportURI:
    """One ``rua``/``ruf`` destination."""

    uri: str                        # as written, without its size limit
    max_size: Optional[int] = None  # octets; None: no limit

    @property
    def mailto(self) -> Optional[str]:
        """The address of a ``mailto:`` URI (its ``?headers`` dropped), or None."""
        scheme, _, rest = self.uri.partition(":")
        if scheme.lower() != "mailto":
            return None
        address = urllib.parse.unquote(rest.partition("?")[0]).strip()
        local, at, domain = address.rpartition("@")
        if not (at and local and _DOMAIN.fullmatch(domain.lower().rstrip("."))):
            return None
        return f"{local}@{domain.lower().rstrip('.')}"

    def __str__(self) -> str:
        return self.uri if self.max_size is None else f"{self.uri}!{self.max_size}"


@dataclass(frozen=True)
class DMARCRecord:
    """A parsed record, defaults filled in (§6.3)."""

    p: str                          # none, quarantine, reject
    sp: Optional[str] = None        # None: not given (p applies to subdomains)
    np: Optional[str] = None        # RFC 9091; None: not given (sp, then p, applies)
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: tuple[ReportURI, ...] = ()
    ruf: tuple[ReportURI, ...] = ()
    fo: str = "0"
    rf: str = "afrf"
    ri: int = 86400
    text: str = ""
    #: What was set aside while reading (invalid values, tags given twice).
    problems: tuple[str, ...] = ()

    def policy_for(self, subdomain: bool, nonexistent: bool = False) -> str:
        """The policy a message gets: ``p`` for the domain that published the record,
        ``sp`` (else ``p``) for its subdomains, and ``np`` (else ``sp``, else ``p``)
        for subdomains that do not exist (RFC 9091 §4.2)."""
        if not subdomain:
            return self.p
        if nonexistent and self.np is not None:
            return self.np
        return self.sp or self.p


def is_dmarc_record(text: str) -> bool:
    """Whether a TXT record's text claims to be a DMARC record (§6.6.3 step 3)."""
    return _VERSION.match(text) is not None


# A busy MX reads the same few records again and again (the answers are cached by
# the resolver): a record is parsed once (DMARCRecord is frozen, so it may be shared).
@functools.lru_cache(maxsize=1024)
def parse_record(text: str) -> DMARCRecord:
    """The record ``text`` says; raises :class:`DMARCSyntaxError` when it is none."""
    if not is_dmarc_record(text):
        raise DMARCSyntaxError("it does not start with v=DMARC1")
    values: dict[str, str] = {}
    problems: list[str] = []
    for part in text.split(";")[1:]:
        part = part.strip(" \t\r\n")
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(" \t").lower(), value.strip(" \t")
        if not sep or not re.fullmatch(r"[a-z0-9]+", name):
            problems.append(f"{part[:40]!r} is not a tag")
        elif name not in KNOWN_TAGS or name == "v":
            continue                    # §6.3: unknown tags are ignored
        elif name in values:
            problems.append(f"{name}= is given twice (the first one counts)")
        else:
            values[name] = value
    rua = _uris(values.get("rua"), "rua", problems)
    ruf = _uris(values.get("ruf"), "ruf", problems)
    p = _choice(values, "p", POLICIES, None, problems)
    sp = _choice(values, "sp", POLICIES, None, problems)
    if p is None or ("sp" in values and sp is None):
        if not rua:                     # §6.6.3 step 6
            raise DMARCSyntaxError("no valid p= (none, quarantine or reject)"
                                   if p is None else f"sp={values['sp']!r} is not valid")
        problems.append("read as p=none: its p= or sp= is not valid, and it asks for "
                        "reports")
        p, sp = "none", None
    return DMARCRecord(
        p=p, sp=sp, np=_choice(values, "np", POLICIES, None, problems),
        adkim=_choice(values, "adkim", ALIGNMENTS, "r", problems) or "r",
        aspf=_choice(values, "aspf", ALIGNMENTS, "r", problems) or "r",
        pct=_number(values, "pct", 100, 100, problems),
        rua=rua, ruf=ruf, fo=_failure_options(values.get("fo"), problems),
        rf=_report_formats(values.get("rf"), problems),
        ri=_number(values, "ri", 86400, 2**32 - 1, problems),
        text=text, problems=tuple(problems))


def parse_uris(text: str) -> tuple[ReportURI, ...]:
    """The valid URIs of a ``rua``/``ruf`` value (comma-separated, each with its
    optional ``!size``)."""
    return _uris(text, "rua", [])


def _choice(values: dict[str, str], name: str, choices: tuple[str, ...],
            default: Optional[str], problems: list[str]) -> Optional[str]:
    if name not in values:
        return default
    value = values[name].lower()
    if value in choices:
        return value
    problems.append(f"{name}={values[name][:40]!r} is not valid")
    return default


def _number(values: dict[str, str], name: str, default: int, maximum: int,
            problems: list[str]) -> int:
    if name not in values:
        return default
    raw = values[name]
    if raw.isascii() and raw.isdigit() and int(raw) <= maximum:
        return int(raw)
    problems.append(f"{name}={raw[:40]!r} is not valid")
    return default


def _failure_options(raw: Optional[str], problems: list[str]) -> str:
    """fo: colon-separated 0, 1, d, s (§6.3); any option not valid voids the tag."""
    if raw is None:
        return "0"
    options = [option.strip(" \t").lower() for option in raw.split(":")]
    if options and all(option in FAILURE_OPTIONS for option in options):
        return ":".join(options)
    problems.append(f"fo={raw[:40]!r} is not valid")
    return "0"


def _report_formats(raw: Optional[str], problems: list[str]) -> str:
    if raw is None:
        return "afrf"
    formats = [item.strip(" \t").lower() for item in raw.split(":")]
    if formats and all(re.fullmatch(r"[a-z0-9-]+", item) for item in formats):
        return ":".join(formats)
    problems.append(f"rf={raw[:40]!r} is not valid")
    return "afrf"


def _uris(raw: Optional[str], name: str, problems: list[str]) -> tuple[ReportURI, ...]:
    if raw is None:
        return ()
    uris: list[ReportURI] = []
    for item in (item.strip(" \t") for item in raw.split(",")):
        uri, bang, size = item.rpartition("!")
        match = _SIZE.fullmatch(size) if bang else None
        if match is None:
            uri = item
        if not _SCHEME.fullmatch(uri):
            problems.append(f"{name}: {item[:60]!r} is not a URI")
            continue
        limit = None
        if match is not None:
            limit = int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
        uris.append(ReportURI(uri, limit))
    return tuple(uris)
