"""What every SASL mechanism is: a state machine with a start and steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred


class SASLError(Exception):
    """The exchange is malformed; the protocol answers with its syntax error."""


@dataclass
class Step:
    """What a mechanism wants next: send ``challenge``, or log in with ``credentials``."""

    challenge: Optional[bytes] = None
    credentials: Any = None         # an ICredentials (twisted.cred's, or SCRAM's)
    username: str = ""              # who the credentials name (for logs and limits)


def _no_bindings() -> dict[str, bytes]:
    return {}


@dataclass
class Context:
    """What a mechanism may know of its connection and server.

    ``channel_bindings``: the connection's channel binding data by type
    (``tls-exporter``, ``tls-server-end-point``), empty without TLS; asked for only
    when a mechanism needs it.  ``verifiers``: the directory's
    :class:`~lightmail.directory.interfaces.IScramVerifiers`.  ``secret``: this
    server's key for made-up salts of unknown users."""

    channel_bindings: Callable[[], dict[str, bytes]] = _no_bindings
    verifiers: Any = None
    secret: bytes = field(default=b"", repr=False)
    iterations: int = 4096
    plus_offered: bool = False          # a -PLUS mechanism is enabled
    tokens: Any = None                  # a TokenValidator (OAUTHBEARER, XOAUTH2)
    secure: bool = False                # the connection is under TLS


class Mechanism:
    def __init__(self, name: str, context: Context) -> None:
        self.name = name
        self.context = context

    def start(self, initial: Optional[bytes]) -> Union[Step, Deferred[Step]]:
        raise NotImplementedError

    def step(self, response: bytes) -> Union[Step, Deferred[Step]]:
        raise NotImplementedError
