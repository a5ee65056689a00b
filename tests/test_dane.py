"""DANE for outbound SMTP (RFC 7672): TLSA matching (DANE-EE, DANE-TA with its name
checks, unusable records), the resolver's authenticated lookups, and delivery to a
real Postfix whose certificate comes from a test CA.

The test DNS server cannot sign zones: with ``authenticated=True`` it plays the
*validating resolver* that LightMail trusts, setting the AD bit in its answers, and
``insecure(name)`` takes the bit away for one name (an unsigned zone).  What is tested
is what LightMail does with the resolver's verdict, not DNSSEC validation itself.
"""

from __future__ import annotations

import hashlib
import os
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dnsserver import DNSServer
from harness import free_port
from test_outbound import ReceivingMX
from testca import TestCA
from twisted.internet import defer, reactor, task

from lightmail.delivery.smtp import SMTPDeliveryAgent
from lightmail.dns import TLSA, Resolver, TemporaryDNSError
from lightmail.outbound.dane import DANE, usable, verify
from lightmail.outbound.mtasts import MTASTS
from lightmail.outbound.routing import Router
from lightmail.storage.interfaces import BlobRef, Envelope, QueueItem, QueueRecipient
from lightmail.tlsrpt.interfaces import TLSResult


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def ca() -> Iterator[TestCA]:
    directory = Path(tempfile.mkdtemp(prefix="lightmail-dane-ca-"))
    os.chmod(directory, 0o755)
    yield TestCA(directory)


# -- matching ------------------------------------------------------------------------------

def test_dane_ee_matches_the_server_certificate_only(ca: TestCA) -> None:
    leaf = load(ca.issue("mx.dane.test")[0])
    chain = [leaf, ca.cert]
    for record in (TLSA(3, 1, 1, hashlib.sha256(spki(leaf)).digest()),
                   TLSA(3, 0, 1, hashlib.sha256(der(leaf)).digest()),
                   TLSA(3, 1, 2, hashlib.sha512(spki(leaf)).digest()),
                   TLSA(3, 0, 0, der(leaf))):
        verdict = verify(chain, (record,), ("anything.test",))   # no name checks
        assert verdict.ok and verdict.how == "DANE-EE", record
    # The CA's key as DANE-EE: no (EE means the server's own certificate).
    wrong = verify(chain, (TLSA(3, 1, 1, hashlib.sha256(spki(ca.cert)).digest()),),
                   ("mx.dane.test",))
    assert not wrong.ok and wrong.result_type == "validation-failure"


def test_dane_ta_needs_the_anchor_in_the_chain_and_the_right_name(ca: TestCA) -> None:
    leaf = load(ca.issue("mx.dane.test")[0])
    anchor = (TLSA(2, 0, 1, hashlib.sha256(der(ca.cert)).digest()),)
    assert verify([leaf, ca.cert], anchor, ("mx.dane.test",)).how == "DANE-TA"
    assert verify([leaf, ca.cert], (TLSA(2, 1, 1, hashlib.sha256(spki(ca.cert)).digest()),),
                  ("MX.dane.test.",)).ok
    mismatch = verify([leaf, ca.cert], anchor, ("other.dane.test",))
    assert mismatch.result_type == "certificate-host-mismatch"
    # RFC 7672 §3.1.2: the server must send its trust anchor.
    assert not verify([leaf], anchor, ("mx.dane.test",)).ok
    # A certificate another CA issued, with this CA's certificate sent beside it.
    stranger = TestCA(Path(tempfile.mkdtemp(prefix="lightmail-dane-other-")))
    forged = load(stranger.issue("mx.dane.test")[0])
    assert verify([forged, ca.cert], anchor, ("mx.dane.test",)).result_type == (
        "validation-failure")
    wildcard = load(ca.issue("*.dane.test")[0])
    assert verify([wildcard, ca.cert], anchor, ("mx.dane.test",)).ok
    assert not verify([wildcard, ca.cert], anchor, ("a.mx.dane.test",)).ok


