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


class CertificateProblem(ValueError):
    """A certificate or key file that cannot be used: ``path``, the ``certificate`` or
    the ``key`` of a pair (``what``)."""

    def __init__(self, path: Path, what: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.what = what


def _context(cert: Path, key: Path) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_cipher_list(CIPHERS)
    try:
        ctx.use_certificate_chain_file(str(cert))
    except SSL.Error as exc:
        raise CertificateProblem(cert, "certificate",
                                 f"not a PEM certificate chain ({_why(exc)})") from None
    try:
        ctx.use_privatekey_file(str(key))
    except SSL.Error as exc:
        why = _why(exc)
        if "values mismatch" in why:     # OpenSSL compares it with the certificate
            raise CertificateProblem(key, "key", f"not the key of the certificate "
                                                 f"{cert}") from None
        raise CertificateProblem(key, "key", f"not a PEM private key ({why})") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise CertificateProblem(key, "key", f"not the key of the certificate {cert}") from None
    return ctx


def _why(error: SSL.Error) -> str:
    """OpenSSL's reasons, without its error codes: 'no start line'."""
    reasons = [str(item[2]) for item in error.args[0] if len(item) == 3] \
        if error.args and isinstance(error.args[0], list) else []
    return "; ".join(reasons) or str(error)


def _names(cert: Path) -> list[str]:
    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateProblem(cert, "certificate",
                                 f"cannot read the certificate ({exc})") from None
    try:
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(name) for name in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(attr.value) for attr in
                 parsed.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
    return [name.lower() for name in names]


class Certificates:
    """A listener's certificates, read: the first pair is the default, the others are
    picked by SNI from the names they carry.  Made in a thread (it reads files)."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]]) -> None:
        if not pairs:
            raise ValueError("TLS needs at least one certificate")
        self.default = _context(*pairs[0])
        self._by_name: dict[str, SSL.Context] = {}
        for cert, key in pairs:
            ctx = self.default if (cert, key) == tuple(pairs[0]) else _context(cert, key)
            for name in _names(cert):
                self._by_name.setdefault(name, ctx)
        self.default.set_tlsext_servername_callback(self._pick)

    def _pick(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if not name:
            return
        host = name.decode("ascii", "replace").lower()
        ctx = self._by_name.get(host) or self._by_name.get("*." + host.partition(".")[2])
        if ctx is not None and ctx is not self.default:
            connection.set_context(ctx)


class ServerTLS(ContextFactory):
    """Context factory with SNI: the first pair is the default certificate.

    Twisted asks it for a context at each new connection (implicit TLS and
    STARTTLS alike), so :meth:`use` replaces the certificates of connections to come;
    a connection already made keeps the context it was given."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]]) -> None:
        self.certificates = Certificates(pairs)

    def use(self, certificates: Certificates) -> None:
        """Serve new connections with ``certificates`` (a reload)."""
        self.certificates = certificates

    def getContext(self) -> SSL.Context:
        return self.certificates.default


def server_context(listener: ListenerConfig) -> Any:
    return ServerTLS(certificate_pairs(listener))


def certificate_pairs(listener: ListenerConfig) -> list[tuple[Path, Path]]:
    """The (certificate, key) files of a listener, its default first."""
    assert listener.tls_cert is not None and listener.tls_key is not None
    return [(listener.tls_cert, listener.tls_key), *listener.tls_sni]


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
