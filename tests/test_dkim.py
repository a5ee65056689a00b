"""DKIM signing (RFC 6376, RFC 8463): keys, the signer, the config, the command line,
and outgoing mail, verified by dkimpy and by OpenDKIM's opendkim-testmsg.

opendkim-testmsg (Debian's opendkim-tools) looks the public key up in the DNS through
the C library's resolver, which reads /etc/resolv.conf and asks port 53.  The tests
run a DNS server of their own on port 53 of a 127.x address and the tool in a private
mount namespace (``unshare -m``) where /etc/resolv.conf names that server: so they
need root, as the rest of the suite does for Postfix and Dovecot.
"""

from __future__ import annotations

import base64
import os
import random
import re
import shutil
import smtplib
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
import pytest_twisted
from dnsserver import DNSServer
from harness import free_port
from inprocess import in_thread, start
from test_outbound import ReceivingMX, until
from twisted.internet import defer
from twisted.python import threadable

from lightmail.config import ConfigError, load_config, parse_config
from lightmail.policy.dkim import (
    DKIMSigner,
    KeyProblem,
    Signer,
    SigningKey,
    dns_record,
    from_domain,
    generate_key,
    load_key,
    load_signer,
    signing_key,
)
from lightmail.service import validate
from lightmail.storage.interfaces import BlobRef, Envelope, QueueItem, QueueRecipient

LIGHTMAIL = [sys.executable, "-m", "lightmail.admin.cli"]

MESSAGE = (b"Received: from client.example.org by mx.example.test; Mon, 1 Jan 2024\r\n"
           b"From: Bob Example <bob@example.org>\r\n"
           b"To: alice@remote.test\r\n"
           b"Subject: DKIM test\r\n"
           b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
           b"Message-ID: <dkim-test-1@example.org>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"\r\n"
           b"Hello,\r\n.a line with a dot\r\n\r\n  spaced   text  \r\n")


# --- helpers ------------------------------------------------------------------------------

def make_key(domain: str, selector: str, algorithm: str = "rsa", bits: int = 2048,
             directory: Path | None = None) -> SigningKey:
    pem, key = generate_key(algorithm, bits)
    path = None
    if directory is not None:
        path = directory / f"{domain}.{selector}.pem"
        path.write_bytes(pem)
        path.chmod(0o600)
    return signing_key(domain, selector, key, path)


def dnsfunc(records: dict[str, str]) -> Any:
    """A dkimpy DNS lookup answering from ``records`` (name -> TXT value)."""
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name.decode().rstrip(".").lower())
        return value.encode() if value is not None else None
    return lookup


def records_of(*keys: SigningKey) -> dict[str, str]:
    return {f"{k.selector}._domainkey.{k.domain}": dns_record(k) for k in keys}


