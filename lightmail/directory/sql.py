"""The SQL directory: domains, users and aliases in the metadata database."""

from __future__ import annotations

import time
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from zope.interface import implementer

from lightmail.address import AddressError, normalise_address, normalise_domain, split_address
from lightmail.directory import scram
from lightmail.directory.accounts import AccountAdmin
from lightmail.directory.interfaces import (
    Account,
    Alias,
    AlreadyExists,
    DirectoryError,
    IDirectory,
    IScramVerifiers,
    LocalTarget,
    LoginSecrets,
    NotFound,
    Resolution,
    User,
)
from lightmail.directory.passwords import Secrets, make_secrets_async
from lightmail.storage import schema as s
from lightmail.storage.database import Database, first_direct, now_ms, rows_direct
from lightmail.storage.sqlstore import release_blob_ref

CATCH_ALL = "*"
RESOLVE_CACHE_SIZE = 10000   # addresses remembered at most (then forgotten all at once)
MAX_ALIAS_DEPTH = 10   # as Postfix's virtual_alias_recursion_limit (1000 is its default
                       # for expansions; 10 levels is far beyond any real use)


def _user(row: Any, domain: str) -> User:
    return User(id=row.id, address=f"{row.localpart}@{domain}",
                quota_bytes=row.quota_bytes, enabled=bool(row.enabled))


def _domain_id(conn: Connection, domain: str) -> int:
    row = conn.execute(sa.select(s.domains.c.id).where(s.domains.c.name == domain)).first()
    if row is None:
        raise NotFound(f"no such domain: {domain}")
    return int(row.id)


def _release_messages_of(conn: Connection, user_ids: sa.ColumnElement[bool]) -> None:
    """Release the blob references of every message owned by the selected users."""
    counts = conn.execute(
        sa.select(s.messages.c.blob_id, sa.func.count().label("n"))
        .join(s.mailboxes, s.mailboxes.c.id == s.messages.c.mailbox_id)
        .where(user_ids).group_by(s.messages.c.blob_id))
    for row in counts.all():
        release_blob_ref(conn, row.blob_id, row.n)


# Built once (every login and RCPT lookup runs it): SQLAlchemy then finds the compiled
# form by identity instead of building and hashing a new statement each time.
_USER_ROW = sa.select(s.users).join(s.domains, s.domains.c.id == s.users.c.domain_id).where(
    (s.domains.c.name == sa.bindparam("b_domain"))
    & (s.users.c.localpart == sa.bindparam("b_local")))
_DOMAIN_ID = sa.select(s.domains.c.id).where(s.domains.c.name == sa.bindparam("b_domain"))
_ALIAS_DESTS = (
    sa.select(s.aliases.c.destination)
    .join(s.domains, s.domains.c.id == s.aliases.c.domain_id)
    .where((s.domains.c.name == sa.bindparam("b_domain"))
           & (s.aliases.c.localpart == sa.bindparam("b_local")))
    .order_by(s.aliases.c.destination))


