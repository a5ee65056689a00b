"""SCRAM's stored keys (RFC 5802 §3, RFC 7677): what a server keeps instead of a
password so that SCRAM-SHA-256 and SCRAM-SHA-1 can check a client's proof.

A verifier is (iterations, salt, StoredKey, ServerKey); kept beside the argon2 hash
in ``users.scram_verifiers`` as ``ALGORITHM:iterations:salt:StoredKey:ServerKey``
(base64), one per algorithm, space-separated.  They are made when a password is set
and, for users whose password was set before, at their next password login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Optional

from zope.interface import Attribute, Interface, implementer

# Algorithms by SCRAM name; hashlib names them in lower case.
ALGORITHMS = {"SHA-256": "sha256", "SHA-1": "sha1"}
# RFC 7677 §4: at least 4096 for SHA-256 (as Dovecot).
DEFAULT_ITERATIONS = 4096
SALT_SIZE = 16


@dataclass(frozen=True)
class Verifier:
    algorithm: str           # "SHA-256" or "SHA-1"
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def encode(self) -> str:
        parts = (self.salt, self.stored_key, self.server_key)
        return ":".join([self.algorithm, str(self.iterations)]
                        + [base64.b64encode(p).decode("ascii") for p in parts])


def digest_name(algorithm: str) -> str:
    return ALGORITHMS[algorithm]


def make_verifier(password: str, algorithm: str, iterations: int = DEFAULT_ITERATIONS,
                  salt: Optional[bytes] = None) -> Verifier:
    """The verifier of ``password`` (PBKDF2: tens of milliseconds, run it in a
    thread).  The password is used as UTF-8; SASLprep is not applied."""
    name = digest_name(algorithm)
    salt = os.urandom(SALT_SIZE) if salt is None else salt
    salted = hashlib.pbkdf2_hmac(name, password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", name).digest()
    server_key = hmac.new(salted, b"Server Key", name).digest()
    return Verifier(algorithm, iterations, salt, hashlib.new(name, client_key).digest(),
                    server_key)


def make_verifiers(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Every algorithm's verifier, encoded for ``users.scram_verifiers``."""
    return " ".join(make_verifier(password, algorithm, iterations).encode()
                    for algorithm in ALGORITHMS)


def find_verifier(encoded: Optional[str], algorithm: str) -> Optional[Verifier]:
    """The verifier for ``algorithm`` among the encoded ones, or None."""
    for item in (encoded or "").split():
        fields = item.split(":")
        if len(fields) != 5 or fields[0] != algorithm:
            continue
        try:
            salt, stored, server = (base64.b64decode(f, validate=True) for f in fields[2:])
            return Verifier(algorithm, int(fields[1]), salt, stored, server)
        except ValueError:
            return None
    return None


def stand_in(secret: bytes, username: str, algorithm: str,
             iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """A verifier for a user who does not exist or has none: the same salt for the
    same name every time (so repeated tries do not reveal it is made up), keys no
    proof matches."""
    name = digest_name(algorithm)
    salt = hmac.new(secret, username.encode("utf-8", "surrogateescape"),
                    "sha256").digest()[:SALT_SIZE]
    nothing = bytes(hashlib.new(name).digest_size)
    return Verifier(algorithm, iterations, salt, nothing, nothing)


def client_proof_matches(verifier: Verifier, auth_message: bytes, proof: bytes) -> bool:
    """RFC 5802 §3: ClientKey = proof XOR HMAC(StoredKey, AuthMessage), and
    H(ClientKey) must be StoredKey."""
    name = digest_name(verifier.algorithm)
    signature = hmac.new(verifier.stored_key, auth_message, name).digest()
    if len(proof) != len(signature):
        return False
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    return hmac.compare_digest(hashlib.new(name, client_key).digest(), verifier.stored_key)


def server_signature(verifier: Verifier, auth_message: bytes) -> bytes:
    return hmac.new(verifier.server_key, auth_message, digest_name(verifier.algorithm)).digest()


class IScramProof(Interface):
    """Credentials of a SCRAM exchange (RFC 5802): the client's proof over the
    exchange's AuthMessage, which a checker holding the user's StoredKey verifies."""

    username = Attribute("The authentication identity (bytes, UTF-8).")
    algorithm = Attribute('"SHA-256" or "SHA-1".')
    auth_message = Attribute("client-first-bare, server-first, client-final-without-proof.")
    proof = Attribute("The ClientProof (bytes).")


@implementer(IScramProof)
@dataclass(frozen=True)
class ScramProof:
    username: bytes
    algorithm: str
    auth_message: bytes
    proof: bytes = field(repr=False)
