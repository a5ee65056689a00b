"""OAuth 2.0 bearer tokens as credentials (OAUTHBEARER, RFC 7628; XOAUTH2).

LightMail is a resource server: a client brings a JWT its issuer made, and LightMail
checks the signature against the issuer's published keys (a JWK Set, from a file or
the issuer's jwks_uri), the issuer, the audience, expiry and not-before, and takes the
user's address from a configured claim.  The keys are cached: a file is read again
when it changes, a URL fetched again after ``jwks_refresh`` or, at most once a minute,
when a token names a key not seen yet (the issuer rotated).  Fetching and reading run
in threads, never on the reactor.  PyJWT does the JWT work.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import jwt
from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from lightmail.config import OAuthConfig

FORCED_REFRESH_INTERVAL = 60.0      # fetches for unknown key ids, at most this often
FETCH_TIMEOUT = 10.0
MAX_JWKS_SIZE = 1024 * 1024


class TokenRejected(Exception):
    """The token is not good; the message says why (for the log, not the client)."""


class IBearerToken(Interface):
    username = Attribute("The identity the client names (may be empty: the token's).")
    token = Attribute("The bearer token (a JWT).")


@implementer(IBearerToken)
@dataclass(frozen=True)
class BearerToken:
    username: bytes
    token: str = field(repr=False)


class KeySet:
    """The issuer's signing keys, cached (see the module's docstring)."""

    log = Logger()

    def __init__(self, source: str, refresh: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.refresh, self.clock = source, refresh, clock
        self.keys: Optional[jwt.PyJWKSet] = None
        self.loaded_at = float("-inf")
        self.forced_at = float("-inf")
        self.file_stamp: Optional[tuple[float, int]] = None

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("https://", "http://"))

    @inlineCallbacks
    def key_for(self, kid: Optional[str]) -> Any:
        """The PyJWK the token's header names (by kid; the only key if it names none)."""
        keys = yield self._current(force=False)
        found = _pick(keys, kid)
        if found is None and self.clock() - self.forced_at >= FORCED_REFRESH_INTERVAL:
            self.forced_at = self.clock()
            keys = yield self._current(force=True)
            found = _pick(keys, kid)
        if found is None:
            raise TokenRejected(f"no key {kid!r} in the issuer's key set")
        return found

    @inlineCallbacks
    def _current(self, force: bool) -> Any:
        stale = self.keys is None or force \
            or self.clock() - self.loaded_at >= self.refresh
        if not stale and not self.is_url:
            stamp = yield deferToThread(_stamp, Path(self.source))
            stale = stamp != self.file_stamp
        if stale:
            try:
                text, stamp = yield deferToThread(self._read)
                self.keys = jwt.PyJWKSet.from_dict(json.loads(text))
                self.loaded_at, self.file_stamp = self.clock(), stamp
            except Exception as exc:
                if self.keys is None:
                    raise TokenRejected(f"the issuer's keys cannot be had: {exc}") from None
                # Keep the keys we have: the issuer may be down for a moment.
                self.log.warn("could not refresh the OAuth keys from {source}: {error}",
                              source=self.source, error=str(exc))
        return self.keys

    def _read(self) -> tuple[str, Optional[tuple[float, int]]]:
        if self.is_url:
            with urllib.request.urlopen(self.source, timeout=FETCH_TIMEOUT) as answer:
                return answer.read(MAX_JWKS_SIZE).decode("utf-8"), None
        path = Path(self.source)
        return path.read_text(encoding="utf-8"), _stamp(path)


def _stamp(path: Path) -> Optional[tuple[float, int]]:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime, status.st_size


def _pick(keys: Optional[jwt.PyJWKSet], kid: Optional[str]) -> Any:
    if keys is None:
        return None
    if kid is None:
        return keys.keys[0] if len(keys.keys) == 1 else None
    return next((key for key in keys.keys if key.key_id == kid), None)


class TokenValidator:
    def __init__(self, config: OAuthConfig, keys: Optional[KeySet] = None) -> None:
        self.config = config
        self.keys = keys or KeySet(config.jwks, config.jwks_refresh)
        self.algorithms = [a for a in config.algorithms
                           if a.lower() != "none" and not a.upper().startswith("HS")]

    @inlineCallbacks
    def address_of(self, token: str) -> Any:
        """The user's address the token names; fails with TokenRejected."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"not a JWT: {exc}") from None
        if header.get("alg") not in self.algorithms:
            raise TokenRejected(f"algorithm {header.get('alg')!r} is not accepted")
        key = yield self.keys.key_for(header.get("kid"))
        config = self.config
        try:
            claims = jwt.decode(
                token, key.key, algorithms=self.algorithms,
                audience=config.audience or None, issuer=config.issuer,
                leeway=config.leeway,
                options={"require": ["exp", "iss"], "verify_aud": bool(config.audience)})
        except jwt.PyJWTError as exc:
            raise TokenRejected(str(exc)) from None
        address = claims.get(config.user_claim)
        if not isinstance(address, str) or not address:
            raise TokenRejected(f"the token has no {config.user_claim} claim")
        return address.strip().lower()


@implementer(ICredentialsChecker)
class BearerChecker:
    """Bearer tokens: the token's user must be ours, enabled, and the one the client
    names (if it names one)."""

    credentialInterfaces = (IBearerToken,)
    log = Logger()

    def __init__(self, validator: TokenValidator, directory: Any) -> None:
        self.validator = validator
        self.directory = directory

    @inlineCallbacks
    def requestAvatarId(self, creds: IBearerToken) -> Any:
        try:
            address = yield self.validator.address_of(creds.token)
        except TokenRejected as exc:
            self.log.info("bearer token refused: {reason}", reason=str(exc))
            raise error.UnauthorizedLogin("authentication failed") from None
        named = creds.username.decode("utf-8", "replace").strip().lower()
        if named and named != address:
            self.log.info("bearer token of {address} offered for {named}", address=address,
                          named=named)
            raise error.UnauthorizedLogin("authentication failed")
        user = yield self.directory.get_user(address)
        if user is None or not user.enabled:
            raise error.UnauthorizedLogin("authentication failed")
        return user.address