def test_pkix_usages_and_malformed_records_are_unusable() -> None:
    digest = bytes(32)
    records = [TLSA(0, 0, 1, digest), TLSA(1, 1, 1, digest),      # PKIX-TA, PKIX-EE
               TLSA(3, 2, 1, digest), TLSA(3, 1, 3, digest),      # unknown selector, type
               TLSA(3, 1, 1, digest[:20]), TLSA(3, 1, 2, digest),  # digests of wrong size
               TLSA(3, 1, 0, b"")]
    assert usable(records) == []
    assert usable([TLSA(3, 1, 1, digest), TLSA(2, 0, 2, bytes(64))]) == [
        TLSA(3, 1, 1, digest), TLSA(2, 0, 2, bytes(64))]


# -- the resolver's authenticated lookups ----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_resolver_hands_on_the_ad_bit() -> None:
    digest = "ab" * 32
    with DNSServer({
        "signed.test.": {"MX": [(10, "mx.signed.test.")]},
        "mx.signed.test.": {"A": ["192.0.2.1"]},
        "_25._tcp.mx.signed.test.": {"TLSA": [f"3 1 1 {digest}"]},
        "_25._tcp.plain.signed.test.": {"TLSA": [f"3 1 1 {digest}"]},
        "_25._tcp.broken.signed.test.": {"TLSA": [f"3 1 1 {digest}"]},
    }, authenticated=True) as server:
        server.insecure("_25._tcp.plain.signed.test.")
        server.fail("_25._tcp.broken.signed.test.")
        resolver = Resolver(f"127.0.0.1:{server.port}", timeout=2)
        answer = await resolver.tlsa("_25._tcp.mx.signed.test")
        assert answer.authenticated
        assert answer.records == [TLSA(3, 1, 1, bytes.fromhex(digest))]
        assert str(answer.records[0]) == f"3 1 1 {digest}"
        assert not (await resolver.tlsa("_25._tcp.plain.signed.test")).authenticated
        none = await resolver.tlsa("_25._tcp.nowhere.signed.test")   # NXDOMAIN
        assert none.records == []
        with pytest.raises(TemporaryDNSError):
            await resolver.tlsa("_25._tcp.broken.signed.test")
        mx = await resolver.mx_authenticated("signed.test")
        assert mx.authenticated and mx.records == [(10, "mx.signed.test")]
        addresses = await resolver.addresses_authenticated("mx.signed.test")
        assert addresses.authenticated and addresses.records == ["192.0.2.1"]
        # Cached answers keep their bit.
        assert (await resolver.mx_authenticated("signed.test")).authenticated
        server.insecure("mx.signed.test.")
        resolver.resolver.cache.flush()
        assert not (await resolver.addresses_authenticated("mx.signed.test")).authenticated
    # A server that does not validate (no AD): nothing is authenticated.
    with DNSServer({"signed.test.": {"MX": [(10, "mx.signed.test.")]}}) as plain:
        resolver = Resolver(f"127.0.0.1:{plain.port}", timeout=2)
        assert not (await resolver.mx_authenticated("signed.test")).authenticated
        assert (plain.queries[-1] == ("signed.test.", "MX"))


# -- delivery to a real Postfix --------------------------------------------------------------

