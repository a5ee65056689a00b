"""Antivirus: LightMail's clamd client (lightmail/policy/clamav.py) against Debian's
clamd started here with a signature database made here (the EICAR test string), and
against fakes that hang, answer garbage or close in the middle; the antivirus check
on SMTP and LMTP listeners and IMAP APPEND of a running LightMail."""

from __future__ import annotations

import base64
import imaplib
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from inprocess import in_thread, start
from scanpeers import EICAR, SIGNATURE, Clamd, FakeScanner
from twisted.internet import reactor

from lightmail.config import AntivirusConfig
from lightmail.policy.clamav import ClamdScanner
from lightmail.policy.scanclient import ScannerError

CLEAN = (b"From: Ann <ann@sender.example>\r\nTo: bob@example.test\r\n"
         b"Subject: clean\r\nMessage-ID: <c1@sender.example>\r\n\r\nNothing to see.\r\n")
INFECTED = CLEAN.replace(b"clean", b"infected") + EICAR + b"\r\n"
ATTACHED = (b"From: ann@sender.example\r\nTo: bob@example.test\r\nSubject: attached\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n--b\r\n"
            b"Content-Type: application/octet-stream; name=\"x.com\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(EICAR).replace(b"\n", b"\r\n") + b"--b--\r\n")
FOUND = f"{SIGNATURE}.UNOFFICIAL"       # clamd marks signatures not signed by ClamAV
#: What a sender may write to pass its virus off as scanned.
PRE_MARKED = b"X-Virus-Status: Clean\r\n" + INFECTED


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    peer = Clamd(tmp_path_factory.mktemp("clamd")).start()
    try:
        yield peer
    finally:
        peer.stop()


def scanner(address: str, timeout: float = 10.0) -> ClamdScanner:
    settings = AntivirusConfig(socket=address, timeout=timeout)
    return ClamdScanner(reactor, lambda: settings)


# --- the client -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_clamd_verdicts(clamd: Clamd) -> None:
    client = scanner(clamd.address)
    assert (await client.scan(CLEAN)).status == "clean"
    found = await client.scan(INFECTED)
    assert (found.status, found.name) == ("infected", FOUND)
    # In a base64 attachment: clamd decodes the MIME parts.
    assert (await client.scan(ATTACHED)).name == FOUND
    # Split over several INSTREAM chunks (64 KiB each), the string across a boundary.
    padded = CLEAN + b"x" * (64 * 1024 - len(CLEAN) - 10) + EICAR + b"\r\n"
    assert (await client.scan(padded)).status == "infected"


@pytest_twisted.ensureDeferred
async def test_over_stream_max_length_is_unscanned_not_an_error(clamd: Clamd) -> None:
    """clamd's StreamMaxLength (1M here): it says so, closes, and the message is
    reported as not scanned (tagged by the check), not as a failure of the scanner."""
    result = await scanner(clamd.address).scan(CLEAN + b"y" * (3 * 1024 * 1024))
    assert result.status == "unscanned" and "StreamMaxLength" in result.reason


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", ["hang", "garbage", "close"])
@pytest.mark.parametrize("unix", [True, False])
async def test_a_misbehaving_scanner_is_an_error_within_the_timeout(
        tmp_path: Path, mode: str, unix: bool) -> None:
    fake = FakeScanner(mode, tmp_path, unix=unix)
    try:
        started = reactor.seconds()  # type: ignore[attr-defined]
        with pytest.raises(ScannerError) as raised:
            await scanner(fake.address, timeout=1.5).scan(INFECTED + b"z" * 200_000)
        assert reactor.seconds() - started < 5  # type: ignore[attr-defined]
        assert fake.connections == 1
        expected = {"hang": "did not answer within 1.5 s",
                    "garbage": "something else", "close": "without an answer"}[mode]
        assert expected in str(raised.value)
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_nobody_listening_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ScannerError, match="cannot reach the clamd"):
        await scanner(f"unix:{tmp_path / 'none.sock'}").scan(CLEAN)
    with pytest.raises(ScannerError, match="cannot reach the clamd"):
        await scanner("tcp:127.0.0.1:9").scan(CLEAN)


# --- on a running LightMail ---------------------------------------------------------------

def av_server(tmp_path: Path, address: str, antivirus: str = "") -> Any:
    return start(tmp_path, extra=(
        "[directory]\nauth_over_plaintext = yes\n"
        f"[antivirus]\nsocket = {address}\ntimeout = 3s\n{antivirus}"
        "[listener:av]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "checks = antivirus\n"
        "[listener:lmtp]\nprotocol = lmtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "checks = antivirus\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "checks = antivirus\n"
        "[listener:plainimap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"))


