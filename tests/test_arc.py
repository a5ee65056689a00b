"""ARC (RFC 8617, lightmail/policy/arc): chains sealed by dkimpy, one forwarder after
another, verified by LightMail's verifier with the test DNS server; the arc check
on a running LightMail; and the ARC set LightMail adds to mail it forwards, verified
by dkimpy at the receiving server (a Postfix)."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
import pytest_twisted
from dnsserver import DNSServer
from harness import free_port
from inprocess import in_thread, start
from postfix import PostfixInstance
from test_dkim import dnsfunc, make_key, records_of
from test_inbound_policy import publish
from test_outbound import ReceivingMX, until
from twisted.internet import defer

from lightmail.config import ConfigError, parse_config
from lightmail.delivery.headers import HeaderSources, outbound_headers
from lightmail.dns import Resolver
from lightmail.policy.arc import ARCResult, ARCSealer, ARCVerifier, trusted_pass
from lightmail.policy.arc.seal import load_seal_key
from lightmail.policy.arc.verify import has_chain
from lightmail.policy.dkim import SigningKey
from lightmail.policy.inbound import Findings
from lightmail.storage.interfaces import BlobRef, Envelope, QueueItem, QueueRecipient

ORIGINAL = (b"From: Ann <ann@sender.example>\r\nTo: list@lists.example\r\n"
            b"Subject: ARC test\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            b"Message-ID: <arc-1@sender.example>\r\n\r\nHello over several hops.\r\n")


def hop(message: bytes, key: SigningKey, keys: list[SigningKey], cv: str | None = None,
        results: str = "spf=pass smtp.mailfrom=ann@sender.example") -> bytes:
    """A forwarder at ``key.domain``: its Authentication-Results (with the arc= verdict
    dkimpy itself finds on the chain so far, or ``cv``), then its ARC set on top."""
    if cv is None:
        found, _, _ = dkim.arc_verify(message, dnsfunc=dnsfunc(records_of(*keys)))
        cv = found.decode()
    authserv_id = f"mx.{key.domain}"
    field = f"Authentication-Results: {authserv_id}; {results}; arc={cv}\r\n".encode()
    forwarded = field + message
    sealed = dkim.arc_sign(forwarded, key.selector.encode(), key.domain.encode(),
                           key.private, authserv_id.encode(), linesep=b"\r\n")
    assert sealed, "dkimpy sealed nothing"
    return b"".join(sealed) + forwarded


def chain(hops: int) -> tuple[bytes, list[SigningKey]]:
    keys = [make_key(f"fwd{n}.example", "arc") for n in range(1, hops + 1)]
    message = ORIGINAL
    for n, key in enumerate(keys):
        message = hop(message, key, keys[:n])
    return message, keys


def verify(dns: DNSServer, message: bytes, **options: Any) -> Any:
    resolver = Resolver(f"127.0.0.1:{dns.port}", timeout=2)
    header_end = message.index(b"\r\n\r\n") + 2
    return ARCVerifier(resolver).verify(message, message[:header_end], **options)


# --- verification ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("hops", [1, 2, 3])
async def test_chains_sealed_by_dkimpy_pass(dns: DNSServer, hops: int) -> None:
    message, keys = chain(hops)
    publish(dns, *keys)
    result = await verify(dns, message)
    assert (result.result, result.reason, result.instances) == ("pass", "", hops)
    assert result.sealer == f"fwd{hops}.example"
    assert result.sealers == tuple(f"fwd{n}.example" for n in range(hops, 0, -1))
    assert result.oldest_pass == 0 and not result.temporary
    assert result.aar_authserv_id == f"mx.fwd{hops}.example"
    assert result.passed("spf") and not result.passed("dkim")
    assert [(r.method, r.result) for r in result.aar] == [
        ("spf", "pass"), ("arc", "none" if hops == 1 else "pass")]


@pytest_twisted.ensureDeferred
async def test_no_arc_fields_is_none(dns: DNSServer) -> None:
    result = await verify(dns, ORIGINAL)
    assert (result.result, result.instances, result.sealer) == ("none", 0, "")
    # What the check asks first, so as not to read a message without a chain.
    assert not has_chain(ORIGINAL.replace(b"Subject:", b"X-Arc-Seal: no\r\nSubject:"))
    assert has_chain(b"Subject: x\r\narc-seal: i=1\r\n")


@pytest_twisted.ensureDeferred
async def test_a_changed_body_or_signed_header_fails(dns: DNSServer) -> None:
    message, keys = chain(2)
    publish(dns, *keys)
    body = await verify(dns, message.replace(b"several hops", b"SEVERAL hops"))
    assert body.result == "fail" and "ARC-Message-Signature" in body.reason
    subject = await verify(dns, message.replace(b"Subject: ARC test", b"Subject: changed"))
    assert subject.result == "fail"
    assert body.sealer == "fwd2.example" and body.instances == 2


@pytest_twisted.ensureDeferred
async def test_a_change_between_hops_passes_with_oldest_pass(dns: DNSServer) -> None:
    """A mailing list changed the subject after the first hop sealed, then sealed
    itself: the chain passes (the newest AMS verifies), oldest-pass is 2."""
    first, second = make_key("fwd1.example", "arc"), make_key("list.example", "arc")
    publish(dns, first, second)
    message = hop(ORIGINAL, first, [])
    message = message.replace(b"Subject: ARC test", b"Subject: [list] ARC test")
    message = hop(message, second, [first], cv="pass")
    result = await verify(dns, message)
    assert (result.result, result.oldest_pass, result.instances) == ("pass", 2, 2)


@pytest_twisted.ensureDeferred
async def test_a_broken_seal_fails(dns: DNSServer) -> None:
    message, keys = chain(2)
    publish(dns, *keys)
    # The first hop's results, which both seals cover, said otherwise.
    aar = message.index(b"ARC-Authentication-Results: i=1;")
    forged = message[:aar] + message[aar:].replace(b"spf=pass", b"spf=fail", 1)
    result = await verify(dns, forged)
    assert result.result == "fail" and "ARC-Seal" in result.reason
    # A seal's own signature damaged.
    start = message.index(b"ARC-Seal: i=2")
    at = message.index(b"b=", start) + 10
    flipped = message[:at] + (b"A" if message[at:at + 1] != b"A" else b"B") + message[at + 1:]
    assert (await verify(dns, flipped)).result == "fail"


@pytest_twisted.ensureDeferred
async def test_cv_fail_chains_fail(dns: DNSServer) -> None:
    """A sealer that found the chain broken says so (cv=fail); after it, the chain
    stays failed whatever the later seals say (RFC 8617 §5.2)."""
    first, second, third = (make_key(f"fwd{n}.example", "arc") for n in (1, 2, 3))
    publish(dns, first, second, third)
    message = hop(ORIGINAL, first, [])
    failed = hop(message, second, [first], cv="fail")
    result = await verify(dns, failed)
    assert result.result == "fail" and "cv=fail" in result.reason
    assert result.sealer == "fwd2.example"
    after = hop(failed, third, [first, second], cv="fail")
    assert (await verify(dns, after)).result == "fail"


@pytest_twisted.ensureDeferred
async def test_structure_problems_fail_without_lookups(dns: DNSServer) -> None:
    message, keys = chain(2)
    publish(dns, *keys)
    start = message.index(b"ARC-Message-Signature: i=1")
    end = message.index(b"ARC-Authentication-Results: i=1")
    incomplete = message[:start] + message[end:]
    result = await verify(dns, incomplete)
    assert result.result == "fail" and "no ARC-Message-Signature" in result.reason
    twice = message[:end] + message[end:].replace(
        b"ARC-Authentication-Results: i=1;", b"ARC-Authentication-Results: i=1; x\r\n"
        b"ARC-Authentication-Results: i=1;", 1)
    assert "more than one" in (await verify(dns, twice)).reason
    no_instance = b"ARC-Seal: cv=none; a=rsa-sha256; d=x.example; s=s; b=AA==\r\n" + ORIGINAL
    assert "no valid instance" in (await verify(dns, no_instance)).reason
    wrong_cv = message.replace(b"ARC-Seal: i=2; cv=pass", b"ARC-Seal: i=2; cv=none")
    assert "cv=none, not pass" in (await verify(dns, wrong_cv)).reason
    queried = len(dns.queries)
    assert queried == 0


@pytest_twisted.ensureDeferred
async def test_more_instances_than_allowed_fail(dns: DNSServer) -> None:
    message, keys = chain(3)
    publish(dns, *keys)
    result = await verify(dns, message, max_instances=2)
    assert result.result == "fail" and "3 ARC sets, more than the 2" in result.reason
    assert result.instances == 3 and result.sealer == "fwd3.example"
    # Beyond RFC 8617's 50, an instance is not valid at all.
    beyond = message.replace(b"ARC-Seal: i=3;", b"ARC-Seal: i=51;")
    assert "no valid instance" in (await verify(dns, beyond)).reason


@pytest_twisted.ensureDeferred
async def test_a_missing_key_fails_a_dns_error_fails_as_temporary(dns: DNSServer) -> None:
    message, keys = chain(2)
    publish(dns, keys[1])                       # fwd1's key is not published
    missing = await verify(dns, message)
    assert missing.result == "fail" and not missing.temporary
    assert "no key for ARC-Seal i=1 (arc._domainkey.fwd1.example)" in missing.reason
    publish(dns, keys[0])
    dns.fail("arc._domainkey.fwd2.example.")
    flaky = await verify(dns, message)
    assert flaky.result == "fail" and flaky.temporary
    assert "temporary error" in flaky.reason and flaky.sealer == "fwd2.example"


@pytest_twisted.ensureDeferred
async def test_short_rsa_keys_and_junk_keys_fail(dns: DNSServer) -> None:
    short = make_key("fwd1.example", "arc", bits=1024)
    message = hop(ORIGINAL, short, [])
    publish(dns, short)
    assert (await verify(dns, message)).result == "pass"
    assert (await verify(dns, message, min_rsa_bits=2048)).result == "fail"
    dns.set("arc._domainkey.fwd1.example.", "TXT", ["v=DKIM1; k=rsa; p=%%%"])
    assert (await verify(dns, message)).result == "fail"


def test_trusted_pass_names_a_trusted_sealer_of_a_passing_chain() -> None:
    findings = Findings()
    assert trusted_pass(findings, ["lists.example"]) is None
    findings.arc = ARCResult("pass", sealer="lists.example", instances=1)
    assert trusted_pass(findings, ["Lists.Example."]) == "lists.example"
    assert trusted_pass(findings, ["other.example"]) is None
    assert trusted_pass(findings, []) is None
    findings.arc = ARCResult("fail", sealer="lists.example", instances=1)
    assert trusted_pass(findings, ["lists.example"]) is None


# --- on a running LightMail -------------------------------------------------------------

def server_for(tmp_path: Path, dns: DNSServer, extra: str = "") -> Any:
    return start(tmp_path, extra=f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n"
                 "[spf]\ntime_limit = 5s\n" + extra)


def send(port: int, message: bytes, rcpt: str = "bob@example.test") -> Any:
    def go() -> Any:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.sender.example",
                          timeout=30) as smtp:
            try:
                return smtp.sendmail("ann@sender.example", [rcpt], message)
            except smtplib.SMTPResponseException as exc:
                return exc.smtp_code, exc.smtp_error.decode()
    return in_thread(go)


def our_arc_entry(message: bytes) -> str:
    """The arc= entry of our Authentication-Results field, unfolded."""
    header = message.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n\t", " ")
    [field] = [f for f in header.split("\r\n")
               if f.startswith("Authentication-Results: mx.example.test;")]
    [entry] = [e.strip() for e in field.split(";") if e.strip().startswith("arc=")]
    return entry


@pytest_twisted.inlineCallbacks
def test_the_arc_check_writes_its_result(tmp_path: Path, dns: DNSServer) -> Any:
    message, keys = chain(2)
    publish(dns, *keys)
    server = yield server_for(tmp_path, dns)
    try:
        port = server.ports["mx"]
        assert (yield send(port, message)) == {}
        assert (yield send(port, message.replace(b"several", b"SEVERAL"))) == {}
        assert (yield send(port, ORIGINAL)) == {}
        first, second, third = yield server.delivered("bob@example.test", 3)
        assert our_arc_entry(first) == ("arc=pass header.oldest-pass=0 "
                                        "smtp.remote-ip=127.0.0.1")
        assert our_arc_entry(second).startswith("arc=fail reason=")
        assert our_arc_entry(third) == "arc=none smtp.remote-ip=127.0.0.1"
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_a_dns_error_defers_only_for_a_trusted_sealer(tmp_path: Path,
                                                      dns: DNSServer) -> Any:
    message, keys = chain(1)
    publish(dns, *keys)
    dns.fail("arc._domainkey.fwd1.example.")
    server = yield server_for(tmp_path, dns, "[arc]\ntrusted_sealers = fwd1.example\n")
    try:
        code, text = yield send(server.ports["mx"], message)
        assert (code, text.split()[0]) == (451, "4.4.3") and "ARC:" in text
    finally:
        yield server.stop()
    server = yield server_for(tmp_path / "tag", dns,
                              "[arc]\ntrusted_sealers = fwd1.example\n"
                              "temperror_action = tag\n")
    try:
        assert (yield send(server.ports["mx"], message)) == {}
        [delivered] = yield server.delivered("bob@example.test", 1)
        assert our_arc_entry(delivered).startswith("arc=fail reason=")
    finally:
        yield server.stop()


# --- sealing ------------------------------------------------------------------------------

class Blobs:
    def __init__(self, content: bytes) -> None:
        self.content = content

    def read(self, blob_id: str) -> Any:
        return defer.succeed(self.content)


def item(source: str, content: bytes | None = None) -> QueueItem:
    return QueueItem(1, "Q1", QueueRecipient("friend@remote.example"), "ann@sender.example",
                     BlobRef("blob", 1), 0, envelope=Envelope("ann@sender.example", (),
                                                             source=source),
                     content=content)


@pytest_twisted.ensureDeferred
async def test_the_sealer_seals_mail_from_outside_only() -> None:
    key = make_key("example.test", "arc")
    ours = b"Authentication-Results: mx.example.test;\r\n\tspf=pass;\r\n\tarc=none\r\n"
    blobs = Blobs(ours + ORIGINAL)
    sealer = ARCSealer(key, "mx.example.test", blobs)           # type: ignore[arg-type]
    assert await sealer.header_for(item("submission")) == b""
    assert await sealer.header_for(item("local")) == b""
    fields = await sealer.header_for(item("mx"))
    assert fields.startswith(b"ARC-Seal: i=1; cv=none;")
    cv, _, reason = dkim.arc_verify(fields + ours + ORIGINAL,
                                    dnsfunc=dnsfunc(records_of(key)))
    assert cv == b"pass", reason
    # Without our field (a listener without checks), nothing is sealed.
    assert await sealer.header_for(item("lmtp", ORIGINAL)) == b""
    assert sealer.sealed == 1
    # A message with a chain whose result we did not record is left as it is.
    chained, _ = chain(1)
    unchecked = b"Authentication-Results: mx.example.test; spf=pass\r\n" + chained
    assert await sealer.header_for(item("mx", unchecked)) == b""


def test_outbound_headers_stack_their_sources() -> None:
    assert outbound_headers(None, None) is None
    sealer = ARCSealer(make_key("example.test", "arc"), "x", Blobs(b""))  # type: ignore[arg-type]
    assert outbound_headers(sealer, None) is sealer
    both = outbound_headers(sealer, sealer)
    assert isinstance(both, HeaderSources) and both.sources == (sealer, sealer)


def test_seal_key_config_errors(tmp_path: Path) -> None:
    rsa = make_key("example.test", "arc", directory=tmp_path)
    ed = make_key("example.test", "ed", "ed25519", directory=tmp_path)

    def load(text: str) -> Any:
        path = tmp_path / "lm.conf"        # the errors' lines are read from the file
        path.write_text(f"[arc]\n{text}")
        return load_seal_key(parse_config(path.read_text(), str(path)))
    assert load(f"seal_keys = example.test:arc:{rsa.path}\n") is None     # seal = no
    key = load(f"seal = yes\nseal_keys = example.test:arc:{rsa.path}\n")
    assert (key.domain, key.selector, key.algorithm) == ("example.test", "arc", "rsa-sha256")
    with pytest.raises(ConfigError, match="needs the sealing key") as missing:
        load("seal = yes\n")
    assert missing.value.line == 2
    with pytest.raises(ConfigError, match="ARC seals with RSA"):
        load(f"seal = yes\nseal_keys = example.test:ed:{ed.path}\n")
    with pytest.raises(ConfigError, match="one sealing key"):
        load(f"seal = yes\nseal_keys = example.test:arc:{rsa.path}, "
             f"example.test:ed:{ed.path}\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load(f"seal = yes\nseal_keys = example.test:arc:{tmp_path / 'nope.pem'}\n")


@pytest.fixture
def remote_mx() -> Iterator[tuple[ReceivingMX, int]]:
    port = free_port()
    mx = ReceivingMX(port, ["friend@remote.example"])
    try:
        yield mx, port
    finally:
        mx.stop()


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("incoming_hops", [0, 1])
def test_forwarded_mail_arrives_sealed(tmp_path: Path, dns: DNSServer,
                                       remote_mx: tuple[ReceivingMX, int],
                                       incoming_hops: int) -> Any:
    """outside@example.test is an alias of friend@remote.example: the message leaves
    with our ARC set, which dkimpy verifies at the receiving Postfix's mailbox."""
    mx, port = remote_mx
    ours = make_key("example.test", "seal", directory=tmp_path)
    message, keys = chain(incoming_hops) if incoming_hops else (ORIGINAL, [])
    publish(dns, ours, *keys)
    server = yield server_for(
        tmp_path, dns, f"[transport:remote.example]\nrelay = [127.0.0.1]:{port}\n"
        f"[arc]\nseal = yes\nseal_keys = example.test:seal:{ours.path}\n")
    try:
        assert (yield send(server.ports["mx"], message, "outside@example.test")) == {}
        [arrived] = yield until(lambda: mx.messages("friend@remote.example"))
    finally:
        yield server.stop()
    arrived = arrived.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    cv, details, reason = dkim.arc_verify(arrived, dnsfunc=dnsfunc(records_of(ours, *keys)))
    assert cv == b"pass", (reason, arrived.decode())
    newest = details[0]
    assert newest["instance"] == incoming_hops + 1
    assert newest["as-domain"] == b"example.test" and newest["as-selector"] == b"seal"
    assert newest["cv"] == (b"pass" if incoming_hops else b"none")
    assert newest["aar-value"].startswith(f"i={incoming_hops + 1}; mx.example.test;".encode())
    assert b"arc=" in newest["aar-value"] and b"spf=" in newest["aar-value"]


