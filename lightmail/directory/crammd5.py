"""CRAM-MD5's stored secret (RFC 2195), only for sites that enable the mechanism.

CRAM-MD5 proves the password with HMAC-MD5 over a challenge.  What the server keeps is
Dovecot's CRAM-MD5 scheme: the MD5 states after the HMAC key's inner and outer pad
blocks (32 octets).  They do not give the password back, but they are all an attacker
needs to pass CRAM-MD5: keep it off unless old clients need it.  hashlib cannot resume
an MD5 state, so the compression function is here (RFC 1321 §3.4); it runs on a few
blocks per login.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from dataclasses import dataclass

from zope.interface import Attribute, Interface, implementer

_S = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_K = [int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)]
_INITIAL = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MASK = 0xFFFFFFFF


def _compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _MASK)), (7 * i) % 16
        f = (f + a + _K[i] + words[g]) & _MASK
        a, d, c = d, c, b
        b = (b + ((f << _S[i]) | (f >> (32 - _S[i])))) & _MASK
    return tuple((x + y) & _MASK for x, y in zip(state, (a, b, c, d), strict=True))  # type: ignore[return-value]


def _finish(state: tuple[int, int, int, int], data: bytes, done: int) -> bytes:
    """The MD5 digest of a message whose first ``done`` octets (whole blocks) left
    ``state``, followed by ``data``."""
    length = (done + len(data)) * 8
    data += b"\x80" + b"\x00" * ((55 - (done + len(data))) % 64) + struct.pack("<Q", length)
    for start in range(0, len(data), 64):
        state = _compress(state, data[start:start + 64])
    return struct.pack("<4I", *state)


def make_secret(password: str) -> str:
    """The states after the inner and outer pad blocks of HMAC-MD5 keyed with the
    password, hex (as Dovecot's {CRAM-MD5} scheme, in RFC 2104's order)."""
    key = password.encode("utf-8")
    if len(key) > 64:
        key = hashlib.md5(key).digest()            # RFC 2104 §2: a long key is hashed
    key = key.ljust(64, b"\x00")
    inner = _compress(_INITIAL, bytes(k ^ 0x36 for k in key))
    outer = _compress(_INITIAL, bytes(k ^ 0x5C for k in key))
    return struct.pack("<8I", *inner, *outer).hex()


def response_matches(secret: str, challenge: bytes, digest_hex: str) -> bool:
    """Whether ``digest_hex`` is HMAC-MD5(password, challenge) for the password the
    secret was made from."""
    try:
        words = struct.unpack("<8I", bytes.fromhex(secret))
    except ValueError:
        return False
    inner, outer = words[:4], words[4:]
    expected = _finish(outer, _finish(inner, challenge, 64), 64).hex()
    return hmac.compare_digest(expected, digest_hex.lower())


class ICramProof(Interface):
    username = Attribute("The user name (bytes).")
    challenge = Attribute("The challenge the server sent (bytes).")
    digest = Attribute("The client's HMAC-MD5 of it, hex.")


@implementer(ICramProof)
@dataclass(frozen=True)
class CramProof:
    username: bytes
    challenge: bytes
    digest: str