def send(port: int, message: bytes, lmtp: bool = False) -> Any:
    def go() -> Any:
        client = (smtplib.LMTP("127.0.0.1", port, timeout=30) if lmtp
                  else smtplib.SMTP("127.0.0.1", port, timeout=30))
        with client:
            try:
                return client.sendmail("ann@sender.example", ["bob@example.test"], message)
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code, exc.smtp_error.decode()
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients["bob@example.test"]
                return code, text.decode()
    return in_thread(go)


def append(port: int, message: bytes) -> Any:
    def go() -> Any:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        try:
            client.login("bob@example.test", "bob-secret")
            try:
                status, data = client.append("INBOX", None, None, message)
            except imaplib.IMAP4.error as exc:
                return "NO", str(exc)
            return status, b" ".join(data).decode()
        finally:
            client.logout()
    return in_thread(go)


def header(message: bytes, name: bytes) -> list[bytes]:
    head = message.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
            if line.lower().startswith(name.lower() + b":")]


@pytest_twisted.inlineCallbacks
def test_smtp_lmtp_and_append_refuse_a_virus(tmp_path: Path, clamd: Clamd) -> Any:
    server = yield av_server(tmp_path, clamd.address)
    try:
        code, text = yield send(server.ports["av"], INFECTED)
        assert (code, text.split()[0]) == (554, "5.7.1") and FOUND in text
        code, text = yield send(server.ports["lmtp"], ATTACHED, lmtp=True)
        assert (code, text.split()[0]) == (554, "5.7.1") and FOUND in text
        assert (yield send(server.ports["av"], CLEAN)) == {}
        [message] = yield server.delivered("bob@example.test", 1)
        assert header(message, b"X-Virus-Status") == [b"Clean"]
        # A listener without the check lets it through unscanned, and leaves the
        # field it came with (it is not that listener's verdict).
        assert (yield send(server.ports["mx"], PRE_MARKED)) == {}
        unscanned = (yield server.delivered("bob@example.test", 2))[1]
        assert header(unscanned, b"X-Virus-Status") == [b"Clean"]
        status, text = yield append(server.ports["imap"], INFECTED)
        assert status == "NO" and "virus" in text and FOUND in text
        status, _ = yield append(server.ports["imap"], CLEAN)
        assert status == "OK"
        status, _ = yield append(server.ports["plainimap"], INFECTED)
        assert status == "OK"
        yield server.delivered("bob@example.test", 4)
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_quarantine_files_the_virus_apart(tmp_path: Path, clamd: Clamd) -> Any:
    server = yield av_server(tmp_path, clamd.address, "action = quarantine\n")
    try:
        # Its own "X-Virus-Status: Clean" goes: only clamd's verdict is left.
        assert (yield send(server.ports["av"], PRE_MARKED)) == {}
        [message] = yield server.delivered("bob@example.test", 1, mailbox="Quarantine")
        assert header(message, b"X-Virus-Status") == [f"Infected ({FOUND})".encode()]
        assert (yield server.inbox("bob@example.test")) == []
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_scanner_down_tempfails_or_tags_as_configured(tmp_path: Path) -> Any:
    fake = FakeScanner("hang", tmp_path)
    server = yield av_server(tmp_path / "a", fake.address)
    try:
        code, text = yield send(server.ports["av"], CLEAN)
        assert (code, text.split()[0]) == (451, "4.7.1")
        code, text = yield send(server.ports["lmtp"], CLEAN, lmtp=True)
        assert code == 451
        status, text = yield append(server.ports["imap"], CLEAN)
        assert status == "NO" and "UNAVAILABLE" in text
        assert (yield server.inbox("bob@example.test")) == []
    finally:
        yield server.stop()
    server = yield av_server(tmp_path / "b", fake.address, "on_error = accept\n")
    try:
        assert (yield send(server.ports["av"], CLEAN)) == {}
        [message] = yield server.delivered("bob@example.test", 1)
        assert header(message, b"X-Virus-Status") == [b"Unscanned (scanner not available)"]
        status, _ = yield append(server.ports["imap"], CLEAN)
        assert status == "OK"
    finally:
        yield server.stop()
        yield fake.stop()


@pytest_twisted.inlineCallbacks
def test_larger_than_max_size_is_delivered_unscanned(tmp_path: Path, clamd: Clamd) -> Any:
    server = yield av_server(tmp_path, clamd.address, "max_size = 1k\n")
    big = INFECTED + b"padding\r\n" * 200
    try:
        assert (yield send(server.ports["av"], big)) == {}
        [message] = yield server.delivered("bob@example.test", 1)
        assert header(message, b"X-Virus-Status") == [b"Unscanned (larger than 1024 octets)"]
    finally:
        yield server.stop()
