"""SRS (lightmail/policy/srs.py): the scheme, against postsrsd as an independent peer,
and forwarding end to end with Postfix as the receiving MX.

postsrsd (Debian's package, installed by scripts/test-peers.sh) runs the libsrs2 code
that Postfix sites use: with the same secret, each side must read the other's
addresses.  The end-to-end test sends a message from outside to an alias that leads to
a Postfix; Postfix sees the SRS sender, bounces a copy it cannot deliver to that SRS
address at LightMail, and LightMail relays the bounce to the original sender's MX
(the same Postfix).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import smtplib
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from dnsserver import DNSServer
from harness import free_ports
from inprocess import in_thread, start
from test_outbound import ReceivingMX, until
from twisted.internet import defer

from lightmail.config import ConfigError, SRSConfig, parse_config
from lightmail.directory.interfaces import Resolution
from lightmail.policy.srs import (
    SRS,
    SRSError,
    SRSForwarding,
    load_or_create_secrets,
    load_srs,
    read_secrets,
)
from lightmail.smtp.codes import Reply
from lightmail.storage.interfaces import BlobRef, Envelope, QueueItem, QueueRecipient

DAY = 86400
TODAY = 20794 * DAY + 3600          # a fixed day: 2026-12-07 (timestamp "J2")


def scheme(secrets: tuple[bytes, ...] = (b"tops3cr3t",), domain: str = "srs.example",
           now: float = TODAY, max_age: int = 21) -> SRS:
    return SRS(domain, list(secrets), max_age, clock=lambda: now)


# --- the scheme --------------------------------------------------------------------

def test_postsrsd_vectors() -> None:
    """Addresses postsrsd 1.10 made with secret "tops3cr3t" on day 20794 (recorded
    from `postsrsd -s FILE -d srs.example`, as the peer test below does live)."""
    srs = scheme()
    assert srs.forward("Alice.Smith@Origin.Example") == \
        "SRS0=QGCS=J2=Origin.Example=Alice.Smith@srs.example"
    assert srs.forward("SRS0=abcd=AB=orig.test=alice@hop1.test") == \
        "SRS1=jZhe=hop1.test==abcd=AB=orig.test=alice@srs.example"
    assert srs.forward("SRS1=qkOF=hop1.test==abcd=AB=orig.test=alice@hop2.test") == \
        "SRS1=jZhe=hop1.test==abcd=AB=orig.test=alice@srs.example"
    assert srs.forward("SRS0+xyzw=CD=orig.test=bob@hop1.test") == \
        "SRS1=PGCe=hop1.test=+xyzw=CD=orig.test=bob@srs.example"


def test_round_trip_keeps_the_sender_as_written() -> None:
    srs = scheme()
    for sender in ("alice@origin.example", "Alice.Smith@Origin.Example",
                   "a=b+c@sub.origin.example", "user-with-dash@x.example"):
        rewritten = srs.forward(sender)
        assert rewritten.startswith("SRS0=") and rewritten.endswith("@srs.example")
        assert srs.reverse(rewritten) == sender


def test_hash_and_timestamp_compare_without_case() -> None:
    """As libsrs2: an MTA on the way may have lower- or upper-cased the local part."""
    srs = scheme()
    rewritten = srs.forward("alice@origin.example")
    assert srs.reverse(rewritten.lower()) == "alice@origin.example"
    local, _, domain = rewritten.partition("@")
    assert srs.reverse(f"{local.upper()}@{domain}") == "ALICE@ORIGIN.EXAMPLE"


def test_expiry_after_max_age_days() -> None:
    rewritten = scheme(now=TODAY).forward("alice@origin.example")
    assert scheme(now=TODAY + 21 * DAY).reverse(rewritten) == "alice@origin.example"
    with pytest.raises(SRSError, match="expired"):
        scheme(now=TODAY + 22 * DAY).reverse(rewritten)
    with pytest.raises(SRSError, match="expired"):
        scheme(now=TODAY + 8 * DAY, max_age=7).reverse(rewritten)
    # Across the 1024-day wrap of the two-character timestamp.
    near_wrap = 1023 * DAY + 1024 * 20 * DAY
    old = scheme(now=near_wrap).forward("alice@origin.example")
    assert scheme(now=near_wrap + 3 * DAY).reverse(old) == "alice@origin.example"
    # An address "from the future" (a stamp after today) is a very old one.
    with pytest.raises(SRSError, match="expired"):
        scheme(now=TODAY - 2 * DAY).reverse(rewritten)


def test_forged_or_foreign_hash_is_refused() -> None:
    srs = scheme()
    rewritten = srs.forward("alice@origin.example")
    hashed = rewritten[5:9]
    forged = rewritten.replace(hashed, "AAAA" if hashed != "AAAA" else "BBBB", 1)
    with pytest.raises(SRSError, match="does not match"):
        srs.reverse(forged)
    # The same address, pointing elsewhere.
    with pytest.raises(SRSError, match="does not match"):
        srs.reverse(rewritten.replace("=alice@", "=mallory@"))
    with pytest.raises(SRSError, match="does not match"):
        scheme(secrets=(b"another",)).reverse(rewritten)
    for malformed in ("SRS0=abc@srs.example", "SRS0=abcd=J2=origin.example@srs.example",
                      "SRS0=abcd=J2==alice@srs.example", "SRS1=abcd=hop1.test@srs.example",
                      "SRS0=abcde=J2=origin.example=alice@srs.example",
                      "SRS0=" + hashed + "=J!=origin.example=alice@srs.example",
                      "alice@srs.example"):
        with pytest.raises(SRSError):
            srs.reverse(malformed)


def test_srs1_of_an_srs0_bounces_to_the_first_hop() -> None:
    first = scheme(secrets=(b"first-hop",), domain="hop1.example")
    second = scheme(secrets=(b"second-hop",), domain="hop2.example")
    third = scheme(secrets=(b"third-hop",), domain="hop3.example")
    srs0 = first.forward("alice@origin.example")
    srs1 = second.forward(srs0)
    assert srs1.startswith("SRS1=") and f"=hop1.example=={srs0[5:].split('@')[0]}" in srs1
    assert srs1.endswith("@hop2.example")
    # A third forwarder signs it again, still pointing at the first hop.
    srs1_again = third.forward(srs1)
    assert srs1_again.endswith("@hop3.example") and "=hop1.example==" in srs1_again
    for hop, address in ((second, srs1), (third, srs1_again)):
        assert hop.reverse(address) == srs0
    assert first.reverse(srs0) == "alice@origin.example"
    with pytest.raises(SRSError, match="does not match"):
        third.reverse(srs1)                # signed by the second hop, not this one


def test_secret_rotation_first_signs_all_verify() -> None:
    old = scheme(secrets=(b"old-secret",)).forward("alice@origin.example")
    rotated = scheme(secrets=(b"new-secret", b"old-secret"))
    assert rotated.reverse(old) == "alice@origin.example"
    new = rotated.forward("alice@origin.example")
    assert new != old
    assert scheme(secrets=(b"new-secret",)).reverse(new) == "alice@origin.example"
    with pytest.raises(SRSError):
        scheme(secrets=(b"new-secret",)).reverse(old)


def test_secret_file_is_made_0600_once_and_read_as_postsrsd_reads_it(
        tmp_path: Path) -> None:
    path = tmp_path / "state" / "srs.secret"
    first = load_or_create_secrets(path)
    assert len(first) == 1 and len(first[0]) >= 24
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secrets(path) == first             # kept across starts
    assert [p.name for p in path.parent.iterdir()] == ["srs.secret"]   # no leftovers
    path.write_bytes(b"new one\r\n\nold one\n")
    assert read_secrets(path) == [b"new one", b"old one"]
    path.write_bytes(b"\n")
    with pytest.raises(ValueError, match="no secret"):
        read_secrets(path)


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    config = parse_config(f"[server]\nstate_dir = {tmp_path}\nhostname = MX.Example.Test\n")
    assert config.srs.enabled and config.srs_domain == "mx.example.test"
    assert config.srs_secret_file == tmp_path / "srs.secret"
    srs = load_srs(config, create=True)
    assert srs is not None and srs.max_age_days == 21 and srs.domain == "mx.example.test"
    assert (tmp_path / "srs.secret").exists()
    config = parse_config(f"[server]\nstate_dir = {tmp_path}\n[srs]\ndomain = srs.example\n"
                          f"max_age = 7d\nsecret_file = {tmp_path}/none\n"
                          "exclude_domains = a.example, b.example\n")
    assert config.srs.exclude_domains == ("a.example", "b.example")
    with pytest.raises(ConfigError, match="cannot read the SRS secrets"):
        load_srs(config)
    assert load_srs(parse_config("[srs]\nenabled = no\n")) is None
    for bad in ("max_age = 2000d", "max_age = 1h", "domain = not a domain"):
        with pytest.raises(ConfigError):
            parse_config(f"[srs]\n{bad}\n")


# --- what LightMail does with it ---------------------------------------------------

class LocalDomains:
    def __init__(self, *domains: str) -> None:
        self.domains = set(domains)

    def is_local_domain(self, name: str) -> defer.Deferred[bool]:
        return defer.succeed(name.lower() in self.domains)


class Trusted:
    def __init__(self, *clients: str) -> None:
        self.clients = set(clients)

    def is_trusted(self, ip: str) -> defer.Deferred[bool]:
        return defer.succeed(ip in self.clients)


def queued(sender: str, source: str = "mx", auth_user: str | None = None,
           client: str = "203.0.113.5") -> QueueItem:
    rcpt = QueueRecipient("friend@remote.example", "smtp")
    return QueueItem(1, "Q1", rcpt, sender, BlobRef("b", 1), 0,
                     envelope=Envelope(sender, (rcpt,), source=source, auth_user=auth_user,
                                       client_address=client))


def sent_as(forwarding: SRSForwarding, item: QueueItem) -> str:
    results: list[str] = []
    forwarding.envelope_sender(item).addCallback(results.append)
    return results[0]


def test_which_senders_are_rewritten() -> None:
    srs = scheme(domain="mx.example.test")
    forwarding = SRSForwarding(srs, LocalDomains("example.test"), ["partner.example"],
                               Trusted("192.0.2.7"))
    rewritten = sent_as(forwarding, queued("alice@origin.example"))
    assert rewritten == srs.forward("alice@origin.example")
    assert sent_as(forwarding, queued("alice@origin.example", source="lmtp")) == rewritten
    for item in (queued(""),                                        # the null sender
                 queued("bob@example.test"),                        # a local domain
                 queued("bob@partner.example"),                     # exclude_domains
                 queued(rewritten),                                 # our own SRS domain
                 queued("alice@origin.example", source="submission"),
                 queued("alice@origin.example", source="local"),
                 queued("alice@origin.example", auth_user="bob@example.test"),
                 queued("alice@origin.example", client="192.0.2.7")):   # trusted relay
        assert sent_as(forwarding, item) == item.mail_from
    # A local part longer than RFC 5321's 64 octets is made, as libsrs2 makes it ...
    long_sender = "list-bounces+someone=example.org@lists.very-long-domain.example"
    rewritten = sent_as(forwarding, queued(long_sender))
    assert rewritten == srs.forward(long_sender)
    assert len(rewritten.rpartition("@")[0]) > 64 and len(rewritten) + 2 <= 256
    # ... but not a path longer than 256 octets: the sender is sent as it is.
    near = f"{'v' * 60}@{'d' * 63}.{'e' * 63}.{'f' * 29}.example"
    assert len(srs.forward(near)) + 2 == 257
    assert sent_as(forwarding, queued(near)) == near
    shorter = near.replace("v" * 60, "v" * 59)
    assert sent_as(forwarding, queued(shorter)) == srs.forward(shorter)
    forwarding.configure(None)                                       # [srs] enabled = no
    assert sent_as(forwarding, queued("alice@origin.example")) == "alice@origin.example"


def test_rcpt_to_srs_addresses() -> None:
    srs = scheme(domain="mx.example.test")
    forwarding = SRSForwarding(srs, LocalDomains())
    rewritten = srs.forward("Alice@origin.example")
    assert forwarding.resolve(rewritten) == Resolution(
        rewritten, remote=("Alice@origin.example",), is_local_domain=True)
    assert forwarding.resolve(f"<{rewritten.upper()}>") == Resolution(
        f"<{rewritten.upper()}>", remote=("ALICE@ORIGIN.EXAMPLE",), is_local_domain=True)
    srs1 = srs.forward("SRS0=abcd=AB=orig.test=alice@hop1.test")
    assert forwarding.resolve(srs1).remote == ("SRS0=abcd=AB=orig.test=alice@hop1.test",)
    # Not ours: the directory decides.
    assert forwarding.resolve("alice@mx.example.test") is None
    assert forwarding.resolve(rewritten.replace("mx.example.test", "other.test")) is None
    refused = forwarding.resolve(rewritten.replace("=Alice@", "=mallory@"))
    assert isinstance(refused, Reply)
    assert (refused.code, refused.status) == (550, "5.1.1")
    assert "does not match" in refused.text
    forwarding.configure(None)
    assert forwarding.resolve(rewritten) is None


# --- postsrsd, the real peer ---------------------------------------------------------

POSTSRSD = shutil.which("postsrsd") or "/usr/sbin/postsrsd"


class Postsrsd:
    """A private postsrsd: forward and reverse lookups over Postfix's TCP table
    protocol (``get ADDRESS`` -> ``200 RESULT`` or ``500 REASON``)."""

    def __init__(self, tmp: Path, secrets: list[bytes], domain: str) -> None:
        if not os.access(POSTSRSD, os.X_OK):
            raise AssertionError("postsrsd is not installed: run scripts/test-peers.sh "
                                 "(part of `make test`)")
        self.secret = tmp / "postsrsd.secret"
        self.secret.write_bytes(b"".join(secret + b"\n" for secret in secrets))
        self.forward_port, self.reverse_port = free_ports(2)
        self.proc = subprocess.Popen(
            [POSTSRSD, f"-s{self.secret}", f"-d{domain}", "-l127.0.0.1", "-4",
             f"-f{self.forward_port}", f"-r{self.reverse_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.reverse_port), 1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"postsrsd did not start: {self.output()}") from None
                time.sleep(0.05)

    def _get(self, port: int, address: str) -> tuple[int, str]:
        with socket.create_connection(("127.0.0.1", port), 10) as sock:
            sock.sendall(f"get {address}\n".encode())
            reply = sock.makefile("rb").readline().decode().rstrip("\n")
        code, _, text = reply.partition(" ")
        return int(code), text

    def forward(self, address: str) -> str:
        code, text = self._get(self.forward_port, address)
        assert code == 200, text
        return text

    def reverse(self, address: str) -> tuple[int, str]:
        return self._get(self.reverse_port, address)

    def output(self) -> str:
        return self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def postsrsd(tmp_path: Path) -> Iterator[Postsrsd]:
    peer = Postsrsd(tmp_path, [b"new-secret", b"old-secret"], "srs.example")
    try:
        yield peer
    finally:
        peer.stop()


def test_lightmail_and_postsrsd_read_each_other(postsrsd: Postsrsd) -> None:
    """Same secrets, same domain: the same addresses both ways (same day: the test
    retries once if midnight passed in between), and each reverses the other's."""
    ours = SRS("srs.example", [b"new-secret", b"old-secret"])
    senders = ["alice@origin.example", "Alice.Smith@Origin.Example",
               "a=b+c@sub.origin.example", "SRS0=abcd=AB=orig.test=alice@hop1.test",
               "SRS0+xyzw=CD=orig.test=bob@hop1.test",
               "SRS1=qkOF=hop1.test==abcd=AB=orig.test=alice@hop2.test",
               # Local parts over 64 octets once rewritten: postsrsd makes them too.
               "list-bounces+someone=example.org@lists.very-long-domain.example",
               f"{'b' * 64}@{'sub.' * 40}origin.example",
               f"SRS0=abcd=AB={'l' * 60}.test={'m' * 60}@hop1.test"]
    for sender in senders:
        theirs = postsrsd.forward(sender)
        mine = ours.forward(sender)
        if mine != theirs:                    # midnight between the two?
            theirs, mine = postsrsd.forward(sender), ours.forward(sender)
        assert mine == theirs, sender
        for address in (theirs, theirs.lower()):
            code, text = postsrsd.reverse(address)
            assert code == 200, (address, text)
            assert ours.reverse(address).lower() == text.lower()
    # A sender whose SRS form is a path over 256 octets: postsrsd still rewrites it,
    # LightMail sends it as it is (see lightmail/policy/srs.py); what postsrsd made
    # reverses on both all the same.
    huge = f"{'h' * 64}@{'d' * 63}.{'e' * 63}.{'f' * 63}.example"
    theirs = postsrsd.forward(huge)
    assert len(theirs) + 2 > 256 and ours.reverse(theirs).lower() == huge.lower()
    forwarding = SRSForwarding(ours, LocalDomains())
    assert sent_as(forwarding, queued(huge)) == huge
    # Key rotation: an address signed with the old secret still comes back on both.
    old = SRS("srs.example", [b"old-secret"]).forward("alice@origin.example")
    assert postsrsd.reverse(old) == (200, "alice@origin.example")
    assert ours.reverse(old) == "alice@origin.example"
    # Forged and expired: both refuse.
    forged = SRS("srs.example", [b"not-a-secret"]).forward("alice@origin.example")
    assert postsrsd.reverse(forged)[0] == 500
    with pytest.raises(SRSError):
        ours.reverse(forged)
    expired = SRS("srs.example", [b"new-secret"],
                  clock=lambda: time.time() - 30 * DAY).forward("alice@origin.example")
    code, text = postsrsd.reverse(expired)
    assert code == 500 and "out of date" in text
    with pytest.raises(SRSError, match="expired"):
        ours.reverse(expired)


