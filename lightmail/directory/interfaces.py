"""Interfaces of the directory: domains, users, aliases, and who may log in.

Authentication itself goes through twisted.cred (see ``cred.py``): protocols ask a
Portal for an avatar and never see password hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class User:
    id: int
    address: str            # canonical localpart@domain, lower-case
    quota_bytes: int = 0
    enabled: bool = True


@dataclass(frozen=True)
class LoginSecrets:
    """What a user's password is checked against (for credentials checkers only)."""

    user: Optional[User] = None
    password_hash: Optional[str] = None         # argon2id PHC string
    scram_verifiers: Optional[str] = None       # directory/scram.py
    password_expired: bool = False
    cram_md5: Optional[str] = None              # directory/crammd5.py


@dataclass(frozen=True)
class LastLogin:
    address: str
    when: Optional[int]         # milliseconds since the epoch; None: never
    source: Optional[str]       # "protocol address"


@dataclass(frozen=True)
class Alias:
    source: str             # localpart@domain, or *@domain for the catch-all
    destination: str


@dataclass(frozen=True)
class LocalTarget:
    """A local mailbox owner that a recipient address leads to."""

    user: User
    detail: Optional[str] = None    # the part after the recipient delimiter


@dataclass(frozen=True)
class Resolution:
    """Where mail for one address goes: local users and/or external addresses."""

    address: str
    local: tuple[LocalTarget, ...] = ()
    remote: tuple[str, ...] = ()
    is_local_domain: bool = True

    @property
    def deliverable(self) -> bool:
        return bool(self.local or self.remote)


class DirectoryError(Exception):
    """A directory change could not be made; the message says why, for a person."""


class NotFound(DirectoryError):
    """The domain, user, alias or app password named does not exist."""


class AlreadyExists(DirectoryError):
    """What was to be made exists already."""


class DirectoryUnavailable(DirectoryError):
    """The directory could not be asked (an LDAP server down or too slow): the login
    or recipient gets a temporary failure, to be tried again later."""


@dataclass(frozen=True)
class Account:
    """A user as an account backend (LDAP, a passwd-file) knows them: the SQL
    directory keeps a shadow row of each, which owns their mailboxes."""

    address: str                    # canonical localpart@domain, lower-case
    aliases: tuple[str, ...] = ()   # other addresses that lead to the account
    quota_bytes: Optional[int] = None   # None: [directory] default_quota
    enabled: bool = True


class IDirectory(Interface):
    """Domains, users and aliases, and recipient resolution."""

    def add_domain(name: str) -> Deferred[None]:
        """Add a local domain."""

    def remove_domain(name: str) -> Deferred[None]:
        """Remove a domain with its users, aliases and their mailboxes."""

    def list_domains() -> Deferred[list[str]]:
        """Local domains, sorted."""

    def is_local_domain(name: str) -> Deferred[bool]:
        """Whether mail for ``name`` is ours to deliver."""

    def add_user(address: str, password: Optional[str], quota_bytes: Optional[int] = None) -> Deferred[User]:  # noqa: E501
        """Add a user in an existing domain; None as password disables password login."""

    def remove_user(address: str) -> Deferred[None]:
        """Remove a user and their mailboxes."""

    def set_password(address: str, password: str) -> Deferred[None]:
        """Replace a user's password."""

    def get_user(address: str) -> Deferred[Optional[User]]:
        """The user with this exact address, or None."""

    def list_users(domain: Optional[str] = None) -> Deferred[list[User]]:
        """Users, in one domain or all."""

    def add_alias(source: str, destination: str) -> Deferred[None]:
        """Forward mail for ``source`` (localpart@domain or *@domain) to ``destination``."""

    def remove_alias(source: str, destination: Optional[str] = None) -> Deferred[int]:
        """Remove one alias or all with this source; fires with how many went."""

    def list_aliases(domain: Optional[str] = None) -> Deferred[list[Alias]]:
        """Aliases, in one domain or all."""

    def resolve(address: str) -> Deferred[Resolution]:
        """Expand ``address`` through users, +detail, aliases and catch-alls."""

    def allowed_senders(user: User) -> Deferred[list[str]]:
        """Addresses ``user`` may use in MAIL FROM on submission."""


class IAccountBackend(Interface):
    """Where the users of some domains live instead of the SQL directory
    (``directory/ldap.py``, ``directory/passwdfile.py``); the routing directory
    (``directory/routing.py``) sends it the lookups and logins of those domains."""

    name = Attribute("The backend's name, from its [backend:NAME] section.")
    domains = Attribute("The domains it serves (a tuple of lower-case names).")
    checker = Attribute("Its twisted.cred checker of IUsernamePassword credentials; "
                        "the avatar id is the account's canonical address.")

    def find_user(address: str) -> Deferred[Optional[Account]]:
        """The account logging in or looked up as ``address``, or None; fails with
        DirectoryUnavailable when the backend cannot be asked."""

    def find_recipient(address: str) -> Deferred[Optional[Account]]:
        """The account mail for ``address`` (its address or an alias) goes to."""

    def start() -> None:
        """Open what the backend needs (threads, connections are made on use)."""

    def stop() -> None:
        """Close it."""


class IScramVerifiers(Interface):
    """Where SCRAM finds a user's stored keys (``directory/scram.py``)."""

    def scram_verifier(address: str, algorithm: str) -> Deferred[tuple[Optional[User], Any]]:
        """The user (None if unknown) and their Verifier for ``algorithm`` (None if
        they have none: a password set before SCRAM, or no password)."""


class IMailAccount(Interface):
    """The avatar a protocol gets after authentication."""

    user = Attribute("The authenticated User.")
    directory = Attribute("The IDirectory the user lives in.")
    mailstore = Attribute("The IMailStore that holds the user's mailboxes.")

    def logout() -> None:
        """Release whatever the session held."""


@dataclass
class Credentials:
    """What a login presented, for logging without the secret."""

    username: str
    mechanism: str = "PLAIN"
    extra: dict[str, str] = field(default_factory=dict)
