"""PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login): a password in the
exchange, so offered only over TLS unless ``auth_over_plaintext`` says otherwise."""

from __future__ import annotations

from typing import Optional

from twisted.cred import credentials

from lightmail.sasl.mechanism import Mechanism, SASLError, Step


def password_step(username: bytes, password: bytes) -> Step:
    return Step(credentials=credentials.UsernamePassword(username, password),
                username=username.decode("utf-8", "replace"))


class Plain(Mechanism):
    """PLAIN: authzid NUL authcid NUL passwd."""

    def start(self, initial: Optional[bytes]) -> Step:
        if initial is None:
            return Step(challenge=b"")
        return self.step(initial)

    def step(self, response: bytes) -> Step:
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise SASLError("PLAIN needs authzid NUL authcid NUL password")
        authzid, authcid, password = parts
        # We do not offer acting for another user (RFC 4616 §2: authzid may be empty).
        if authzid and authzid != authcid:
            raise SASLError("authorization identity must be empty or the user's own")
        return password_step(authcid, password)


class Login(Mechanism):
    """LOGIN: username, then password, each prompted."""

    username: Optional[bytes] = None

    def start(self, initial: Optional[bytes]) -> Step:
        if initial is not None:
            self.username = initial
            return Step(challenge=b"Password:")
        return Step(challenge=b"Username:")

    def step(self, response: bytes) -> Step:
        if self.username is None:
            self.username = response
            return Step(challenge=b"Password:")
        return password_step(self.username, response)