# --- Postfix as a forwarding hop ------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_a_chain_survives_a_postfix_hop(tmp_path: Path, dns: DNSServer) -> Any:
    """A sealed message relayed by a Postfix (which adds its Received field) on the
    way to LightMail's MX still passes."""
    message, keys = chain(2)
    publish(dns, *keys)
    server = yield server_for(tmp_path, dns)
    postfix = None
    try:
        postfix = PostfixInstance(None, free_port(), main={
            "relayhost": f"[127.0.0.1]:{server.ports['mx']}", "myhostname": "relay.test"})
        postfix.start()
        port = postfix.port
        assert (yield send(port, message)) == {}
        [delivered] = yield server.delivered("bob@example.test", 1)
        assert b"by relay.test (Postfix)" in delivered
        assert our_arc_entry(delivered).startswith("arc=pass header.oldest-pass=0")
    finally:
        if postfix is not None:
            postfix.stop()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_a_reload_turns_sealing_on_and_off(tmp_path: Path) -> Any:
    """The outbound part (lightmail/reload/parts.py) reads the sealing key in a thread
    and gives the SMTP agent the header sources the new config asks for."""
    from lightmail.policy.dkim import DKIMSigner
    from lightmail.reload.parts import OutboundPart
    seal_key = make_key("example.test", "seal", directory=tmp_path)
    dkim_key = make_key("example.test", "dkim", directory=tmp_path)
    server = yield start(tmp_path)
    try:
        [part] = [p for p in server.root.reloader.parts if isinstance(p, OutboundPart)]
        assert part.agent.signer is None

        def reload(extra: str) -> Any:
            text = (f"[server]\nstate_dir = {tmp_path / 'state'}\n"
                    f"hostname = mx.example.test\n{extra}")
            return part.prepare(parse_config(text)).addCallback(lambda switch: switch())
        yield reload(f"[arc]\nseal = yes\nseal_keys = example.test:seal:{seal_key.path}\n")
        assert isinstance(part.agent.signer, ARCSealer)
        assert part.agent.signer.authserv_id == "mx.example.test"
        yield reload(f"[arc]\nseal = yes\nseal_keys = example.test:seal:{seal_key.path}\n"
                     f"[dkim]\nkeys = example.test:dkim:{dkim_key.path}\n")
        assert isinstance(part.agent.signer, HeaderSources)
        assert [type(s) for s in part.agent.signer.sources] == [ARCSealer, DKIMSigner]
        yield reload(f"[dkim]\nkeys = example.test:dkim:{dkim_key.path}\n")
        assert isinstance(part.agent.signer, DKIMSigner)
        with pytest.raises(ConfigError, match="needs the sealing key"):
            yield reload("[arc]\nseal = yes\n")
        assert isinstance(part.agent.signer, DKIMSigner)        # the refused one changed nothing
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_dmarc_takes_a_trusted_sealers_word_for_forwarded_mail(tmp_path: Path,
                                                               dns: DNSServer) -> Any:
    """A list forwards Ann's message: SPF and DKIM no longer align for her domain,
    whose DMARC policy says reject.  Refused, unless the list's sealer is trusted
    and its chain passes (RFC 7489 §7.2.2's trusted_forwarder)."""
    message, keys = chain(1)
    publish(dns, *keys)
    dns.set("sender.example.", "TXT", ["v=spf1 ?all"])
    dns.set("_dmarc.sender.example.", "TXT", ["v=DMARC1; p=reject"])
    refusing = tmp_path / "refusing"
    refusing.mkdir()
    server = yield server_for(refusing, dns)
    try:
        code, text = yield send(server.ports["mx"], message)
        assert code == 550 and "DMARC" in text
    finally:
        yield server.stop()
    trusting = tmp_path / "trusting"
    trusting.mkdir()
    server = yield server_for(trusting, dns, "[arc]\ntrusted_sealers = fwd1.example\n")
    try:
        assert (yield send(server.ports["mx"], message)) == {}
        [arrived] = yield server.delivered("bob@example.test", 1)
        assert b"arc=pass" in arrived and b"dmarc=" in arrived
    finally:
        yield server.stop()
