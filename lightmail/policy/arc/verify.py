"""Verifying the ARC chain of an incoming message (RFC 8617 §5.2), through dkimpy, with
every DNS query through LightMail's resolver.

The work is split as for DKIM (lightmail.policy.dkimverify, whose
:class:`~lightmail.policy.dkimverify.KeyFetcher` and
:class:`~lightmail.policy.dkimverify.FetchedKeys` it uses): on the reactor, the
chain's structure is read from the header block and checked (§5.2 steps 1-2: every
ARC field has an instance from 1 to 50, each instance up to the newest has exactly
one field of each kind, ``cv=`` is ``none`` on the first seal and ``pass`` on the
others), which decides most broken chains without a lookup; then the keys that every
ARC-Seal and ARC-Message-Signature names are fetched with the asynchronous resolver;
then dkimpy verifies the signatures in a worker thread against those keys only.

The verdict (:class:`ARCResult`) is the Chain Validation Status, ``none``, ``pass`` or
``fail``.  A key that does not exist fails the chain.  RFC 8617 §5.2.1 has every
failure permanent, a DNS one included: a key that could not be fetched for a while
(timeout, SERVFAIL) fails the chain too, marked ``temporary`` so that the inbound
check may ask the client to try again instead (``[arc] temperror_action``).
Chains longer than ``[arc] max_instances`` sets fail without being checked.

``header.oldest-pass`` (§5.2 step 3's "oldest-pass"): on a passing chain, 0 when the
ARC-Message-Signature of every set still verifies, else the lowest instance from
which on they all do; the message changed after the set below it was added.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import authres
import dkim
from authres import AuthenticationResult
from twisted.internet import threads
from twisted.internet.defer import Deferred

from lightmail.dns import IResolver
from lightmail.policy.dkimverify import FetchedKeys, KeyFetcher, header_fields, signature_fields

__all__ = ["MAX_INSTANCES", "ARCResult", "ARCVerifier", "has_chain", "trusted_pass"]

# RFC 8617 §4.2.1: the instance tag's valid range is 1 to 50.
MAX_INSTANCES = 50
_SEAL, _SIGNATURE, _RESULTS = b"arc-seal", b"arc-message-signature", b"arc-authentication-results"
_NAMES = {_SEAL: "ARC-Seal", _SIGNATURE: "ARC-Message-Signature",
          _RESULTS: "ARC-Authentication-Results"}
_AAR_INSTANCE = re.compile(rb"^\s*i\s*=\s*([0-9]+)\s*;")
_ANY_ARC_FIELD = re.compile(
    rb"^arc-(?:seal|message-signature|authentication-results)[ \t]*:",
    re.IGNORECASE | re.MULTILINE)
# The logger dkimverify silenced: dkimpy logs every failure at error level.
_QUIET = logging.getLogger("lightmail.dkimpy")


@dataclass(frozen=True)
class ARCResult:
    """An ARC chain's verdict, with what DMARC and the next sealer need of it."""

    #: The Chain Validation Status: none (no ARC set), pass or fail.
    result: str
    #: Why it failed (or what was not checked), for Authentication-Results and logs.
    reason: str = ""
    #: How many ARC sets the message has (the newest instance number).
    instances: int = 0
    #: The d= of the newest ARC-Seal (lower case): who vouches for the chain.
    sealer: str = ""
    #: Every ARC-Seal's d=, newest first.
    sealers: tuple[str, ...] = ()
    #: On pass: 0 when every set's ARC-Message-Signature verifies, else the lowest
    #: instance from which on they do (header.oldest-pass).
    oldest_pass: Optional[int] = None
    #: The failure came from a DNS error that may go away (a temperror).
    temporary: bool = False
    #: The newest set's ARC-Authentication-Results: the sealer's authserv-id and its
    #: results (authres objects; empty when they cannot be read).
    aar_authserv_id: str = ""
    aar: tuple[AuthenticationResult, ...] = ()
    #: The client that handed us the message (smtp.remote-ip; set by the check).
    remote_ip: str = ""

    def passed(self, method: str) -> bool:
        """Whether the newest sealer found ``method`` (spf, dkim, dmarc...) to pass."""
        return any(entry.method == method and entry.result == "pass" for entry in self.aar)


def has_chain(header_block: bytes) -> bool:
    """Whether a header block has any ARC field (most messages have none: their
    verdict is ``none`` without reading the rest of the message)."""
    return _ANY_ARC_FIELD.search(header_block) is not None


