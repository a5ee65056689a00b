"""The inbound policy chain (lightmail/policy/inbound): DKIM verification through the
asynchronous resolver (lightmail/policy/dkimverify.py), and SPF, DKIM and the
Authentication-Results field on a running LightMail, its DNS the test DNS server.

Messages are signed by dkimpy (through LightMail's signer) here; those signed by
OpenDKIM are in test_dkim_opendkim_signed below."""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path
from typing import Any

import authres
import dkim
import pytest
import pytest_twisted
from dnsserver import DNSServer
from inprocess import in_thread, start
from test_dkim import MESSAGE, make_key, opendkim_testmsg
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from lightmail.dns import Resolver
from lightmail.policy.dkim import Signer, SigningKey, dns_record, generate_key, signing_key
from lightmail.policy.dkimverify import DKIMVerifier
from lightmail.policy.inbound import InboundCheck
from lightmail.policy.inbound.chain import with_authentication_results, without_our_fields
from lightmail.policy.inbound.edits import apply_edits, has_fields
from lightmail.policy.inbound.findings import HeaderEdit


def publish(dns: DNSServer, *keys: SigningKey) -> None:
    for key in keys:
        dns.set(f"{key.selector}._domainkey.{key.domain}.", "TXT", [dns_record(key)])


def signed(message: bytes, *keys: SigningKey) -> bytes:
    return Signer(keys).sign(message, list(keys)) + message


def verify(dns: DNSServer, message: bytes, **options: Any) -> Any:
    resolver = Resolver(f"127.0.0.1:{dns.port}", timeout=2)
    header_end = message.index(b"\r\n\r\n") + 2
    return DKIMVerifier(resolver).verify(message, message[:header_end], **options)


# --- DKIM verification ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_good_signatures_pass_with_their_tags(dns: DNSServer, algorithm: str) -> None:
    key = make_key("example.org", "sel1", algorithm)
    publish(dns, key)
    [result] = await verify(dns, signed(MESSAGE, key))
    assert (result.result, result.domain, result.selector) == ("pass", "example.org", "sel1")
    assert result.algorithm == ("ed25519-sha256" if algorithm == "ed25519" else "rsa-sha256")
    assert len(result.b_prefix) == 8


@pytest_twisted.ensureDeferred
async def test_every_signature_gets_its_own_result(dns: DNSServer) -> None:
    good = make_key("example.org", "good")
    unpublished = make_key("example.org", "gone", "ed25519")
    publish(dns, good)
    dns.fail("broken._domainkey.example.org.")
    dns.drop("silent._domainkey.example.org.")         # the query times out (2 s)
    broken = make_key("example.org", "broken")
    silent = make_key("example.org", "silent")
    message = signed(MESSAGE, good, unpublished, broken, silent)
    results = await verify(dns, message)
    assert [(r.selector, r.result) for r in results] == [
        ("good", "pass"), ("gone", "permerror"), ("broken", "temperror"),
        ("silent", "temperror")]
    assert "no key" in results[1].reason


@pytest_twisted.ensureDeferred
async def test_a_changed_body_or_header_fails(dns: DNSServer) -> None:
    key = make_key("example.org", "sel")
    publish(dns, key)
    message = signed(MESSAGE, key)
    [body] = await verify(dns, message.replace(b"spaced", b"SPACED"))
    assert body.result == "fail" and "body hash" in body.reason
    [header] = await verify(dns, message.replace(b"Subject: DKIM test", b"Subject: other"))
    assert header.result == "fail"


@pytest_twisted.ensureDeferred
async def test_limits_on_signatures_and_key_sizes(dns: DNSServer) -> None:
    keys = [make_key("example.org", f"s{n}", "ed25519") for n in range(4)]
    publish(dns, *keys)
    results = await verify(dns, signed(MESSAGE, *keys), max_signatures=2)
    assert [r.result for r in results] == ["pass", "pass", "policy", "policy"]
    short = make_key("example.org", "short", bits=1024)
    publish(dns, short)
    [result] = await verify(dns, signed(MESSAGE, short), min_rsa_bits=2048)
    assert result.result == "policy" and "1024-bit" in result.reason


