"""DKIM verification of incoming mail (RFC 6376; Ed25519-SHA256, RFC 8463), every DNS
query through LightMail's resolver.

The ``DKIM-Signature`` fields are read from the header block on the reactor, the key
records they name are fetched with the asynchronous resolver (in parallel, cached with
their TTLs), and each signature is then checked against them by
lightmail.policy.dkimsignature: on the reactor for a message up to INLINE_LIMIT
octets (about 0.1 ms at 4 KB, less than a hop to a thread costs), in a worker thread
above it (canonicalizing 50 MB would hold the reactor).  A lookup that failed for a
while (timeout, SERVFAIL) gives ``temperror``; a key that does not exist, or cannot
be read, gives ``permerror``.

Every signature is verified, up to ``[dkim] verify_max_signatures`` of them (the rest
are reported as ``policy``: not checked), each with its own result
(:class:`SignatureResult`, RFC 8601 §2.7.1's words).  RSA keys shorter than
``verify_min_rsa_bits`` fail as ``policy`` (RFC 8301 §3.2), and so do rsa-sha1
signatures (§3.1: verifiers must not consider them valid) unless
``verify_rsa_sha1`` accepts them (OpenDKIM and rspamd still do).  The ARC verifier
(RFC 8617, through dkimpy) shares :class:`KeyFetcher` and :class:`FetchedKeys`: ARC
seals and message signatures name their keys the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import dkim
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred

from lightmail.dns import IResolver, NoSuchDomain, TemporaryDNSError
from lightmail.policy.dkimsignature import (
    HeaderField,
    KeyCache,
    check,
    normalised,
    split_message,
    tag_list,
)
from lightmail.policy.dkimsignature import header_fields as header_fields_of

__all__ = ["DKIMVerifier", "FetchedKeys", "KeyFetcher", "SignatureResult",
           "signature_fields"]

# dkimpy (ARC's verifier and sealer, which name this logger) logs each failure at
# error level: what LightMail reports is the result.
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
    return tag_list(value) or {}


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
        if len(unique) == 1:            # most signed mail: no gathering needed
            name = unique[0]
            return one(name).addCallback(lambda value: {name: value})
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


#: Messages up to this size are checked on the reactor (see the module's docstring).
INLINE_LIMIT = 256 * 1024


class DKIMVerifier:
    """Verifies every DKIM signature of a message (see the module's docstring)."""

    def __init__(self, resolver: IResolver) -> None:
        self.keys = KeyFetcher(resolver)
        self.parsed_keys = KeyCache()

    def verify(self, message: bytes, header_block: bytes, max_signatures: int = 5,
               min_rsa_bits: int = 1024, accept_rsa_sha1: bool = False
               ) -> Deferred[list[SignatureResult]]:
        """The results, top signature first; ``[]`` for an unsigned message.  Never
        fails: trouble is each signature's ``temperror``/``permerror``.  Signatures
        after the first ``max_signatures`` are not checked (``policy``); RSA keys
        shorter than ``min_rsa_bits``, and rsa-sha1 signatures unless
        ``accept_rsa_sha1``, are refused (``policy``)."""
        # Callbacks rather than a coroutine: with the keys in the resolver's cache
        # (most mail), every step has its answer at hand and runs at once.
        block = _fields_only(normalised(header_block))
        all_fields = header_fields_of(block)
        fields = dkim_fields(all_fields)
        if not fields:
            return defer.succeed([])
        signatures = [tag_list(field.raw.split(b":", 1)[1]) or {} for field in fields]
        checked = signatures[:max_signatures]
        names = [_key_name(tags) for tags in checked if tags.get(b"s") and tags.get(b"d")]
        unchecked = [_described(tags, "policy", "more signatures than the "
                                f"{max_signatures} checked")
                     for tags in signatures[len(checked):]]

        def with_keys(keys: dict[str, Any]) -> Any:
            verify = _Verification(self.parsed_keys, checked, keys, min_rsa_bits,
                                   accept_rsa_sha1, (block, all_fields))
            if len(message) <= INLINE_LIMIT:
                return verify(message) + unchecked
            return threads.deferToThread(verify, message).addCallback(
                lambda results: results + unchecked)
        return self.keys.fetch(names).addCallback(with_keys)


def _fields_only(block: bytes) -> bytes:
    """A header block without the blank line that ends it (the blob writer keeps
    it), as split_message gives it."""
    return block[:-2] if block.endswith(b"\r\n\r\n") else block


def dkim_fields(fields: Sequence[HeaderField]) -> list[HeaderField]:
    return [field for field in fields if field.name.lower() == b"dkim-signature"]


def _key_name(tags: Mapping[bytes, bytes]) -> str:
    return _key_name_text(f"{_text(tags.get(b's'))}._domainkey.{_text(tags.get(b'd'))}")


class _Verification:
    """Checks the signatures fetched for (on the reactor, or in a thread)."""

    def __init__(self, parsed_keys: KeyCache, signatures: Sequence[dict[bytes, bytes]],
                 keys: Mapping[str, Any], min_rsa_bits: int, accept_rsa_sha1: bool,
                 parsed: tuple[bytes, list[HeaderField]]) -> None:
        self.parsed = parsed        # the header block read already, and its fields
        self.parsed_keys = parsed_keys
        self.accept_rsa_sha1 = accept_rsa_sha1
        self.signatures = signatures
        self.keys = keys
        self.min_rsa_bits = min_rsa_bits

    def __call__(self, message: bytes) -> list[SignatureResult]:
        block, body = split_message(normalised(message))
        # The header block given with the message is the message's own (the blob
        # writer's copy): its fields need not be read again.
        fields = self.parsed[1] if block == self.parsed[0] else header_fields_of(block)
        positions = [index for index, field in enumerate(fields)
                     if field.name.lower() == b"dkim-signature"]
        return [self._one(fields, body, position, tags)
                for position, tags in zip(positions, self.signatures, strict=False)]

    def _one(self, fields: list[HeaderField], body: bytes, position: int,
             tags: dict[bytes, bytes]) -> SignatureResult:
        if not tags or not tags.get(b"d") or not tags.get(b"s"):
            return _described(tags, "neutral", "signature cannot be read")
        record = self.keys.get(_key_name(tags))
        if isinstance(record, Exception):
            return _described(tags, "temperror", f"key lookup: {record}")
        key = self.parsed_keys.parsed(record) if record is not None else None
        try:
            verdict = check(fields, body, position, tags, key, self.min_rsa_bits,
                            self.accept_rsa_sha1)
        except Exception as exc:     # input nobody foresaw: a result, not a dead session
            return _described(tags, "permerror", f"{exc.__class__.__name__}: {exc}")
        return _described(tags, verdict.result, verdict.reason)


def _described(tags: Mapping[bytes, bytes], result: str, reason: str) -> SignatureResult:
    return SignatureResult(
        result=result, domain=_text(tags.get(b"d")).lower(),
        selector=_text(tags.get(b"s")), identity=_text(tags.get(b"i")),
        algorithm=_text(tags.get(b"a")), b_prefix=_text(tags.get(b"b"))[:8],
        reason=reason)


def _text(value: Optional[bytes]) -> str:
    return value.decode("ascii", "replace") if value else ""
