"""Authentication through twisted.cred: checker, realm and the mail account avatar.

SMTP submission, IMAP and POP3 all log in through one Portal built here, so a new
credentials checker (LDAP, OAuth2 bearer tokens, app passwords) serves every protocol.
"""

from __future__ import annotations

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


@implementer(ICredentialsChecker)
class SQLPasswordChecker:
    """Checks username/password against argon2 hashes; the avatar id is the address."""

    credentialInterfaces = (credentials.IUsernamePassword,)
    log = Logger()

    def __init__(self, directory: Any) -> None:
        # Any directory offering password_hash(address) -> (User | None, hash | None).
        self.directory = directory

    @inlineCallbacks
    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> Any:
        username: Any = creds.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        password: Any = creds.password
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        user, stored = yield self.directory.password_hash(username)
        # Always verify, even for unknown users, so that timing does not tell.
        ok = yield verify_password_async(stored, password)
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


def make_portal(directory: Any, mailstore: IMailStore) -> Portal:
    return Portal(MailRealm(directory, mailstore), [SQLPasswordChecker(directory)])


def login(portal: Portal, username: str, password: str) -> Deferred[Any]:
    """Log in with a password; fires with the MailAccount or fails UnauthorizedLogin."""
    creds = credentials.UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
    d: Deferred[Any] = portal.login(creds, None, IMailAccount)
    return d.addCallback(_avatar_of)


def _avatar_of(result: Any) -> Any:
    return result[1]