# --- end to end: an alias to a Postfix, and the bounce back --------------------------

@pytest.fixture
def dns() -> Iterator[DNSServer]:
    server = DNSServer({
        "remote.test.": {"MX": [(10, "mx.remote.test.")]},
        "origin.test.": {"MX": [(10, "mx.remote.test.")]},
        "mx.remote.test.": {"A": ["127.0.0.1"]},
    }, ttl=60)
    server.start()
    try:
        yield server
    finally:
        server.stop()


#: A sender (a list's bounce address) whose SRS form has a local part of 75 octets
#: (no "=": the receiving Postfix's inline map would cut its key there).
LONG_SENDER = "list-bounces-" + "y" * 37 + "@origin.test"


def send_from_outside(port: int, rcpts: list[str],
                      sender: str = "sender@origin.test") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail(sender, rcpts,
                      b"From: sender@origin.test\r\nTo: forwarded@example.test\r\n"
                      b"Subject: via an alias\r\n\r\nHello from outside\r\n")


def rcpt_reply(port: int, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("bouncer.test")
        smtp.mail("")
        return smtp.rcpt(address)


@pytest_twisted.inlineCallbacks
def test_forwarded_mail_leaves_with_srs_and_bounces_come_back(
        tmp_path: Path, dns: DNSServer) -> None:
    postfix_port = free_ports(1)[0]
    server = yield start(tmp_path, f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n"
                         f"port = {postfix_port}\nmin_backoff = 1s\ntls = none\n")
    server.parts.queue_runner.poll_interval = 0.5
    mx: Any = None
    try:
        lm_port = server.ports["mx"]
        directory = server.parts.directory
        yield directory.add_alias("forwarded@example.test", "alice@remote.test")
        yield directory.add_alias("lost@example.test", "gone@remote.test")
        yield directory.add_alias("unknown@example.test", "nobody@remote.test")
        # Postfix: alice's and the sender's mailboxes; gone@ is accepted, then bounced
        # (a pipe that fails), to the SRS address, at LightMail (the SRS domain's MX:
        # here a transport map, as Postfix looks up no DNS).
        mx = yield in_thread(ReceivingMX, postfix_port, [
            "alice@remote.test", "gone@remote.test", "sender@origin.test", LONG_SENDER],
            main={
                "transport_maps": f"inline:{{ gone@remote.test=failing:, "
                                  f"mx.example.test=smtp:[127.0.0.1]:{lm_port} }}"},
            services=("failing unix - n n - - pipe user=nobody argv=/bin/false",))
        yield in_thread(send_from_outside, lm_port,
                        ["forwarded@example.test", "lost@example.test",
                         "unknown@example.test"])
        # 1. The forwarded copy arrives from SRS0=...=origin.test=sender@mx.example.test.
        [copy] = yield until(lambda: mx.messages("alice@remote.test"))
        secret = (tmp_path / "state" / "srs.secret").read_bytes().split(b"\n")[0]
        srs = SRS("mx.example.test", [secret])
        match = re.search(rb"^Return-Path: <(SRS0=[^>]+)>", copy, re.M)
        assert match, copy[:500]
        assert srs.reverse(match.group(1).decode()) == "sender@origin.test"
        assert match.group(1).decode().endswith("=origin.test=sender@mx.example.test")
        assert b"Subject: via an alias" in copy
        # 2. Postfix bounced gone@'s copy to the SRS address; LightMail checked it and
        # relayed it, from <>, to the original sender's MX.
        # 3. nobody@ was refused at RCPT: LightMail's own notice goes to the original
        # sender too (the queue kept it; only the wire's MAIL FROM was rewritten).
        found = yield until(lambda: len(mx.messages("sender@origin.test")) >= 2 and
                            mx.messages("sender@origin.test"), timeout=90)
        postfix_bounce = [m for m in found if b"MAILER-DAEMON@mx.remote.test" in m]
        our_notice = [m for m in found if b"MAILER-DAEMON@mx.example.test" in m]
        assert len(postfix_bounce) == 1 and len(our_notice) == 1, [m[:600] for m in found]
        assert b"gone@remote.test" in postfix_bounce[0]
        assert b"Return-Path: <>" in postfix_bounce[0]
        assert b"Final-Recipient: rfc822; nobody@remote.test" in our_notice[0]
        log = mx.postfix.logtext()
        assert re.search(r"from=<SRS0=[^>]+=origin\.test=sender@mx\.example\.test>", log)
        assert re.search(r"to=<SRS0=[^>]+@mx\.example\.test>.*status=sent", log), log
        # 4. Forged and expired SRS addresses get 550 5.1.1 with the reason.
        forged = SRS("mx.example.test", [b"guess"]).forward("victim@origin.test")
        code, text = yield in_thread(rcpt_reply, lm_port, forged)
        assert code == 550 and text.startswith(b"5.1.1") and b"does not match" in text
        expired = SRS("mx.example.test", [secret],
                      clock=lambda: time.time() - 30 * DAY).forward("sender@origin.test")
        code, text = yield in_thread(rcpt_reply, lm_port, expired)
        assert code == 550 and text.startswith(b"5.1.1") and b"expired" in text
        fresh = srs.forward("sender@origin.test")
        code, _ = yield in_thread(rcpt_reply, lm_port, fresh.lower())
        assert code == 250
        # 5. A sender whose SRS form has a local part over RFC 5321's 64 octets is
        # rewritten all the same: Postfix takes it, and its bounce comes back through
        # our MX (which takes our own long SRS addresses) to the sender.
        yield in_thread(send_from_outside, lm_port,
                        ["forwarded@example.test", "lost@example.test"], LONG_SENDER)
        copies = yield until(lambda: len(mx.messages("alice@remote.test")) >= 2
                             and mx.messages("alice@remote.test"))
        [long_copy] = [m for m in copies if b"=origin.test=list-bounces-" in m]
        match = re.search(rb"^Return-Path: <(SRS0=[^>]+)>", long_copy, re.M)
        assert match, long_copy[:500]
        long_srs = match.group(1).decode()
        assert len(long_srs.rpartition("@")[0]) == 75
        assert srs.reverse(long_srs) == LONG_SENDER
        [bounce] = yield until(lambda: mx.messages(LONG_SENDER), timeout=90)
        assert b"gone@remote.test" in bounce and b"Return-Path: <>" in bounce
        assert re.search(rf"to=<{re.escape(long_srs)}>.*status=sent", mx.postfix.logtext())
        # Other recipients are still held to the 64 octets, and every path to 256.
        code, text = yield in_thread(rcpt_reply, lm_port, "z" * 65 + "@example.test")
        assert (code, text[:5]) == (553, b"5.1.3")
        too_long = srs.forward(f"{'w' * 64}@{'d' * 63}.{'e' * 63}.{'f' * 40}.test")
        assert len(too_long) + 2 > 256
        code, text = yield in_thread(rcpt_reply, lm_port, too_long)
        assert (code, text[:5]) == (553, b"5.1.3")
    finally:
        yield server.root.stopService()
        if mx is not None:
            mx.stop()


@pytest_twisted.inlineCallbacks
def test_reload_reads_rotated_secrets_and_turns_srs_off(tmp_path: Path) -> None:
    from lightmail.reload.parts import ServicesPart
    server = yield start(tmp_path)
    try:
        services = server.parts
        path = tmp_path / "state" / "srs.secret"
        [first] = read_secrets(path)
        assert services.srs.srs is not None and services.srs.srs.secrets == [first]
        old = services.srs.srs.forward("alice@origin.example")
        path.write_bytes(b"rotated\n" + first + b"\n")
        part = ServicesPart(services)
        switch = yield part.prepare(services.config)
        switch()
        assert services.srs.srs.secrets == [b"rotated", first]
        assert services.srs.resolve(old).remote == ("alice@origin.example",)
        config = services.config
        off = dataclasses.replace(config, srs=SRSConfig(enabled=False))
        switch = yield part.prepare(off)
        switch()
        assert services.srs.srs is None and services.srs.resolve(old) is None
        # A file that cannot be read has the reload refused.
        path.write_bytes(b"")
        with pytest.raises(ConfigError, match="no secret"):
            yield part.prepare(config)
    finally:
        yield server.root.stopService()


class BrokenDirectory:
    def is_local_domain(self, name: str) -> defer.Deferred[bool]:
        return defer.fail(RuntimeError("database unavailable"))


def test_directory_failure_still_rewrites() -> None:
    srs = scheme(domain="mx.example.test")
    forwarding = SRSForwarding(srs, BrokenDirectory())
    assert sent_as(forwarding, queued("alice@origin.example")) == \
        srs.forward("alice@origin.example")
