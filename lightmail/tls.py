"""TLS for listeners: pyOpenSSL contexts, TLS 1.2 or newer, SNI across certificates.

A listener names one default certificate (``tls_cert``/``tls_key``); more certificates
for other names are picked by SNI (RFC 6066 §3) from the subject names they carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL
from twisted.internet.interfaces import ISSLTransport, ISystemHandle
from twisted.internet.ssl import ContextFactory

from lightmail.config import ListenerConfig

# Mozilla "intermediate" cipher list for TLS 1.2; TLS 1.3 suites are always on.
CIPHERS = (b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
           b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
           b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")


def _context(cert: Path, key: Path) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_cipher_list(CIPHERS)
    ctx.use_certificate_chain_file(str(cert))
    ctx.use_privatekey_file(str(key))
    ctx.check_privatekey()
    return ctx


def _names(cert: Path) -> list[str]:
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(name) for name in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(attr.value) for attr in
                 parsed.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
    return [name.lower() for name in names]


class ServerTLS(ContextFactory):
    """Context factory with SNI: the first pair is the default certificate."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]]) -> None:
        if not pairs:
            raise ValueError("TLS needs at least one certificate")
        self._default = _context(*pairs[0])
        self._by_name: dict[str, SSL.Context] = {}
        for cert, key in pairs:
            ctx = self._default if (cert, key) == tuple(pairs[0]) else _context(cert, key)
            for name in _names(cert):
                self._by_name.setdefault(name, ctx)
        self._default.set_tlsext_servername_callback(self._pick)

    def _pick(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if not name:
            return
        host = name.decode("ascii", "replace").lower()
        ctx = self._by_name.get(host) or self._by_name.get("*." + host.partition(".")[2])
        if ctx is not None and ctx is not self._default:
            connection.set_context(ctx)

    def getContext(self) -> SSL.Context:
        return self._default


def server_context(listener: ListenerConfig) -> Any:
    assert listener.tls_cert is not None and listener.tls_key is not None
    return ServerTLS([(listener.tls_cert, listener.tls_key), *listener.tls_sni])


# -- channel binding (SCRAM-*-PLUS) ----------------------------------------------------

def channel_bindings(transport: Any) -> dict[str, bytes]:
    """The channel binding data of a TLS connection, by type: ``tls-exporter`` (RFC
    9266, on TLS 1.3 only: on TLS 1.2 it is unsafe without extended master secrets)
    and ``tls-server-end-point`` (RFC 5929 §4: the hash of our certificate).  Empty
    for a connection without TLS."""
    if not ISSLTransport.providedBy(transport):
        return {}
    # Twisted's TLS transports are also ISystemHandles: the handle is the pyOpenSSL
    # connection.
    connection = cast(SSL.Connection, ISystemHandle(transport).getHandle())
    out: dict[str, bytes] = {}
    if connection.get_protocol_version_name() == "TLSv1.3":
        out["tls-exporter"] = connection.export_keying_material(
            b"EXPORTER-Channel-Binding", 32, b"")
    certificate = connection.get_certificate()
    if certificate is not None:
        out["tls-server-end-point"] = end_point_hash(certificate.to_cryptography())
    return out


def end_point_hash(certificate: x509.Certificate) -> bytes:
    """RFC 5929 §4.1: the certificate hashed with its signature's hash, SHA-256 when
    that is MD5 or SHA-1 (or the signature has none of its own, as Ed25519)."""
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or algorithm.name in ("md5", "sha1"):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(certificate.public_bytes(serialization.Encoding.DER))
    return digest.finalize()
