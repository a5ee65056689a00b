"""A passwd-file account backend (``[backend:NAME] type = passwd-file``), for small
sites: Dovecot's passwd-file format, one user a line::

    alice@example.org:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$...::::::userdb_quota_rule=*:storage=1G
    bob@example.org:{SHA512-CRYPT}$6$...:1000:1000::/home/bob::nologin

Fields: user (the full address), password, uid, gid, gecos, home, shell, extra fields
(space-separated); LightMail reads the first two and, of the extra fields, ``nologin``
(the account may not log in or receive mail) and ``userdb_quota_rule=*:storage=SIZE``
(the quota; B, K, M, G, T suffixes).  Lines that are empty or start with # are
skipped; a malformed line is logged and skipped.

Password schemes: {ARGON2ID} and {ARGON2I} (PHC strings, argon2-cffi), {SHA512-CRYPT}
and {SHA256-CRYPT} (libpass, the maintained fork of passlib, in pure Python: no
dependency on the C library's crypt, which Python 3.13 took out of its standard
library), {PLAIN} (for tests only).  A hash without a {SCHEME} is recognised by its
form ($argon2..., $6$, $5$).

The file is read again when it changes (checked at most once a second, by its size,
time and inode), in a thread: never on the reactor.
"""

from __future__ import annotations

import hmac
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from passlib.hash import sha256_crypt, sha512_crypt
from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from zope.interface import implementer

from lightmail.address import AddressError, normalise_address
from lightmail.config import BackendConfig
from lightmail.directory.cred import VerifiedCache
from lightmail.directory.interfaces import Account, IAccountBackend
from lightmail.directory.passwords import verify_password

_argon2 = PasswordHasher()
_SIZE = re.compile(r"(\d+)\s*([bkmgt]?)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
SCHEMES = ("ARGON2ID", "ARGON2I", "SHA512-CRYPT", "SHA256-CRYPT", "PLAIN")


@dataclass(frozen=True)
class Entry:
    account: Account
    scheme: str
    hash: str


def verify(entry: Optional[Entry], password: str) -> bool:
    """Whether ``password`` is ``entry``'s (CPU work: call in a thread).  No entry:
    the same argon2 work against a made-up hash, so that timing does not tell."""
    if entry is None:
        return verify_password(None, password)
    if entry.scheme in ("ARGON2ID", "ARGON2I"):
        try:
            return _argon2.verify(entry.hash, password)
        except (VerificationError, InvalidHashError):
            return False
    if entry.scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        scheme = sha512_crypt if entry.scheme == "SHA512-CRYPT" else sha256_crypt
        try:
            return bool(scheme.verify(password, entry.hash))
        except ValueError:
            return False
    if entry.scheme == "PLAIN" and entry.hash:
        return hmac.compare_digest(entry.hash.encode("utf-8", "surrogateescape"),
                                   password.encode("utf-8", "surrogateescape"))
    return False            # an unknown scheme, or an empty password field


def scheme_of(password_field: str) -> tuple[str, str]:
    """(SCHEME, hash) of a passwd-file password field."""
    match = re.match(r"\{([A-Za-z0-9.-]+)\}(.*)", password_field, re.DOTALL)
    if match:
        return match.group(1).upper(), match.group(2)
    for prefix, scheme in (("$argon2id$", "ARGON2ID"), ("$argon2i$", "ARGON2I"),
                           ("$6$", "SHA512-CRYPT"), ("$5$", "SHA256-CRYPT")):
        if password_field.startswith(prefix):
            return scheme, password_field
    return "", password_field


def parse(text: str, domains: tuple[str, ...], where: str,
          warn: Callable[[str], None]) -> dict[str, Entry]:
    """The users of ``text`` in ``domains``, by address."""
    found: dict[str, Entry] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":", 7)
        try:
            address = normalise_address(fields[0])
        except AddressError:
            warn(f"{where}:{number}: not an address: {fields[0]!r}; line skipped")
            continue
        if address.rpartition("@")[2] not in domains:
            warn(f"{where}:{number}: {address} is not in this backend's domains; skipped")
            continue
        scheme, hashed = scheme_of(fields[1] if len(fields) > 1 else "")
        if scheme not in SCHEMES:
            warn(f"{where}:{number}: unknown password scheme {scheme or '(none)'!r} "
                 f"(known: {', '.join(SCHEMES)}); {address} cannot log in")
        extra = fields[7].split() if len(fields) > 7 else []
        enabled, quota = True, None
        for item in extra:
            key, _, value = item.partition("=")
            if key == "nologin" and value.lower() not in ("n", "no", "0"):
                enabled = False
            elif key == "userdb_quota_rule" and value.startswith("*:storage="):
                size = _SIZE.fullmatch(value[len("*:storage="):].strip())
                if size is None:
                    warn(f"{where}:{number}: cannot read the quota {value!r}")
                else:
                    quota = int(size.group(1)) * _UNITS[size.group(2).lower()]
        if address in found:
            warn(f"{where}:{number}: {address} appears again; the first line counts")
            continue
        found[address] = Entry(Account(address, (), quota, enabled), scheme, hashed)
    return found


