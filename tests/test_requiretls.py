"""REQUIRETLS (RFC 8689), TLS-Required: No, and the MTA-STS policy cache kept across
restarts (RFC 8461 §5).

Inbound: smtplib against LightMail, over STARTTLS and implicit TLS.  Outbound: a
LightMail sending through the test DNS server (tests/dnsserver.py) to real peers -
another LightMail (offers REQUIRETLS after STARTTLS, certificate from a test CA),
Postfix (STARTTLS, no REQUIRETLS: Postfix 3.x has none), and a plain Python MX
without STARTTLS - with MTA-STS policies served over HTTPS; bounces come back to
the sender as DSNs.  The cache: its SQL store on every backend, and a sending
LightMail stopped and started again while the policy server is down.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import smtplib
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from dnsserver import DNSServer
from harness import free_port
from inprocess import in_thread, start
from test_outbound import AcceptingMX, ReceivingMX, until
from testca import TestCA
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import resource, server

from lightmail.outbound.mtasts import MTASTS, https_fetcher
from lightmail.outbound.requiretls import (
    ENCRYPTION_NEEDED,
    REQUIRETLS_NEEDED,
    Refusal,
    bounce_detail,
    session_refusal,
    tls_optional,
)
from lightmail.storage import schema
from lightmail.storage.interfaces import MTASTSPolicyRecord
from lightmail.storage.mtastsstore import SQLMTASTSPolicyStore

NO_CHECK = ssl.create_default_context()
NO_CHECK.check_hostname, NO_CHECK.verify_mode = False, ssl.CERT_NONE


# -- the rules, alone ------------------------------------------------------------------

def test_tls_required_no_is_read_from_the_header_section_only() -> None:
    assert tls_optional(b"From: a@b\r\nTLS-Required: No\r\n\r\nbody\r\n")
    assert tls_optional(b"tls-required:no\n\nbody\n")
    assert tls_optional(b"Subject: x\r\nTLS-Required:\r\n  No\r\n\r\n")     # folded
    assert not tls_optional(b"TLS-Required: Yes\r\n\r\n")
    assert not tls_optional(b"TLS-Required: Nope\r\n\r\n")
    assert not tls_optional(b"Subject: x\r\n\r\nTLS-Required: No\r\n")    # the body
    assert not tls_optional(b"X-TLS-Required: No\r\n\r\n")


def test_a_session_qualifies_with_verified_tls_and_requiretls_offered() -> None:
    where = "mx.test[192.0.2.1]:25"
    offered = {"REQUIRETLS": "", "PIPELINING": ""}
    assert session_refusal(where, "TLSv1.3 (verified)", True, offered) is None
    no_tls = session_refusal(where, "", False, offered)
    unverified = session_refusal(where, "TLSv1.3 (untrusted: Error)", False, offered)
    not_offered = session_refusal(where, "TLSv1.3 (verified)", True, {"PIPELINING": ""})
    assert no_tls is not None and no_tls.status == ENCRYPTION_NEEDED
    assert unverified is not None and unverified.status == ENCRYPTION_NEEDED
    assert not_offered is not None and not_offered.status == REQUIRETLS_NEEDED
    assert bounce_detail([no_tls, not_offered]).startswith("5.7.30 ")
    assert bounce_detail([unverified, unverified]) == f"5.7.10 {unverified.text}"
    assert str(Refusal("5.7.10", "x")) == "5.7.10 x"


def test_the_flag_crosses_to_the_writer_process() -> None:
    from lightmail.storage.interfaces import Envelope, QueueRecipient
    from lightmail.storage.wire import decode, encode
    envelope = Envelope("a@b.test", (QueueRecipient("c@d.test", "smtp"),), requiretls=True)
    assert decode(encode(envelope)) == envelope and decode(encode(envelope)).requiretls


# -- inbound -----------------------------------------------------------------------------

def _queued_requiretls(server: Any) -> Any:
    def read(conn: Any) -> dict[str, bool]:
        m = schema.queue_messages
        return {row.mail_from: bool(row.requiretls)
                for row in conn.execute(sa.select(m.c.mail_from, m.c.requiretls))}
    return server.parts.storage.db.read(read)


@pytest_twisted.inlineCallbacks
def test_requiretls_is_offered_and_accepted_only_over_tls(tmp_path: Path) -> Any:
    # Mail to other domains waits (a relay that is never there): it stays queued.
    server = yield start(tmp_path, f"[outbound]\nrelay_host = [127.0.0.1]:{free_port()}\n"
                         "min_backoff = 1h\n")

    def over_smtp(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert not smtp.has_extn("requiretls")       # RFC 8689 §2: TLS first
            code, text = smtp.docmd("MAIL", "FROM:<a@client.test> REQUIRETLS")
            assert (code, text[:6]) == (530, b"5.7.10"), (code, text)
            smtp.starttls(context=NO_CHECK)
            smtp.ehlo("client.test")
            assert smtp.has_extn("requiretls")
            code, text = smtp.docmd("MAIL", "FROM:<a@client.test> REQUIRETLS=YES")
            assert code == 555, (code, text)
            code, text = smtp.docmd("MAIL", "FROM:<a@client.test> REQUIRETLS")
            assert code == 250, (code, text)
            assert smtp.rcpt("bob@example.test")[0] == 250
            assert smtp.data(b"Subject: over starttls\r\n\r\nHello\r\n")[0] == 250

    def over_submission(port: int) -> None:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=NO_CHECK, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert smtp.has_extn("requiretls")            # implicit TLS: at once
            smtp.login("bob@example.test", "bob-secret")
            smtp.sendmail("bob@example.test", ["friend@far.test"],
                          b"Subject: required\r\n\r\nSecret\r\n", mail_options=["REQUIRETLS"])
            # The postmaster alias resolves to bob: local, a second message, not required.
            smtp.sendmail("postmaster@example.test", ["friend2@far.test"],
                          b"Subject: optional\r\n\r\nNot secret\r\n")
    try:
        yield in_thread(over_smtp, server.ports["mx"])
        [filed] = yield server.delivered("bob@example.test", 1)
        assert b"Subject: over starttls" in filed
        yield in_thread(over_submission, server.ports["submissions"])
        flags = yield until(lambda: _queued_requiretls(server).addCallback(
            lambda found: found if len(found) == 2 else None))
        assert flags == {"bob@example.test": True, "postmaster@example.test": False}
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_requiretls_can_be_switched_off(tmp_path: Path) -> Any:
    server = yield start(tmp_path, "[smtp]\nrequiretls = no\n")

    def check(port: int) -> None:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=NO_CHECK, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert smtp.does_esmtp and not smtp.has_extn("requiretls")
            smtp.login("bob@example.test", "bob-secret")
            code, _ = smtp.docmd("MAIL", "FROM:<bob@example.test> REQUIRETLS")
            assert code == 555
    try:
        yield in_thread(check, server.ports["submissions"])
    finally:
        yield server.stop()


# -- outbound, with real peers -----------------------------------------------------------

class Policies(resource.Resource):
    """MTA-STS policy files, by the host asked (mta-sts.DOMAIN): enforce, naming
    mx.DOMAIN."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        domain = request.getRequestHostname().decode().removeprefix("mta-sts.")
        request.setHeader(b"content-type", b"text/plain")
        return (f"version: STSv1\nmode: enforce\nmx: mx.{domain}\n"
                "max_age: 86400\n").encode()


