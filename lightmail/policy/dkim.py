"""DKIM signing of outgoing mail (RFC 6376), with RSA-SHA256 and Ed25519-SHA256
(RFC 8463) keys, through dkimpy.

Which messages are signed, and by whom, follows OpenDKIM's SigningTable: the domain of
the message's ``From:`` header field (the author, what DMARC aligns with) picks the
keys, exactly (``[dkim] keys``, ``DOMAIN:SELECTOR:KEYFILE``; a domain may have several
keys, say an RSA and an Ed25519 one, and the message then gets one signature each).  A
message whose From: domain has no key is sent unsigned: bounces (``From:
MAILER-DAEMON@`` the host name) are signed only when the host name has a key of its
own.  The envelope sender plays no part.  As OpenDKIM signs only what its
InternalHosts or authenticated clients send, only messages of the sources listed in
``[dkim] sources`` are signed: by default those submitted by authenticated users and
those LightMail makes itself (delivery notices), never mail that came in on the MX
(a forged From: of a signing domain, forwarded by an alias, would otherwise get a
genuine signature).

Canonicalisation is relaxed/relaxed; the signed header fields are those of ``[dkim]
headers`` that the message has (each occurrence), and ``[dkim] oversign`` fields one
time more (as OpenDKIM's OversignHeaders), so that a copy added later breaks the
signature.

Keys are read when the configuration is loaded (a key that cannot be used is a config
error); signing runs in a worker thread, once per queued message however many
recipients it has: the header fields are kept by queue id (:class:`DKIMSigner`).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.delivery.headers import IOutboundHeaders
from lightmail.logs import BoundLogger
from lightmail.storage.interfaces import IBlobStore, QueueItem

__all__ = [
    "DEFAULT_HEADERS",
    "DKIMSigner",
    "KeyProblem",
    "Signer",
    "SigningKey",
    "dns_record",
    "from_domain",
    "generate_key",
    "load_key",
    "zone_line",
]

# RFC 6376 §5.4.1's list, trimmed to what a sent message carries.
DEFAULT_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "reply-to",
                   "mime-version", "content-type", "content-transfer-encoding",
                   "in-reply-to", "references")
# What dkimpy refuses to sign (RFC 6376 §5.4: they change in transit).
NEVER_SIGNED = frozenset(name.decode() for name in dkim.DKIM.SHOULD_NOT)
MIN_RSA_BITS = 1024        # RFC 8301 §3.2: verifiers refuse less
HEADER_PEEK = 64 * 1024    # read this much first to find the From: field


class KeyProblem(Exception):
    """A key file that cannot be used; the message says why, for a config error."""


@dataclass(frozen=True)
class SigningKey:
    """One loaded key: the d= domain, the selector and what dkimpy signs with."""

    domain: str                 # lower case, A-labels
    selector: str
    algorithm: str              # "rsa-sha256" or "ed25519-sha256"
    private: bytes              # PKCS#1 PEM (RSA) or the base64 32-octet seed (Ed25519)
    public: bytes               # what p= holds: SubjectPublicKeyInfo DER, or raw Ed25519
    bits: int = 0               # RSA modulus size
    path: Optional[Path] = None

    @property
    def kind(self) -> str:
        """The k= tag value: rsa or ed25519."""
        return "ed25519" if self.algorithm == "ed25519-sha256" else "rsa"

    def describe(self) -> str:
        size = f"-{self.bits}" if self.bits else ""
        return f"d={self.domain} s={self.selector} ({self.kind}{size})"


def normalise_domain(domain: str) -> str:
    """Lower case, no final dot, A-labels (RFC 8616: d= is ASCII)."""
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        domain = domain.encode("idna").decode("ascii")
    return domain


def load_key(domain: str, selector: str, path: Path) -> SigningKey:
    """Read a private key file: PEM (PKCS#8, or PKCS#1 ``RSA PRIVATE KEY`` as
    opendkim-genkey writes), or the base64 Ed25519 seed that dkimpy's dknewkey writes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyProblem(f"cannot read the key file {path}: {exc.strerror}") from None
    key: Any
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise KeyProblem(f"{path} is encrypted; DKIM keys are stored without a "
                             "passphrase (keep the file mode 0600)") from None
        except ValueError as exc:
            raise KeyProblem(f"{path} is not a usable PEM private key: {exc}") from None
    else:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise KeyProblem(f"{path} holds no private key (expected PEM, or a base64 "
                             "Ed25519 key as dknewkey writes)")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    return signing_key(domain, selector, key, path)