def trusted_pass(findings: Any, trusted_sealers: Iterable[str]) -> Optional[str]:
    """The newest sealer's domain when the chain of ``findings.arc`` (a
    :class:`lightmail.policy.inbound.Findings`) passes and that sealer is one of
    ``trusted_sealers`` (``[arc] trusted_sealers``); None otherwise.  What it found
    is then ``findings.arc.aar`` (:meth:`ARCResult.passed`)."""
    arc: Optional[ARCResult] = findings.arc
    if arc is None or arc.result != "pass" or not arc.sealer:
        return None
    trusted = {domain.lower().rstrip(".") for domain in trusted_sealers}
    return arc.sealer if arc.sealer in trusted else None


@dataclass(frozen=True)
class _Set:
    """One ARC set as read from the header block (before any signature is checked)."""

    instance: int
    seal: dict[bytes, bytes]
    signature: dict[bytes, bytes]
    results: bytes

    def key_name(self, tags: Mapping[bytes, bytes]) -> str:
        return f"{_text(tags[b's'])}._domainkey.{_text(tags[b'd'])}".lower()


class _Broken(Exception):
    """The chain fails on its structure; the message says why."""


class ARCVerifier:
    """Verifies a message's ARC chain (see the module's docstring)."""

    def __init__(self, resolver: IResolver) -> None:
        self.keys = KeyFetcher(resolver)

    def verify(self, message: bytes, header_block: bytes, max_instances: int = MAX_INSTANCES,
               min_rsa_bits: int = 1024) -> Deferred[ARCResult]:
        """The chain's verdict.  Never fails: trouble is a ``fail`` with its reason.
        RSA keys shorter than ``min_rsa_bits`` do not verify."""
        return Deferred.fromCoroutine(
            self._verify(message, header_block, max_instances, min_rsa_bits))

    async def _verify(self, message: bytes, header_block: bytes, max_instances: int,
                      min_rsa_bits: int) -> ARCResult:
        try:
            sets = _read_chain(header_block, min(max_instances, MAX_INSTANCES))
        except _Broken as exc:
            return ARCResult("fail", str(exc), *_who(header_block))
        if not sets:
            return ARCResult("none")
        newest = sets[-1]
        described = _described(sets)
        seal_keys = [(s.instance, s.key_name(s.seal)) for s in sets]
        needed = seal_keys + [(-newest.instance, newest.key_name(newest.signature))]
        keys = await self.keys.fetch([name for _, name in needed] +
                                     [s.key_name(s.signature) for s in sets])
        for instance, name in sorted(needed, key=lambda pair: -abs(pair[0])):
            field = "ARC-Message-Signature" if instance < 0 else "ARC-Seal"
            key = keys.get(name)
            if isinstance(key, Exception):
                return ARCResult("fail", f"temporary error looking up the key of {field} "
                                 f"i={abs(instance)} ({name}): {key}", **described,
                                 temporary=True)
            if key is None:
                return ARCResult("fail", f"no key for {field} i={abs(instance)} ({name})",
                                 **described)
        usable = {name: value for name, value in keys.items()
                  if not isinstance(value, Exception)}
        cv, details, reason = await threads.deferToThread(
            _verify_now, message, usable, min_rsa_bits)
        if cv == dkim.CV_Pass:
            return ARCResult("pass", "", **described, oldest_pass=_oldest_pass(details))
        if cv is None:                 # dkimpy: a seal said cv=fail, the chain had ended
            return ARCResult("fail", reason, **described)
        return ARCResult("fail", reason or "the chain did not verify", **described)


def _verify_now(message: bytes, keys: Mapping[str, bytes], min_rsa_bits: int
                ) -> tuple[Optional[bytes], list[dict[str, Any]], str]:
    """(A worker thread.)  dkimpy's verdict on the chain, its keys from ``keys``."""
    try:
        verifier = dkim.ARC(message, logger=_QUIET, minkey=min_rsa_bits)
        cv, details, reason = verifier.verify(dnsfunc=FetchedKeys(keys))
    except dkim.DKIMException as exc:
        return dkim.CV_Fail, [], str(exc)
    except Exception as exc:   # dkimpy on input it never expected: not ours to die of
        return dkim.CV_Fail, [], f"{exc.__class__.__name__}: {exc}"
    return cv, details, str(reason)


def _oldest_pass(details: Sequence[Mapping[str, Any]]) -> int:
    """§5.2 step 3: walking down from the newest set, the instance above the first
    ARC-Message-Signature that does not verify; 0 when they all do."""
    for detail in details:                       # dkimpy lists them newest first
        if not detail.get("ams-valid"):
            return int(detail["instance"]) + 1
    return 0


