"""The directory that sends each domain to its backend: the SQL directory for every
domain, except those a ``[backend:NAME]`` section names (LDAP, a passwd-file).

Built once, in ``wiring.py``, when the configuration has backends; protocols see one
IDirectory and one Portal either way.  For a backend's domain:

- a recipient (RCPT, local delivery) is looked up in the backend by its address or an
  alias, then without its ``+detail``; found and enabled, it resolves to the user;
- a login goes to the backend's checker (:class:`RoutingPasswordChecker`);
- SCRAM finds no keys (the backend holds no SCRAM secrets), so it fails as a wrong
  password does: PLAIN or LOGIN over TLS are the mechanisms for those domains;
- each user found gets a shadow row in the SQL users table (no password), which owns
  their mailboxes and holds the quota and enabled flag the backend gave last;
- adding users, passwords or aliases is refused: those live in the backend.

SQL aliases that lead into a backend's domain resolve there too.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from twisted.cred import credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from zope.interface import implementer

from lightmail.address import AddressError, normalise_address, normalise_domain
from lightmail.directory.interfaces import (
    Account,
    Alias,
    DirectoryError,
    IAccountBackend,
    IDirectory,
    IScramVerifiers,
    LocalTarget,
    Resolution,
    User,
)
from lightmail.directory.sql import SQLDirectory

SHADOW_TTL = 60.0      # seconds a shadow row is trusted without asking SQL


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().lower().rstrip(".")


@implementer(IDirectory, IScramVerifiers)
class RoutingDirectory:
    def __init__(self, sql: SQLDirectory, backends: list[IAccountBackend]) -> None:
        self.sql = sql
        self.backends = backends
        self.by_domain: dict[str, IAccountBackend] = {
            domain: backend for backend in backends for domain in backend.domains}
        # The shadow rows seen, by address: a lookup whose quota and enabled flag
        # have not changed needs no SQL write.  For a minute only: a row removed by
        # another process (lightmail user remove) is made again after it.
        self._shadows: dict[str, tuple[float, User]] = {}

    def backend_of(self, address: str) -> Optional[IAccountBackend]:
        return self.by_domain.get(domain_of(address))

    def start(self) -> None:
        for backend in self.backends:
            backend.start()

    def stop(self) -> None:
        for backend in self.backends:
            backend.stop()

    def _refuse(self, address: str, what: str) -> DirectoryError:
        backend = self.backend_of(address)
        assert backend is not None
        return DirectoryError(f"{domain_of(address)}'s {what} live in [backend:"
                              f"{backend.name}]; change them there")

    def shadow(self, account: Optional[Account]) -> Deferred[Optional[User]]:
        """The SQL user of ``account`` (made or updated when needed)."""
        if account is None:
            return succeed(None)
        expires, known = self._shadows.get(account.address, (0.0, None))
        quota = self.sql.default_quota if account.quota_bytes is None \
            else account.quota_bytes
        if known is not None and expires > time.monotonic() \
                and known.quota_bytes == quota and known.enabled == account.enabled:
            return succeed(known)

        def keep(user: User) -> User:
            if len(self._shadows) > 100_000:
                self._shadows = {}
            self._shadows[account.address] = (time.monotonic() + SHADOW_TTL, user)
            return user
        return self.sql.shadow_user(account).addCallback(keep)

    # -- domains ----------------------------------------------------------------------

    def add_domain(self, name: str) -> Deferred[None]:
        return self.sql.add_domain(name)

    def remove_domain(self, name: str) -> Deferred[None]:
        return self.sql.remove_domain(name)

    @inlineCallbacks
    def list_domains(self) -> Any:
        return sorted(set((yield self.sql.list_domains())) | set(self.by_domain))

    def is_local_domain(self, name: str) -> Deferred[bool]:
        try:
            if normalise_domain(name) in self.by_domain:
                return succeed(True)
        except AddressError:
            pass
        return self.sql.is_local_domain(name)

    # -- users ------------------------------------------------------------------------

    def add_user(self, address: str, password: Optional[str],
                 quota_bytes: Optional[int] = None) -> Deferred[User]:
        if self.backend_of(address) is not None:
            return fail(self._refuse(address, "users"))
        return self.sql.add_user(address, password, quota_bytes)

    def remove_user(self, address: str) -> Deferred[None]:
        """For a backend's user: their shadow row and mailboxes (after they left the
        backend; they come back empty if the backend still knows them)."""
        self._shadows.pop(address.strip().lower(), None)
        return self.sql.remove_user(address)

    def set_password(self, address: str, password: str) -> Deferred[None]:
        if self.backend_of(address) is not None:
            return fail(self._refuse(address, "passwords"))
        return self.sql.set_password(address, password)

    def get_user(self, address: str) -> Deferred[Optional[User]]:
        backend = self.backend_of(address)
        if backend is None:
            return self.sql.get_user(address)
        try:
            canonical = normalise_address(address)
        except AddressError:
            return succeed(None)
        return backend.find_user(canonical).addCallback(self.shadow)

    def list_users(self, domain: Optional[str] = None) -> Deferred[list[User]]:
        """SQL's users, and the backends' users seen so far (their shadow rows)."""
        return self.sql.list_users(domain)

    def scram_verifier(self, address: str, algorithm: str) -> Deferred[tuple[Any, Any]]:
        if self.backend_of(address) is not None:
            return succeed((None, None))    # as an unknown user: a made-up salt
        return self.sql.scram_verifier(address, algorithm)

    # -- aliases ----------------------------------------------------------------------

    def add_alias(self, source: str, destination: str) -> Deferred[None]:
        if self.backend_of(source) is not None:
            return fail(self._refuse(source, "aliases"))
        return self.sql.add_alias(source, destination)

    def remove_alias(self, source: str, destination: Optional[str] = None) -> Deferred[int]:
        return self.sql.remove_alias(source, destination)

    def list_aliases(self, domain: Optional[str] = None) -> Deferred[list[Alias]]:
        return self.sql.list_aliases(domain)

    # -- resolution -------------------------------------------------------------------

    @inlineCallbacks
    def resolve(self, address: str) -> Any:
        backend = self.backend_of(address)
        if backend is not None:
            return (yield self._resolve_in(backend, address))
        found: Resolution = yield self.sql.resolve(address)
        delegated = [a for a in found.remote if self.backend_of(a) is not None]
        if not delegated:
            return found
        local = {target.user.id: target for target in found.local}
        for remote in delegated:
            resolution = yield self._resolve_in(self.by_domain[domain_of(remote)], remote)
            for target in resolution.local:
                local.setdefault(target.user.id, target)
        return Resolution(address=found.address, local=tuple(local.values()),
                          remote=tuple(a for a in found.remote if a not in delegated),
                          is_local_domain=found.is_local_domain)

    @inlineCallbacks
    def _resolve_in(self, backend: IAccountBackend, address: str) -> Any:
        try:
            start = normalise_address(address)
        except AddressError:
            return Resolution(address=address, is_local_domain=False)
        local, _, domain = start.rpartition("@")
        candidates: list[tuple[str, Optional[str]]] = [(start, None)]
        delimiter = self.sql.delimiter
        if delimiter and delimiter in local:
            base, _, suffix = local.partition(delimiter)
            candidates.append((f"{base}@{domain}", suffix))
        for candidate, detail in candidates:
            account = yield backend.find_recipient(candidate)
            if account is None:
                continue
            if not account.enabled:
                return Resolution(address=start)        # known, but takes no mail
            user = yield self.shadow(account)
            return Resolution(address=start, local=(LocalTarget(user, detail),))
        return Resolution(address=start)

    @inlineCallbacks
    def allowed_senders(self, user: User) -> Any:
        backend = self.backend_of(user.address)
        if backend is None:
            return (yield self.sql.allowed_senders(user))
        account = yield backend.find_user(user.address)
        aliases = sorted(account.aliases) if account is not None else []
        return [user.address] + aliases


@implementer(ICredentialsChecker)
class RoutingPasswordChecker:
    """Sends a username/password to the checker of the username's domain (the SQL
    checker for every domain no backend serves)."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, default: ICredentialsChecker,
                 backends: list[IAccountBackend]) -> None:
        self.default = default
        self.by_domain = {domain: backend.checker
                          for backend in backends for domain in backend.domains}

    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> Deferred[Any]:
        username: Any = creds.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        checker = self.by_domain.get(domain_of(username), self.default)
        if "@" not in username:
            checker = self.default
        d: Deferred[Any] = checker.requestAvatarId(creds)
        return d