STS_DOMAINS = ("rt.test", "bad.test", "pf.test", "fresh.test")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """DNS, a test CA, the MTA-STS policy server, and the MX hosts on one port:
    127.0.0.2 a receiving LightMail (certificate for mx.rt.test), 127.0.0.3 an MX
    without STARTTLS; 127.0.0.1 is left for Postfix."""
    from twisted.internet import ssl as tssl
    ca = TestCA(Path(tempfile.mkdtemp(prefix="lightmail-ca-")))
    os.chmod(ca.directory, 0o755)
    port = free_port()
    zone: dict[str, dict[str, Any]] = {
        "rt.test.": {"MX": [(10, "mx.rt.test.")]},
        "mx.rt.test.": {"A": ["127.0.0.2"]},
        "nosts.test.": {"MX": [(10, "mx.rt.test.")]},       # the same MX, no policy
        "bad.test.": {"MX": [(10, "mx.bad.test.")]},
        "mx.bad.test.": {"A": ["127.0.0.2"]},               # a certificate for another
        "pf.test.": {"MX": [(10, "mx.pf.test.")]},
        "mx.pf.test.": {"A": ["127.0.0.1"]},
        "plain.test.": {"MX": [(10, "mx.plain.test.")]},
        "mx.plain.test.": {"A": ["127.0.0.3"]},
        "fresh.test.": {"MX": [(10, "mx.plain.test.")]},
    }
    contexts = {}
    for domain in STS_DOMAINS:
        zone[f"_mta-sts.{domain}."] = {"TXT": ["v=STSv1; id=1"]}
        zone[f"mta-sts.{domain}."] = {"A": ["127.0.0.1"]}
        cert, key = ca.issue(f"mta-sts.{domain}")
        contexts[f"mta-sts.{domain}".encode()] = tssl.DefaultOpenSSLContextFactory(
            str(key), str(cert))
    dns = DNSServer(zone, ttl=1)
    dns.start()
    # One listener for every policy host: the certificate chosen by the name asked.
    web = contexts[b"mta-sts.rt.test"]
    web.getContext().set_tlsext_servername_callback(
        lambda connection: connection.set_context(
            contexts[connection.get_servername()].getContext()))
    https = reactor.listenSSL(0, server.Site(Policies()), web,  # type: ignore[attr-defined]
                              interface="127.0.0.1")
    plain = AcceptingMX("127.0.0.3", port)
    receiver_dir = tmp_path / "receiver"
    receiver_dir.mkdir()
    cert, key = ca.issue("mx.rt.test")
    shutil.copy(cert, receiver_dir / "cert.pem")
    shutil.copy(key, receiver_dir / "key.pem")
    try:
        yield {"ca": ca, "dns": dns, "port": port, "https": https,
               "https_port": https.getHost().port, "plain": plain,
               "receiver_dir": receiver_dir}
    finally:
        plain.stop()
        if https.connected:
            https.stopListening()
        dns.stop()
        shutil.rmtree(ca.directory, ignore_errors=True)


