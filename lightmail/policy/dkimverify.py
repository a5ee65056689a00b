"""DKIM verification of incoming mail (RFC 6376; Ed25519-SHA256, RFC 8463), through
dkimpy, with every DNS query through LightMail's resolver.

dkimpy looks keys up synchronously, as it verifies.  So the work is split: the
``DKIM-Signature`` fields are read from the header block on the reactor, the key
records they name are fetched with the asynchronous resolver (in parallel, cached
with their TTLs), and dkimpy then verifies each signature in a worker thread against
the keys fetched, through a ``dnsfunc`` that only reads them (:class:`FetchedKeys`).
A lookup that failed for a while (timeout, SERVFAIL) gives ``temperror`` without
dkimpy being asked at all; a key that does not exist, or cannot be read, gives
``permerror``.

Every signature is verified, up to ``[dkim] verify_max_signatures`` of them (the rest
are reported as ``policy``: not checked), each with its own result
(:class:`SignatureResult`, RFC 8601 §2.7.1's words).  RSA keys shorter than
``verify_min_rsa_bits`` fail as ``policy`` (RFC 8301 §3.2).  An ARC verifier
(RFC 8617) can share :class:`KeyFetcher`: ARC seals and message signatures name
their keys the same way.
"""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import dkim
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred

from lightmail.dns import IResolver, NoSuchDomain, TemporaryDNSError

__all__ = ["DKIMVerifier", "FetchedKeys", "KeyFetcher", "SignatureResult",
           "signature_fields"]