def verify_each(message: bytes, records: dict[str, str]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of ``message``, top first."""
    count = len(re.findall(rb"(?mi)^DKIM-Signature:", message))
    results = []
    for index in range(count):
        try:
            results.append(bool(dkim.DKIM(message).verify(idx=index,
                                                          dnsfunc=dnsfunc(records))))
        except dkim.DKIMException:      # what dkim.verify() says False for
            results.append(False)
    return results


def signatures(message: bytes) -> list[bytes]:
    """The DKIM-Signature fields of ``message`` (unfolded, in order)."""
    return [m.group(0) for m in re.finditer(
        rb"(?mi)^DKIM-Signature:.*(?:\r?\n[ \t].*)*", message)]


def only_signature(message: bytes, keep: int) -> bytes:
    """``message`` with every DKIM-Signature field but the ``keep``-th removed."""
    fields = signatures(message)
    for index, field in enumerate(fields):
        if index != keep:
            message = message.replace(field + (b"\r\n" if b"\r\n" in message else b"\n"),
                                      b"", 1)
    return message


def tags(signature: bytes) -> dict[str, str]:
    value = signature.split(b":", 1)[1].decode()
    value = re.sub(r"\s+", "", value)
    return dict(item.split("=", 1) for item in value.split(";") if item)


def opendkim_testmsg() -> str:
    path = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"
    if not os.path.exists(path):
        pytest.fail("opendkim-testmsg is not installed: run scripts/test-peers.sh (it "
                    "installs Debian's opendkim-tools)", pytrace=False)
    return path


class OpenDKIM:
    """Runs opendkim-testmsg against a DNS server of the test's on port 53."""

    def __init__(self) -> None:
        self.tool = opendkim_testmsg()
        if shutil.which("unshare") is None:
            pytest.fail("unshare (util-linux) is missing: it gives opendkim-testmsg a "
                        "resolv.conf of its own", pytrace=False)
        if os.geteuid() != 0:
            pytest.fail("the opendkim-testmsg tests need root (a DNS server on port 53 "
                        "and a private mount namespace)", pytrace=False)
        last: Exception | None = None
        for _ in range(20):
            host = f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"
            try:
                self.dns = DNSServer({}, ttl=1, host=host, port=53).start()
                break
            except OSError as exc:
                last = exc
        else:
            pytest.fail(f"no 127.53.x.y address free for a DNS server on port 53: {last}",
                        pytrace=False)
        self.dir = Path(tempfile.mkdtemp(prefix="lightmail-opendkim-"))
        self.resolv = self.dir / "resolv.conf"
        self.resolv.write_text(f"nameserver {host}\noptions timeout:2 attempts:2\n")

    def publish(self, *keys: SigningKey) -> None:
        for key in keys:
            self.dns.set(f"{key.selector}._domainkey.{key.domain}.", "TXT", [dns_record(key)])

    def publish_record(self, name: str, value: str) -> None:
        self.dns.set(name, "TXT", [value])

    def run(self, message: bytes) -> subprocess.CompletedProcess[bytes]:
        script = 'mount --bind "$1" /etc/resolv.conf && exec "$2"'
        return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(self.resolv),
                               self.tool], input=message, capture_output=True, timeout=60)

    def verify(self, message: bytes) -> None:
        """Pass, or fail with what opendkim-testmsg said."""
        result = self.run(message)
        assert result.returncode == 0 and not result.stderr, (
            f"opendkim-testmsg failed (exit {result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()}")

    def close(self) -> None:
        self.dns.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def opendkim() -> Iterator[OpenDKIM]:
    tool = OpenDKIM()
    try:
        yield tool
    finally:
        tool.close()


# --- signing and verifying -----------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signature_verifies_with_dkimpy_and_opendkim(algorithm: str,
                                                     opendkim: OpenDKIM) -> None:
    key = make_key("example.org", f"t-{algorithm}", algorithm)
    header = Signer([key]).sign(MESSAGE)
    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    signed = header + MESSAGE
    fields = tags(header)
    assert fields["a"] == f"{algorithm}-sha256"
    assert (fields["d"], fields["s"], fields["c"]) == ("example.org", f"t-{algorithm}",
                                                       "relaxed/relaxed")
    # The present header fields of the list, each once, and From once more (oversigned).
    assert fields["h"].split(":") == ["from", "to", "subject", "date", "message-id",
                                      "mime-version", "content-type", "from"]
    assert verify_each(signed, records_of(key)) == [True]
    opendkim.publish(key)
    opendkim.verify(signed)
    # Relaxed canonicalisation survives re-folding and trailing white space ...
    refolded = signed.replace(b"Subject: DKIM test", b"Subject:  DKIM\r\n\ttest ")
    assert verify_each(refolded, records_of(key)) == [True]
    opendkim.verify(refolded)
    # ... and an unsigned field added on the way; not a changed body, nor a second From.
    assert verify_each(b"X-Spam: no\r\n" + signed, records_of(key)) == [True]
    for broken, says in ((signed.replace(b"Hello,", b"Hello!"), b"Bad signature"),
                         (signed.replace(b"Subject: DKIM test", b"Subject: DKIM test!"),
                          b"Bad signature"),
                         (signed + b"more\r\n", b"Bad signature"),
                         # (OpenDKIM refuses two From: fields before any signature)
                         (signed.replace(b"To: ", b"From: mallory@evil.test\r\nTo: "),
                          b"Syntax error")):
        assert verify_each(broken, records_of(key)) == [False]
        result = opendkim.run(broken)
        assert result.returncode != 0 and says in result.stderr, result.stderr