def stand_in(entries: dict[str, Entry]) -> Optional[Entry]:
    """A user's entry whose scheme most of the file uses: an unknown user's password
    is checked against it (and the answer is no whatever it says), so that the time
    taken is that of a known user's (an argon2 check for everyone would set apart
    the users of a file of SHA-crypt hashes)."""
    usable = [entry for entry in entries.values() if entry.scheme in SCHEMES[:4]]
    if not usable:
        return None
    common = Counter(entry.scheme for entry in usable).most_common(1)[0][0]
    return next(entry for entry in usable if entry.scheme == common)


@implementer(IAccountBackend)
class PasswdFileBackend:
    log = Logger()

    def __init__(self, config: BackendConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert config.path is not None
        self.config = config
        self.name = config.name
        self.domains = config.domains
        self.path: Path = config.path
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: Optional[tuple[int, int, int]] = None
        self._checked = float("-inf")
        self._entries: dict[str, Entry] = {}
        self._stand_in: Optional[Entry] = None
        self.checker = PasswdFileChecker(self, VerifiedCache(config.auth_cache_ttl,
                                                             clock=clock))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def entries(self) -> dict[str, Entry]:
        """The users, read again if the file changed (in a thread: it may read)."""
        with self._lock:
            if self.clock() - self._checked < 1.0:
                return self._entries
            self._checked = self.clock()
            try:
                info = os.stat(self.path)
                seen = (info.st_size, info.st_mtime_ns, info.st_ino)
                if seen != self._seen:
                    text = self.path.read_text(encoding="utf-8")
                    self._entries = parse(text, self.domains, str(self.path),
                                          self._warn)
                    self._stand_in = stand_in(self._entries)
                    self._seen = seen
                    self.log.info("passwd-file backend {backend}: {count} users read "
                                  "from {path}", backend=self.name,
                                  count=len(self._entries), path=str(self.path))
            except (OSError, UnicodeDecodeError) as exc:
                # Keep the users read last: a file being replaced, or gone for a
                # moment, must not lock everybody out.
                self.log.error("passwd-file backend {backend}: cannot read {path}: "
                               "{error}; the users read before stay", backend=self.name,
                               path=str(self.path), error=str(exc))
            return self._entries

    def _warn(self, message: str) -> None:
        self.log.warn("passwd-file backend {backend}: {message}", backend=self.name,
                      message=message)

    def find_entry(self, address: str) -> Deferred[Optional[Entry]]:
        return threads.deferToThread(lambda: self.entries().get(address))

    def stand_in(self) -> Optional[Entry]:
        """What an unknown user's password is checked against (see :func:`stand_in`)."""
        return self._stand_in

    def find_user(self, address: str) -> Deferred[Optional[Account]]:
        return self.find_entry(address).addCallback(
            lambda entry: entry.account if entry is not None else None)

    find_recipient = find_user


@implementer(ICredentialsChecker)
class PasswdFileChecker:
    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, backend: PasswdFileBackend, cache: VerifiedCache) -> None:
        self.backend = backend
        self.cache = cache

    @inlineCallbacks
    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> Any:
        username = _text(creds.username)
        password = _text(creds.password)
        try:
            address = normalise_address(username)
        except AddressError:
            raise error.UnauthorizedLogin("authentication failed") from None
        entry = yield self.backend.find_entry(address)
        ok = entry is not None and self.cache.hit(address, entry.hash, password)
        if not ok:
            checked = entry if entry is not None else self.backend.stand_in()
            ok = yield threads.deferToThread(verify, checked, password)
            ok = ok and entry is not None
            if ok and entry is not None:
                self.cache.remember(address, entry.hash, password)
        if not ok or entry is None or not entry.account.enabled:
            raise error.UnauthorizedLogin("authentication failed")
        return entry.account.address


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