def _read_chain(block: bytes, max_instances: int) -> list[_Set]:
    """The ARC sets of a header block, oldest first ([] without ARC fields); raises
    :class:`_Broken` for a chain that fails on its structure (§5.2 steps 1-2)."""
    found: dict[int, dict[bytes, list[bytes]]] = {}
    for name in (_SEAL, _SIGNATURE, _RESULTS):
        for value in header_fields(block, name):
            instance = _instance(name, value)
            if instance is None:
                raise _Broken(f"an {_NAMES[name]} field has no valid instance tag "
                              f"(i=1 to {MAX_INSTANCES})")
            found.setdefault(instance, {}).setdefault(name, []).append(value)
    if not found:
        return []
    newest = max(found)
    if newest > max_instances:
        raise _Broken(f"{newest} ARC sets, more than the {max_instances} checked")
    sets = []
    for instance in range(1, newest + 1):
        fields = found.get(instance, {})
        for name in (_SEAL, _SIGNATURE, _RESULTS):
            if len(fields.get(name, ())) != 1:
                how = "no" if not fields.get(name) else "more than one"
                raise _Broken(f"ARC set i={instance} has {how} {_NAMES[name]} field")
        seal, signature = (signature_fields(fields[name][0]) for name in (_SEAL, _SIGNATURE))
        for tags, name in ((seal, _SEAL), (signature, _SIGNATURE)):
            if not tags.get(b"d") or not tags.get(b"s"):
                raise _Broken(f"the {_NAMES[name]} of ARC set i={instance} cannot be read "
                              "(no d= or s=)")
        sets.append(_Set(instance, seal, signature, fields[_RESULTS][0]))
    newest_cv = sets[-1].seal.get(b"cv", b"").lower()
    if newest_cv == b"fail":
        raise _Broken(f"ARC-Seal i={newest} says the chain had failed before it (cv=fail)")
    for one in sets:
        expected = b"none" if one.instance == 1 else b"pass"
        cv = one.seal.get(b"cv", b"").lower()
        if cv != expected:
            raise _Broken(f"ARC-Seal i={one.instance} has cv={_text(cv) or '(none given)'}"
                          f", not {expected.decode()}")
    return sets


def _instance(name: bytes, value: bytes) -> Optional[int]:
    if name == _RESULTS:
        match = _AAR_INSTANCE.match(value)
        text = match.group(1) if match else b""
    else:
        text = signature_fields(value).get(b"i", b"")
    if not re.fullmatch(rb"[1-9][0-9]?", text):
        return None
    number = int(text)
    return number if number <= MAX_INSTANCES else None


def _described(sets: Sequence[_Set]) -> dict[str, Any]:
    """What an :class:`ARCResult` says of a readable chain besides its verdict."""
    newest = sets[-1]
    authserv_id, aar = _parse_results(newest.results)
    sealers = tuple(_text(one.seal[b"d"]).lower() for one in reversed(sets))
    return {"instances": newest.instance, "sealer": sealers[0], "sealers": sealers,
            "aar_authserv_id": authserv_id, "aar": aar}


def _who(block: bytes) -> tuple[int, str]:
    """(instances, sealer) of a chain too broken to read as sets: the highest
    instance and the d= of its seal, when they can be found."""
    seals = [signature_fields(value) for value in header_fields(block, _SEAL)]
    numbered = [(int(tags[b"i"]), _text(tags.get(b"d")).lower()) for tags in seals
                if re.fullmatch(rb"[0-9]{1,3}", tags.get(b"i", b""))]
    return max(numbered) if numbered else (0, "")


def _parse_results(value: bytes) -> tuple[str, tuple[AuthenticationResult, ...]]:
    """An ARC-Authentication-Results value (``i=N; authserv-id; results``) read by
    authres; ("", ()) when it cannot be."""
    text = value.replace(b"\r\n", b"").replace(b"\n", b"").decode("utf-8", "replace")
    text = re.sub(r"^\s*i\s*=\s*[0-9]+\s*;", "", text)
    try:
        parsed = authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {text}")
    except Exception:         # authres raises several kinds on what it cannot read
        return "", ()
    return str(parsed.authserv_id or ""), tuple(parsed.results)


def _text(value: Optional[bytes]) -> str:
    return value.decode("ascii", "replace") if value else ""
