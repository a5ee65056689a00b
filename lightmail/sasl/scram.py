"""SCRAM-SHA-256 and SCRAM-SHA-1, with and without channel binding (RFC 5802, 7677,
RFC 9266 ``tls-exporter``, RFC 5929 ``tls-server-end-point``).

The server side of the exchange: it never sees the password.  The client's proof
is checked against the user's StoredKey (``directory/scram.py``) before the server
proves itself with ``v=``; the credentials handed to the Portal carry the proof, and
the SCRAM checker verifies it again against the directory, so a login succeeds only
where a checker says so.  An unknown user gets a made-up salt, the same each time,
and fails at the proof like a wrong password.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred

from lightmail.directory import scram as keys
from lightmail.sasl.mechanism import Context, Mechanism, SASLError, Step

NONCE_SIZE = 18       # random octets of the server's part of the nonce


class Scram(Mechanism):
    def __init__(self, name: str, context: Context) -> None:
        super().__init__(name, context)
        self.algorithm = "SHA-256" if name.startswith("SCRAM-SHA-256") else "SHA-1"
        self.plus = name.endswith("-PLUS")
        self.next: Callable[[bytes], Union[Step, Deferred[Step]]] = self._client_first
        self.username = ""
        self.gs2_header = b""
        self.binding = b""               # the channel binding data the client names
        self.first_bare = ""
        self.server_first = ""
        self.nonce = ""
        self.verifier: Optional[keys.Verifier] = None
        self.outcome: Optional[Step] = None

    def start(self, initial: Optional[bytes]) -> Union[Step, Deferred[Step]]:
        if initial is None:
            return Step(challenge=b"")
        return self.step(initial)

    def step(self, response: bytes) -> Union[Step, Deferred[Step]]:
        return self.next(response)

    # -- client-first -> server-first ---------------------------------------------------

    def _client_first(self, message: bytes) -> Deferred[Step]:
        text = _text(message)
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise SASLError("client-first-message: gs2-header and bare message")
        flag, authzid, bare = parts
        self._check_binding_flag(flag)
        attributes = _attributes(bare)
        if not bare.startswith("n=") or "r" not in attributes or "m" in attributes:
            raise SASLError("client-first-message-bare: n=user,r=nonce")
        self.username = _saslname(attributes["n"])
        if authzid and _saslname(authzid.removeprefix("a=")) != self.username:
            raise SASLError("authorization identity must be empty or the user's own")
        if not attributes["r"] or not attributes["r"].isprintable():
            raise SASLError("the client nonce must be printable")
        self.gs2_header = f"{flag},{authzid},".encode()
        self.first_bare = bare
        self.nonce = attributes["r"] + base64.b64encode(os.urandom(NONCE_SIZE)).decode()
        self.next = self._refuse
        d: Deferred[Any] = self.context.verifiers.scram_verifier(self.username,
                                                                 self.algorithm)
        return d.addCallback(self._server_first)

    def _check_binding_flag(self, flag: str) -> None:
        """RFC 5802 §6: "p=type" only with a -PLUS mechanism and a type this
        connection has; "y" (the client could bind but thinks we cannot) is a
        downgrade when we offer binding here."""
        if self.plus:
            bindings = self.context.channel_bindings()
            kind = flag.removeprefix("p=")
            if not flag.startswith("p=") or kind not in bindings:
                raise SASLError("-PLUS needs p= with tls-exporter or tls-server-end-point")
            self.binding = bindings[kind]
        elif flag == "y":
            if self.context.secure and self.context.plus_offered:
                raise SASLError("channel binding was offered: a downgrade is refused")
        elif flag != "n":
            raise SASLError("channel binding needs the -PLUS mechanism")

    def _server_first(self, found: tuple[Any, Optional[keys.Verifier]]) -> Step:
        verifier = found[1]
        if verifier is None:
            verifier = keys.stand_in(self.context.secret, self.username, self.algorithm,
                                     self.context.iterations)
        self.verifier = verifier
        salt = base64.b64encode(verifier.salt).decode()
        self.server_first = f"r={self.nonce},s={salt},i={verifier.iterations}"
        self.next = self._client_final
        return Step(challenge=self.server_first.encode())

    # -- client-final -> server-final ---------------------------------------------------

    def _client_final(self, message: bytes) -> Step:
        text = _text(message)
        cut = text.rfind(",p=")
        if cut < 0:
            raise SASLError("client-final-message: c=...,r=...,p=proof")
        without_proof = text[:cut]
        attributes = _attributes(without_proof)
        if not without_proof.startswith("c=") or "r" not in attributes:
            raise SASLError("client-final-message: c=...,r=...,p=proof")
        try:
            proof = base64.b64decode(text[cut + 3:], validate=True)
            binding = base64.b64decode(attributes["c"], validate=True)
        except (binascii.Error, ValueError):
            raise SASLError("c= and p= are base64") from None
        if attributes["r"] != self.nonce:
            raise SASLError("the nonce is not the one of this exchange")
        auth_message = ",".join((self.first_bare, self.server_first, without_proof)).encode()
        verifier = self.verifier
        assert verifier is not None
        # The channel binding is ours to check: the checker sees the proof only.
        bound = binding == self.gs2_header + self.binding
        credentials = keys.ScramProof(self.username.encode(), self.algorithm,
                                      auth_message, proof if bound else b"")
        self.outcome = Step(credentials=credentials, username=self.username)
        self.next = self._refuse
        if not (bound and keys.client_proof_matches(verifier, auth_message, proof)):
            return self.outcome            # the checker says no, as to a bad password
        self.next = self._after_server_final
        signature = keys.server_signature(verifier, auth_message)
        return Step(challenge=b"v=" + base64.b64encode(signature))

    def _after_server_final(self, message: bytes) -> Step:
        """RFC 5802 §5: the client answers the server's v= with an empty response."""
        if message:
            raise SASLError("nothing is expected after the server's signature")
        assert self.outcome is not None
        return self.outcome

    def _refuse(self, message: bytes) -> Step:
        raise SASLError("the exchange is over")


def _text(message: bytes) -> str:
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError("SCRAM messages are UTF-8") from None


def _attributes(text: str) -> dict[str, str]:
    """``a=1,b=2`` as {"a": "1", "b": "2"}; each attribute is one letter."""
    out: dict[str, str] = {}
    for item in text.split(","):
        name, equals, value = item.partition("=")
        if len(name) != 1 or not equals or name in out:
            raise SASLError(f"malformed SCRAM attribute {item[:20]!r}")
        out[name] = value
    return out


def _saslname(text: str) -> str:
    """RFC 5802 §5.1: "=2C" stands for "," and "=3D" for "="; no other "=" allowed."""
    out = text.replace("=2C", ",").replace("=3D", "=")
    if "=" in text.replace("=2C", "").replace("=3D", "") or not out:
        raise SASLError("malformed user name")
    return out