@pytest_twisted.ensureDeferred
async def test_signatures_over_fields_the_message_lacks_still_verify(dns: DNSServer) -> None:
    """h= may name fields the message does not have (they sign their absence)."""
    pem, private = generate_key("rsa", 2048)
    publish(dns, signing_key("example.org", "sel", private))
    header = dkim.sign(MESSAGE, b"sel", b"example.org", pem,
                       include_headers=[b"from", b"subject", b"x-not-there"])
    assert b"x-not-there" in header
    [result] = await verify(dns, header + MESSAGE)
    assert result.result == "pass"
    [added] = await verify(dns, header + b"X-Not-There: now it is\r\n" + MESSAGE)
    assert added.result == "fail"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("field", [
    b"DKIM-Signature: v=1; a=rsa-sha256; b=\r\n",                     # no d=, no s=
    b"DKIM-Signature: garbage without tags\r\n",
    b"DKIM-Signature: v=1; d=example.org; d=example.org; s=x; b=; bh=\r\n",   # d twice
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=nokey; h=from; bh=AA==; b=AA==\r\n",
    b"DKIM-Signature: v=1; a=rot13; d=example.org; s=sel; h=from; bh=AA==; b=AA==\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=from; bh=!!; b=!!\r\n",
])
async def test_malformed_signatures_get_a_result_not_a_crash(dns: DNSServer,
                                                              field: bytes) -> None:
    publish(dns, make_key("example.org", "sel"))
    [result] = await verify(dns, field + MESSAGE)
    assert result.result in ("neutral", "permerror", "fail")


@pytest_twisted.ensureDeferred
async def test_a_giant_or_broken_key_record_is_a_permerror(dns: DNSServer) -> None:
    dns.set("giant._domainkey.example.org.", "TXT", ["v=DKIM1; p=" + "A" * 6000])
    dns.set("junk._domainkey.example.org.", "TXT", ["v=DKIM1; k=rsa; p=%%%"])
    field = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=%s; h=from; "
             b"bh=AA==; b=AA==\r\n")
    message = field % b"giant" + field % b"junk" + MESSAGE
    results = await verify(dns, message)
    assert [r.result for r in results] == ["permerror", "permerror"]


# --- Authentication-Results -----------------------------------------------------------

def test_our_authserv_id_from_outside_is_removed_others_kept() -> None:
    message = (b"Received: from x by mx.example.test; today\r\n"
               b"Authentication-Results: MX.example.test; dkim=pass header.d=bank.test\r\n"
               b"Authentication-Results: (forged) mx.example.test;\r\n\tspf=pass\r\n"
               b"Authentication-Results: other.example; spf=fail\r\n"
               b"Subject: hi\r\n\r\n"
               b"Authentication-Results: mx.example.test; in the body, kept\r\n")
    kept = without_our_fields(message, "mx.example.test")
    assert kept == (b"Received: from x by mx.example.test; today\r\n"
                    b"Authentication-Results: other.example; spf=fail\r\n"
                    b"Subject: hi\r\n\r\n"
                    b"Authentication-Results: mx.example.test; in the body, kept\r\n")
    written = with_authentication_results(message, "mx.example.test", [])
    assert written.startswith(b"Received: from x by mx.example.test; today\r\n"
                              b"Authentication-Results: mx.example.test;\r\n\tnone\r\n")
    assert written.count(b"Authentication-Results: mx.example.test;") == 2  # ours, the body's


