"""OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's, which most mail clients still speak):
a bearer token (a JWT, ``directory/oauth.py``) in place of a password.

The mechanism checks the token itself first, so that a bad one gets the error the
RFC describes (a JSON challenge, answered by the client with an empty response or
^A) before the failure; a good one goes to the Portal, whose bearer checker decides.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred

from lightmail.directory.oauth import BearerToken, TokenRejected
from lightmail.sasl.mechanism import Mechanism, SASLError, Step

KVSEP = b"\x01"


class Bearer(Mechanism):
    """What the two mechanisms share: a token in, a check, maybe an error challenge."""

    error_challenge = b""
    credentials: Optional[BearerToken] = None

    def start(self, initial: Optional[bytes]) -> Union[Step, Deferred[Step]]:
        if initial is None:
            return Step(challenge=b"")
        return self.step(initial)

    def step(self, response: bytes) -> Union[Step, Deferred[Step]]:
        if self.credentials is not None:
            # The client's answer to our error challenge: now the failure.
            return Step(credentials=self.credentials, username=self._username())
        username, token = self.parse(response)
        self.credentials = BearerToken(username, token)
        d: Deferred[Any] = self.context.tokens.address_of(token)
        return d.addCallbacks(self._good, self._bad)

    def parse(self, response: bytes) -> tuple[bytes, str]:
        raise NotImplementedError

    def _username(self) -> str:
        assert self.credentials is not None
        return self.credentials.username.decode("utf-8", "replace")

    def _good(self, address: str) -> Step:
        assert self.credentials is not None
        return Step(credentials=self.credentials, username=self._username() or address)

    def _bad(self, failure: Any) -> Step:
        failure.trap(TokenRejected)
        return Step(challenge=self.error_challenge)


class OAuthBearer(Bearer):
    """RFC 7628 §3.1: gs2-header ^A auth=Bearer TOKEN ^A [host=... ^A port=... ^A] ^A."""

    error_challenge = json.dumps({"status": "invalid_token", "schemes": "bearer"}).encode()

    def parse(self, response: bytes) -> tuple[bytes, str]:
        header, sep, rest = response.partition(b",")
        authzid, sep2, pairs = rest.partition(b",")
        if not sep or not sep2 or header not in (b"n", b"y") or \
                not pairs.startswith(KVSEP) or not pairs.endswith(KVSEP + KVSEP):
            raise SASLError("OAUTHBEARER: gs2-header, then ^A-separated key=value pairs")
        if authzid and not authzid.startswith(b"a="):
            raise SASLError("OAUTHBEARER: the authorization identity is a=user")
        return authzid[2:], _bearer(_pairs(pairs.strip(KVSEP)))


class XOAuth2(Bearer):
    """user=ADDRESS ^A auth=Bearer TOKEN ^A ^A."""

    error_challenge = json.dumps({"status": "401", "schemes": "Bearer"}).encode()

    def parse(self, response: bytes) -> tuple[bytes, str]:
        if not response.endswith(KVSEP + KVSEP):
            raise SASLError("XOAUTH2: user=... ^A auth=Bearer ... ^A ^A")
        pairs = _pairs(response.strip(KVSEP))
        return pairs.get("user", "").encode(), _bearer(pairs)


def _pairs(text: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(KVSEP):
        key, equals, value = item.partition(b"=")
        if not equals:
            raise SASLError("a key=value pair is malformed")
        out[key.decode("ascii", "replace").lower()] = value.decode("utf-8", "replace")
    return out


def _bearer(pairs: dict[str, str]) -> str:
    scheme, _, token = pairs.get("auth", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SASLError("auth=Bearer TOKEN is missing")
    return token.strip()