def test_two_keys_give_two_signatures_each_verifiable(opendkim: OpenDKIM) -> None:
    rsa_key = make_key("example.org", "dual-rsa")
    ed_key = make_key("example.org", "dual-ed", "ed25519")
    signed = Signer([rsa_key, ed_key]).sign(MESSAGE) + MESSAGE
    first, second = signatures(signed)
    assert tags(first)["a"] == "rsa-sha256" and tags(second)["a"] == "ed25519-sha256"
    assert verify_each(signed, records_of(rsa_key, ed_key)) == [True, True]
    opendkim.publish(rsa_key, ed_key)
    for index in (0, 1):
        opendkim.verify(only_signature(signed, index))
    # A receiver that knows only one of the keys still verifies that signature.
    assert verify_each(signed, records_of(ed_key)) == [False, True]


def test_the_from_domain_chooses_the_keys() -> None:
    org = make_key("example.org", "s1")
    idn = make_key("bücher.example", "s1", "ed25519")
    signer = Signer([org, idn])
    assert idn.domain == "xn--bcher-kva.example"
    assert signer.sign(MESSAGE.replace(b"bob@example.org", b"bob@example.net")) == b""
    assert signer.sign(MESSAGE.replace(b"bob@example.org", b"bob@sub.example.org")) == b""
    assert signer.sign(MESSAGE.replace(b"From: Bob Example <bob@example.org>\r\n", b"")) \
        == b""
    upper = MESSAGE.replace(b"bob@example.org", b"Bob@EXAMPLE.ORG.")
    assert tags(signer.sign(upper))["d"] == "example.org"
    utf8 = MESSAGE.replace(b"bob@example.org", "bob@bücher.example".encode())
    assert tags(signer.sign(utf8))["d"] == "xn--bcher-kva.example"
    assert verify_each(signer.sign(utf8) + utf8, records_of(idn)) == [True]
    # Folded From: with a comment and a group-less list: the first author counts.
    folded = MESSAGE.replace(b"From: Bob Example <bob@example.org>",
                             b"From: \"Example, Bob\" (work)\r\n <bob@example.org>,"
                             b" carol@example.net")
    assert from_domain(folded) == "example.org"
    # The envelope plays no part; the Received field above is never signed.
    assert "received" not in tags(signer.sign(MESSAGE))["h"]


def test_header_and_oversign_lists() -> None:
    key = make_key("example.org", "s1")
    message = b"To: a@x.test\r\nTo: b@x.test\r\n" + MESSAGE
    header = Signer([key], headers=("from", "to"), oversign=("from", "reply-to")) \
        .sign(message)
    assert tags(header)["h"].split(":") == ["to", "to", "from", "to", "from", "reply-to"]
    assert verify_each(header + message, records_of(key)) == [True]
    # An oversigned field that was absent cannot be added afterwards.
    assert verify_each(header + message.replace(b"Subject:", b"Reply-To: m@evil.test\r\n"
                                                 b"Subject:"), records_of(key)) == [False]
    with pytest.raises(ValueError, match="always signed"):
        Signer([key], headers=("to",))
    with pytest.raises(ValueError, match="never signed"):
        Signer([key], oversign=("received",))


def test_lf_only_messages_sign_the_same() -> None:
    key = make_key("example.org", "s1")
    lf = MESSAGE.replace(b"\r\n", b"\n")
    header = Signer([key]).sign(lf)
    assert verify_each(header + MESSAGE, records_of(key)) == [True]


# --- key files ---------------------------------------------------------------------------------

def test_key_files_in_the_formats_in_use(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    formats = {
        # opendkim-genkey: PKCS#1; openssl genpkey: PKCS#8.
        "pkcs1.pem": rsa_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()),
        "pkcs8.pem": rsa_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()),
    }
    for name, data in formats.items():
        (tmp_path / name).write_bytes(data)
        key = load_key("example.org", "s", tmp_path / name)
        assert (key.algorithm, key.bits) == ("rsa-sha256", 2048)
        assert verify_each(Signer([key]).sign(MESSAGE) + MESSAGE, records_of(key)) == [True]
    # dkimpy's dknewkey writes an Ed25519 key as its base64 seed.
    ed = ed25519.Ed25519PrivateKey.generate()
    seed = ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    (tmp_path / "dknewkey.key").write_bytes(base64.b64encode(seed) + b"\n")
    key = load_key("example.org", "s", tmp_path / "dknewkey.key")
    assert key.algorithm == "ed25519-sha256"
    assert verify_each(Signer([key]).sign(MESSAGE) + MESSAGE, records_of(key)) == [True]

    def problem(name: str, data: bytes) -> str:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(KeyProblem) as info:
            load_key("example.org", "s", tmp_path / name)
        return str(info.value)

    # cryptography makes no key under 1024 bits; OpenSSL still does.
    small_pem = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                                "rsa_keygen_bits:768"], capture_output=True, check=True,
                               timeout=60).stdout
    assert "768-bit RSA key" in problem("small.pem", small_pem)
    encrypted = rsa_key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"pw"))
    assert "is encrypted" in problem("encrypted.pem", encrypted)
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    assert "RSA or Ed25519" in problem("ec.pem", ec_pem)
    assert "holds no private key" in problem("junk.pem", b"hello\n")
    assert "not a usable PEM" in problem("broken.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                         b"-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyProblem, match=r"cannot read the key file .*missing\.pem"):
        load_key("example.org", "s", tmp_path / "missing.pem")


