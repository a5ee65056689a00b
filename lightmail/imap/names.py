"""Mailbox names on the wire: modified UTF-7, UTF-8, hierarchy and LIST patterns.

LightMail keeps names in UTF-8 with ``/`` as the hierarchy delimiter.  IMAP4rev1
clients see them in modified UTF-7 (RFC 3501 §5.1.3); sessions that ENABLE UTF8=ACCEPT
(RFC 6855) or IMAP4rev2 (RFC 9051 §5.1) see UTF-8.  The codec is Twisted's
(``twisted.mail.imap4`` registers ``imap4-utf-7``).
"""

from __future__ import annotations

import re

import twisted.mail.imap4  # noqa: F401  (registers the imap4-utf-7 codec)

DELIMITER = "/"


class BadName(ValueError):
    pass


def decode_name(raw: str, utf8: bool) -> str:
    """A client's mailbox name to the stored form."""
    if not utf8 and "&" in raw:
        try:
            raw = raw.encode("ascii").decode("imap4-utf-7")
        except (UnicodeError, ValueError):
            raise BadName("invalid modified UTF-7 in mailbox name") from None
    if raw.upper() == "INBOX":
        return "INBOX"
    if raw[:6].upper() == "INBOX/":
        raw = "INBOX/" + raw[6:]
    if not raw or raw.startswith(DELIMITER) or raw.endswith(DELIMITER) or "//" in raw:
        raise BadName("invalid mailbox name")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in raw):
        raise BadName("control characters in mailbox name")
    return raw


def encode_name(name: str, utf8: bool) -> str:
    """A stored name as the client should see it."""
    if utf8 or (name.isascii() and "&" not in name):
        return name
    return name.encode("imap4-utf-7").decode("ascii")


def pattern_regex(reference: str, pattern: str) -> re.Pattern[str]:
    """LIST's reference and pattern (RFC 9051 §6.3.9) as a regex over stored names:
    ``*`` matches anything, ``%`` anything but the delimiter.

    The reference is prefixed as it is, no delimiter added (as Dovecot and Cyrus do):
    ``LIST "foo" "*"`` matches ``foo`` itself and ``foobar`` as well as ``foo/bar``;
    IMAPClient's ``list_folders(directory)`` relies on getting the directory too."""
    full = pattern
    if reference and not pattern.startswith(DELIMITER):
        full = reference + pattern
    # INBOX matches case-insensitively, as the name itself (RFC 9051 §5.1).
    if full[:5].upper() == "INBOX" and (len(full) == 5 or full[5] in (DELIMITER, "*", "%")):
        return re.compile("^(?i:INBOX)" + _glob(full[5:]) + "$", re.DOTALL)
    return re.compile("^" + _glob(full) + "$", re.DOTALL)


def _glob(text: str) -> str:
    out = []
    for ch in text:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append(f"[^{re.escape(DELIMITER)}]*")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def parents(name: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = name.split(DELIMITER)
    return [DELIMITER.join(parts[:i]) for i in range(1, len(parts))]
