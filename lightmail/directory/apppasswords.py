"""App passwords: a random password per mail client, named, scoped to protocols,
revocable, shown once (``lightmail user app-password add``).

Four groups of five letters and digits (about 103 bits), easy to type on a phone.  Only
the SHA-256 is stored (``schema.app_passwords``): guessing a random string of that size
is hopeless however fast the hash, and a login finds its row by that hash at once, with
no argon2 work and nothing to tell from the time it takes.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Optional

ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"      # no l, o, 0, 1: read aloud safely
GROUPS, GROUP_SIZE = 4, 5
SHAPE = re.compile(rf"[{ALPHABET}]{{{GROUP_SIZE}}}(-[{ALPHABET}]{{{GROUP_SIZE}}}){{{GROUPS - 1}}}")
PROTOCOLS = ("imap", "pop3", "smtp")


@dataclass(frozen=True)
class AppPassword:
    name: str
    protocols: tuple[str, ...]          # empty: every protocol
    created: int                        # milliseconds since the epoch
    last_used: Optional[int]

    def allows(self, protocol: str) -> bool:
        return not self.protocols or protocol in self.protocols


def new_secret() -> str:
    return "-".join("".join(secrets.choice(ALPHABET) for _ in range(GROUP_SIZE))
                    for _ in range(GROUPS))


def looks_like_one(password: str) -> bool:
    """Whether a password has an app password's shape (only those are looked up)."""
    return SHAPE.fullmatch(password) is not None


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_protocols(text: str) -> tuple[str, ...]:
    """"imap,pop3" -> ("imap", "pop3"); "" or "all" -> () (every protocol)."""
    names = tuple(sorted({n for n in re.split(r"[\s,]+", text.lower()) if n}))
    if names in ((), ("all",)):
        return ()
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol {unknown[0]!r}: use {', '.join(PROTOCOLS)}")
    return names