# --- configuration -----------------------------------------------------------------------------

def test_dkim_section_is_parsed(tmp_path: Path) -> None:
    config = parse_config(
        "[dkim]\nkeys = Example.ORG:2024a:keys/org.pem,\n"
        "    example.org:2024e:/etc/ed.pem\n    bücher.example:s:b.pem\n"
        "sources = submission\nheaders = From, To, Subject\noversign = from, to\n",
        str(tmp_path / "etc" / "lm.conf"))
    section = config.dkim
    assert [(s.domain, s.selector, s.path) for s in section.keys] == [
        ("example.org", "2024a", tmp_path / "etc" / "keys" / "org.pem"),
        ("example.org", "2024e", Path("/etc/ed.pem")),
        ("xn--bcher-kva.example", "s", tmp_path / "etc" / "b.pem")]
    assert section.enabled and section.sources == ("submission",)
    assert section.headers == ("from", "to", "subject")
    assert section.oversign == ("from", "to")
    defaults = parse_config("", "x.conf").dkim
    assert defaults.keys == () and defaults.sources == ("submission", "local")
    assert "message-id" in defaults.headers and defaults.oversign == ("from",)


@pytest.mark.parametrize("text, needle", [
    ("keys = example.org:sel\n", "expected DOMAIN:SELECTOR:KEYFILE"),
    ("keys = exa mple.org:sel:k.pem\n", "expected a domain name"),
    ("keys = example.org:s_l:k.pem\n", "expected a selector"),
    ("keys = example.org:s:a.pem, example.org:s:b.pem\n", "given twice"),
    ("sources = mx, everyone\n", "expected some of submission, local, mx"),
    ("headers = to, subject\n", "must include from"),
    ("headers = from, received\n", "received is never signed"),
    ("oversign = dkim-signature\n", "dkim-signature is never signed"),
    ("enabled = maybe\n", "expected yes or no"),
])
def test_dkim_errors_are_located(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[server]\nhostname = h\n[dkim]\n" + text, "/etc/lm.conf")
    assert info.value.line == 4 and info.value.section == "dkim", str(info.value)
    assert needle in str(info.value)


def test_key_files_are_read_at_start_up_and_errors_name_their_line(tmp_path: Path) -> None:
    good = make_key("example.org", "good", directory=tmp_path)
    (tmp_path / "bad.pem").write_text("not a key\n")
    path = tmp_path / "lm.conf"
    path.write_text("[server]\nstate_dir = s\n\n[dkim]\n"
                    f"keys = example.org:good:{good.path},\n"
                    "    example.net:s:missing.pem\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, validators=validate)
    assert str(info.value) == (f"{path}:6: [dkim] keys: cannot read the key file "
                               f"{tmp_path / 'missing.pem'}: No such file or directory")
    path.write_text("[dkim]\nkeys = example.net:s:bad.pem\n")
    with pytest.raises(ConfigError, match=r"lm.conf:2: \[dkim\] keys: .*bad.pem holds no"):
        load_config(path, validators=validate)
    # Switched off, nothing is read.
    path.write_text("[dkim]\nenabled = no\nkeys = example.net:s:missing.pem\n")
    config = load_config(path, validators=validate)
    assert load_signer(config) is None
    path.write_text(f"[dkim]\nkeys = example.org:good:{good.path}\n")
    signer = load_signer(load_config(path, validators=validate))
    assert signer is not None and signer.keys_for("example.org")[0].selector == "good"


def test_a_key_lightmail_may_not_read_is_a_config_error() -> None:
    """What an operator sees when the key belongs to root and LightMail runs as nobody
    (``check-config`` runs the start-up checks that ``makeService`` runs)."""
    base = Path(tempfile.mkdtemp(prefix="lightmail-dkim-"))    # reachable by nobody
    try:
        os.chmod(base, 0o755)
        key = make_key("example.org", "s", directory=base)
        conf = base / "lm.conf"
        conf.write_text(f"[server]\nstate_dir = {base / 'state'}\n"
                        f"[dkim]\nkeys = example.org:s:{key.path}\n")
        conf.chmod(0o644)
        result = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             *LIGHTMAIL, "check-config", str(conf)],
            capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": "/"})
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr == (f"lightmail: {conf}:4: [dkim] keys: cannot read the key "
                                 f"file {key.path}: Permission denied\n")
        from lightmail.service import makeService
        (base / "other.pem").write_text("junk\n")
        conf.write_text("[dkim]\nkeys = example.org:s:other.pem\n")
        with pytest.raises(ConfigError, match=r"lm.conf:2: \[dkim\] keys: .*holds no"):
            makeService(load_config(conf))
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the command line --------------------------------------------------------------------------

def genkey(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIGHTMAIL, "dkim", "genkey", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)


def parse_genkey(stdout: str) -> tuple[str, str, str]:
    """(record name, TXT value, config line) from genkey's output."""
    [record] = [line for line in stdout.splitlines() if " IN TXT " in line]
    [config] = [line for line in stdout.splitlines() if line.startswith("keys = ")]
    name, _, _, rdata = record.split(" ", 3)
    txt = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, rdata)
    assert all(len(s) <= 255 for s in txt.strings)       # valid in a zone file
    return name, b"".join(txt.strings).decode(), config


