"""SASL (RFC 4422) for SMTP AUTH, IMAP AUTHENTICATE and POP3 AUTH alike.

A mechanism (``plain.py``: PLAIN, LOGIN; ``scram.py``: SCRAM-SHA-256, SCRAM-SHA-1
and their -PLUS forms) is a server-side state machine fed the client's responses;
each step gives a challenge to send, or credentials for the twisted.cred Portal, at
once or later (a Deferred: SCRAM looks up the user's stored keys).  An
:class:`Exchange` holds one conversation, with the base64, "=" and "*" rules the
three protocols share (RFC 4954, RFC 9051 §6.2.2, RFC 5034), so a protocol only puts
the outcome in its own words.  Which mechanisms a connection is offered is decided
here (:func:`offered`), from the configuration and the connection's TLS.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred, maybeDeferred

from lightmail import tls
from lightmail.sasl.crammd5 import CramMD5
from lightmail.sasl.mechanism import Context, Mechanism, SASLError, Step
from lightmail.sasl.oauth import OAuthBearer, XOAuth2
from lightmail.sasl.plain import Login, Plain
from lightmail.sasl.scram import Scram


class Cancelled(Exception):
    """The client answered "*" (RFC 4422 §3.5)."""


_MECHANISMS: dict[str, type[Mechanism]] = {
    "PLAIN": Plain, "LOGIN": Login,
    "SCRAM-SHA-256": Scram, "SCRAM-SHA-256-PLUS": Scram,
    "SCRAM-SHA-1": Scram, "SCRAM-SHA-1-PLUS": Scram,
    "OAUTHBEARER": OAuthBearer, "XOAUTH2": XOAuth2, "CRAM-MD5": CramMD5,
}
KNOWN = tuple(_MECHANISMS)
# Longest SASL response line taken, whatever the protocol's command line limit (RFC
# 4954 §4 asks SMTP servers for 12288 octets; POP3 and IMAP take the same here).
RESPONSE_LIMIT = 12288
DEFAULT = ("PLAIN", "LOGIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")


@dataclass
class Offer:
    """The mechanisms this server offers (``[directory] mechanisms``) and what they
    need; made once where the server is wired, asked by each connection."""

    enabled: tuple[str, ...] = DEFAULT
    verifiers: Any = None               # IScramVerifiers
    secret: bytes = field(default=b"", repr=False)
    iterations: int = 4096
    tokens: Any = None                  # TokenValidator, when OAuth is configured

    def context(self, transport: Any, secure: bool) -> Context:
        """What a mechanism may know of one connection (``secure``: under TLS)."""
        def bindings() -> dict[str, bytes]:
            return tls.channel_bindings(transport) if secure else {}
        return Context(channel_bindings=bindings, verifiers=self.verifiers,
                       secret=self.secret, iterations=self.iterations, secure=secure,
                       tokens=self.tokens,
                       plus_offered=any(n.endswith("-PLUS") for n in self.enabled))

    def names(self, context: Context) -> list[str]:
        """The mechanisms to announce on this connection: -PLUS ones under TLS only."""
        return [name for name in self.enabled
                if context.secure or not name.endswith("-PLUS")]

    def exchange(self, name: str, context: Context) -> Optional[Exchange]:
        """A fresh exchange of mechanism ``name`` if this connection is offered it."""
        name = name.upper()
        if name not in self.names(context):
            return None
        return Exchange(_MECHANISMS[name](name, context))


class Exchange:
    """One SASL conversation: decodes what the client sends, runs the mechanism's
    steps, fails with :class:`SASLError` (malformed) or :class:`Cancelled`."""

    def __init__(self, mechanism: Mechanism) -> None:
        self.mechanism = mechanism

    @property
    def name(self) -> str:
        return self.mechanism.name

    def start(self, initial: Optional[str]) -> Deferred[Step]:
        """``initial``: the initial response as the command carried it (base64, "="
        for an empty one), or None when there is none."""
        return _deferred(self._start, initial)

    def _start(self, initial: Optional[str]) -> Union[Step, Deferred[Step]]:
        first = None if initial is None else b"" if initial == "=" else _decode(initial)
        return self.mechanism.start(first)

    def respond(self, line: Union[bytes, str]) -> Deferred[Step]:
        """The client's answer to a challenge (one line, base64)."""
        return _deferred(self._respond, line)

    def _respond(self, line: Union[bytes, str]) -> Union[Step, Deferred[Step]]:
        text = line.decode("ascii", "replace") if isinstance(line, bytes) else line
        if text.strip() == "*":
            raise Cancelled()
        return self.mechanism.step(_decode(text))


def _deferred(step: Callable[[Any], Union[Step, Deferred[Step]]], arg: Any
              ) -> Deferred[Step]:
    """A step's outcome as a Deferred, whether it came at once, later or raised."""
    d: Deferred[Step] = maybeDeferred(step, arg)  # type: ignore[call-overload]
    return d


def encode(challenge: bytes) -> str:
    return base64.b64encode(challenge).decode("ascii")


def _decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("the response is not base64") from None


__all__ = ["DEFAULT", "KNOWN", "Cancelled", "Context", "Exchange", "Mechanism", "Offer",
           "SASLError", "Step", "encode"]