def test_verdict_fields_from_outside_go_a_milters_stay() -> None:
    """apply_edits(remove=...): the named fields the message came with go, folds and
    any case of the name included; a field an edit added or changed stays (a milter
    is one of our checks), and so do fields of other names."""
    message = (b"Received: by us\r\nX-Spam-Flag: NO\r\nx-spam-status: No, score=-9\r\n"
               b"\trequired=5\r\nX-Spam-Level: \r\nX-Spam-Score: -9\r\nSubject: hi\r\n"
               b"\r\nX-Spam-Flag: NO (in the body: kept)\r\n")
    ours = frozenset({b"x-spam-flag", b"x-spam-status", b"x-spam-score"})
    assert has_fields(message.split(b"\r\n\r\n")[0] + b"\r\n", ours)
    assert not has_fields(b"Subject: hi\r\nX-Spam-Level: ***\r\n", ours)
    assert not has_fields(message, frozenset())
    edits = [HeaderEdit("append", "X-Spam-Flag", b" YES"),
             HeaderEdit("change", "X-Spam-Score", b" 7.5", 1)]
    assert apply_edits(message, edits, remove=ours) == (
        b"Received: by us\r\nX-Spam-Level: \r\nX-Spam-Score: 7.5\r\nSubject: hi\r\n"
        b"X-Spam-Flag: YES\r\n\r\nX-Spam-Flag: NO (in the body: kept)\r\n")
    assert apply_edits(message, [], remove=ours) == (
        b"Received: by us\r\nX-Spam-Level: \r\nSubject: hi\r\n"
        b"\r\nX-Spam-Flag: NO (in the body: kept)\r\n")
    clean = b"Subject: hi\r\n\r\nbody\r\n"
    assert apply_edits(clean, [], remove=ours) is clean


# --- on a running LightMail -----------------------------------------------------------------

BODY = (b"From: Ann <ann@sender.example>\r\nTo: bob@example.test\r\n"
        b"Subject: policy\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        b"Message-ID: <p1@sender.example>\r\n\r\nHello.\r\n")


def server_for(tmp_path: Path, dns: DNSServer, extra: str = "") -> Any:
    return start(tmp_path, extra=f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n"
                 "[spf]\ntime_limit = 5s\n" + extra)


def send(port: int, sender: str, message: bytes, helo: str = "client.sender.example") -> Any:
    def go() -> Any:
        with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=30) as smtp:
            try:
                return smtp.sendmail(sender, ["bob@example.test"], message)
            except smtplib.SMTPResponseException as exc:
                return exc.smtp_code, exc.smtp_error.decode()
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients["bob@example.test"]
                return code, text.decode()
            except smtplib.SMTPSenderRefused as exc:
                return exc.smtp_code, exc.smtp_error.decode()
    return in_thread(go)


def results_of(message: bytes) -> authres.AuthenticationResultsHeader:
    """Our Authentication-Results field, parsed back by authres."""
    header = message.split(b"\r\n\r\n", 1)[0].decode()
    fields = [f for f in header.replace("\r\n\t", " ").split("\r\n")
              if f.lower().startswith("authentication-results: mx.example.test")]
    assert len(fields) == 1, header
    return authres.AuthenticationResultsHeader.parse(fields[0])