@defer.inlineCallbacks
def start_receiver(world: dict[str, Any]) -> Any:
    """The receiving LightMail: its MX listener on 127.0.0.2 (the world's port), with
    a transcript of every session there."""
    tmp = world["receiver_dir"]
    receiver = yield start(tmp, (
        f"[listener:mx2]\nprotocol = smtp\nendpoint = tcp:{world['port']}:"
        f"interface=127.0.0.2\ntls = starttls\ntls_cert = {tmp / 'cert.pem'}\n"
        f"tls_key = {tmp / 'key.pem'}\n"
        f"[transcript]\nlisteners = mx2\ndirectory = {tmp / 'transcripts'}\n"))
    for domain in ("rt.test", "bad.test", "nosts.test"):
        yield receiver.parts.directory.add_domain(domain)
        yield receiver.parts.directory.add_user(f"carol@{domain}", "carol-secret")
    return receiver


def sender_config(world: dict[str, Any]) -> str:
    return (f"[outbound]\ndns_servers = 127.0.0.1:{world['dns'].port}\n"
            f"port = {world['port']}\nca_file = {world['ca'].ca_file}\n"
            "min_backoff = 1h\nsession_idle = 0\n"
            "[transport:plain.test]\ntls = encrypt\n")


@defer.inlineCallbacks
def start_sender(tmp: Path, world: dict[str, Any], populate: bool = True) -> Any:
    sender = yield start(tmp, sender_config(world), populate=populate)
    sender.parts.queue_runner.poll_interval = 0.5
    # The policy server is on a port of the test's, not 443: the agent's fetcher is
    # replaced (no configuration option names that port; nothing else would use it).
    sts = sender.parts.queue_runner.agents["smtp"].mta_sts
    sts.fetch = https_fetcher(reactor, sts.resolver, str(world["ca"].ca_file),
                              port=world["https_port"])
    return sender


def submit(port: int, rcpt: str, subject: str, requiretls: bool = False,
           header: str = "") -> None:
    with smtplib.SMTP_SSL("127.0.0.1", port, context=NO_CHECK, timeout=30) as smtp:
        smtp.login("bob@example.test", "bob-secret")
        smtp.sendmail("bob@example.test", [rcpt],
                      f"From: bob@example.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
                      f"{header}\r\nBody of {subject}\r\n".encode(),
                      mail_options=["REQUIRETLS"] if requiretls else [])


@defer.inlineCallbacks
def notices(sender: Any, count: int) -> Any:
    found = yield sender.inbox("bob@example.test")
    found = [m for m in found if b"report-type=delivery-status" in m]
    return found if len(found) >= count else None


@defer.inlineCallbacks
def queue_state(server: Any) -> Any:
    rows = yield server.parts.queue.list_recipients()
    return {row["recipient"]: (row["state"], row["last_error"] or "") for row in rows}