@pytest.mark.parametrize("algorithm, selector, bits", [("rsa", None, None),
                                                       ("rsa", "big", "4096"),
                                                       ("ed25519", None, None)])
def test_genkey_writes_a_private_key_and_prints_record_and_config(
        tmp_path: Path, algorithm: str, selector: str | None, bits: str | None,
        opendkim: OpenDKIM) -> None:
    args = ["example.org", "--algorithm", algorithm]
    args += ["--selector", selector] if selector else []
    args += ["--bits", bits] if bits else []
    result = genkey(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    name, value, config_line = parse_genkey(result.stdout)
    default = "ed25519" if algorithm == "ed25519" else "default"
    sel = selector or default
    assert name == f"{sel}._domainkey.example.org."
    assert value.startswith(f"v=DKIM1; k={algorithm}; p=")
    path = tmp_path / f"example.org.{sel}.pem"
    assert config_line == f"keys = example.org:{sel}:{path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The printed line is a working [dkim] configuration, and the printed record
    # verifies what that configuration signs (dkimpy, and OpenDKIM through DNS).
    conf = tmp_path / "lm.conf"
    conf.write_text(f"[dkim]\n{config_line}\n")
    signer = load_signer(load_config(conf, validators=validate))
    assert signer is not None
    [key] = signer.keys_for("example.org")
    assert key.bits == (int(bits or 2048) if algorithm == "rsa" else 0)
    signed = signer.sign(MESSAGE) + MESSAGE
    assert verify_each(signed, {name.rstrip("."): value}) == [True]
    opendkim.publish_record(name, value)
    opendkim.verify(signed)
    # `dkim records` prints the same record from the configuration.
    records = subprocess.run([*LIGHTMAIL, "--config", str(conf), "dkim", "records"],
                             capture_output=True, text=True, timeout=60)
    assert records.returncode == 0, records.stderr
    assert parse_genkey(records.stdout + "keys = x\n")[:2] == (name, value)


def test_genkey_refuses_to_overwrite_and_checks_its_arguments(tmp_path: Path) -> None:
    assert genkey(tmp_path, "example.org", "-a", "ed25519").returncode == 0
    again = genkey(tmp_path, "example.org", "-a", "ed25519")
    assert again.returncode == 1 and "exists already" in again.stderr
    for args, needle in ((["example.org", "--bits", "512"], "1024 to 4096"),
                         (["example.org", "-a", "ed25519", "--bits", "2048"], "RSA keys"),
                         (["exa mple.org"], "expected a domain name"),
                         (["example.org", "-s", "a_b"], "expected a selector")):
        result = genkey(tmp_path, *args)
        assert result.returncode == 1 and needle in result.stderr, result.stderr
        assert result.stderr.startswith("lightmail: ") and "Traceback" not in result.stderr


# --- the delivery agent's signer ---------------------------------------------------------------

class MemoryBlobs:
    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.whole_reads = 0

    def read(self, blob_id: str) -> defer.Deferred[bytes]:
        self.whole_reads += 1
        return defer.succeed(self.blobs[blob_id])

    def read_range(self, blob_id: str, offset: int, length: int) -> defer.Deferred[bytes]:
        return defer.succeed(self.blobs[blob_id][offset:offset + length])


def item(queue_id: str, blob: str, size: int, source: str = "submission",
         rcpt: str = "alice@remote.test") -> QueueItem:
    return QueueItem(1, queue_id, QueueRecipient(rcpt, "smtp"), "bob@example.org",
                     BlobRef(blob, size), 0,
                     Envelope("bob@example.org", (), source=source))


@pytest_twisted.ensureDeferred
async def test_one_signature_per_queued_message_made_in_a_thread() -> None:
    key = make_key("example.org", "s1")
    big = MESSAGE + b"x" * 100 + b"\r\n" * 40000            # past the header peek
    bounce = MESSAGE.replace(b"Bob Example <bob@example.org>",
                             b"Mail Delivery System <MAILER-DAEMON@mx.example.org>")
    blobs = MemoryBlobs({"m": MESSAGE, "big": big, "bounce": bounce})
    signer = Signer([key])
    threads_used: list[bool] = []
    original = signer.sign

    def sign(message: bytes, keys: Any = None) -> bytes:
        threads_used.append(threadable.isInIOThread())
        return original(message, keys)
    signer.sign = sign  # type: ignore[method-assign]
    agent_signer = DKIMSigner(signer, blobs)      # type: ignore[arg-type]
    # Three recipients of one message at once, and again later: one signing.
    first = await defer.gatherResults([
        defer.ensureDeferred(agent_signer.header_for(item("Q1", "m", len(MESSAGE),
                                                          rcpt=f"r{n}@remote.test")))
        for n in range(3)])
    later = await agent_signer.header_for(item("Q1", "m", len(MESSAGE)))
    assert len(set(first + [later])) == 1 and first[0].startswith(b"DKIM-Signature:")
    assert threads_used == [False] and agent_signer.signed == 1
    assert verify_each(first[0] + MESSAGE, records_of(key)) == [True]
    # The same content queued again (a new message) is signed again.
    assert await agent_signer.header_for(item("Q2", "m", len(MESSAGE)))
    assert agent_signer.signed == 2
    # A large message is read whole only to be signed.
    header = await agent_signer.header_for(item("Q3", "big", len(big)))
    assert verify_each(header + big, records_of(key)) == [True]
    # Mail that came in on the MX is not signed, nor read; nor a bounce without a key.
    reads = blobs.whole_reads
    assert await agent_signer.header_for(item("Q4", "m", len(MESSAGE), source="mx")) == b""
    assert await agent_signer.header_for(item("Q5", "bounce", len(bounce),
                                              source="local")) == b""
    assert blobs.whole_reads == reads and agent_signer.signed == 3


@pytest_twisted.ensureDeferred
async def test_a_message_dkimpy_cannot_parse_goes_out_unsigned() -> None:
    broken = MESSAGE.replace(b"MIME-Version: 1.0\r\n", b"this is no header field\r\n")
    agent_signer = DKIMSigner(Signer([make_key("example.org", "s1")]),
                              MemoryBlobs({"b": broken}))    # type: ignore[arg-type]
    assert await agent_signer.header_for(item("Q1", "b", len(broken))) == b""
    assert agent_signer.signed == 0


# --- end to end: submission, queue, SMTP to Postfix ----------------------------------------

@pytest.fixture
def remote() -> Iterator[dict[str, Any]]:
    port = free_port()
    dns_server = DNSServer({"remote.test.": {"MX": [(10, "mx.remote.test.")]},
                            "remote.example.": {"MX": [(10, "mx.remote.test.")]},
                            "mx.remote.test.": {"A": ["127.0.0.1"]}}, ttl=1).start()
    # No header rewriting by Postfix: what arrives is what LightMail sent.
    mx = ReceivingMX(port, ["alice@remote.test", "carol@remote.test",
                            "friend@remote.example"],
                     main={"local_header_rewrite_clients": ""})
    try:
        yield {"dns": dns_server, "mx": mx, "port": port}
    finally:
        mx.stop()
        dns_server.stop()


def send(port: int, sender: str, rcpts: list[str], message: bytes, tls: bool = True,
         login: bool = True) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    smtp: smtplib.SMTP = (smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=30)
                          if tls else smtplib.SMTP("127.0.0.1", port, timeout=30))
    with smtp:
        if login:
            smtp.login("bob@example.test", "bob-secret")
        smtp.sendmail(sender, rcpts, message)