def signing_key(domain: str, selector: str, key: Any,
                path: Optional[Path] = None) -> SigningKey:
    """A :class:`SigningKey` from a ``cryptography`` private key object."""
    where = str(path) if path is not None else "the key"
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyProblem(f"{where} is a {key.key_size}-bit RSA key; DKIM needs at "
                             f"least {MIN_RSA_BITS} bits (RFC 8301), 2048 are usual")
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return SigningKey(normalise_domain(domain), selector, "rsa-sha256", private,
                          public, key.key_size, path)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw,
                                 serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        return SigningKey(normalise_domain(domain), selector, "ed25519-sha256",
                          base64.b64encode(seed), public, 0, path)
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "") or "other"
    raise KeyProblem(f"{where} is an {kind} key; DKIM signs with RSA or Ed25519 keys")


def generate_key(algorithm: str = "rsa", bits: int = 2048) -> tuple[bytes, Any]:
    """A new private key: its PEM (PKCS#1 for RSA, as opendkim-genkey writes; PKCS#8
    for Ed25519) and the ``cryptography`` key object."""
    if algorithm == "ed25519":
        key: Any = ed25519.Ed25519PrivateKey.generate()
        fmt = serialization.PrivateFormat.PKCS8
    elif algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        fmt = serialization.PrivateFormat.TraditionalOpenSSL
    else:
        raise ValueError(f"unknown DKIM key algorithm {algorithm!r}")
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    return pem, key


def dns_record(key: SigningKey) -> str:
    """The TXT record value that publishes ``key`` (RFC 6376 §3.6.1)."""
    return f"v=DKIM1; k={key.kind}; p={base64.b64encode(key.public).decode()}"


def zone_line(key: SigningKey) -> str:
    """The record as one zone-file line, the value in 255-octet character-strings
    (longer ones are invalid in a zone file; verifiers join them)."""
    value = dns_record(key)
    strings = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{key.selector}._domainkey.{key.domain}. IN TXT {strings}"


