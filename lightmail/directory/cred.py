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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import Interface, implementer

from lightmail.directory import apppasswords, crammd5, scram
from lightmail.directory.interfaces import (
    IAccountBackend,
    IDirectory,
    IMailAccount,
    IScramVerifiers,
    LoginSecrets,
    User,
)
from lightmail.directory.logins import IProtocolPassword, PasswordExpired
from lightmail.directory.passwords import Secrets, upgraded_secrets, verify_password_async
from lightmail.directory.routing import RoutingPasswordChecker
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

    def verified(self, username: str, password: str) -> Optional[str]:
        """What was remembered with ``password`` for ``username`` if it is the
        password verified then and the entry has not expired; else None.  For
        backends that have no stored hash to compare with (LDAP): the entry ends
        only with its time."""
        entry = self.entries.get(username)
        if entry is None:
            return None
        if entry[2] < self.clock():
            del self.entries[username]
            return None
        return entry[0] if hmac.compare_digest(entry[1], self._mac(password)) else None

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

    credentialInterfaces = (IProtocolPassword, credentials.IUsernamePassword)
    log = Logger()

    def __init__(self, directory: Any, cache_ttl: float = 0.0,
                 scram_iterations: int = scram.DEFAULT_ITERATIONS) -> None:
        # The SQL directory: login_secrets(address) -> (User, hash, SCRAM verifiers)
        # and store_secrets(user id, Secrets, replacing hash).
        self.directory = directory
        self.cache = VerifiedCache(cache_ttl)
        self.scram_iterations = scram_iterations

    @inlineCallbacks
    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> Any:
        username: Any = creds.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        password: Any = creds.password
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        found: LoginSecrets = yield self.directory.login_secrets(username)
        user, stored = found.user, found.password_hash
        if apppasswords.looks_like_one(password):
            # Looked up for unknown users too (user id 0 has none): the same time.
            protocol = creds.protocol if IProtocolPassword.providedBy(creds) else None
            if (yield self.directory.app_password_user(user.id if user else 0, password,
                                                       protocol)):
                if user is None or not user.enabled:
                    raise error.UnauthorizedLogin("authentication failed")
                return user.address
        key = user.address if user is not None else ""
        ok = bool(key) and self.cache.hit(key, stored, password)
        if not ok:
            # Always verify, even for unknown users, so that timing does not tell.
            ok = yield verify_password_async(stored, password)
            if ok and user is not None and stored is not None:
                self.cache.remember(key, stored, password)
                self._upgrade(user, stored, found, password)
        if not ok or user is None or not user.enabled:
            raise error.UnauthorizedLogin("authentication failed")
        if found.password_expired:
            raise PasswordExpired("the password has expired")
        return user.address

    def _upgrade(self, user: User, stored: str, found: LoginSecrets,
                 password: str) -> None:
        """A password just verified is the moment to make what was missing: SCRAM
        keys for a password set before SCRAM, a hash with today's parameters.  In
        the background: the login does not wait for it."""
        d = deferToThread(upgraded_secrets, password, stored, found.scram_verifiers,
                          self.scram_iterations, self.directory.keep_cram_md5,
                          found.cram_md5)

        def store(secrets: Optional[Secrets]) -> Any:
            if secrets is not None:
                return self.directory.store_secrets(user.id, secrets, stored)
            return None
        d.addCallback(store).addErrback(
            lambda failure: self.log.failure("could not upgrade the stored secrets of "
                                             "{user}", failure, user=user.address))


@implementer(ICredentialsChecker)
class CramChecker:
    """CRAM-MD5 (RFC 2195): the client's HMAC-MD5 of our challenge, checked with the
    stored secret (``directory/crammd5.py``); none for users who have not logged in
    with their password since the mechanism was turned on."""

    credentialInterfaces = (crammd5.ICramProof,)

    def __init__(self, directory: Any) -> None:
        self.directory = directory          # login_secrets(address) -> LoginSecrets

    @inlineCallbacks
    def requestAvatarId(self, creds: crammd5.ICramProof) -> Any:
        found: LoginSecrets = yield self.directory.login_secrets(
            creds.username.decode("utf-8", "replace"))
        user = found.user
        if user is None or not user.enabled or found.password_expired \
                or found.cram_md5 is None \
                or not crammd5.response_matches(found.cram_md5, creds.challenge,
                                                creds.digest):
            raise error.UnauthorizedLogin("authentication failed")
        return user.address


@implementer(ICredentialsChecker)
class ScramChecker:
    """Checks a SCRAM exchange's proof (``sasl/scram.py``) against the user's stored
    keys: the mechanism checked it too, but only a checker decides a login."""

    credentialInterfaces = (scram.IScramProof,)

    def __init__(self, directory: IScramVerifiers) -> None:
        self.directory = directory

    @inlineCallbacks
    def requestAvatarId(self, creds: scram.IScramProof) -> Any:
        username = creds.username.decode("utf-8", "replace")
        user, verifier = yield self.directory.scram_verifier(username, creds.algorithm)
        if user is None or verifier is None or not user.enabled \
                or not scram.client_proof_matches(verifier, creds.auth_message, creds.proof):
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


def stand_in_secret(state_dir: Path) -> bytes:
    """This server's key for the made-up SCRAM salts of unknown users: kept in the
    state directory, so that they stay the same across restarts and processes (a
    salt that changed would tell that the user is made up)."""
    path = state_dir / "sasl-stand-in.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:               # another process made it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as out:
        out.write(os.urandom(32))
    return path.read_bytes()


def make_portal(directory: Any, mailstore: IMailStore, auth_cache_ttl: float = 0.0,
                scram_iterations: int = scram.DEFAULT_ITERATIONS, *,
                sql: Any = None, backends: Sequence[IAccountBackend] = ()) -> Portal:
    """The Portal of every login.  With ``backends`` (domains whose users live in
    LDAP or a passwd-file), ``directory`` is the routing directory, ``sql`` the SQL
    one, and passwords go to the checker of their domain (``directory/routing.py``)."""
    checker: ICredentialsChecker = SQLPasswordChecker(sql or directory, auth_cache_ttl,
                                                      scram_iterations)
    if backends:
        checker = RoutingPasswordChecker(checker, list(backends))
    return Portal(MailRealm(directory, mailstore),
                  [checker, ScramChecker(directory), CramChecker(sql or directory)])


def login(portal: Portal, username: str, password: str) -> Deferred[Any]:
    """Log in with a password; fires with the MailAccount or fails UnauthorizedLogin."""
    creds = credentials.UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
    d: Deferred[Any] = portal.login(creds, None, IMailAccount)
    return d.addCallback(_avatar_of)


def _avatar_of(result: Any) -> Any:
    return result[1]
