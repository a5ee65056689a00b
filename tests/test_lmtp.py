"""LMTP (RFC 2033) against real clients: raw commands, Python's smtplib.LMTP, Postfix.

LMTP answers once per accepted recipient after the content, each reply meaning
"filed durably"; one recipient over quota or unknown does not fail the others.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness import ServerProcess, free_port, inbox_subjects, run_cli
from inprocess import Raw, in_thread, session, start
from postfix import PostfixInstance
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

MESSAGE = "From: a@example.org\r\nSubject: {subject}\r\n\r\nHello {subject}\r\n"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short (a Unix socket path has ~100 octets) and reachable by Postfix's user.
    path = Path(tempfile.mkdtemp(prefix="lm-lmtp-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@defer.inlineCallbacks
def start_lmtp(tmp: Path, socket_path: Path, extra: str = "") -> Any:
    server = yield start(
        tmp, "[listener:lmtp]\nprotocol = lmtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        f"[listener:lmtp-unix]\nprotocol = lmtp\nendpoint = unix:{socket_path}:mode=666\n"
        + extra)
    d = server.parts.directory
    yield d.add_user("small@example.test", None, 200)       # room for nothing much
    yield d.add_alias("both@example.test", "bob@example.test")
    yield d.add_alias("both@example.test", "small@example.test")
    return server


def transaction(port: int, *rcpts: str, subject: str = "lmtp", bdat: bool = False,
                content: str | None = None) -> tuple[list[str], list[str]]:
    """One LMTP transaction; returns (RCPT replies, final replies)."""
    client = Raw(port)
    try:
        assert client.cmd("LHLO client.test").startswith("250")
        assert client.cmd("MAIL FROM:<a@example.org>").startswith("250 2.1.0")
        rcpt_replies = [client.cmd(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
        accepted = sum(reply.startswith("250") for reply in rcpt_replies)
        body = (content or MESSAGE.format(subject=subject)).encode()
        if bdat:
            client.send(f"BDAT {len(body)} LAST\r\n".encode() + body)
        else:
            assert client.cmd("DATA").startswith("354")
            client.send(body + b".\r\n")
        finals = ["\n".join(client.reply()) for _ in range(accepted)]
        assert client.cmd("QUIT").startswith("221")
        return rcpt_replies, finals
    finally:
        client.close()


@pytest_twisted.inlineCallbacks
def test_lhlo_and_extensions(tmp_path: Path, socket_dir: Path) -> None:
    server = yield start_lmtp(tmp_path, socket_dir / "lmtp.sock")
    try:
        greeting, ehlo, lhlo = yield in_thread(
            lambda: [Raw(server.ports["lmtp"]).greeting[0],
                     *session(server.ports["lmtp"], "EHLO client.test", "LHLO client.test")])
        assert greeting.startswith("220 ") and "LMTP" in greeting
        assert ehlo.startswith("500 5.5.1")
        for ext in ("PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING",
                    "SMTPUTF8"):
            assert re.search(rf"^250[- ]{ext}\b", lhlo, re.M), lhlo
        assert "AUTH" not in lhlo and "DSN" not in lhlo
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_a_reply_per_recipient_and_one_failure_fails_only_itself(
        tmp_path: Path, socket_dir: Path) -> None:
    server = yield start_lmtp(tmp_path, socket_dir / "lmtp.sock")
    try:
        big = MESSAGE.format(subject="big") + "x" * 400 + "\r\n"
        rcpts, finals = yield in_thread(
            transaction, server.ports["lmtp"], "bob@example.test", "nobody@example.test",
            "small@example.test", "friend@remote.example", "outside@example.test",
            "bob+lists@example.test", content=big)
        assert [r[:9] for r in rcpts] == ["250 2.1.5", "550 5.1.1", "250 2.1.5",
                                          "550 5.1.1", "550 5.1.1", "250 2.1.5"]
        assert finals[0].startswith("250 2.0.0") and "bob@example.test" in finals[0]
        assert finals[1].startswith("552 5.2.2")        # small is over quota
        assert finals[2].startswith("250 2.0.0")
        inbox = yield server.delivered("bob@example.test", 1)
        lists = yield server.delivered("bob@example.test", 1, mailbox="lists")
        assert inbox[0].startswith(b"Received: from client.test")
        assert b"with LMTP id" in inbox[0] and inbox[0].endswith(b"x" * 400 + b"\r\n")
        assert lists[0] == inbox[0]
        assert (yield server.inbox("small@example.test")) == []
        # An alias to two users: delivered to the one with room, so 250.
        _, [both] = yield in_thread(transaction, server.ports["lmtp"], "both@example.test",
                                    content=big)
        assert both.startswith("250 2.0.0")
        assert len((yield server.inbox("bob@example.test"))) == 2
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_bdat_bad_content_and_tempfail_quota(tmp_path: Path, socket_dir: Path) -> None:
    server = yield start_lmtp(tmp_path, socket_dir / "lmtp.sock",
                              "[lmtp]\nquota_full_tempfail = yes\n")
    try:
        _, finals = yield in_thread(transaction, server.ports["lmtp"], "bob@example.test",
                                    "small@example.test", subject="chunked" + "y" * 300,
                                    bdat=True)
        assert finals[0].startswith("250 2.0.0")
        assert finals[1].startswith("452 4.2.2")        # try again later, as configured
        # Content refused: every recipient hears it (RFC 2033 §4.2).
        _, finals = yield in_thread(transaction, server.ports["lmtp"], "bob@example.test",
                                    "bob+lists@example.test",
                                    content="Subject: bare\nLF only\r\n")
        assert [f[:9] for f in finals] == ["550 5.5.2", "550 5.5.2"]
        assert len((yield server.inbox("bob@example.test"))) == 1
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_smtplib_lmtp_over_tcp_and_unix_socket(tmp_path: Path, socket_dir: Path) -> None:
    sock = socket_dir / "lmtp.sock"
    server = yield start_lmtp(tmp_path, sock)
    try:
        def send() -> list[Any]:
            out = []
            for host, port in ((str(sock), 0), ("127.0.0.1", server.ports["lmtp"])):
                with smtplib.LMTP(host, port, timeout=20) as lmtp:
                    for number in range(3):
                        out.append(lmtp.sendmail(
                            "a@example.org", ["bob@example.test"],
                            MESSAGE.format(subject=f"{host[:4]}-{number}").encode()))
            return out
        assert (yield in_thread(send)) == [{}] * 6
        messages = yield server.delivered("bob@example.test", 6)
        assert sum(b"Subject: /tmp-" in m for m in messages) == 3
        assert sum(b"Subject: 127.-" in m for m in messages) == 3
    finally:
        yield server.root.stopService()


def test_postfix_delivers_into_lightmail_over_lmtp(write_config, tmp_path: Path,
                                                   socket_dir: Path) -> None:
    """Postfix as the MX in front, LightMail as its mailbox store: the production set-up
    that docs/operations.rst shows (virtual_transport = lmtp:unix:...)."""
    sock = socket_dir / "lmtp.sock"
    config = write_config(
        "[server]\nstate_dir = state\nhostname = store.relay.test\n"
        f"[listener:lmtp]\nprotocol = lmtp\nendpoint = unix:{sock}:mode=666\n"
        "[listener:lmtp-tcp]\nprotocol = lmtp\nendpoint = tcp:0:interface=127.0.0.1\n")
    run_cli(config, "domain", "add", "relay.test")
    run_cli(config, "user", "add", "alice@relay.test", "--no-password")
    run_cli(config, "user", "add", "bob@relay.test", "--no-password", "--quota", "1K")
    server = ServerProcess(config)
    postfixes = []
    try:
        tcp_port = server.ports(expected=1)["lmtp-tcp"]
        for transport in (f"lmtp:unix:{sock}", f"lmtp:inet:127.0.0.1:{tcp_port}"):
            port = free_port()
            postfix = PostfixInstance(None, port, main={
                "myhostname": "mx.relay.test",
                "virtual_mailbox_domains": "relay.test",
                "virtual_mailbox_maps": "",
                "virtual_transport": transport,
                "lmtp_destination_recipient_limit": "50",
            })
            postfixes.append(postfix)
            postfix.start()
            kind = transport.split(":")[1]
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                for number in range(5):
                    smtp.sendmail("sender@client.test", ["alice@relay.test"],
                                  MESSAGE.format(subject=f"{kind}-{number}").encode())
                # One message, two recipients: one fits, one is over quota.
                smtp.sendmail("sender@client.test", ["alice@relay.test", "bob@relay.test"],
                              (MESSAGE.format(subject=f"{kind}-big") + "z" * 2000).encode())
        state = tmp_path / "state"
        deadline = time.monotonic() + 90
        found: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            found = inbox_subjects(state)
            logs = "".join(p.logtext() for p in postfixes)
            if len(found) >= 12 and logs.count("said: 552 5.2.2") >= 2:
                break
            time.sleep(0.3)
        logs = "".join(p.logtext() for p in postfixes)
        for kind in ("unix", "inet"):
            for number in range(5):
                assert found.get(f"{kind}-{number}") == ["alice/INBOX"], (found, logs)
            assert found.get(f"{kind}-big") == ["alice/INBOX"], (found, logs)
        # Postfix read the per-recipient replies: delivered once, and bounced bob.
        assert logs.count("status=sent (250 2.0.0") >= 12, logs
        assert re.search(r"to=<bob@relay\.test>.*said: 552 5\.2\.2", logs), logs
    finally:
        for postfix in postfixes:
            postfix.stop()
        server.kill()


@pytest_twisted.inlineCallbacks
def test_blob_not_made_durable_is_a_tempfail(tmp_path: Path, socket_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The blob's fsync/rename fails (in the SQL group's hop or on the I/O pool):
    4xx, nothing filed, no temporary file left behind."""
    from lightmail.storage.blobs import FilesystemBlobStore

    def full(*args: Any, **kwargs: Any) -> bool:
        raise OSError(28, "No space left on device")

    server = yield start_lmtp(tmp_path, socket_dir / "lmtp.sock")
    try:
        monkeypatch.setattr(FilesystemBlobStore, "_commit", full)
        _, [one] = yield in_thread(transaction, server.ports["lmtp"], "bob@example.test",
                                   subject="lost")
        _, two = yield in_thread(transaction, server.ports["lmtp"], "bob@example.test",
                                 "bob+lists@example.test", subject="lost2")
        assert one.startswith("451") and [t[:3] for t in two] == ["451", "451"]
        assert (yield server.inbox("bob@example.test")) == []
        assert (yield server.inbox("bob@example.test", "lists")) == []
        blobs = server.parts.blobs
        deadline = time.monotonic() + 10
        while blobs._spares_coming and time.monotonic() < deadline:
            yield deferLater(reactor, 0.01, lambda: None)       # spares being made
        spares = {path for _, path, _ in blobs._spares}          # empty, kept ready
        assert {str(p) for p in Path(blobs._tmp).iterdir()} == spares
        assert all(os.path.getsize(path) == 0 for path in spares)
    finally:
        yield server.root.stopService()
