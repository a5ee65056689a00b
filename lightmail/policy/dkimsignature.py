"""One DKIM signature checked against a message (RFC 6376 §3.4-3.7 and §6.1;
Ed25519-SHA256, RFC 8463; RSA-SHA1 refused unless asked for, RFC 8301): canonicalization and hashes
with ``hashlib`` and bytes operations that run in C, the RSA or Ed25519 check through
``cryptography`` (OpenSSL).

Why not dkimpy, which LightMail signs with and its tests verify with: for a 4 KB
message dkimpy spent 1.2 ms of Python a signature (its RSA is pure Python, 0.45 ms
for a 2048-bit key against 0.035 ms in OpenSSL; it splits the whole message into
lines with a regular expression), the largest cost of the inbound checks
(docs/benchmarks.rst).  Here the body is canonicalized with whole-buffer
substitutions, a key record is parsed once (:class:`KeyCache`), and a 4 KB message
costs about 0.1 ms.  dkimpy stays the reference: tests/test_dkim_signature.py
compares the two on canonicalization corner cases and on signatures made by dkimpy
and by OpenDKIM.

Everything here is synchronous and thread-safe; lightmail.policy.dkimverify decides
where it runs.  :func:`check` never raises: every outcome is a :class:`Verdict`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

__all__ = ["HeaderField", "KeyCache", "ParsedKey", "Verdict", "canonical_body",
           "check", "header_fields", "normalised", "split_message"]

#: Signatures dated this far ahead are refused (clocks drift; dkimpy allows as much).
FUTURE_SLOP = 36000
_WSP_TO_SQUEEZE = re.compile(rb"\t[ \t]*| [ \t]+")
_WSP_BEFORE_CRLF = re.compile(rb"[ \t]+\r\n")
_WSP = re.compile(rb"[ \t]+")
_B_TAG = re.compile(rb"((?:^|;)[ \t\r\n]*b[ \t\r\n]*=)[^;]*")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_TAG_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9_]*")
_ALGORITHMS = {b"rsa-sha256": ("rsa", "sha256"), b"ed25519-sha256": ("ed25519", "sha256"),
               b"rsa-sha1": ("rsa", "sha1")}
_RSA_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


@dataclass(frozen=True)
class Verdict:
    """``pass``, ``fail``, ``neutral``, ``policy`` or ``permerror`` (RFC 8601's
    words), and why, for Authentication-Results' reason."""

    result: str
    reason: str = ""


@dataclass(frozen=True)
class HeaderField:
    """A header field as it arrived: its name as written (before the colon, blanks
    before the colon removed), and the whole field, folding kept, without the CRLF
    that ends it."""

    name: bytes
    raw: bytes


def normalised(message: bytes) -> bytes:
    """The message with every bare LF made CRLF (as dkimpy and OpenDKIM read it);
    the same object when it has none."""
    if message.count(b"\n") == message.count(b"\r\n"):
        return message
    return re.sub(rb"\r?\n", b"\r\n", message)


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header block, each field ending in CRLF; body after the blank line) of a
    CRLF message.  A message without a blank line is all header."""
    if message.startswith(b"\r\n"):
        return b"", message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[:end + 2], message[end + 4:]


def header_fields(block: bytes) -> list[HeaderField]:
    """The fields of a CRLF header block, top first; a continuation line before any
    field, or a line without a colon, is skipped (there is no field it could sign)."""
    fields: list[HeaderField] = []
    current: list[bytes] = []
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current:
                current.append(line)
            continue
        if current:
            fields.append(_field(current))
        current = [line] if b":" in line else []
    if current:
        fields.append(_field(current))
    return fields


def _field(lines: list[bytes]) -> HeaderField:
    raw = b"\r\n".join(lines)
    return HeaderField(raw.split(b":", 1)[0].rstrip(b" \t"), raw)


def canonical_header(field: HeaderField, relaxed: bool) -> bytes:
    """RFC 6376 §3.4.1/§3.4.2, with the CRLF that ends the field."""
    if not relaxed:
        return field.raw + b"\r\n"
    value = field.raw.split(b":", 1)[1].replace(b"\r\n", b"")
    return field.name.lower() + b":" + _WSP.sub(b" ", value).strip() + b"\r\n"


def canonical_body(body: bytes, relaxed: bool) -> bytes:
    """RFC 6376 §3.4.3/§3.4.4 of a CRLF body."""
    if relaxed:
        if b"\t" in body or b"  " in body:
            body = _WSP_TO_SQUEEZE.sub(b" ", body)
        if b" \r\n" in body:
            body = body.replace(b" \r\n", b"\r\n")
    end = len(body)
    while end >= 2 and body[end - 2:end] == b"\r\n":
        end -= 2
    if end == 0:
        return b"" if relaxed else b"\r\n"
    return body[:end] + b"\r\n"


@dataclass(frozen=True)
class ParsedKey:
    """A key record read (RFC 6376 §3.6.1): the public key, or why it cannot be
    used."""

    kind: str = ""                  # rsa or ed25519
    key: Any = None
    bits: int = 0
    hashes: tuple[str, ...] = ()    # h=: allowed hashes, () for any
    strict: bool = False            # t=s: i= must be in d= exactly
    testing: bool = False           # t=y
    problem: str = ""


class KeyCache:
    """Key records parsed once: loading a public key costs more than checking a
    signature with it.  Keyed by the record's text; at most ``size`` kept."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._keys: OrderedDict[bytes, ParsedKey] = OrderedDict()
        self._lock = threading.Lock()     # dkimverify may check in threads

    def parsed(self, record: bytes) -> ParsedKey:
        with self._lock:
            found = self._keys.get(record)
            if found is not None:
                self._keys.move_to_end(record)
                return found
        parsed = parse_key(record)
        with self._lock:
            self._keys[record] = parsed
            while len(self._keys) > self.size:
                self._keys.popitem(last=False)
        return parsed


