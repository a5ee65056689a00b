"""CRAM-MD5 (RFC 2195): the server sends a unique challenge, the client answers with
its name and the HMAC-MD5 of the challenge keyed with its password.  Off unless named
in ``[directory] mechanisms`` (see ``directory/crammd5.py`` for what it costs)."""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Optional

from lightmail.directory.crammd5 import CramProof
from lightmail.sasl.mechanism import Mechanism, SASLError, Step

_ANSWER = re.compile(rb"(.+) ([0-9a-fA-F]{32})")


class CramMD5(Mechanism):
    challenge = b""

    def start(self, initial: Optional[bytes]) -> Step:
        if initial:
            raise SASLError("CRAM-MD5 has no initial response")
        # RFC 2195 §2: msg-id form, unique for each exchange.
        self.challenge = (f"<{os.urandom(8).hex()}.{int(time.time())}"
                          f"@{socket.gethostname()}>").encode()
        return Step(challenge=self.challenge)

    def step(self, response: bytes) -> Step:
        match = _ANSWER.fullmatch(response)
        if match is None or not self.challenge:
            raise SASLError("CRAM-MD5 expects: user, a space, 32 hex digits")
        username = match.group(1)
        return Step(credentials=CramProof(username, self.challenge,
                                          match.group(2).decode()),
                    username=username.decode("utf-8", "replace"))
