"""ESMTP parameters (RFC 5321 §4.1.2) and the values of the DSN ones (RFC 3461
§4: RET and ENVID on MAIL FROM, NOTIFY and ORCPT on RCPT TO), checked by the same
rules whoever gives them: the SMTP client on its commands, or a milter with the
recipients it adds and the sender it changes (lightmail.policy.milter.check)."""

from __future__ import annotations

import re
from typing import Optional

# RFC 3461 §4: xtext (printable ASCII but "+" and "=", "+HH" for the rest); the second
# form lets in the UTF-8 that RFC 6533 allows under SMTPUTF8.
_XTEXT = re.compile(r"^[\x21-\x2a\x2c-\x3c\x3e-\x7e]*$|^(?:[^+]|\+[0-9A-F]{2})*$")
#: RFC 3461 §4.4: ENVID's length limit.
MAX_ENVID = 100
#: ORCPT's (RFC 3461 §4.2 allows 500 characters in all).
MAX_ORCPT = 500


def parse_params(text: str) -> list[tuple[str, Optional[str]]]:
    """ESMTP parameters: ``NAME`` or ``NAME=VALUE``, space separated; names upper-cased,
    values as given (None for a bare ``NAME``)."""
    out: list[tuple[str, Optional[str]]] = []
    for item in text.split():
        name, eq, value = item.partition("=")
        out.append((name.upper(), value if eq else None))
    return out


def valid_notify(value: str) -> bool:
    """RFC 3461 §4.1: NEVER alone, or any of SUCCESS, FAILURE, DELAY, each once."""
    items = value.upper().split(",")
    if items == ["NEVER"]:
        return True
    return len(set(items)) == len(items) and set(items) <= {"SUCCESS", "FAILURE", "DELAY"}


def valid_orcpt(value: str) -> bool:
    """RFC 3461 §4.2: ``addr-type;xtext``, at most MAX_ORCPT characters."""
    return ";" in value and len(value) <= MAX_ORCPT


def valid_ret(value: str) -> bool:
    """RFC 3461 §4.3: FULL or HDRS."""
    return value.upper() in ("FULL", "HDRS")


def valid_envid(value: str) -> bool:
    """RFC 3461 §4.4: xtext, at most MAX_ENVID characters."""
    return len(value) <= MAX_ENVID and bool(_XTEXT.match(value))