def parse_key(record: bytes) -> ParsedKey:
    tags = tag_list(record)
    if tags is None:
        return ParsedKey(problem="key record cannot be read")
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        return ParsedKey(problem="key record is not v=DKIM1")
    services = tags.get(b"s", b"*").split(b":")
    if b"*" not in services and b"email" not in services:
        return ParsedKey(problem="key is not for email (s=)")
    if b"p" not in tags:
        return ParsedKey(problem="key record has no p=")
    if not tags[b"p"]:
        return ParsedKey(problem="key revoked (empty p=)")
    flags = tags.get(b"t", b"").split(b":")
    allowed = tuple(h.decode("ascii", "replace") for h in tags.get(b"h", b"").split(b":")
                    if h)
    kind = tags.get(b"k", b"rsa").decode("ascii", "replace")
    try:
        data = base64.b64decode(tags[b"p"], validate=True)
        key, bits = _public_key(kind, data)
    except (binascii.Error, ValueError, UnsupportedAlgorithm) as exc:
        return ParsedKey(problem=f"key cannot be used: {exc}")
    return ParsedKey(kind=kind, key=key, bits=bits, hashes=allowed,
                     strict=b"s" in flags, testing=b"y" in flags)


def _public_key(kind: str, data: bytes) -> tuple[Any, int]:
    if kind == "ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(data), 256
    if kind != "rsa":
        raise ValueError(f"unknown key type k={kind}")
    try:
        key = serialization.load_der_public_key(data)
    except ValueError:
        # A bare RSAPublicKey (PKCS#1), as some old records publish it.
        pem = (b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(data)
               + b"-----END RSA PUBLIC KEY-----\n")
        key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("k=rsa record holds another kind of key")
    return key, key.key_size


def tag_list(value: bytes) -> Optional[dict[bytes, bytes]]:
    """A tag=value list (RFC 6376 §3.2), blanks inside values removed; None when it
    cannot be read (a tag without ``=``, or twice)."""
    tags: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        name, equals, text = part.partition(b"=")
        name = name.strip()
        if not equals:
            if name:
                return None
            continue
        if not _TAG_NAME.fullmatch(name) or name in tags:
            return None
        tags[name] = b"".join(text.split())
    return tags


