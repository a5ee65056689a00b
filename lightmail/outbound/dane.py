"""DANE for outbound SMTP (RFC 7672, on RFC 6698 and RFC 7671): a receiving domain that
signs its zone with DNSSEC publishes TLSA records for its MX hosts
(``_25._tcp.mx.example.com``) saying which certificate or key each presents.  Where
there are such records, mail goes to that host only over TLS, with a certificate chain
that matches them, never in clear; where there are none, STARTTLS stays opportunistic.

What is trusted (RFC 7672 §2.2): only answers the resolver says it validated (the AD
bit, :class:`lightmail.dns.Authenticated`): the domain's MX answer (or the configured
relay name), the MX host's address records, then its TLSA records.  Insecure answers
anywhere on that path mean no DANE for the host.  A TLSA lookup that fails after the
address records were secure makes the host unusable (the zone is signed: the failure
may be an attack), so the next MX is tried and the mail waits (4.7.5) if none is left.

Matching (RFC 7672 §3.1): DANE-EE(3) against the server's own certificate, with no
name or date checks; DANE-TA(2) against a certificate of the chain the server sends
(it must send its trust anchor, §3.1.2), the chain then verified up to that anchor and
the server certificate's names checked against the TLSA base name, the MX host name
(§3.2.2; the name is not CNAME-expanded).  PKIX-TA(0) and PKIX-EE(1) are unusable for
SMTP (§3.1.3), as are unknown selectors and matching types: TLSA records that are all
unusable still mean TLS is required, but not authenticated (§2.2, as Postfix does).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.logger import Logger

from lightmail.dns import TLSA, DNSError, IResolver

DANE_TA, DANE_EE = 2, 3
_DIGEST_SIZES = {1: 32, 2: 64}          # SHA2-256, SHA2-512 (RFC 6698 §2.1.3)

#: HostDANE.state: no DANE for the host; TLSA records to match; records, but none
#: usable (TLS required, unauthenticated); the lookup failed (the host is unusable).
NONE, MATCH, ENCRYPT, FAILED = "none", "match", "encrypt", "failed"


def usable(records: list[TLSA]) -> list[TLSA]:
    """The records SMTP can use (RFC 7672 §3.1): DANE-TA or DANE-EE, selector Cert or
    SPKI, matching Full, SHA2-256 or SHA2-512 with a digest of the right size."""
    return [r for r in records
            if r.usage in (DANE_TA, DANE_EE) and r.selector in (0, 1)
            and r.mtype in (0, 1, 2) and r.data
            and len(r.data) == _DIGEST_SIZES.get(r.mtype, len(r.data))]


@dataclass(frozen=True)
class HostDANE:
    """What DANE asks of one MX host."""

    host: str
    state: str = NONE
    records: tuple[TLSA, ...] = ()      # usable ones (MATCH)
    published: tuple[TLSA, ...] = ()    # all of them, as published (TLS-RPT's policy)
    detail: str = ""                    # why (FAILED, ENCRYPT)

    @property
    def tls_required(self) -> bool:
        return self.state in (MATCH, ENCRYPT)


@dataclass(frozen=True)
class Verdict:
    """Whether a certificate chain matched; else the TLS-RPT result type and why."""

    ok: bool
    how: str = ""                        # "DANE-EE" or "DANE-TA"
    result_type: str = ""                # RFC 8460 §4.3 when not ok
    reason: str = ""


class DANE:
    """TLSA lookups for the MX hosts of a destination, through the resolver."""

    log = Logger(namespace="lightmail.outbound")

    def __init__(self, resolver: IResolver) -> None:
        self.resolver = resolver

    async def mx_authenticated(self, name: str) -> bool:
        """Whether ``name``'s MX answer (its records, or their absence: the implicit
        MX) was DNSSEC-validated: DANE needs it (RFC 7672 §2.2.1), and a REQUIRETLS
        message takes it as vouching for the MX hosts (RFC 8689 §4.2.1)."""
        try:
            mx = await self.resolver.mx_authenticated(name)
        except DNSError:
            return False            # the router's own lookup decided about that
        return mx.authenticated

    async def hosts(self, hosts: list[tuple[str, int]]) -> dict[str, HostDANE]:
        """What DANE asks of each ``(host, port)``, hosts whose names are trusted:
        from an authenticated MX answer (:meth:`mx_authenticated`), or a relay host
        the configuration names (RFC 7672 §2.2.2)."""
        found = {}
        for host, port in hosts:
            found[host] = await self.host(host, port)
        return found

    async def host(self, host: str, port: int) -> HostDANE:
        if _is_address(host):
            return HostDANE(host)
        try:
            addresses = await self.resolver.addresses_authenticated(host)
        except DNSError:
            return HostDANE(host)
        if not addresses.authenticated:
            return HostDANE(host)       # §2.2.2: TLSA only for secure address records
        tlsa_name = f"_{port}._tcp.{host.rstrip('.')}"
        try:
            answer = await self.resolver.tlsa(tlsa_name)
        except DNSError as exc:
            self.log.warn("DANE: TLSA lookup for {name} failed ({error}): {host} is not "
                          "used", name=tlsa_name, error=str(exc), host=host)
            return HostDANE(host, FAILED, detail=f"TLSA lookup for {tlsa_name} failed")
        if not answer.records:
            return HostDANE(host)
        if not answer.authenticated:
            self.log.info("DANE: TLSA records of {name} are not DNSSEC-authenticated: "
                          "ignored", name=tlsa_name)
            return HostDANE(host)
        published = tuple(answer.records)
        records = tuple(usable(answer.records))
        if not records:
            return HostDANE(host, ENCRYPT, published=published,
                            detail=f"no usable TLSA record at {tlsa_name}")
        return HostDANE(host, MATCH, records, published)


def verify(chain: list[x509.Certificate], records: tuple[TLSA, ...],
           names: tuple[str, ...]) -> Verdict:
    """Match the chain the server sent (its certificate first) against the usable
    TLSA ``records``; ``names``: the reference identifiers for DANE-TA."""
    if not chain:
        return Verdict(False, result_type="validation-failure",
                       reason="the server sent no certificate")
    leaf = chain[0]
    if any(_matches(leaf, r) for r in records if r.usage == DANE_EE):
        return Verdict(True, "DANE-EE")     # §3.1.1: no name, no expiry checks
    anchors = [cert for cert in chain[1:] for r in records
               if r.usage == DANE_TA and _matches(cert, r)]
    if not anchors:
        return Verdict(False, result_type="validation-failure",
                       reason="no certificate of the chain matches the TLSA records")
    problem = ""
    for anchor in anchors:
        problem = _chain_problem(leaf, chain[1:], anchor)
        if not problem:
            break
    if problem:
        kind = "certificate-expired" if "expired" in problem else "validation-failure"
        return Verdict(False, result_type=kind, reason=problem)
    if not _name_matches(leaf, names):
        return Verdict(False, result_type="certificate-host-mismatch",
                       reason=f"the certificate is not for {' or '.join(names)}")
    return Verdict(True, "DANE-TA")


def _matches(cert: x509.Certificate, record: TLSA) -> bool:
    if record.selector == 0:
        data = cert.public_bytes(serialization.Encoding.DER)
    else:
        data = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def _chain_problem(leaf: x509.Certificate, intermediates: list[x509.Certificate],
                   anchor: x509.Certificate) -> str:
    """Why ``leaf`` does not chain up to ``anchor`` (which need not be a root: a
    partial chain, RFC 7671 §5.2.2), or ``""``."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(anchor))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    context = crypto.X509StoreContext(
        store, crypto.X509.from_cryptography(leaf),
        [crypto.X509.from_cryptography(c) for c in intermediates])
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as exc:
        return str(exc) or "the chain does not verify"
    return ""


def _name_matches(cert: x509.Certificate, names: tuple[str, ...]) -> bool:
    """RFC 7672 §3.2.3: a DNS name of the subjectAltName (the CN only when there is
    none) equal to a reference name, or a wildcard that is a whole leftmost label."""
    try:
        presented = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        presented = []
    if not presented:
        presented = [str(a.value) for a in
                     cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    wanted = [n.lower().rstrip(".") for n in names]
    for item in presented:
        pattern = item.lower().rstrip(".")
        for name in wanted:
            if pattern == name:
                return True
            if pattern.startswith("*.") and "." in name:
                head, rest = name.split(".", 1)
                if head and rest == pattern[2:]:
                    return True
    return False


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True

