"""Mailbox names on the wire: modified UTF-7, UTF-8, hierarchy and LIST patterns.

LightMail keeps names in UTF-8 with ``/`` as the hierarchy delimiter.  IMAP4rev1
clients see them in modified UTF-7 (RFC 3501 §5.1.3); sessions that ENABLE UTF8=ACCEPT
(RFC 6855) or IMAP4rev2 (RFC 9051 §5.1) see UTF-8.  The codec is Twisted's
(``twisted.mail.imap4`` registers ``imap4-utf-7``).
"""

from __future__ import annotations

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


class ListPattern:
    """LIST's reference and pattern (RFC 9051 §6.3.9) matched against stored names:
    ``*`` matches anything, ``%`` anything but the delimiter.

    The reference is prefixed as it is, no delimiter added (as Dovecot and Cyrus do):
    ``LIST "foo" "*"`` matches ``foo`` itself and ``foobar`` as well as ``foo/bar``;
    IMAPClient's ``list_folders(directory)`` relies on getting the directory too.

    Not a regex: ``"*a*a*a…"`` would backtrack for exponential time on the reactor.
    The pattern positions reached so far are the bits of an int, advanced one name
    character at a time."""

    def __init__(self, reference: str, pattern: str) -> None:
        full = pattern
        if reference and not pattern.startswith(DELIMITER):
            full = reference + pattern
        # INBOX matches case-insensitively, as the name itself (RFC 9051 §5.1).
        fold = 5 if full[:5].upper() == "INBOX" and (
            len(full) == 5 or full[5] in (DELIMITER, "*", "%")) else 0
        tokens: list[str] = []
        for ch in full:
            if ch in "*%" and tokens and tokens[-1] in "*%" and len(tokens) > fold:
                # A run of wildcards is one: ``*`` if it has one, else ``%``.
                tokens[-1] = "*" if "*" in (ch, tokens[-1]) else "%"
            else:
                tokens.append(ch)
        self.exact: dict[str, int] = {}
        self.folded: dict[str, int] = {}
        self.star = self.percent = 0
        for i, ch in enumerate(tokens):
            if i >= fold and ch == "*":
                self.star |= 1 << i
            elif i >= fold and ch == "%":
                self.percent |= 1 << i
            elif i < fold:
                self.folded[ch.upper()] = self.folded.get(ch.upper(), 0) | 1 << i
            else:
                self.exact[ch] = self.exact.get(ch, 0) | 1 << i
        self.wild = self.star | self.percent
        self.accept = 1 << len(tokens)

    def match(self, name: str) -> bool:
        wild, star, percent, exact = self.wild, self.star, self.percent, self.exact
        reached = 1 | (1 & wild) << 1
        for ch in name:
            literal = exact.get(ch, 0)
            if self.folded:
                literal |= self.folded.get(ch.upper(), 0)
            reached = ((reached & literal) << 1 | reached & star
                       | (reached & percent if ch != DELIMITER else 0))
            if not reached:
                return False
            reached |= (reached & wild) << 1
        return bool(reached & self.accept)


def parents(name: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = name.split(DELIMITER)
    return [DELIMITER.join(parts[:i]) for i in range(1, len(parts))]