def check(fields: list[HeaderField], body: bytes, index: int, tags: Mapping[bytes, bytes],
          key: Union[ParsedKey, None], min_rsa_bits: int, accept_rsa_sha1: bool = False,
          now: Optional[float] = None) -> Verdict:
    """Signature ``fields[index]`` (a DKIM-Signature whose tags are ``tags``) against
    the header ``fields`` and the CRLF ``body``, with its key.  An rsa-sha1 signature
    is refused (``policy``) unless ``accept_rsa_sha1``."""
    problem = _tags_problem(tags, now if now is not None else time.time())
    if problem:
        return Verdict("permerror", problem)
    if tags[b"a"] == b"rsa-sha1" and not accept_rsa_sha1:
        return Verdict("policy", "rsa-sha1 signatures are not accepted (RFC 8301)")
    if key is None:
        return Verdict("permerror", "no key for signature")
    if key.problem:
        return Verdict("permerror", key.problem)
    kind, hash_name = _ALGORITHMS[tags[b"a"]]
    if kind != key.kind:
        return Verdict("permerror", f"a={tags[b'a'].decode()} does not match k={key.kind}")
    if key.hashes and hash_name not in key.hashes:
        return Verdict("permerror", f"the key does not allow {hash_name} (h=)")
    if key.strict and b"i" in tags and _domain_of(tags[b"i"]) != tags[b"d"].lower():
        return Verdict("permerror", "i= is not d= exactly, as the key's t=s requires")
    if kind == "rsa" and key.bits < min_rsa_bits:
        return Verdict("policy", f"{key.bits}-bit RSA key is too short")
    relaxed_header, relaxed_body = _canonicalization(tags.get(b"c", b"simple/simple"))
    canonical = canonical_body(body, relaxed_body)
    if b"l" in tags:
        length = int(tags[b"l"])
        if length > len(canonical):
            return Verdict("permerror", "l= is longer than the body")
        canonical = canonical[:length]
    if hashlib.new(hash_name, canonical).digest() != base64.b64decode(tags[b"bh"]):
        return Verdict("fail", "body hash did not verify")
    signed = _signed_headers(fields, index, tags, relaxed_header)
    signature = base64.b64decode(tags[b"b"])
    try:
        if kind == "rsa":
            key.key.verify(signature, signed, padding.PKCS1v15(), _RSA_HASHES[hash_name]())
        else:
            key.key.verify(signature, hashlib.sha256(signed).digest())
    except InvalidSignature:
        return Verdict("fail", "signature did not verify")
    return Verdict("pass")


def _tags_problem(tags: Mapping[bytes, bytes], now: float) -> str:
    for name in (b"v", b"a", b"b", b"bh", b"d", b"h", b"s"):
        if name not in tags:
            return f"missing {name.decode()}="
    if tags[b"v"] != b"1":
        return "v= is not 1"
    if tags[b"a"] not in _ALGORITHMS:
        return "unknown signature algorithm a=" + tags[b"a"].decode("ascii", "replace")
    for name in (b"b", b"bh"):
        if not _BASE64.fullmatch(tags[name]) or len(tags[name]) % 4:
            return f"{name.decode()}= is not base64"
    try:
        _canonicalization(tags.get(b"c", b"simple/simple"))
    except ValueError as exc:
        return str(exc)
    header_names = [name.strip().lower() for name in tags[b"h"].split(b":")]
    if b"from" not in header_names:
        return "h= does not sign From:"
    domain = tags[b"d"].lower()
    if not domain or re.search(rb"[()<>\[\]:;@\\,\s]", domain):
        return "d= is not a domain"
    if b"i" in tags:
        identity_domain = _domain_of(tags[b"i"])
        if identity_domain != domain and not identity_domain.endswith(b"." + domain):
            return "i= is not in d="
    if b"l" in tags and not tags[b"l"].isdigit():
        return "l= is not a number"
    if b"q" in tags and b"dns/txt" not in tags[b"q"].split(b":"):
        return "q= does not offer dns/txt"
    for name in (b"t", b"x"):
        if name in tags and not tags[name].isdigit():
            return f"{name.decode()}= is not a number"
    if b"t" in tags and int(tags[b"t"]) > now + FUTURE_SLOP:
        return "t= is in the future"
    if b"x" in tags:
        if b"t" in tags and int(tags[b"x"]) < int(tags[b"t"]):
            return "x= is before t="
        if int(tags[b"x"]) < now:
            return "signature expired (x=)"
    return ""


def _canonicalization(value: bytes) -> tuple[bool, bool]:
    header, _, body = value.lower().partition(b"/")
    body = body or b"simple"
    if header not in (b"simple", b"relaxed") or body not in (b"simple", b"relaxed"):
        raise ValueError("unknown canonicalization c=" + value.decode("ascii", "replace"))
    return header == b"relaxed", body == b"relaxed"


def _domain_of(identity: bytes) -> bytes:
    return identity.rpartition(b"@")[2].lower()


def _signed_headers(fields: list[HeaderField], index: int, tags: Mapping[bytes, bytes],
                    relaxed: bool) -> bytes:
    """What the signature signs (§3.7): the fields h= names, each occurrence taken
    from the bottom up, then the signature's own field without b='s value and
    without its CRLF."""
    by_name: dict[bytes, list[int]] = {}
    for position, field in enumerate(fields):
        by_name.setdefault(field.name.lower(), []).append(position)
    parts = []
    for name in tags[b"h"].split(b":"):
        found = by_name.get(name.strip().lower())
        if found:                       # a name not (or no longer) there signs nothing
            parts.append(canonical_header(fields[found.pop()], relaxed))
    own = fields[index]
    name, colon, value = own.raw.partition(b":")
    emptied = HeaderField(own.name, name + colon + _B_TAG.sub(rb"\1", value, count=1))
    parts.append(canonical_header(emptied, relaxed)[:-2])
    return b"".join(parts)