@pytest_twisted.inlineCallbacks
def test_requiretls_and_tls_required_no_outbound(tmp_path: Path,
                                                 world: dict[str, Any]) -> Any:
    cert, key = world["ca"].issue("mx.pf.test")
    os.chmod(key, 0o644)                      # Postfix reads it as root at start
    postfix = ReceivingMX(world["port"], ["dora@pf.test"], main={
        "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
        "smtpd_tls_key_file": str(key)})
    events: list[str] = []

    def observe(event: Any) -> None:
        events.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    receiver = sender = None
    try:
        receiver = yield start_receiver(world)
        sender = yield start_sender(tmp_path / "sender", world)
        port = sender.ports["submissions"]
        for rcpt, subject, requiretls, header in (
                ("carol@rt.test", "rt-required", True, ""),
                ("x@nosts.test", "nosts-required", True, ""),
                ("dora@pf.test", "pf-required", True, ""),
                ("dora@pf.test", "pf-plain", False, ""),
                ("carol@bad.test", "bad-required", True, ""),
                ("carol@bad.test", "bad-plain", False, ""),
                ("carol@bad.test", "bad-optional", False, "TLS-Required: No\r\n"),
                ("p@plain.test", "plain-plain", False, ""),
                ("p@plain.test", "plain-optional", False, "TLS-Required: No\r\n"),
                ("p@plain.test", "plain-both", True, "TLS-Required: No\r\n")):
            yield in_thread(submit, port, rcpt, subject, requiretls, header)

        # Verified TLS to a LightMail offering REQUIRETLS: delivered, REQUIRETLS on.
        [got] = yield receiver.delivered("carol@rt.test", 1)
        assert b"Subject: rt-required" in got
        transcripts = "".join(path.read_text() for path in
                              (world["receiver_dir"] / "transcripts").iterdir())
        assert "MAIL FROM:<bob@example.test>" in transcripts
        assert " REQUIRETLS" in transcripts
        # The others bounce at once, each with the RFC's code, the notice returning
        # only the header section.
        found = yield until(lambda: notices(sender, 4), timeout=60)
        by_subject = {subject: notice for notice in found
                      for subject in ("nosts-required", "pf-required", "bad-required",
                                      "plain-both")
                      if f"Subject: {subject}".encode() in notice}
        assert sorted(by_subject) == ["bad-required", "nosts-required", "pf-required",
                                      "plain-both"], found
        assert b"Status: 5.7.30" in by_subject["nosts-required"]        # no MTA-STS
        assert b"vouched" in by_subject["nosts-required"]
        assert b"Status: 5.7.30" in by_subject["pf-required"]           # Postfix
        assert b"does not offer REQUIRETLS" in by_subject["pf-required"]
        assert b"Status: 5.7.10" in by_subject["bad-required"]          # wrong name
        assert b"does not verify" in by_subject["bad-required"]
        assert b"Status: 5.7.30" in by_subject["plain-both"]    # the header ignored
        for notice in by_subject.values():
            assert b"text/rfc822-headers" in notice
            assert b"Body of" not in notice
        # Without REQUIRETLS: to Postfix over verified TLS; MTA-STS holds back the
        # wrong certificate, tls = encrypt the MX without STARTTLS ...
        [to_postfix] = yield until(lambda: postfix.messages("dora@pf.test"), timeout=60)
        assert b"Subject: pf-plain" in to_postfix
        state = yield until(lambda: queue_state(sender).addCallback(
            lambda rows: rows if {"carol@bad.test", "p@plain.test"} <= set(rows)
            and rows["carol@bad.test"][0] == rows["p@plain.test"][0] == "deferred"
            else None))
        assert "4.7.5" in state["carol@bad.test"][1], state
        assert "4.7.5" in state["p@plain.test"][1] and "STARTTLS" in state["p@plain.test"][1]
        # ... but TLS-Required: No goes all the same, and the log says how.
        [optional] = yield receiver.delivered("carol@bad.test", 1)
        assert b"Subject: bad-optional" in optional
        yield until(lambda: len(world["plain"].messages) == 1)
        assert b"Subject: plain-optional" in world["plain"].messages[0]
        said = [line for line in events if line.startswith("TLS-Required: No")]
        assert any("<p@plain.test>" in line and "in clear" in line
                   and "tls = encrypt" in line for line in said), said
        assert any("<carol@bad.test>" in line and "certificate unverified" in line
                   and "MTA-STS (enforce)" in line for line in said), said
    finally:
        globalLogPublisher.removeObserver(observe)
        if sender is not None:
            yield sender.stop()
        if receiver is not None:
            yield receiver.stop()
        postfix.stop()


