"""Adding many SQL users in one transaction (``lightmail user import``): all or none.

The checks are those of ``SQLDirectory.add_user`` (the domain is local and served
by SQL, the address is new), made for the whole set first; a problem with any user
adds nobody.  The insert runs in the same transaction as the checks, so a user
added meanwhile by someone else makes the import fail whole rather than half.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lightmail.directory.interfaces import DirectoryError
from lightmail.directory.passwords import Secrets
from lightmail.storage import schema as s
from lightmail.storage.database import now_ms

_CHUNK = 500        # names per IN (...) and rows per executemany


@dataclass(frozen=True)
class NewUser:
    """One user to add; ``line`` is where it came from, for the messages."""

    line: int
    local: str
    domain: str
    quota_bytes: int
    enabled: bool = True
    #: What is kept of the password (none: no password login, as ``user add
    #: --no-password``); a hash given as such comes without SCRAM's verifiers, made
    #: at the user's first password login.
    secrets: Optional[Secrets] = None

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"


class UsersRefused(DirectoryError):
    """Some users cannot be added; ``problems`` are (line, message), by line."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        super().__init__(f"{len(problems)} user(s) cannot be added; none was")
        self.problems = problems


def problems_now(conn: Connection, users: Sequence[NewUser],
                 delegated: frozenset[str] = frozenset()) -> list[tuple[int, str]]:
    """What stands in the way of adding ``users`` (worker thread), by line."""
    problems: list[tuple[int, str]] = []
    ids = _domain_ids(conn, users)
    wanted: dict[int, list[str]] = {}
    for user in users:
        if user.domain in delegated:
            problems.append((user.line, f"{user.address}: the users of {user.domain} "
                                        "live in another backend ([backend:NAME])"))
        elif user.domain not in ids:
            problems.append((user.line, f"{user.address}: {user.domain} is not a local "
                                        "domain (lightmail domain add)"))
        else:
            wanted.setdefault(ids[user.domain], []).append(user.local)
    existing: set[tuple[int, str]] = set()
    for domain_id, locals_ in wanted.items():
        for start in range(0, len(locals_), _CHUNK):
            existing.update((domain_id, row.localpart) for row in conn.execute(
                sa.select(s.users.c.localpart).where(
                    (s.users.c.domain_id == domain_id)
                    & s.users.c.localpart.in_(locals_[start:start + _CHUNK]))))
    for user in users:
        if (ids.get(user.domain), user.local) in existing:
            problems.append((user.line, f"{user.address}: the user exists already"))
    return sorted(problems)


def add_users_now(conn: Connection, users: Sequence[NewUser],
                  delegated: frozenset[str] = frozenset()) -> int:
    """Add every user of ``users`` in the caller's write transaction, or none
    (raises :class:`UsersRefused`).  Returns how many were added."""
    problems = problems_now(conn, users, delegated)
    if problems:
        raise UsersRefused(problems)
    ids = _domain_ids(conn, users)
    created = now_ms()
    rows = [{"domain_id": ids[user.domain], "localpart": user.local,
             "password_hash": user.secrets.password_hash if user.secrets else None,
             "scram_verifiers": (user.secrets.scram_verifiers or None) if user.secrets
             else None,
             "cram_md5": user.secrets.cram_md5 if user.secrets else None,
             "quota_bytes": user.quota_bytes, "enabled": user.enabled,
             "created": created} for user in users]
    for start in range(0, len(rows), _CHUNK):
        conn.execute(s.users.insert(), rows[start:start + _CHUNK])
    return len(rows)


def _domain_ids(conn: Connection, users: Sequence[NewUser]) -> dict[str, int]:
    domains = sorted({user.domain for user in users})
    ids: dict[str, int] = {}
    for start in range(0, len(domains), _CHUNK):
        ids.update((row.name, row.id) for row in conn.execute(
            sa.select(s.domains.c.name, s.domains.c.id).where(
                s.domains.c.name.in_(domains[start:start + _CHUNK]))))
    return ids