_TAG = re.compile(rb"^\s*([a-zA-Z][a-zA-Z0-9_]*)\s*=(.*)$", re.DOTALL)
# dkimpy logs each failure at error level: what LightMail reports is the result.
_QUIET = logging.getLogger("lightmail.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


@dataclass(frozen=True)
class SignatureResult:
    """One DKIM-Signature field's verdict: ``pass``, ``fail``, ``neutral`` (a
    signature that cannot be read), ``policy`` (not checked, or refused by a local
    rule), ``temperror`` or ``permerror``; with its tags for Authentication-Results
    (RFC 8601 §2.7.1: header.d, header.i, header.s, header.a, header.b's first
    characters, RFC 6008)."""

    result: str
    domain: str = ""
    selector: str = ""
    identity: str = ""
    algorithm: str = ""
    b_prefix: str = ""
    reason: str = ""


def header_fields(block: bytes, name: bytes) -> list[bytes]:
    """The values of every occurrence of header field ``name`` (lower case) in a
    header block, top first, as dkimpy reads them (so that signature ``n`` here is
    dkimpy's ``idx=n``)."""
    try:
        headers, _ = dkim.rfc822_parse(block)
    except (dkim.MessageFormatError, IndexError):   # IndexError: a first line folded
        return []
    return [value for field_name, value in headers if field_name.lower() == name]


def signature_fields(value: bytes) -> dict[bytes, bytes]:
    """A DKIM-Signature's tags (RFC 6376 §3.2), whitespace inside values removed;
    a tag list that cannot be read gives ``{}``."""
    tags: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        if not part.strip():
            continue
        match = _TAG.match(part)
        if match is None:
            return {}
        name = match.group(1)
        if name in tags:
            return {}                   # §3.2: a tag twice makes the list invalid
        tags[name] = re.sub(rb"\s+", b"", match.group(2))
    return tags


class FetchedKeys:
    """dkimpy's ``dnsfunc``, answering from key records already fetched: it never
    touches the network, so dkimpy can run in a thread without its own DNS."""

    def __init__(self, records: Mapping[str, Optional[bytes]]) -> None:
        self.records = records

    def __call__(self, name: Any, timeout: float = 5) -> Optional[bytes]:
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        return self.records.get(_key_name_text(name))


class KeyFetcher:
    """Fetches the key records (``selector._domainkey.domain`` TXT) that a message's
    signatures name, with the asynchronous resolver."""

    def __init__(self, resolver: IResolver) -> None:
        self.resolver = resolver

    def fetch(self, names: Iterable[str]) -> Deferred[dict[str, Any]]:
        """Each name's record (bytes; the first when there are several, as dkimpy
        reads them), ``None`` when it has none, or the :class:`TemporaryDNSError`."""
        unique = sorted({_key_name_text(name) for name in names})

        def one(name: str) -> Deferred[Any]:
            d = self.resolver.txt_records(name)
            d.addCallback(lambda records: records[0] if records else None)
            d.addErrback(_lookup_outcome)
            return d
        found = defer.gatherResults([one(name) for name in unique])
        return found.addCallback(lambda values: dict(zip(unique, values, strict=True)))


def _lookup_outcome(failure: Any) -> Any:
    if failure.check(NoSuchDomain):
        return None
    if failure.check(TemporaryDNSError):
        return failure.value
    return TemporaryDNSError(str(failure.value))


def _key_name_text(name: str) -> str:
    return name.lower().rstrip(".")


class DKIMVerifier:
    """Verifies every DKIM signature of a message (see the module's docstring)."""

    def __init__(self, resolver: IResolver) -> None:
        self.keys = KeyFetcher(resolver)

    def verify(self, message: bytes, header_block: bytes, max_signatures: int = 5,
               min_rsa_bits: int = 1024) -> Deferred[list[SignatureResult]]:
        """The results, top signature first; ``[]`` for an unsigned message.  Never
        fails: trouble is each signature's ``temperror``/``permerror``.  Signatures
        after the first ``max_signatures`` are not checked (``policy``); RSA keys
        shorter than ``min_rsa_bits`` are refused (``policy``)."""
        return Deferred.fromCoroutine(
            self._verify(message, header_block, max_signatures, min_rsa_bits))

    async def _verify(self, message: bytes, header_block: bytes, max_signatures: int,
                      min_rsa_bits: int) -> list[SignatureResult]:
        signatures = [signature_fields(value)
                      for value in header_fields(header_block, b"dkim-signature")]
        if not signatures:
            return []
        checked = signatures[:max_signatures]
        names = [f"{_text(tags.get(b's'))}._domainkey.{_text(tags.get(b'd'))}"
                 for tags in checked if tags.get(b"s") and tags.get(b"d")]
        keys = await self.keys.fetch(names)
        results: list[SignatureResult] = await threads.deferToThread(
            _verify_now, message, checked, keys, min_rsa_bits)
        return results + [_described(tags, "policy", "more signatures than the "
                                     f"{max_signatures} checked")
                          for tags in signatures[len(checked):]]


def _verify_now(message: bytes, signatures: Sequence[dict[bytes, bytes]],
                keys: Mapping[str, Any], min_rsa_bits: int) -> list[SignatureResult]:
    """(A worker thread.)  dkimpy verifies signature ``index`` of the message's
    DKIM-Signature fields, counted from the top as ``signatures`` is."""
    usable = {name: value for name, value in keys.items()
              if not isinstance(value, Exception)}
    try:
        verifier = dkim.DKIM(message, logger=_QUIET, minkey=min_rsa_bits)
    except (dkim.DKIMException, IndexError) as exc:
        return [_described(tags, "permerror", f"message cannot be read: {exc}")
                for tags in signatures]
    return [_verify_one(verifier, index, tags, keys, usable, min_rsa_bits)
            for index, tags in enumerate(signatures)]


def _verify_one(verifier: dkim.DKIM, index: int, tags: dict[bytes, bytes],
                keys: Mapping[str, Any], usable: Mapping[str, Any], min_rsa_bits: int
                ) -> SignatureResult:
    if not tags or not tags.get(b"d") or not tags.get(b"s"):
        return _described(tags, "neutral", "signature cannot be read")
    name = _key_name_text(f"{_text(tags[b's'])}._domainkey.{_text(tags[b'd'])}")
    key = keys.get(name)
    if isinstance(key, Exception):
        return _described(tags, "temperror", f"key lookup: {key}")
    if key is None:
        return _described(tags, "permerror", "no key for signature")
    try:
        _, bits, kind, _ = dkim.evaluate_pk(name, key)
    except (dkim.KeyFormatError, binascii.Error, ValueError) as exc:
        return _described(tags, "permerror", f"key cannot be used: {exc}")
    if kind == b"rsa" and bits is not None and bits < min_rsa_bits:
        return _described(tags, "policy", f"{bits}-bit RSA key is too short")
    try:
        good = verifier.verify(idx=index, dnsfunc=FetchedKeys(usable))
    except dkim.ValidationError as exc:
        reason = str(exc)
        return _described(tags, "fail" if "body hash" in reason else "permerror",
                          reason)
    except dkim.MessageFormatError as exc:
        return _described(tags, "neutral", f"signature cannot be read: {exc}")
    except dkim.DKIMException as exc:
        return _described(tags, "permerror", str(exc))
    except Exception as exc:   # dkimpy on input it never expected: not ours to die of
        return _described(tags, "permerror", f"{exc.__class__.__name__}: {exc}")
    if good:
        return _described(tags, "pass", "")
    return _described(tags, "fail", "signature did not verify")


def _described(tags: Mapping[bytes, bytes], result: str, reason: str) -> SignatureResult:
    return SignatureResult(
        result=result, domain=_text(tags.get(b"d")).lower(),
        selector=_text(tags.get(b"s")), identity=_text(tags.get(b"i")),
        algorithm=_text(tags.get(b"a")), b_prefix=_text(tags.get(b"b"))[:8],
        reason=reason)


def _text(value: Optional[bytes]) -> str:
    return value.decode("ascii", "replace") if value else ""