_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def header_fields(head: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, unfolded value) of each field in a header section."""
    fields: list[tuple[str, bytes]] = []
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + line)
            continue
        match = _FIELD.match(line)
        if match:
            fields.append((match.group(1).decode("ascii").lower(), line[match.end():]))
    return fields


def header_section(message: bytes) -> Optional[bytes]:
    """The header section of ``message``, or None when its end is not in it."""
    if message.startswith((b"\r\n", b"\n")):
        return b""
    match = re.search(rb"\r?\n\r?\n", message)
    return message[:match.start()] if match else None


def from_domain(message: bytes) -> Optional[str]:
    """The domain of the first author address in the (first) From: field, normalised;
    None without one."""
    head = header_section(message)
    if head is None:
        head = message
    for name, value in header_fields(head):
        if name == "from":
            text = value.decode("utf-8", "replace")
            for _, address in email.utils.getaddresses([text]):
                if "@" in address:
                    try:
                        return normalise_domain(address.rpartition("@")[2])
                    except UnicodeError:
                        return None
            return None
    return None


class Signer:
    """Signs messages with the keys of their From: domain.  Thread-safe: it keeps
    nothing between calls."""

    def __init__(self, keys: Iterable[SigningKey], headers: Sequence[str] = DEFAULT_HEADERS,
                 oversign: Sequence[str] = ("from",)) -> None:
        self.keys: dict[str, list[SigningKey]] = {}
        for key in keys:
            self.keys.setdefault(key.domain, []).append(key)
        self.headers = frozenset(name.lower() for name in headers)
        self.oversign = tuple(name.lower() for name in oversign)
        bad = (self.headers | set(self.oversign)) & NEVER_SIGNED
        if bad:
            raise ValueError(f"these header fields are never signed: {', '.join(sorted(bad))}")
        if "from" not in self.headers:
            raise ValueError("the From header field is always signed (RFC 6376 §5.4)")

    def keys_for(self, domain: Optional[str]) -> list[SigningKey]:
        return self.keys.get(domain, []) if domain else []

    def sign(self, message: bytes, keys: Optional[Sequence[SigningKey]] = None) -> bytes:
        """The DKIM-Signature field(s) to put before ``message``, CRLF-terminated (empty
        when its From: domain has no key).  CPU work: call it in a thread."""
        if keys is None:
            keys = self.keys_for(from_domain(message))
        if not keys:
            return b""
        head = header_section(message)
        names = [name for name, _ in header_fields(message if head is None else head)
                 if name in self.headers or name in self.oversign]
        include = [name.encode() for name in names + list(self.oversign)]
        out = []
        for key in keys:
            out.append(dkim.sign(message, key.selector.encode(), key.domain.encode(),
                                 key.private, canonicalize=(b"relaxed", b"relaxed"),
                                 signature_algorithm=key.algorithm.encode(),
                                 include_headers=include, linesep=b"\r\n"))
        # The first key's signature on top: verifiers that check one check that.
        return b"".join(out)


@implementer(IOutboundHeaders)
class DKIMSigner:
    """The outbound delivery agent's signer: ``await header_for(item)`` gives the
    header fields to send before the stored message.

    The message is signed once per queue id, in a worker thread; the recipients of the
    same message (delivered one by one, maybe at once) share that work and the result,
    which is kept for later attempts (the ``cache_size`` most recent messages).
    """

    def __init__(self, signer: Signer, blobs: IBlobStore,
                 sources: Sequence[str] = ("submission", "local"), reactor: Any = None,
                 cache_size: int = 1024, concurrency: int = 2) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.signer, self.blobs, self.reactor = signer, blobs, reactor
        self.sources = frozenset(sources)
        self.cache_size = cache_size
        self.cache: OrderedDict[str, bytes] = OrderedDict()
        self.waiting: dict[str, list[defer.Deferred[bytes]]] = {}
        # At most this many messages in memory and being signed at once.
        self.limit = defer.DeferredSemaphore(concurrency)
        self.signed = 0                  # messages signed (each once)

    def use(self, signer: Signer, sources: Sequence[str]) -> None:
        """Sign with new keys from now on (a reload).  Signatures made with the old
        ones are forgotten: a message retried later is signed again."""
        self.signer = signer
        self.sources = frozenset(sources)
        self.cache.clear()

    async def header_for(self, item: QueueItem) -> bytes:
        if item.envelope.source not in self.sources:
            return b""
        key = item.queue_id
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        if key in self.waiting:                     # another recipient is signing it
            d: defer.Deferred[bytes] = defer.Deferred()
            self.waiting[key].append(d)
            return await d
        self.waiting[key] = []
        try:
            header = await self.limit.run(lambda: defer.ensureDeferred(self._sign(item)))
        except BaseException as exc:
            failure = Failure(exc)
            for d in self.waiting.pop(key):
                d.errback(failure)
            raise
        self.cache[key] = header
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        for d in self.waiting.pop(key):
            d.callback(header)
        return header

    async def _sign(self, item: QueueItem) -> bytes:
        log = BoundLogger(namespace="lightmail.dkim", msg_id=item.queue_id)
        blob = item.blob
        # The From: field first: most messages without a key are never read whole.
        message = await self.blobs.read_range(blob.id, 0, min(blob.size, HEADER_PEEK))
        if header_section(message) is None and len(message) < blob.size:
            message = await self.blobs.read(blob.id)
        keys = self.signer.keys_for(from_domain(message))
        if not keys:
            return b""
        if len(message) < blob.size:
            message = await self.blobs.read(blob.id)
        try:
            header: bytes = await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), self.signer.sign, message, keys)
        except dkim.DKIMException as exc:
            # A message dkimpy cannot parse goes out unsigned rather than never.
            log.warn("not DKIM-signed: {error}", error=str(exc))
            return b""
        self.signed += 1
        log.info("DKIM-Signature added: {keys}",
                 keys=", ".join(key.describe() for key in keys))
        return header


def load_signer(config: Any) -> Optional[Signer]:
    """The :class:`Signer` that ``[dkim]`` of ``config`` (a
    :class:`lightmail.config.Config`) describes, its keys read; None when it signs
    nothing.  A key that cannot be used raises a ConfigError naming its line."""
    from lightmail.config import ConfigError, line_of_text
    section = config.dkim
    if not section.enabled or not section.keys:
        return None
    keys = []
    for spec in section.keys:
        try:
            keys.append(load_key(spec.domain, spec.selector, spec.path))
        except KeyProblem as exc:
            raise ConfigError(str(exc), config.path,
                              line_of_text(config, "dkim", "keys", spec.text),
                              "dkim", "keys") from None
    return Signer(keys, section.headers, section.oversign)