class PlainMX(threading.Thread):
    """An MX without STARTTLS that counts the MAIL commands it gets (none, here)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        counter = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b"220 plain.test ESMTP\r\n")
                while line := self.rfile.readline():
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        self.wfile.write(b"250-plain.test\r\n250 PIPELINING\r\n")
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        if verb == b"MAIL":
                            counter.mails += 1
                        self.wfile.write(b"250 ok\r\n")
        self.mails = 0
        self.server = socketserver.ThreadingTCPServer((host, port), Handler)
        self.server.daemon_threads = True

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.05)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


DOMAINS = ("ee", "ta", "taname", "bad", "plain", "insecure", "mxinsecure", "sts", "nodane",
           "servfail", "unusable", "unusableplain")


@pytest.fixture
def dane_world(ca: TestCA) -> Iterator[dict[str, Any]]:
    cert, key = ca.issue("mx.dane.test")
    leaf = load(cert)
    chain = ca.directory / "mx.dane.test-chain.pem"          # the server sends its TA
    chain.write_bytes(cert.read_bytes() + ca.ca_file.read_bytes())
    os.chmod(key, 0o644)                  # Postfix reads it as root at start
    port = free_port()
    ee = f"3 1 1 {hashlib.sha256(spki(leaf)).hexdigest()}"
    ta = f"2 0 1 {hashlib.sha256(der(ca.cert)).hexdigest()}"
    wrong = f"3 1 1 {'00' * 32}"

    def tlsa(host: str) -> str:
        return f"_{port}._tcp.{host}.dane.test."
    zones: dict[str, dict[str, list[Any]]] = {}
    for name in DOMAINS:
        host = "mx" if name == "ta" else f"{name}-mx"
        zones[f"{name}.test."] = {"MX": [(10, f"{host}.dane.test.")]}
        zones[f"{host}.dane.test."] = {"A": ["127.0.0.2" if "plain" in name
                                             else "127.0.0.1"]}
    for host, record in (("ee-mx", ee), ("mx", ta), ("taname-mx", ta), ("bad-mx", wrong),
                         ("plain-mx", ee), ("insecure-mx", wrong), ("mxinsecure-mx", wrong),
                         ("sts-mx", ee), ("servfail-mx", ee),
                         ("unusable-mx", f"1 1 1 {'00' * 32}"),
                         ("unusableplain-mx", f"0 0 1 {'00' * 32}")):
        zones[tlsa(host)] = {"TLSA": [record]}
    for name in ("sts", "nodane"):
        zones[f"_mta-sts.{name}.test."] = {"TXT": ["v=STSv1; id=1"]}
    dns = DNSServer(zones, ttl=1, authenticated=True)
    dns.insecure(tlsa("insecure-mx"))
    dns.insecure("mxinsecure.test.")
    dns.fail(tlsa("servfail-mx"))
    dns.start()
    mx = ReceivingMX(port, [f"rcpt@{name}.test" for name in DOMAINS], main={
        "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(chain),
        "smtpd_tls_key_file": str(key)})
    plain = PlainMX("127.0.0.2", port)
    plain.start()
    try:
        yield {"dns": dns, "mx": mx, "port": port, "plain": plain}
    finally:
        plain.stop()
        mx.stop()
        dns.stop()


class Recorded:
    """TLS-RPT's outcomes, kept in a list (the SQL store is tested in test_tlsrpt)."""

    def __init__(self) -> None:
        self.results: list[TLSResult] = []

    def record(self, result: TLSResult) -> None:
        self.results.append(result)

    def of(self, domain: str) -> list[str]:
        return [r.result_type for r in self.results if r.policy_domain == domain]


MESSAGE = b"From: a@out.test\r\nSubject: dane\r\n\r\nHello\r\n"


def item(address: str) -> QueueItem:
    rcpt = QueueRecipient(address, "smtp")
    return QueueItem(recipient_id=1, queue_id="Q1", recipient=rcpt, mail_from="a@out.test",
                     blob=BlobRef("0" * 64, len(MESSAGE)), attempts=0,
                     envelope=Envelope("a@out.test", (rcpt,)))


STS_POLICY = "version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n"