@pytest_twisted.inlineCallbacks
def test_spf_and_dkim_results_are_written_and_forgeries_removed(tmp_path: Path,
                                                                  dns: DNSServer) -> Any:
    key = make_key("sender.example", "mail", "ed25519")
    publish(dns, key)
    dns.set("sender.example.", "TXT", ["v=spf1 ip4:127.0.0.0/8 -all"])
    dns.set("client.sender.example.", "TXT", ["v=spf1 a -all"])
    dns.set("client.sender.example.", "A", ["127.0.0.1"])
    forged = b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test\r\n"
    server = yield server_for(tmp_path, dns)
    try:
        assert (yield send(server.ports["mx"], "ann@sender.example",
                           forged + signed(BODY, key))) == {}
        [message] = yield server.delivered("bob@example.test", 1)
        assert b"bank.test" not in message
        assert message.startswith(b"Received: ")
        parsed = results_of(message)
        found = {(r.method, r.result) for r in parsed.results}
        assert found == {("spf", "pass"), ("dkim", "pass"), ("arc", "none"),
                         ("dmarc", "none")}, str(parsed)
        spf = [r for r in parsed.results if r.method == "spf"]
        assert {p.name: p.value for r in spf for p in r.properties} == {
            "helo": "client.sender.example", "mailfrom": "ann@sender.example"}
        [dkim_result] = [r for r in parsed.results if r.method == "dkim"]
        assert {p.name: p.value for p in dkim_result.properties}["d"] == "sender.example"
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_spf_fail_temperror_and_permerror_answers(tmp_path: Path, dns: DNSServer) -> Any:
    dns.set("forbidden.example.", "TXT", ["v=spf1 -all exp=why.forbidden.example"])
    dns.set("why.forbidden.example.", "TXT", ["%{i} may not send for %{d}"])
    dns.fail("flaky.example.")
    dns.set("loop.example.", "TXT", ["v=spf1 include:loop.example -all"])
    server = yield server_for(tmp_path, dns)
    try:
        port = server.ports["mx"]
        code, text = yield send(port, "x@forbidden.example", BODY)
        assert (code, text.split()[0]) == (550, "5.7.23")
        assert "127.0.0.1 may not send for forbidden.example" in text
        code, text = yield send(port, "x@flaky.example", BODY)
        assert (code, text.split()[0]) == (451, "4.7.24")
        assert (yield send(port, "x@loop.example", BODY)) == {}
        [message] = yield server.delivered("bob@example.test", 1)
        results = {r.method: r.result for r in results_of(message).results
                   if not any(p.name == "helo" for p in r.properties)}
        assert results == {"spf": "permerror", "dkim": "none", "arc": "none",
                           "dmarc": "none"}
        # Submission (authenticated) is not checked, nor written up.
        def submit() -> Any:
            with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as smtp:
                smtp.starttls(context=_unverified())
                smtp.login("bob@example.test", "bob-secret")
                return smtp.sendmail("bob@example.test", ["bob@example.test"], BODY)
        assert (yield in_thread(submit)) == {}
        messages = yield server.delivered("bob@example.test", 2)
        assert b"Authentication-Results" not in messages[1]
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_listener_checks_and_actions_follow_the_config(tmp_path: Path,
                                                       dns: DNSServer) -> Any:
    """A listener with checks = none checks nothing and writes nothing."""
    dns.set("forbidden.example.", "TXT", ["v=spf1 -all"])
    server = yield server_for(
        tmp_path, dns, "[listener:plain]\nprotocol = smtp\n"
        "endpoint = tcp:0:interface=127.0.0.1\nchecks = none\n")
    try:
        code, _ = yield send(server.ports["mx"], "x@forbidden.example", BODY)
        assert code == 550
        assert (yield send(server.ports["plain"], "x@forbidden.example", BODY)) == {}
        [message] = yield server.delivered("bob@example.test", 1)
        assert b"Authentication-Results" not in message
    finally:
        yield server.stop()


FORGED = (b"X-Spam-Flag: NO\r\nx-spam-score: -20\r\nX-Spam-Status: No, score=-20\r\n"
          b"\trequired=5 scanner=rspamd\r\nX-Spam-Symbols: ALL_CLEAN\r\n"
          b"X-Spam-Level: \r\nX-Virus-Status: Clean\r\n"
          b"X-DNSBL: score=0 threshold=1\r\n")


