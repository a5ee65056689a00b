"""SASL (RFC 4422) for every protocol: SMTP AUTH now, IMAP AUTHENTICATE and POP3 AUTH next.

A mechanism is a small server-side state machine: the protocol feeds it the client's
responses (decoded from base64) and gets back either a challenge to send, or
credentials to hand to the twisted.cred Portal.  New mechanisms (SCRAM-SHA-256,
OAUTHBEARER) register with :func:`register_mechanism`; protocols list
:func:`mechanisms` and never change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from twisted.cred import credentials


class SASLError(Exception):
    """The exchange is malformed; the protocol answers with its syntax error."""


@dataclass
class Step:
    """What a mechanism wants next: send ``challenge``, or log in with ``credentials``."""

    challenge: Optional[bytes] = None
    credentials: Optional[credentials.IUsernamePassword] = None


class Mechanism:
    name = ""
    needs_tls = True         # plain-text passwords: only over TLS unless configured

    def start(self, initial: Optional[bytes]) -> Step:
        raise NotImplementedError

    def step(self, response: bytes) -> Step:
        raise NotImplementedError


class Plain(Mechanism):
    """PLAIN (RFC 4616): authzid NUL authcid NUL passwd."""

    name = "PLAIN"

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
        return Step(credentials=credentials.UsernamePassword(authcid, password))


class Login(Mechanism):
    """LOGIN (draft-murchison-sasl-login): username, then password, each prompted."""

    name = "LOGIN"

    def __init__(self) -> None:
        self.username: Optional[bytes] = None

    def start(self, initial: Optional[bytes]) -> Step:
        if initial is not None:
            self.username = initial
            return Step(challenge=b"Password:")
        return Step(challenge=b"Username:")

    def step(self, response: bytes) -> Step:
        if self.username is None:
            self.username = response
            return Step(challenge=b"Password:")
        return Step(credentials=credentials.UsernamePassword(self.username, response))


_MECHANISMS: dict[str, Callable[[], Mechanism]] = {"PLAIN": Plain, "LOGIN": Login}


def register_mechanism(name: str, factory: Callable[[], Mechanism]) -> None:
    _MECHANISMS[name.upper()] = factory


def mechanisms() -> list[str]:
    return list(_MECHANISMS)


def new_mechanism(name: str) -> Optional[Mechanism]:
    factory = _MECHANISMS.get(name.upper())
    return factory() if factory else None