@pytest_twisted.inlineCallbacks
def test_delivery_follows_the_tlsa_records(dane_world: dict[str, Any]) -> None:
    dns, mx, plain = dane_world["dns"], dane_world["mx"], dane_world["plain"]
    resolver = Resolver(f"127.0.0.1:{dns.port}", timeout=3)

    class Blobs:
        def read_range(self, blob_id: str, offset: int, length: int) -> Any:
            return defer.succeed(MESSAGE[offset:offset + length])

    def fetch(url: str) -> Any:            # the MTA-STS policies, as if over HTTPS
        host = "sts-mx" if "sts.test" in url and "nodane" not in url else "nodane-mx"
        return defer.succeed(STS_POLICY.format(mx=f"{host}.dane.test").encode())
    recorded = Recorded()
    # No ca_file: the test CA is not trusted, so only DANE can vouch for the server.
    agent = SMTPDeliveryAgent(Router(resolver, port=dane_world["port"]), Blobs(),  # type: ignore[arg-type]
                              "out.test", connect_timeout=5, session_idle=0,
                              mta_sts=MTASTS(resolver, fetch), dane=DANE(resolver),
                              tls_reports=recorded)

    @defer.inlineCallbacks
    def deliver(name: str) -> Any:
        result = yield agent.deliver(item(f"rcpt@{name}.test"))
        return result
    try:
        result = yield deliver("ee")
        assert result.status == "delivered", result
        assert "(DANE-EE verified)" in result.detail
        result = yield deliver("ta")
        assert result.status == "delivered" and "(DANE-TA verified)" in result.detail, result
        # The TA matches, but the certificate is for mx.dane.test, not taname-mx.
        result = yield deliver("taname")
        assert result.status == "deferred" and "4.7.5" in result.detail, result
        assert "DANE: the certificate is not for taname-mx.dane.test" in result.detail
        assert recorded.of("taname.test") == ["certificate-host-mismatch"]
        result = yield deliver("bad")
        assert result.status == "deferred" and "4.7.5" in result.detail, result
        assert recorded.of("bad.test") == ["validation-failure"]
        # TLSA records and no STARTTLS: never in clear.
        result = yield deliver("plain")
        assert result.status == "deferred" and "4.7.5" in result.detail, result
        assert recorded.of("plain.test") == ["starttls-not-supported"]
        # Unauthenticated TLSA records, or an insecure MX answer: no DANE at all.
        for name in ("insecure", "mxinsecure"):
            result = yield deliver(name)
            assert result.status == "delivered", (name, result)
            assert "DANE" not in result.detail and "(untrusted" in result.detail
            assert recorded.of(f"{name}.test") == ["success"]
        # DANE wins over MTA-STS: the policy alone would want a certificate the
        # roots trust (as nodane.test shows), the TLSA record vouches for this one.
        result = yield deliver("sts")
        assert result.status == "delivered" and "DANE-EE" in result.detail, result
        result = yield deliver("nodane")
        assert result.status == "deferred" and "MTA-STS needs a valid" in result.detail
        assert recorded.of("nodane.test") == ["certificate-not-trusted"]
        tlsa_policy = [r.policy for r in recorded.results if r.policy_domain == "sts.test"]
        assert tlsa_policy[0].type == "tlsa" and tlsa_policy[0].mx_hosts == (
            "sts-mx.dane.test",)
        # A TLSA lookup that fails in a signed zone: the host is not used.
        result = yield deliver("servfail")
        assert result.status == "deferred" and "TLSA lookup" in result.detail, result
        assert recorded.of("servfail.test") == ["dnssec-invalid"]
        # Only unusable records (PKIX-EE): TLS, unauthenticated, is still required.
        result = yield deliver("unusable")
        assert result.status == "delivered" and "DANE" not in result.detail, result
        assert recorded.of("unusable.test") == ["tlsa-invalid"]
        result = yield deliver("unusableplain")
        assert result.status == "deferred" and "4.7.5" in result.detail, result
        for _ in range(100):
            if all(mx.messages(f"rcpt@{n}.test") for n in (
                    "ee", "ta", "insecure", "mxinsecure", "sts", "unusable")):
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        for name in DOMAINS:
            delivered = name in ("ee", "ta", "insecure", "mxinsecure", "sts", "unusable")
            assert len(mx.messages(f"rcpt@{name}.test")) == int(delivered), name
        assert plain.mails == 0
        assert recorded.of("ee.test") == ["success"]
        assert recorded.of("ta.test") == ["success"]
        # TLS-Required: No (RFC 8689 §4.2.2) sets the TLSA records aside: TLS as
        # offered, the certificate unchecked; the session is not held to the
        # domain's policy, so not counted under it.
        optional = b"TLS-Required: No\r\n" + MESSAGE
        result = yield agent.deliver(replace(
            item("rcpt@bad.test"), blob=BlobRef("1" * 64, len(optional)),
            content=optional))
        assert result.status == "delivered" and "(untrusted" in result.detail, result
        assert recorded.of("bad.test") == ["validation-failure"]
        for _ in range(100):
            if mx.messages("rcpt@bad.test"):
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        assert b"TLS-Required: No" in mx.messages("rcpt@bad.test")[0]
    finally:
        agent.close()


def test_dane_per_transport_follows_outbound_unless_told() -> None:
    from lightmail.config import parse_config
    from lightmail.service import _routes  # the only builder of Transports (no public way)
    config = parse_config("[outbound]\ndane = no\n[transport:on.test]\ndane = yes\n"
                          "[transport:same.test]\ntls = encrypt\n"
                          "[transport:clear.test]\ndane = yes\ntls = none\n")
    default, transports = _routes(config, None)
    assert not default.dane
    assert transports["on.test"].uses_dane
    assert not transports["same.test"].dane                  # as [outbound]
    assert not transports["clear.test"].uses_dane             # never without TLS
    default, transports = _routes(parse_config("[transport:same.test]\n"
                                               "tls = encrypt\n"), None)
    assert default.dane and transports["same.test"].dane     # yes by default
