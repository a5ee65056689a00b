"""Bearer tokens of the admin API (``lightmail token add|list|revoke``).

A token is ``lmt_`` and 40 random characters (about 238 bits); it is shown once, and
only its SHA-256 is stored (``schema.admin_tokens``): as with app passwords, a random
string of that size cannot be guessed however fast the hash, and a request finds its
row by the hash at once.  Each token is ``read`` (GET only) or ``write`` (everything),
and may expire.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, succeed

from lightmail.storage import schema as s
from lightmail.storage.database import Database, now_ms

PREFIX = "lmt_"
SCOPES = ("read", "write")
# A token's last use is written down at most this often (a script polling the queue
# every second would otherwise be a write transaction a second).
USE_RECORD_INTERVAL_MS = 60_000


class TokenError(Exception):
    """A request to the token store that cannot be done; the text says why."""


@dataclass(frozen=True)
class AdminToken:
    name: str
    scope: str                      # "read" or "write"
    created: int                    # milliseconds since the epoch
    expires: Optional[int]
    last_used: Optional[int]

    def allows_writes(self) -> bool:
        return self.scope == "write"


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(30)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


class AdminTokens:
    """The tokens, in the SQL database every process shares."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, name: str, scope: str, lifetime_ms: Optional[int] = None
            ) -> Deferred[str]:
        """Make a token; fires with its secret (the only time it is seen)."""
        if scope not in SCOPES:
            raise TokenError(f"scope is read or write, not {scope!r}")
        if not name or len(name) > 255 or not name.isprintable():
            raise TokenError("a token's name is 1 to 255 printable characters")
        secret = new_secret()

        def add_(conn: Connection) -> str:
            if conn.execute(sa.select(s.admin_tokens.c.id).where(
                    s.admin_tokens.c.name == name)).first() is not None:
                raise TokenError(f"there is a token named {name!r} already")
            now = now_ms()
            conn.execute(s.admin_tokens.insert().values(
                name=name, scope=scope, secret_hash=secret_hash(secret), created=now,
                expires=now + lifetime_ms if lifetime_ms else None))
            return secret
        return self.db.write(add_)

    def list(self) -> Deferred[list[AdminToken]]:
        def list_(conn: Connection) -> list[AdminToken]:
            t = s.admin_tokens
            return [_token(row) for row in conn.execute(sa.select(t).order_by(t.c.name))]
        return self.db.read(list_)

    def revoke(self, name: str) -> Deferred[None]:
        def revoke_(conn: Connection) -> None:
            t = s.admin_tokens
            if not conn.execute(t.delete().where(t.c.name == name)).rowcount:
                raise TokenError(f"no token named {name!r}")
        return self.db.write(revoke_)

    def check(self, secret: str) -> Deferred[Optional[AdminToken]]:
        """The token whose secret this is, if it exists and has not expired."""
        if not secret.startswith(PREFIX):
            return succeed(None)
        digest = secret_hash(secret)
        t = s.admin_tokens

        def find(conn: Connection) -> Optional[sa.Row]:
            return conn.execute(sa.select(t).where(t.c.secret_hash == digest)).first()

        def note_use(row: Optional[sa.Row]) -> Any:
            now = now_ms()
            if row is None or (row.expires is not None and row.expires <= now):
                return None
            token = _token(row)
            if row.last_used is not None and now - row.last_used < USE_RECORD_INTERVAL_MS:
                return token

            def note(conn: Connection) -> None:
                conn.execute(t.update().where(t.c.id == row.id).values(last_used=now))
            return self.db.write(note).addCallback(lambda _: token)
        return self.db.read(find).addCallback(note_use)

def _token(row: sa.Row) -> AdminToken:
    return AdminToken(name=row.name, scope=row.scope, created=row.created,
                      expires=row.expires, last_used=row.last_used)