@implementer(IDirectory, IScramVerifiers)
class SQLDirectory(AccountAdmin):
    def __init__(self, db: Database, recipient_delimiter: str = "+",
                 default_quota: int = 0, resolve_cache_ttl: float = 0.0,
                 scram_iterations: int = scram.DEFAULT_ITERATIONS,
                 delegated_domains: frozenset[str] = frozenset(),
                 keep_cram_md5: bool = False) -> None:
        self.db = db
        # CRAM-MD5 is on ([directory] mechanisms): keep its secret when a password is set.
        self.keep_cram_md5 = keep_cram_md5
        # Domains whose users live in another backend (LDAP, a passwd-file): their
        # addresses resolve here as if remote, for the routing directory to resolve
        # them with their backend (directory/routing.py).
        self.delegated_domains = delegated_domains
        self.scram_iterations = scram_iterations
        self.delimiter = recipient_delimiter
        self.default_quota = default_quota
        # Recipient resolutions (found or not) remembered for a few seconds: every
        # RCPT would otherwise cost a thread hop and three or four queries.  A change
        # made through this object forgets them all at once; one made by another
        # process (the lightmail command, another node) shows within the TTL.
        self.resolve_cache_ttl = resolve_cache_ttl
        self._resolved: dict[str, tuple[float, Resolution]] = {}

    def forget_resolutions(self) -> None:
        """Drop every remembered resolution (after a change to the directory)."""
        self._resolved = {}     # a new dict: lookups in flight see it is not theirs

    def reconfigure(self, recipient_delimiter: str, default_quota: int,
                    resolve_cache_ttl: float, keep_cram_md5: bool) -> None:
        """New [directory] settings (a reload); resolutions made with the old ones
        are forgotten."""
        self.delimiter = recipient_delimiter
        self.default_quota = default_quota
        self.resolve_cache_ttl = resolve_cache_ttl
        self.keep_cram_md5 = keep_cram_md5
        self.forget_resolutions()

    def _changing(self, d: Deferred[Any]) -> Deferred[Any]:
        # Before the change (a lookup in flight must not re-fill the cache with the
        # old answer after it): forget now and again once it has committed.
        self.forget_resolutions()

        def forget(result: Any) -> Any:
            self.forget_resolutions()
            return result
        return d.addBoth(forget)

    # -- domains ----------------------------------------------------------------------

    def add_domain(self, name: str) -> Deferred[None]:
        domain = _checked(normalise_domain, name)

        def add(conn: Connection) -> None:
            if conn.execute(sa.select(s.domains.c.id).where(
                    s.domains.c.name == domain)).first() is not None:
                raise AlreadyExists(f"domain {domain} exists already")
            conn.execute(s.domains.insert().values(name=domain, created=now_ms()))
        return self._changing(self.db.write(add))

    def remove_domain(self, name: str) -> Deferred[None]:
        domain = _checked(normalise_domain, name)

        def remove(conn: Connection) -> None:
            domain_id = _domain_id(conn, domain)
            owned = s.mailboxes.c.user_id.in_(
                sa.select(s.users.c.id).where(s.users.c.domain_id == domain_id))
            _release_messages_of(conn, owned)
            # Explicit deletes rather than trusting ON DELETE CASCADE everywhere.
            conn.execute(s.mailboxes.delete().where(owned))
            conn.execute(s.users.delete().where(s.users.c.domain_id == domain_id))
            conn.execute(s.aliases.delete().where(s.aliases.c.domain_id == domain_id))
            conn.execute(s.domains.delete().where(s.domains.c.id == domain_id))
        return self._changing(self.db.write(remove))

    def list_domains(self) -> Deferred[list[str]]:
        return self.db.read(lambda conn: [row.name for row in conn.execute(
            sa.select(s.domains.c.name).order_by(s.domains.c.name))])

    def is_local_domain(self, name: str) -> Deferred[bool]:
        try:
            domain = normalise_domain(name)
        except AddressError:
            return Deferred.fromCoroutine(_false())
        return self.db.read(lambda conn: conn.execute(sa.select(s.domains.c.id).where(
            s.domains.c.name == domain)).first() is not None)

    # -- users ------------------------------------------------------------------------

    @inlineCallbacks
    def add_user(self, address: str, password: Optional[str],
                 quota_bytes: Optional[int] = None) -> Any:
        local, domain = _checked(split_address, address)
        if self.delimiter and self.delimiter in local:
            raise DirectoryError(f"a user name may not contain the recipient delimiter "
                                 f"{self.delimiter!r}")
        if local == CATCH_ALL:
            raise DirectoryError("'*' is reserved for catch-all aliases")
        secrets = (yield make_secrets_async(password, self.scram_iterations,
                                            self.keep_cram_md5)) \
            if password else None
        quota = self.default_quota if quota_bytes is None else quota_bytes

        def add(conn: Connection) -> User:
            domain_id = _domain_id(conn, domain)
            if conn.execute(sa.select(s.users.c.id).where(
                    (s.users.c.domain_id == domain_id)
                    & (s.users.c.localpart == local))).first() is not None:
                raise AlreadyExists(f"user {local}@{domain} exists already")
            result = conn.execute(s.users.insert().values(
                domain_id=domain_id, localpart=local,
                password_hash=secrets.password_hash if secrets else None,
                scram_verifiers=secrets.scram_verifiers if secrets else None,
                cram_md5=secrets.cram_md5 if secrets else None,
                quota_bytes=quota, enabled=True, created=now_ms()))
            key = result.inserted_primary_key
            assert key is not None
            return User(id=int(key[0]), address=f"{local}@{domain}",
                        quota_bytes=quota)
        return (yield self._changing(self.db.write(add)))

    def remove_user(self, address: str) -> Deferred[None]:
        local, domain = _checked(split_address, address)

        def remove(conn: Connection) -> None:
            row = self._user_row(conn, local, domain)
            if row is None:
                raise NotFound(f"no such user: {local}@{domain}")
            owned = s.mailboxes.c.user_id == row.id
            _release_messages_of(conn, owned)
            conn.execute(s.mailboxes.delete().where(owned))
            conn.execute(s.users.delete().where(s.users.c.id == row.id))
        return self._changing(self.db.write(remove))

    @inlineCallbacks
    def set_password(self, address: str, password: str) -> Any:
        local, domain = _checked(split_address, address)
        secrets = yield make_secrets_async(password, self.scram_iterations,
                                           self.keep_cram_md5)

        def update(conn: Connection) -> None:
            row = self._user_row(conn, local, domain)
            if row is None:
                raise NotFound(f"no such user: {local}@{domain}")
            conn.execute(s.users.update().where(s.users.c.id == row.id).values(
                password_hash=secrets.password_hash,
                scram_verifiers=secrets.scram_verifiers, cram_md5=secrets.cram_md5,
                password_expired=False))
        yield self.db.write(update)

    def store_secrets(self, user_id: int, secrets: Secrets, replacing: str) -> Deferred[None]:
        """Keep upgraded secrets of a password that was just verified, unless the
        password changed meanwhile (the stored hash is no longer ``replacing``)."""
        def update(conn: Connection) -> None:
            conn.execute(s.users.update().where(
                (s.users.c.id == user_id) & (s.users.c.password_hash == replacing)).values(
                password_hash=secrets.password_hash,
                scram_verifiers=secrets.scram_verifiers, cram_md5=secrets.cram_md5))
        return self.db.write(update)

    def shadow_user(self, account: Account) -> Deferred[User]:
        """The users row that owns the mailboxes of a user another backend knows,
        made the first time they are seen (no password: they never log in through
        SQL), its quota and enabled flag brought up to what the backend says."""
        local, domain = _checked(split_address, account.address)
        quota = self.default_quota if account.quota_bytes is None else account.quota_bytes

        def ensure(conn: Connection) -> User:
            domain_row = first_direct(conn, _DOMAIN_ID, {"b_domain": domain})
            if domain_row is None:
                made = conn.execute(s.domains.insert().values(
                    name=domain, created=now_ms())).inserted_primary_key
                assert made is not None
                domain_id = made[0]
            else:
                domain_id = domain_row.id
            row = self._user_row(conn, local, domain)
            if row is None:
                key = conn.execute(s.users.insert().values(
                    domain_id=domain_id, localpart=local, password_hash=None,
                    scram_verifiers=None, quota_bytes=quota, enabled=account.enabled,
                    created=now_ms())).inserted_primary_key
                assert key is not None
                return User(int(key[0]), account.address, quota, account.enabled)
            if row.quota_bytes != quota or bool(row.enabled) != account.enabled:
                conn.execute(s.users.update().where(s.users.c.id == row.id).values(
                    quota_bytes=quota, enabled=account.enabled))
            return User(int(row.id), account.address, quota, account.enabled)

        def again(failure: Any) -> Any:
            # Another process (a worker, another node) made the row at the same
            # moment: it is there now.
            failure.trap(sa.exc.IntegrityError)
            return self.db.write(ensure)
        return self.db.write(ensure).addErrback(again)

    def get_user(self, address: str) -> Deferred[Optional[User]]:
        try:
            local, domain = split_address(address)
        except AddressError:
            return Deferred.fromCoroutine(_none())

        def get(conn: Connection) -> Optional[User]:
            row = self._user_row(conn, local, domain)
            return None if row is None else _user(row, domain)
        return self.db.read(get)

    def password_hash(self, address: str) -> Deferred[tuple[Optional[User], Optional[str]]]:
        """The user and their stored hash, for the credentials checker only."""
        return self.login_secrets(address).addCallback(
            lambda found: (found.user, found.password_hash))

    def login_secrets(self, address: str) -> Deferred[LoginSecrets]:
        """The user and what their password is checked against, for checkers only."""
        try:
            local, domain = split_address(address)
        except AddressError:
            return Deferred.fromCoroutine(_no_secrets())

        def get(conn: Connection) -> LoginSecrets:
            row = self._user_row(conn, local, domain)
            if row is None:
                return LoginSecrets()
            return LoginSecrets(_user(row, domain), row.password_hash, row.scram_verifiers,
                                bool(row.password_expired), row.cram_md5)
        return self.db.read(get)

    def scram_verifier(self, address: str, algorithm: str
                       ) -> Deferred[tuple[Optional[User], Optional[scram.Verifier]]]:
        def found(secrets: LoginSecrets) -> tuple[Optional[User], Optional[scram.Verifier]]:
            if secrets.password_expired:
                return secrets.user, None      # as if it had none: refused like a wrong one
            return secrets.user, scram.find_verifier(secrets.scram_verifiers, algorithm)
        return self.login_secrets(address).addCallback(found)

    def list_users(self, domain: Optional[str] = None) -> Deferred[list[User]]:
        wanted = _checked(normalise_domain, domain) if domain else None

        def list_(conn: Connection) -> list[User]:
            query = (sa.select(s.users, s.domains.c.name.label("domain"))
                     .join(s.domains, s.domains.c.id == s.users.c.domain_id)
                     .order_by(s.domains.c.name, s.users.c.localpart))
            if wanted:
                _domain_id(conn, wanted)
                query = query.where(s.domains.c.name == wanted)
            return [_user(row, row.domain) for row in conn.execute(query)]
        return self.db.read(list_)

    @staticmethod
    def _user_row(conn: Connection, local: str, domain: str) -> Any:
        return first_direct(conn, _USER_ROW, {"b_local": local, "b_domain": domain})

    # -- aliases ----------------------------------------------------------------------

    def add_alias(self, source: str, destination: str) -> Deferred[None]:
        local, domain = _alias_source(source)
        dest = _checked(normalise_address, destination)

        def add(conn: Connection) -> None:
            domain_id = _domain_id(conn, domain)
            exists = conn.execute(sa.select(s.aliases.c.id).where(
                (s.aliases.c.domain_id == domain_id) & (s.aliases.c.localpart == local)
                & (s.aliases.c.destination == dest))).first()
            if exists is not None:
                raise AlreadyExists(f"alias {local}@{domain} -> {dest} exists already")
            conn.execute(s.aliases.insert().values(domain_id=domain_id, localpart=local,
                                                   destination=dest, created=now_ms()))
        return self._changing(self.db.write(add))

    def remove_alias(self, source: str, destination: Optional[str] = None) -> Deferred[int]:
        local, domain = _alias_source(source)
        dest = _checked(normalise_address, destination) if destination else None

        def remove(conn: Connection) -> int:
            domain_id = _domain_id(conn, domain)
            where = (s.aliases.c.domain_id == domain_id) & (s.aliases.c.localpart == local)
            if dest is not None:
                where = where & (s.aliases.c.destination == dest)
            count = conn.execute(s.aliases.delete().where(where)).rowcount
            if not count:
                raise NotFound(f"no such alias: {local}@{domain}"
                               + (f" -> {dest}" if dest else ""))
            return int(count)
        return self._changing(self.db.write(remove))

    def list_aliases(self, domain: Optional[str] = None) -> Deferred[list[Alias]]:
        wanted = _checked(normalise_domain, domain) if domain else None

        def list_(conn: Connection) -> list[Alias]:
            query = (sa.select(s.aliases.c.localpart, s.aliases.c.destination,
                               s.domains.c.name.label("domain"))
                     .join(s.domains, s.domains.c.id == s.aliases.c.domain_id)
                     .order_by(s.domains.c.name, s.aliases.c.localpart,
                               s.aliases.c.destination))
            if wanted:
                _domain_id(conn, wanted)
                query = query.where(s.domains.c.name == wanted)
            return [Alias(f"{row.localpart}@{row.domain}", row.destination)
                    for row in conn.execute(query)]
        return self.db.read(list_)

    # -- resolution -------------------------------------------------------------------

    def resolve(self, address: str) -> Deferred[Resolution]:
        cached = self.cached_resolution(address)
        if cached is not None:
            return succeed(cached)
        if not self.resolve_cache_ttl:
            return self.db.read(self.resolve_now, address)
        generation = self._resolved

        def remember(resolution: Resolution) -> Resolution:
            # Not if the cache was cleared meanwhile: the answer may predate a change.
            if generation is self._resolved:
                self.remember(address, resolution)
            return resolution
        return self.db.read(self.resolve_now, address).addCallback(remember)

    def remember(self, address: str, resolution: Resolution) -> None:
        """Keep ``resolution`` for ``resolve_cache_ttl`` (all forgotten at once when
        RESOLVE_CACHE_SIZE addresses are kept)."""
        if len(self._resolved) >= RESOLVE_CACHE_SIZE:
            self._resolved = {}
        else:
            self._resolved[address] = (time.monotonic() + self.resolve_cache_ttl,
                                       resolution)

    def cached_resolution(self, address: str) -> Optional[Resolution]:
        """The remembered resolution of ``address`` if it is still fresh, else None."""
        entry = self._resolved.get(address)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._resolved[address]
            return None
        return entry[1]

    def resolve_now(self, conn: Connection, address: str) -> Resolution:
        """Resolve inside a read transaction (worker thread)."""
        try:
            start = normalise_address(address)
        except AddressError:
            return Resolution(address=address, is_local_domain=False)
        local: dict[int, LocalTarget] = {}
        remote: dict[str, None] = {}
        _, start_domain = start.rsplit("@", 1)
        if start_domain in self.delegated_domains \
                or not self._domain_exists(conn, start_domain):
            return Resolution(address=start, remote=(start,), is_local_domain=False)
        pending = [(start, 0)]
        seen: set[str] = set()
        while pending:
            addr, depth = pending.pop(0)
            if addr in seen:
                continue
            seen.add(addr)
            lpart, domain = addr.rsplit("@", 1)
            if domain in self.delegated_domains or not self._domain_exists(conn, domain):
                remote.setdefault(addr)
                continue
            if depth > MAX_ALIAS_DEPTH:
                raise DirectoryError(f"alias expansion of {start} is deeper than "
                                     f"{MAX_ALIAS_DEPTH} levels (a loop?)")
            candidates: list[tuple[str, str | None]] = [(lpart, None)]
            if self.delimiter and self.delimiter in lpart:
                base, _, suffix = lpart.partition(self.delimiter)
                candidates.append((base, suffix))
            found = False
            for candidate, detail in candidates:
                row = self._user_row(conn, candidate, domain)
                if row is not None:
                    if row.enabled:
                        local.setdefault(row.id, LocalTarget(_user(row, domain), detail))
                    found = True
                    break
                dests = self._alias_dests(conn, candidate, domain)
                if dests:
                    pending.extend((dest, depth + 1) for dest in dests)
                    found = True
                    break
            if not found:
                catch_all = self._alias_dests(conn, CATCH_ALL, domain)
                pending.extend((dest, depth + 1) for dest in catch_all)
        return Resolution(address=start, local=tuple(local.values()),
                          remote=tuple(remote))

    @staticmethod
    def _domain_exists(conn: Connection, domain: str) -> bool:
        return first_direct(conn, _DOMAIN_ID, {"b_domain": domain}) is not None

    @staticmethod
    def _alias_dests(conn: Connection, local: str, domain: str) -> list[str]:
        return [row.destination for row in rows_direct(
            conn, _ALIAS_DESTS, {"b_domain": domain, "b_local": local})]

    def allowed_senders(self, user: User) -> Deferred[list[str]]:
        """The user's own address and every alias that leads only to them."""
        def find(conn: Connection) -> list[str]:
            rows = conn.execute(
                sa.select(s.aliases.c.localpart, s.domains.c.name)
                .join(s.domains, s.domains.c.id == s.aliases.c.domain_id)
                .where((s.aliases.c.destination == user.address)
                       & (s.aliases.c.localpart != CATCH_ALL)))
            return [user.address] + sorted(f"{row.localpart}@{row.name}" for row in rows)
        return self.db.read(find)


def _alias_source(source: str) -> tuple[str, str]:
    local, _, domain = source.strip().rpartition("@")
    if local == CATCH_ALL:
        return CATCH_ALL, _checked(normalise_domain, domain)
    return _checked(split_address, source)


def _checked(fn: Any, value: Any) -> Any:
    try:
        return fn(value)
    except AddressError as exc:
        raise DirectoryError(str(exc)) from None


async def _false() -> bool:
    return False


async def _none() -> None:
    return None


async def _no_secrets() -> LoginSecrets:
    return LoginSecrets()
