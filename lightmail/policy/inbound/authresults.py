"""The result clauses of our Authentication-Results field (RFC 8601 §2.2), written as
authres writes them: ``method=result (comment) reason=... ptype.property=value``.

Plain string formatting rather than authres's objects: those (a property object per
value, a regular expression compiled by name for each quoting) cost some 60 µs of
the inbound checks' time on each message.  authres still reads the fields that come
with a message (lightmail.policy.arc.verify, the tests)."""

from __future__ import annotations

import re
from typing import NamedTuple

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")      # RFC 2045's token
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_SPECIALS = re.compile(r'(["\\])')


def quoted_if_needed(value: str) -> str:
    """``value`` as a token when it is one (or holds an ``@``: an address, as authres
    lets it through), else as a quoted-string."""
    if "@" in value or _TOKEN.fullmatch(value):
        return value
    return '"' + _SPECIALS.sub(r"\\\1", value) + '"'


class ResultClause(NamedTuple):
    """One method's result: ``properties`` are (``ptype.property``, value) pairs,
    written in that order; empty ``reason`` and ``comment`` are left out."""

    method: str
    result: str
    reason: str = ""
    comment: str = ""
    properties: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        parts = [self.method, "=", self.result]
        if self.comment:
            parts.append(f" ({self.comment})")
        if self.reason:
            parts.append(" reason=" + quoted_if_needed(_UNPRINTABLE.sub("?", self.reason)))
        for name, value in self.properties:
            parts.append(f" {name}={quoted_if_needed(value)}")
        return "".join(parts)