@pytest_twisted.inlineCallbacks
def test_outgoing_mail_is_signed_once_and_verifies_at_the_receiver(
        tmp_path: Path, remote: dict[str, Any], opendkim: OpenDKIM) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    rsa_key = make_key("example.test", "e2e-rsa", directory=keys)
    ed_key = make_key("example.test", "e2e-ed", "ed25519", directory=keys)
    server = yield start(tmp_path, f"[outbound]\ndns_servers = 127.0.0.1:{remote['dns'].port}\n"
                         f"port = {remote['port']}\nmin_backoff = 1s\n"
                         f"[dkim]\nkeys = example.test:e2e-rsa:{rsa_key.path},\n"
                         f"    example.test:e2e-ed:keys/example.test.e2e-ed.pem\n")
    server.parts.queue_runner.poll_interval = 0.5
    mx = remote["mx"]
    body = (b"From: Bob <bob@example.test>\r\nTo: alice@remote.test, carol@remote.test\r\n"
            b"Subject: signed on the way out\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            b"Message-ID: <e2e-1@example.test>\r\n\r\n.dot-stuffed line\r\nBody.\r\n")
    forged = body.replace(b"<e2e-1@", b"<e2e-2@").replace(b"To: alice@remote.test, "
                                                          b"carol@remote.test",
                                                          b"To: outside@example.test")
    try:
        yield in_thread(send, server.ports["submissions"], "bob@example.test",
                        ["alice@remote.test", "carol@remote.test"], body)
        # Through the MX, to an alias that forwards to another domain: not signed.
        yield in_thread(send, server.ports["mx"], "someone@elsewhere.test",
                        ["outside@example.test"], forged, tls=False, login=False)
        [alice] = yield until(lambda: mx.messages("alice@remote.test"))
        [carol] = yield until(lambda: mx.messages("carol@remote.test"))
        # (inprocess.start's alias: outside@example.test -> friend@remote.example)
        [friend] = yield until(lambda: mx.messages("friend@remote.example"))
    finally:
        yield server.root.stopService()
    assert signatures(friend) == []
    records = records_of(rsa_key, ed_key)
    for received in (alice, carol):
        assert b"\n.dot-stuffed line\n" in received
        first, second = signatures(received)
        assert (tags(first)["s"], tags(second)["s"]) == ("e2e-rsa", "e2e-ed")
        assert verify_each(received, records) == [True, True]
    # One signing for both recipients: the very same signatures.
    assert signatures(alice) == signatures(carol)
    opendkim.publish(rsa_key, ed_key)
    for index in (0, 1):
        opendkim.verify(only_signature(alice, index))


def test_opendkim_fixture_detects_a_wrong_key(opendkim: OpenDKIM) -> None:
    """The opendkim-testmsg check is not vacuous: a record with another key fails."""
    key = make_key("example.org", "wrong")
    other = make_key("example.org", "wrong")
    opendkim.publish(other)
    result = opendkim.run(Signer([key]).sign(MESSAGE) + MESSAGE)
    assert result.returncode != 0 and b"Bad signature" in result.stderr, result.stderr


def test_thread_safety_of_one_signer_used_from_many_threads() -> None:
    key = make_key("example.org", "s1", "ed25519")
    signer = Signer([key])
    results: list[bool] = []

    def work(n: int) -> None:
        message = MESSAGE.replace(b"Hello,", f"Hello {n},".encode())
        results.append(verify_each(signer.sign(message) + message, records_of(key)) == [True])
    workers = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == [True] * 8