@pytest_twisted.inlineCallbacks
def test_fields_claiming_our_verdicts_are_removed_where_their_check_runs(
        tmp_path: Path, dns: DNSServer) -> Any:
    """A sender's own X-Spam-*, X-Virus-Status and X-DNSBL fields: a listener whose
    checks write them keeps only its own (X-Spam-Status alone here: the message is
    over max_size, so the other three are not written, and go all the same); fields
    of checks a listener does not run, and of names no check writes, are left."""
    events: list[dict[str, Any]] = []
    server = yield server_for(
        tmp_path, dns, "[spam]\nmax_size = 1\n"
        "[listener:scored]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "checks = spam\n")
    globalLogPublisher.addObserver(events.append)
    try:
        forged = FORGED + BODY
        assert (yield send(server.ports["scored"], "ann@sender.example", forged)) == {}
        [scored] = yield server.delivered("bob@example.test", 1)
        head = scored.split(b"\r\n\r\n", 1)[0].lower()
        assert head.count(b"x-spam-status:") == 1
        assert b"\r\nx-spam-status: unscanned (too large)\r\n" in head
        for gone in (b"x-spam-flag", b"x-spam-score", b"x-spam-symbols", b"scanner=rspamd"):
            assert gone not in head, gone
        for kept in (b"x-spam-level: \r\n", b"x-virus-status: clean\r\n",
                     b"x-dnsbl: score=0 threshold=1\r\n"):
            assert kept in head, kept
        assert scored.endswith(b"\r\n\r\nHello.\r\n")
        [said] = [e for e in events if "claim our verdicts" in e.get("log_format", "")]
        assert said["fields"] == "x-spam-flag, x-spam-score, x-spam-status, x-spam-symbols"
        assert said["msg_id"] and said["conn_id"]
        # The MX (dnsbl among its default checks, no scanner): X-DNSBL goes, though no
        # zone is configured; the scanners' fields stay.
        assert (yield send(server.ports["mx"], "ann@sender.example", forged)) == {}
        messages = yield server.delivered("bob@example.test", 2)
        head = messages[1].split(b"\r\n\r\n", 1)[0]
        assert b"X-DNSBL" not in head
        assert FORGED.replace(b"X-DNSBL: score=0 threshold=1\r\n", b"") in head
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield server.stop()


def _unverified() -> Any:
    import ssl
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest_twisted.inlineCallbacks
def test_spf_tag_action_records_the_fail(tmp_path: Path, dns: DNSServer) -> Any:
    dns.set("forbidden.example.", "TXT", ["v=spf1 -all"])
    server = yield start(tmp_path, extra=f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n"
                         "[spf]\nfail_action = tag\ncheck_helo = no\n")
    try:
        assert (yield send(server.ports["mx"], "x@forbidden.example", BODY)) == {}
        [message] = yield server.delivered("bob@example.test", 1)
        parsed = results_of(message)
        assert [(r.method, r.result) for r in parsed.results] == [
            ("spf", "fail"), ("dkim", "none"), ("arc", "none"), ("dmarc", "none")]
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_a_message_too_big_for_memory_buffers_is_checked_from_its_file(
        tmp_path: Path, dns: DNSServer) -> Any:
    """A message larger than the blob writer keeps in memory is read back from its
    temporary file for the checks, and the rewritten one is what is delivered."""
    key = make_key("sender.example", "mail")
    publish(dns, key)
    big = BODY + (b"x" * 998 + b"\r\n") * 3000          # 3 MB
    server = yield server_for(tmp_path, dns)
    try:
        assert (yield send(server.ports["mx"], "ann@sender.example", signed(big, key))) == {}
        [message] = yield server.delivered("bob@example.test", 1)
        assert message.endswith(b"x" * 998 + b"\r\n")
        assert ("dkim", "pass") in {(r.method, r.result) for r in results_of(message).results}
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_a_message_signed_by_opendkim_passes(tmp_path: Path, dns: DNSServer) -> Any:
    """OpenDKIM (opendkim-testmsg, Debian's opendkim-tools) signs, with rsa-sha1 (which
    opendkim-testmsg cannot change); LightMail verifies on arrival when told to accept
    rsa-sha1 (``[dkim] verify_rsa_sha1``), and the body changed on the way fails.
    Without it the signature is refused as 'policy' (RFC 8301 §3.1)."""
    tool = opendkim_testmsg()
    keyfile = tmp_path / "opendkim.pem"
    pem, private = generate_key("rsa", 2048)
    keyfile.write_bytes(pem)
    publish(dns, signing_key("sender.example", "odkim", private))

    def opendkim_signed(message: bytes) -> bytes:
        done = subprocess.run([tool, "-C", "-d", "sender.example", "-k", str(keyfile),
                               "-s", "odkim"], input=message, capture_output=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert done.stdout.startswith(b"DKIM-Signature:"), done.stdout[:200]
        return done.stdout
    good = opendkim_signed(BODY)
    assert b"a=rsa-sha1;" in good
    server = yield server_for(tmp_path, dns, "[dkim]\nverify_rsa_sha1 = yes\n")
    try:
        assert (yield send(server.ports["mx"], "ann@sender.example", good)) == {}
        assert (yield send(server.ports["mx"], "ann@sender.example",
                           good.replace(b"Hello.", b"Goodbye."))) == {}
        messages = yield server.delivered("bob@example.test", 2)
        verdicts = [{(r.method, r.result) for r in results_of(m).results} for m in messages]
        assert ("dkim", "pass") in verdicts[0] and ("dkim", "fail") in verdicts[1]
    finally:
        yield server.stop()
    refused = verify(dns, good)
    [result] = yield refused
    assert (result.result, result.reason) == (
        "policy", "rsa-sha1 signatures are not accepted (RFC 8301)")


class Quarantining(InboundCheck):
    """Files what says "quarantine me" into Junk (as DMARC, a scanner or a milter
    asks)."""

    name = "quarantining"

    def content(self, session: Any, tx: Any, message: Any, findings: Any) -> Any:
        if b"quarantine me" in message.headers:
            findings.quarantine("Junk", "the test said so")
        return defer.succeed(None)


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("direct", ["yes", "no"])
def test_a_quarantined_message_is_filed_in_a_junk_made_for_it(tmp_path: Path,
                                                              dns: DNSServer,
                                                              direct: str) -> Any:
    """Filed at acceptance or through the queue: the folder travels with the
    envelope, and a user without Junk gets one (\\Junk)."""
    server = yield server_for(tmp_path, dns, f"[smtp]\ndirect_delivery = {direct}\n")
    try:
        handler = server.root.getServiceNamed("listener:mx").factory.handler
        handler.policy.checks += (Quarantining(),)
        port = server.ports["mx"]
        assert (yield send(port, "ann@sender.example",
                           BODY.replace(b"Subject: policy", b"Subject: quarantine me"))) == {}
        assert (yield send(port, "ann@sender.example", BODY)) == {}
        [junk] = yield server.delivered("bob@example.test", 1, mailbox="Junk")
        assert b"quarantine me" in junk
        [inbox] = yield server.delivered("bob@example.test", 1)
        assert b"quarantine me" not in inbox
        bob = yield server.parts.directory.get_user("bob@example.test")
        box = yield server.parts.mailstore.get_mailbox(bob.id, "Junk")
        assert box.special_use == "\\Junk"
    finally:
        yield server.stop()


# --- DMARC on a running LightMail -------------------------------------------------------

def dmarc_zone(dns: DNSServer, policy: str, domain: str = "sender.example") -> None:
    """``domain``: SPF neutral for everyone (so SPF refuses nothing at MAIL FROM and
    aligns with nothing), and the DMARC record ``policy``.  (Each policy its own
    domain: the server's resolver caches what it was told.)"""
    dns.set(f"{domain}.", "TXT", ["v=spf1 ?all"])
    dns.set(f"_dmarc.{domain}.", "TXT", [policy])


def from_(domain: str, subject: str = "policy") -> bytes:
    return BODY.replace(b"sender.example", domain.encode()).replace(
        b"Subject: policy", f"Subject: {subject}".encode())


@pytest_twisted.inlineCallbacks
def test_dmarc_rejects_quarantines_tags_and_defers(tmp_path: Path, dns: DNSServer) -> Any:
    key = make_key("sender.example", "mail")
    publish(dns, key)
    dmarc_zone(dns, "v=DMARC1; p=reject")
    dmarc_zone(dns, "v=DMARC1; p=quarantine", "junk.example")
    dmarc_zone(dns, "v=DMARC1; p=none", "lax.example")
    dns.set("flaky.example.", "TXT", ["v=spf1 ?all"])
    dns.fail("_dmarc.flaky.example.")
    server = yield server_for(tmp_path, dns)
    try:
        port = server.ports["mx"]
        code, text = yield send(port, "ann@sender.example", BODY)
        assert (code, text.split()[0]) == (550, "5.7.1") and "DMARC" in text
        # An aligned DKIM signature passes.
        assert (yield send(port, "ann@sender.example", signed(BODY, key))) == {}
        [passed] = yield server.delivered("bob@example.test", 1)
        assert ("dmarc", "pass") in {(r.method, r.result) for r in results_of(passed).results}
        assert (yield send(port, "ann@junk.example", from_("junk.example", "to junk"))) == {}
        [junk] = yield server.delivered("bob@example.test", 1, mailbox="Junk")
        assert ("dmarc", "fail") in {(r.method, r.result) for r in results_of(junk).results}
        assert b"to junk" in junk
        assert (yield send(port, "ann@lax.example", from_("lax.example", "lax"))) == {}
        messages = yield server.delivered("bob@example.test", 2)
        assert ("dmarc", "fail") in {(r.method, r.result)
                                     for r in results_of(messages[1]).results}
        code, text = yield send(port, "ann@flaky.example", from_("flaky.example"))
        assert (code, text.split()[0]) == (451, "4.7.1")
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_dmarc_tag_only_and_the_aggregate_report_of_what_came(tmp_path: Path,
                                                               dns: DNSServer) -> Any:
    """[dmarc] enforce = tag lets a failing message in, marked; its verdict goes into
    the daily report, which reaches the rua address (a local mailbox here, allowed
    by the report domain's record, RFC 7489 §7.1) with our client's address in it."""
    dmarc_zone(dns, "v=DMARC1; p=reject; rua=mailto:bob@example.test")
    dns.set("sender.example._report._dmarc.example.test.", "TXT", ["v=DMARC1"])
    server = yield server_for(tmp_path, dns, "[dmarc]\nenforce = tag\nreports = yes\n")
    try:
        assert (yield send(server.ports["mx"], "ann@sender.example", BODY)) == {}
        [tagged] = yield server.delivered("bob@example.test", 1)
        [dmarc_result] = [r for r in results_of(tagged).results if r.method == "dmarc"]
        assert dmarc_result.result == "fail"
        assert {p.name: p.value for p in dmarc_result.properties} == {
            "from": "sender.example"}
        yield server.parts.dmarc_reports.send_reports()
        messages = yield server.delivered("bob@example.test", 2)
        report = messages[1]
        assert b"Report Domain: sender.example" in report or b"sender.example" in report
        import email
        import gzip
        import xml.etree.ElementTree as ET
        parsed = email.message_from_bytes(report)
        [part] = [p for p in parsed.walk() if p.get_filename()]
        root = ET.fromstring(gzip.decompress(part.get_payload(decode=True)))
        assert root.findtext("policy_published/domain") == "sender.example"
        assert root.findtext("record/row/source_ip") == "127.0.0.1"
        assert root.findtext("record/row/policy_evaluated/disposition") == "none"
        assert root.findtext("record/identifiers/header_from") == "sender.example"
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_trusted_clients_skip_spf_and_dmarc(tmp_path: Path, dns: DNSServer) -> Any:
    """Mail from a trusted network (an internal relay) is not judged by SPF or DMARC,
    as OpenDMARC's IgnoreHosts and policyd-spf's skip_addresses leave localhost."""
    dns.set("sender.example.", "TXT", ["v=spf1 -all"])
    dns.set("_dmarc.sender.example.", "TXT", ["v=DMARC1; p=reject"])
    server = yield server_for(tmp_path, dns, "[access]\ntrusted_networks = 127.0.0.0/8\n")
    try:
        assert (yield send(server.ports["mx"], "ann@sender.example", BODY)) == {}
        [message] = yield server.delivered("bob@example.test", 1)
        methods = {r.method for r in results_of(message).results}
        assert "spf" not in methods and "dmarc" not in methods
    finally:
        yield server.stop()


@pytest_twisted.ensureDeferred
async def test_a_large_rewrite_reaches_the_writer_a_slice_a_turn() -> None:
    """The blob writer hashes on the reactor thread: a rewritten 3.5 MiB message is
    handed over in 1 MiB slices, not at once (and not before a reactor turn)."""
    from lightmail.policy.inbound.chain import REWRITE_SLICE, write_in_slices

    class Recording:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.writes.append(data)

    data = bytes(range(256)) * (14 * 1024)                  # 3.5 MiB
    writer = Recording()
    done = write_in_slices(writer, data)  # type: ignore[arg-type]
    assert len(writer.writes) < 4                           # the rest waits its turns
    await done
    assert [len(w) for w in writer.writes] == [REWRITE_SLICE] * 3 + [REWRITE_SLICE // 2]
    assert b"".join(writer.writes) == data
    small = Recording()
    await write_in_slices(small, b"short")  # type: ignore[arg-type]
    assert small.writes == [b"short"]


def test_the_chain_stops_at_the_first_refusal_and_waits_for_a_check_at_work() -> None:
    """Checks that answer at once are taken in one go; one still at work holds the
    rest back until it answers; the first Reply ends the step, and a check that
    fails fails it."""
    from types import SimpleNamespace

    from lightmail.policy.inbound.chain import InboundPolicy
    from lightmail.policy.inbound.findings import Findings
    from lightmail.smtp.codes import Reply

    asked: list[str] = []

    class Answering(InboundCheck):
        def __init__(self, name: str, answer: Any) -> None:
            self.name, self.answer = name, answer

        def rcpt(self, session: Any, tx: Any, address: str, findings: Any) -> Any:
            asked.append(self.name)
            return self.answer()

    refused = Reply(550, "5.7.1", "refused")
    at_work: defer.Deferred[Any] = defer.Deferred()
    chain = InboundPolicy([Answering("memory", lambda: defer.succeed(None)),
                           Answering("remote", lambda: at_work),
                           Answering("refusing", lambda: defer.succeed(refused)),
                           Answering("never", lambda: defer.succeed(None))],
                          None, lambda: "mx.test")  # type: ignore[arg-type]
    tx = SimpleNamespace(findings=Findings())
    answers: list[Any] = []
    chain.rcpt(None, tx, "bob@example.test").addCallback(answers.append)
    assert asked == ["memory", "remote"] and answers == []
    at_work.callback(None)
    assert asked == ["memory", "remote", "refusing"] and answers == [refused]
    asked.clear()
    passing = InboundPolicy([Answering("one", lambda: defer.succeed(None)),
                             Answering("two", lambda: defer.succeed(None))],
                            None, lambda: "mx.test")  # type: ignore[arg-type]
    passing.rcpt(None, tx, "bob@example.test").addCallback(answers.append)
    assert asked == ["one", "two"] and answers == [refused, None]
    broken = InboundPolicy([Answering("broken", lambda: defer.fail(RuntimeError("bug"))),
                            Answering("after", lambda: defer.succeed(None))],
                           None, lambda: "mx.test")  # type: ignore[arg-type]
    failures: list[Any] = []
    broken.rcpt(None, tx, "bob@example.test").addErrback(failures.append)
    assert [f.type for f in failures] == [RuntimeError] and "after" not in asked