# -- the MTA-STS cache across restarts ---------------------------------------------------

class OneTXT:
    def txt(self, name: str) -> Any:
        return defer.succeed(["v=STSv1; id=one"])


@pytest_twisted.inlineCallbacks
def test_policies_are_stored_and_read_back(stack: Any) -> Any:
    store = SQLMTASTSPolicyStore(stack.db)
    now = [1000.0]

    def up(url: str) -> Any:
        return defer.succeed(b"version: STSv1\nmode: enforce\nmx: mx.sts.test\n"
                             b"mx: *.backup.sts.test\nmax_age: 600\n")

    def down(url: str) -> Any:
        return defer.fail(ConnectionRefusedError())
    first = MTASTS(OneTXT(), up, clock=lambda: now[0], store=store)  # type: ignore[arg-type]
    policy = yield defer.ensureDeferred(first.policy("STS.test"))
    assert policy.mode == "enforce"
    yield store.save(MTASTSPolicyRecord("other.test", "x", "testing", ("a",), 10, 0.0))
    # A new process: nothing in memory, the policy server down; the id unchanged.
    now[0] += 300
    second = MTASTS(OneTXT(), down, clock=lambda: now[0], store=store)  # type: ignore[arg-type]
    again = yield defer.ensureDeferred(second.policy("sts.test"))
    assert again == policy and again.mx == ("mx.sts.test", "*.backup.sts.test")
    assert "other.test" not in second.cache                  # expired when read
    # Past max_age it is gone, from the store too.
    now[0] += 301
    assert (yield defer.ensureDeferred(second.policy("sts.test"))) is None
    assert (yield store.load(0.0)) == [
        MTASTSPolicyRecord("other.test", "x", "testing", ("a",), 10, 0.0)]


@pytest_twisted.inlineCallbacks
def test_a_restarted_server_honours_its_cached_enforce_policy(
        tmp_path: Path, world: dict[str, Any]) -> Any:
    receiver = sender = None
    state_dir = tmp_path / "sender"
    try:
        receiver = yield start_receiver(world)
        sender = yield start_sender(state_dir, world)
        yield in_thread(submit, sender.ports["submissions"], "carol@rt.test", "before")
        yield receiver.delivered("carol@rt.test", 1)
        yield sender.stop()
        sender = None
        # The policy server goes away, and rt.test's MX now points at a host
        # without STARTTLS that the policy does not name.
        yield world["https"].stopListening()
        world["dns"].set("rt.test.", "MX", [(10, "mx.plain.test.")])
        sender = yield start_sender(state_dir, world, populate=False)
        port = sender.ports["submissions"]
        yield in_thread(submit, port, "carol@rt.test", "after")
        # A domain whose policy was never fetched goes opportunistically ...
        yield in_thread(submit, port, "f@fresh.test", "fresh")
        yield until(lambda: any(b"Subject: fresh" in m for m in world["plain"].messages))
        # ... the one cached before the restart waits.
        state = yield until(lambda: queue_state(sender).addCallback(
            lambda rows: rows if rows.get("carol@rt.test", ("",))[0] == "deferred"
            else None))
        assert "names none of its MX hosts" in state["carol@rt.test"][1]
        assert not any(b"Subject: after" in m for m in world["plain"].messages)
    finally:
        if sender is not None:
            yield sender.stop()
        if receiver is not None:
            yield receiver.stop()


# -- REQUIRETLS with DNSSEC and DANE (RFC 8689 §4.2.1, RFC 7672) ------------------------

class Outcomes:
    """TLS-RPT's outcomes, kept in a list (the SQL store is tested in test_tlsrpt)."""

    def __init__(self) -> None:
        self.results: list[Any] = []

    def record(self, result: Any) -> None:
        self.results.append(result)

    def of(self, domain: str) -> list[tuple[str, str]]:
        return [(r.policy.type, r.result_type) for r in self.results
                if r.policy_domain == domain]


