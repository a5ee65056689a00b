"""Authentication through twisted.cred: checker, realm and the mail account avatar.

SMTP submission, IMAP and POP3 all log in through one Portal built here, so a new
credentials checker (LDAP, OAuth2 bearer tokens, app passwords) serves every protocol.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Optional

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from zope.interface import Interface, implementer

from lightmail.directory.interfaces import IDirectory, IMailAccount, User
from lightmail.directory.passwords import verify_password_async
from lightmail.storage.interfaces import IMailStore


class VerifiedCache:
    """Passwords verified lately, so that a mail client's next connections (IMAP
    clients open several at once, POP3 clients poll) skip the deliberately slow argon2.

    Holds an HMAC of the password under a key that lives only in this process, with
    the stored hash it was checked against: a password change (a new hash) or expiry
    ends the entry.  Only a correct password ever takes the fast path.
    """

    def __init__(self, ttl: float, size: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.size, self.clock = ttl, size, clock
        self.key = os.urandom(32)
        self.entries: OrderedDict[str, tuple[str, bytes, float]] = OrderedDict()

    def _mac(self, password: str) -> bytes:
        return hmac.new(self.key, password.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()

    def hit(self, username: str, stored: Optional[str], password: str) -> bool:
        entry = self.entries.get(username)
        if entry is None or stored is None:
            return False
        hash_then, mac, expires = entry
        if expires < self.clock() or hash_then != stored:
            del self.entries[username]
            return False
        return hmac.compare_digest(mac, self._mac(password))

    def remember(self, username: str, stored: str, password: str) -> None:
        if self.ttl <= 0:
            return
        self.entries[username] = (stored, self._mac(password), self.clock() + self.ttl)
        self.entries.move_to_end(username)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


@implementer(ICredentialsChecker)
class SQLPasswordChecker:
    """Checks username/password against argon2 hashes; the avatar id is the address."""

    credentialInterfaces = (credentials.IUsernamePassword,)
    log = Logger()

    def __init__(self, directory: Any, cache_ttl: float = 0.0) -> None:
        # Any directory offering password_hash(address) -> (User | None, hash | None).
        self.directory = directory
        self.cache = VerifiedCache(cache_ttl)

    @inlineCallbacks
    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> Any:
        username: Any = creds.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        password: Any = creds.password
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        user, stored = yield self.directory.password_hash(username)
        key = user.address if user is not None else ""
        ok = bool(key) and self.cache.hit(key, stored, password)
        if not ok:
            # Always verify, even for unknown users, so that timing does not tell.
            ok = yield verify_password_async(stored, password)
            if ok and key and stored is not None:
                self.cache.remember(key, stored, password)
        if not ok or user is None or not user.enabled:
            raise error.UnauthorizedLogin("authentication failed")
        return user.address


@implementer(IMailAccount)
class MailAccount:
    """What an authenticated session gets: the user and the services to reach."""

    def __init__(self, user: User, directory: IDirectory, mailstore: IMailStore) -> None:
        self.user = user
        self.directory = directory
        self.mailstore = mailstore

    def logout(self) -> None:
        pass


@implementer(IRealm)
class MailRealm:
    """Hands out :class:`MailAccount` avatars for authenticated addresses."""

    def __init__(self, directory: IDirectory, mailstore: IMailStore,
                 account_factory: Callable[..., Any] = MailAccount) -> None:
        self.directory = directory
        self.mailstore = mailstore
        self.account_factory = account_factory

    @inlineCallbacks
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: type[Interface]) -> Any:
        if IMailAccount not in interfaces:
            raise NotImplementedError("MailRealm only provides IMailAccount")
        address = avatarId.decode() if isinstance(avatarId, bytes) else avatarId
        user: Optional[User] = yield self.directory.get_user(address)
        if user is None:
            raise error.UnauthorizedLogin("the account is gone")
        account = self.account_factory(user, self.directory, self.mailstore)
        return IMailAccount, account, account.logout


def make_portal(directory: Any, mailstore: IMailStore, auth_cache_ttl: float = 0.0) -> Portal:
    return Portal(MailRealm(directory, mailstore),
                  [SQLPasswordChecker(directory, auth_cache_ttl)])


def login(portal: Portal, username: str, password: str) -> Deferred[Any]:
    """Log in with a password; fires with the MailAccount or fails UnauthorizedLogin."""
    creds = credentials.UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
    d: Deferred[Any] = portal.login(creds, None, IMailAccount)
    return d.addCallback(_avatar_of)


def _avatar_of(result: Any) -> Any:
    return result[1]
