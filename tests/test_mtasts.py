"""MTA-STS (RFC 8461): policy parsing and caching, then the whole path — a policy
served over HTTPS, MX hosts with certificates from a test CA — with a real Postfix
as the receiving MX."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from dnsserver import DNSServer
from harness import free_port
from test_outbound import ReceivingMX
from testca import TestCA
from twisted.internet import defer, reactor, task
from twisted.web import resource, server

from lightmail.delivery.smtp import SMTPDeliveryAgent
from lightmail.dns import Resolver
from lightmail.outbound.mtasts import MTASTS, PolicyError, https_fetcher, parse_policy, policy_id
from lightmail.outbound.routing import Router
from lightmail.storage.interfaces import BlobRef, Envelope, QueueItem, QueueRecipient

POLICY = "version: STSv1\nmode: {mode}\nmx: mx.sts.test\nmx: *.backup.sts.test\nmax_age: 86400\n"


def test_policy_parsing_and_mx_patterns() -> None:
    policy = parse_policy(POLICY.format(mode="enforce"), "id1", 0.0)
    assert policy.mode == "enforce" and policy.max_age == 86400
    assert policy.allows("mx.sts.test") and policy.allows("MX.sts.test.")
    assert policy.allows("a.backup.sts.test")
    assert not policy.allows("a.b.backup.sts.test") and not policy.allows("backup.sts.test")
    assert not policy.allows("evil.test")
    assert policy.expired(86401) and not policy.expired(86399)
    for bad in ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
                "version: STSv1\nmode: sometimes\nmx: a\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmx: a\n"):
        with pytest.raises(PolicyError):
            parse_policy(bad, "x", 0.0)
    assert policy_id(["v=STSv1; id=20261123T01;"]) == "20261123T01"
    assert policy_id(["v=spf1 -all"]) is None
    assert policy_id(["v=STSv1; id=a", "v=STSv1; id=b"]) is None      # two: none


class FakeResolver:
    def __init__(self) -> None:
        self.records: list[str] = ["v=STSv1; id=one"]

    def txt(self, name: str) -> Any:
        return defer.succeed(self.records)


@pytest_twisted.inlineCallbacks
def test_policies_are_cached_until_the_id_changes_or_they_expire() -> None:
    now = [1000.0]
    fetched: list[str] = []
    bodies = [POLICY.format(mode="testing").encode()]

    def fetch(url: str) -> Any:
        fetched.append(url)
        return defer.succeed(bodies[-1])
    dns = FakeResolver()
    sts = MTASTS(dns, fetch, clock=lambda: now[0])  # type: ignore[arg-type]
    policy = yield defer.ensureDeferred(sts.policy("sts.test"))
    assert policy.mode == "testing"
    assert fetched == ["https://mta-sts.sts.test/.well-known/mta-sts.txt"]
    yield defer.ensureDeferred(sts.policy("sts.test"))
    assert len(fetched) == 1                               # same id: cached
    dns.records = ["v=STSv1; id=two"]
    bodies.append(POLICY.format(mode="enforce").encode())
    policy = yield defer.ensureDeferred(sts.policy("sts.test"))
    assert policy.mode == "enforce" and len(fetched) == 2
    bodies.append(b"garbage")
    dns.records = ["v=STSv1; id=three"]
    policy = yield defer.ensureDeferred(sts.policy("sts.test"))
    assert policy.mode == "enforce"                        # a bad new one: keep the old
    dns.records = []
    assert (yield defer.ensureDeferred(sts.policy("sts.test"))).mode == "enforce"
    now[0] += 86401                                        # expired, no TXT: none
    assert (yield defer.ensureDeferred(sts.policy("sts.test"))) is None


class PolicyResource(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = b""

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return self.body


@pytest.fixture
def sts_world(tmp_path: Path) -> Any:
    ca = TestCA(Path(tempfile.mkdtemp(prefix="lightmail-ca-")))
    os.chmod(ca.directory, 0o755)
    cert, key = ca.issue("mx.sts.test")
    os.chmod(key, 0o644)                      # Postfix reads it as root at start
    port = free_port()
    dns = DNSServer({
        "sts.test.": {"MX": [(10, "mx.sts.test.")]},
        "_mta-sts.sts.test.": {"TXT": ["v=STSv1; id=1"]},
        "mta-sts.sts.test.": {"A": ["127.0.0.1"]},
        "mx.sts.test.": {"A": ["127.0.0.1"]},
        "other.test.": {"MX": [(10, "mx.other.test.")]},
        "_mta-sts.other.test.": {"TXT": ["v=STSv1; id=1"]},
        "mta-sts.other.test.": {"A": ["127.0.0.1"]},
        "mx.other.test.": {"A": ["127.0.0.1"]},
    }, ttl=1)
    dns.start()
    mx = ReceivingMX(port, ["rcpt@sts.test", "rcpt@other.test"], main={
        "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
        "smtpd_tls_key_file": str(key)})
    yield {"ca": ca, "dns": dns, "mx": mx, "port": port}
    mx.stop()
    dns.stop()


@pytest_twisted.inlineCallbacks
def test_enforced_policy_needs_a_verified_certificate(tmp_path: Path, sts_world: Any) -> None:
    ca, dns, mx = sts_world["ca"], sts_world["dns"], sts_world["mx"]
    # The policy server: HTTPS with certificates for both policy hosts.
    from twisted.internet import ssl
    policy = PolicyResource()
    web_cert, web_key = ca.issue("mta-sts.sts.test")
    other_cert, other_key = ca.issue("mta-sts.other.test")
    context = ssl.DefaultOpenSSLContextFactory(str(web_key), str(web_cert))

    def sni(connection: Any) -> None:
        name = connection.get_servername()
        if name == b"mta-sts.other.test":
            connection.set_context(ssl.DefaultOpenSSLContextFactory(
                str(other_key), str(other_cert)).getContext())
    context.getContext().set_tlsext_servername_callback(sni)
    https_port = reactor.listenSSL(0, server.Site(policy), context,  # type: ignore[attr-defined]
                                   interface="127.0.0.1")
    resolver = Resolver(f"127.0.0.1:{dns.port}")

    class Blobs:
        def read_range(self, blob_id: str, offset: int, length: int) -> Any:
            return defer.succeed(MESSAGE[offset:offset + length])
    sts = MTASTS(resolver, https_fetcher(reactor, resolver, str(ca.ca_file),
                                         port=https_port.getHost().port))
    agent = SMTPDeliveryAgent(Router(resolver, port=sts_world["port"]), Blobs(),  # type: ignore[arg-type]
                              "out.test", connect_timeout=5, mta_sts=sts,
                              ca_file=str(ca.ca_file), session_idle=0)
    try:
        # mx.sts.test has a certificate from the trusted CA: delivered, verified.
        policy.body = POLICY.format(mode="enforce").encode()
        result = yield agent.deliver(item("rcpt@sts.test"))
        assert result.status == "delivered", result
        assert "(verified)" in result.detail
        # mx.other.test answers with mx.sts.test's certificate: wrong name.
        policy.body = POLICY.format(mode="enforce").replace(
            "mx.sts.test", "mx.other.test").encode()
        result = yield agent.deliver(item("rcpt@other.test"))
        assert result.status == "deferred" and "4.7.5" in result.detail, (result, sts.cache)
        # In testing mode the same is only logged, and the mail goes.
        dns.set("_mta-sts.other.test.", "TXT", ["v=STSv1; id=2"])
        resolver.resolver.cache.flush()                    # (the TXT's TTL is 1s)
        policy.body = POLICY.format(mode="testing").replace(
            "mx.sts.test", "mx.other.test").encode()
        result = yield agent.deliver(item("rcpt@other.test"))
        assert result.status == "delivered", result
        assert "(untrusted" in result.detail
        # A policy naming other MX hosts: not delivered at all in enforce mode.
        dns.set("_mta-sts.other.test.", "TXT", ["v=STSv1; id=3"])
        resolver.resolver.cache.flush()
        policy.body = POLICY.format(mode="enforce").encode()
        result = yield agent.deliver(item("rcpt@other.test"))
        assert result.status == "deferred" and "names none of its MX" in result.detail
        # Postfix said 250 on queueing; its virtual agent files into the Maildir later.
        for _ in range(100):
            if mx.messages("rcpt@sts.test") and mx.messages("rcpt@other.test"):
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        assert len(mx.messages("rcpt@sts.test")) == 1
        assert len(mx.messages("rcpt@other.test")) == 1
    finally:
        agent.close()
        yield https_port.stopListening()


MESSAGE = b"From: a@out.test\r\nSubject: sts\r\n\r\nHello\r\n"


def item(address: str) -> QueueItem:
    rcpt = QueueRecipient(address, "smtp")
    return QueueItem(recipient_id=1, queue_id="Q1", recipient=rcpt, mail_from="a@out.test",
                     blob=BlobRef("0" * 64, len(MESSAGE)), attempts=0,
                     envelope=Envelope("a@out.test", (rcpt,)))