@pytest_twisted.inlineCallbacks
def test_requiretls_to_a_dnssec_mx_whose_certificate_matches_its_tlsa(
        tmp_path: Path) -> Any:
    """No MTA-STS anywhere: the MX answers are DNSSEC-validated (the test DNS server
    sets AD as a validating resolver would), which vouches for the MX host, and the
    receiving LightMail's certificate, from a CA the sender does not trust, matches
    its host's DANE-EE TLSA record: the REQUIRETLS message is delivered with
    REQUIRETLS.  A host whose TLSA record does not match refuses it: 5.7.10, bounced
    at once.  An MX answer without AD vouches for nothing: 5.7.30."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    ca = TestCA(Path(tempfile.mkdtemp(prefix="lightmail-dane-ca-")))
    port = free_port()
    receiver_dir = tmp_path / "receiver"
    receiver_dir.mkdir()
    cert, key = ca.issue("mx.dane.test")
    shutil.copy(cert, receiver_dir / "cert.pem")
    shutil.copy(key, receiver_dir / "key.pem")
    spki = x509.load_pem_x509_certificate(cert.read_bytes()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    dns = DNSServer({
        "dane.test.": {"MX": [(10, "mx.dane.test.")]},
        "mx.dane.test.": {"A": ["127.0.0.2"]},
        f"_{port}._tcp.mx.dane.test.": {"TLSA": [
            f"3 1 1 {hashlib.sha256(spki).hexdigest()}"]},
        "wrong.test.": {"MX": [(10, "mx.wrong.test.")]},
        "mx.wrong.test.": {"A": ["127.0.0.2"]},                 # the same server
        f"_{port}._tcp.mx.wrong.test.": {"TLSA": [f"3 1 1 {'00' * 32}"]},
        "unsigned.test.": {"MX": [(10, "mx.dane.test.")]},
    }, ttl=1, authenticated=True)
    dns.insecure("unsigned.test.")
    dns.start()
    outcomes = Outcomes()
    receiver = sender = None
    try:
        receiver = yield start(receiver_dir, (
            f"[listener:mx2]\nprotocol = smtp\nendpoint = tcp:{port}:interface=127.0.0.2\n"
            f"tls = starttls\ntls_cert = {receiver_dir / 'cert.pem'}\n"
            f"tls_key = {receiver_dir / 'key.pem'}\n"
            f"[transcript]\nlisteners = mx2\ndirectory = {receiver_dir / 'transcripts'}\n"))
        for domain in ("dane.test", "wrong.test", "unsigned.test"):
            yield receiver.parts.directory.add_domain(domain)
            yield receiver.parts.directory.add_user(f"carol@{domain}", "carol-secret")
        # No ca_file: the system's roots do not know the test CA, only DANE vouches.
        sender = yield start(tmp_path / "sender", (
            f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\nport = {port}\n"
            "min_backoff = 1h\nsession_idle = 0\n"))
        sender.parts.queue_runner.poll_interval = 0.5
        sender.parts.queue_runner.agents["smtp"].tls_reports = outcomes
        submissions = sender.ports["submissions"]
        for rcpt in ("carol@dane.test", "carol@wrong.test", "carol@unsigned.test"):
            yield in_thread(submit, submissions, rcpt, f"to {rcpt}", True)

        [got] = yield receiver.delivered("carol@dane.test", 1)
        assert b"Subject: to carol@dane.test" in got
        transcripts = "".join(path.read_text() for path in
                              (receiver_dir / "transcripts").iterdir())
        assert "MAIL FROM:<bob@example.test>" in transcripts
        assert " REQUIRETLS" in transcripts
        found = yield until(lambda: notices(sender, 2), timeout=60)
        by_rcpt = {rcpt: notice for notice in found
                   for rcpt in ("carol@wrong.test", "carol@unsigned.test")
                   if f"Subject: to {rcpt}".encode() in notice}
        assert sorted(by_rcpt) == ["carol@unsigned.test", "carol@wrong.test"], found
        wrong = by_rcpt["carol@wrong.test"].replace(b"\r\n ", b" ")
        assert b"Status: 5.7.10" in wrong
        assert b"does not verify (DANE:" in wrong, wrong
        assert b"Status: 5.7.30" in by_rcpt["carol@unsigned.test"]
        assert b"vouched" in by_rcpt["carol@unsigned.test"]
        assert not (yield receiver.inbox("carol@wrong.test"))
        assert not (yield receiver.inbox("carol@unsigned.test"))
        # TLS-RPT: both sessions held to the TLSA records; the mismatch a failure.
        assert outcomes.of("dane.test") == [("tlsa", "success")]
        assert outcomes.of("wrong.test") == [("tlsa", "validation-failure")]
        assert outcomes.of("unsigned.test") == []           # no session was tried
    finally:
        if sender is not None:
            yield sender.stop()
        if receiver is not None:
            yield receiver.stop()
        dns.stop()
        shutil.rmtree(ca.directory, ignore_errors=True)
