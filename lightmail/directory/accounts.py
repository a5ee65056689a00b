"""What an administrator does to a user beyond their password: app passwords, enable
and disable, quota, expiring a password, and the last logins.  A part of the SQL
directory (``SQLDirectory`` takes these methods from :class:`AccountAdmin`)."""

from __future__ import annotations

import time
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from lightmail.address import AddressError, split_address
from lightmail.directory import apppasswords
from lightmail.directory.apppasswords import AppPassword
from lightmail.directory.interfaces import AlreadyExists, DirectoryError, LastLogin, NotFound, User
from lightmail.storage import schema as s
from lightmail.storage.database import Database, now_ms

# A login is written down at most this often per user: mail clients log in again
# every few minutes, and each write would be a transaction.
LOGIN_RECORD_INTERVAL = 60.0


class AccountAdmin:
    db: Database

    # Provided by SQLDirectory.
    def _user_row(self, conn: Connection, local: str, domain: str) -> Any:
        raise NotImplementedError

    def _changing(self, d: Deferred[Any]) -> Deferred[Any]:
        raise NotImplementedError

    def _found_user(self, conn: Connection, address: str) -> Any:
        try:
            local, domain = split_address(address)
        except AddressError as exc:
            raise DirectoryError(str(exc)) from None
        row = self._user_row(conn, local, domain)
        if row is None:
            raise NotFound(f"no such user: {local}@{domain}")
        return row

    def _update_user(self, address: str, **values: Any) -> Deferred[None]:
        def update(conn: Connection) -> None:
            row = self._found_user(conn, address)
            conn.execute(s.users.update().where(s.users.c.id == row.id).values(**values))
        return self._changing(self.db.write(update))

    # -- the account --------------------------------------------------------------------

    def set_enabled(self, address: str, enabled: bool) -> Deferred[None]:
        """A disabled user cannot log in; mail to them is still delivered."""
        return self._update_user(address, enabled=enabled)

    def set_quota(self, address: str, quota_bytes: int) -> Deferred[None]:
        return self._update_user(address, quota_bytes=quota_bytes)

    def expire_password(self, address: str) -> Deferred[None]:
        """The password works no more until a new one is set (app passwords do)."""
        return self._update_user(address, password_expired=True)

    # -- app passwords ----------------------------------------------------------------

    def add_app_password(self, address: str, name: str,
                         protocols: tuple[str, ...] = ()) -> Deferred[str]:
        """A new app password (returned: shown once, never stored)."""
        if not name or len(name) > 255:
            raise DirectoryError("an app password needs a name (at most 255 characters)")
        secret = apppasswords.new_secret()

        def add(conn: Connection) -> str:
            row = self._found_user(conn, address)
            if conn.execute(sa.select(s.app_passwords.c.id).where(
                    (s.app_passwords.c.user_id == row.id)
                    & (s.app_passwords.c.name == name))).first() is not None:
                raise AlreadyExists(f"{address} has an app password called {name!r}")
            conn.execute(s.app_passwords.insert().values(
                user_id=row.id, name=name, secret_hash=apppasswords.secret_hash(secret),
                protocols=" ".join(protocols), created=now_ms()))
            return secret
        return self.db.write(add)

    def list_app_passwords(self, address: str) -> Deferred[list[AppPassword]]:
        def list_(conn: Connection) -> list[AppPassword]:
            row = self._found_user(conn, address)
            return [AppPassword(found.name, tuple(found.protocols.split()), found.created,
                                found.last_used)
                    for found in conn.execute(sa.select(s.app_passwords).where(
                        s.app_passwords.c.user_id == row.id).order_by(s.app_passwords.c.name))]
        return self.db.read(list_)

    def revoke_app_password(self, address: str, name: str) -> Deferred[None]:
        def revoke(conn: Connection) -> None:
            row = self._found_user(conn, address)
            gone = conn.execute(s.app_passwords.delete().where(
                (s.app_passwords.c.user_id == row.id) & (s.app_passwords.c.name == name)))
            if not gone.rowcount:
                raise NotFound(f"{address} has no app password called {name!r}")
        return self.db.write(revoke)

    def app_password_user(self, user_id: int, secret: str,
                          protocol: Optional[str]) -> Deferred[bool]:
        """Whether ``secret`` is an app password of this user for ``protocol`` (None:
        the protocol is not known, and only an app password for all will do); its
        last use is noted."""
        def check(conn: Connection) -> bool:
            found = conn.execute(sa.select(s.app_passwords).where(
                (s.app_passwords.c.secret_hash == apppasswords.secret_hash(secret))
                & (s.app_passwords.c.user_id == user_id))).first()
            if found is None:
                return False
            scope = found.protocols.split()
            if scope and protocol not in scope:
                return False
            conn.execute(s.app_passwords.update().where(s.app_passwords.c.id == found.id)
                         .values(last_used=now_ms()))
            return True
        return self.db.write(check)

    # -- last logins ------------------------------------------------------------------

    def record_login(self, user: User, peer: str, protocol: str) -> Deferred[None]:
        """Note a successful login (at most once a minute per user)."""
        last = self._login_noted.get(user.id, 0.0)
        now = time.monotonic()
        if now - last < LOGIN_RECORD_INTERVAL:
            return Deferred.fromCoroutine(_nothing())
        self._login_noted[user.id] = now

        def note(conn: Connection) -> None:
            conn.execute(s.users.update().where(s.users.c.id == user.id).values(
                last_login=now_ms(), last_login_from=f"{protocol} {peer}"[:64]))
        return self.db.write(note)

    def last_logins(self, domain: Optional[str] = None) -> Deferred[list[LastLogin]]:
        def list_(conn: Connection) -> list[LastLogin]:
            query = (sa.select(s.users.c.localpart, s.users.c.last_login,
                               s.users.c.last_login_from, s.domains.c.name.label("domain"))
                     .join(s.domains, s.domains.c.id == s.users.c.domain_id)
                     .order_by(s.users.c.last_login.desc(), s.domains.c.name,
                               s.users.c.localpart))
            if domain:
                query = query.where(s.domains.c.name == domain.lower())
            return [LastLogin(f"{row.localpart}@{row.domain}", row.last_login,
                              row.last_login_from) for row in conn.execute(query)]
        return self.db.read(list_)

    @property
    def _login_noted(self) -> dict[int, float]:
        noted: Optional[dict[int, float]] = self.__dict__.get("_noted_logins")
        if noted is None:
            noted = self.__dict__["_noted_logins"] = {}
        return noted


async def _nothing() -> None:
    return None
