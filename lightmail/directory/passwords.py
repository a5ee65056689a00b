"""Password hashing with argon2id (argon2-cffi), OWASP-recommended parameters.

Hashing and verifying cost tens of milliseconds of CPU by design, so callers on the
reactor use :func:`hash_password_async` / :func:`verify_password_async`, which run
in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import threads
from twisted.internet.defer import Deferred

from lightmail.directory import crammd5, scram

# argon2-cffi's defaults are RFC 9106's low-memory profile (t=3, m=64 MiB, p=4).
_hasher = PasswordHasher()

# Verified against when a user does not exist, so that timing does not tell
# whether an address has an account.
_DUMMY_HASH = _hasher.hash("not a real password")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and bool(stored_hash)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


def hash_password_async(password: str) -> Deferred[str]:
    return threads.deferToThread(hash_password, password)


def verify_password_async(stored_hash: str | None, password: str) -> Deferred[bool]:
    return threads.deferToThread(verify_password, stored_hash, password)


@dataclass(frozen=True)
class Secrets:
    """What is kept of a password: its argon2 hash, its SCRAM verifiers, and
    CRAM-MD5's secret where that mechanism is on."""

    password_hash: str
    scram_verifiers: str
    cram_md5: Optional[str] = None


def make_secrets(password: str, iterations: int = scram.DEFAULT_ITERATIONS,
                 cram: bool = False) -> Secrets:
    return Secrets(hash_password(password), scram.make_verifiers(password, iterations),
                   crammd5.make_secret(password) if cram else None)


def make_secrets_async(password: str, iterations: int = scram.DEFAULT_ITERATIONS,
                       cram: bool = False) -> Deferred[Secrets]:
    return threads.deferToThread(make_secrets, password, iterations, cram)


def upgraded_secrets(password: str, stored_hash: str, verifiers: Optional[str],
                     iterations: int = scram.DEFAULT_ITERATIONS, cram: bool = False,
                     cram_secret: Optional[str] = None) -> Optional[Secrets]:
    """After a successful password login: new secrets if the hash's parameters are
    old, the SCRAM verifiers missing or weaker than configured, or CRAM-MD5's secret
    missing while the mechanism is on (or kept while it is off); else None."""
    current = scram.find_verifier(verifiers, "SHA-256")
    if not needs_rehash(stored_hash) and current is not None \
            and current.iterations >= iterations \
            and all(scram.find_verifier(verifiers, a) for a in scram.ALGORITHMS) \
            and (cram_secret is not None) == cram:
        return None
    rehashed = hash_password(password) if needs_rehash(stored_hash) else stored_hash
    return Secrets(rehashed, scram.make_verifiers(password, iterations),
                   crammd5.make_secret(password) if cram else None)
