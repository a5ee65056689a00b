"""Spam scoring and Junk training: LightMail's rspamd client (lightmail/policy/rspamd.py)
against Debian's rspamd started here with a local configuration (no network lookups;
Bayes on a private redis-server), SpamAssassin's spamd (lightmail/policy/spamd.py),
fakes that hang, answer garbage or close; the spam check of a running LightMail, and
lessons queued by IMAP MOVE and COPY reaching the scanner."""

from __future__ import annotations

import imaplib
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from inprocess import in_thread, start
from scanpeers import GTUBE, FakeScanner, Rspamd, Spamd
from twisted.internet import defer, reactor, task

from lightmail.config import SpamConfig
from lightmail.policy.interfaces import SpamRequest
from lightmail.policy.rspamd import RspamdClient
from lightmail.policy.scanclient import ScannerError
from lightmail.policy.spamd import SpamdClient

WORDS = " ".join(f"quarterly{n} report figures meeting agenda budget" for n in range(12))
HAM = (b"From: Ann <ann@sender.example>\r\nTo: Bob <bob@example.test>\r\n"
       b"Subject: the quarterly report\r\nMessage-ID: <h1@sender.example>\r\n"
       b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n" + WORDS.encode() + b"\r\n")
SPAM = HAM.replace(b"the quarterly report", b"cheap offer").replace(b"<h1@", b"<s1@") \
    .replace(b"\r\n\r\n", b"\r\n\r\n" + GTUBE + b"\r\n", 1)
#: What a spammer may write to pass its mail off as scored clean.
PRE_MARKED = (b"X-Spam-Flag: NO\r\nX-Spam-Score: -50\r\n"
              b"X-Spam-Status: No, score=-50\r\n\trequired=15 action=no_action\r\n"
              b"X-Spam-Symbols: NONE\r\n")
REQUEST = SpamRequest(client_address="192.0.2.7", helo="client.sender.example",
                      mail_from="ann@sender.example", recipients=["bob@example.test"],
                      queue_id="Q1")


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    peer = Rspamd(tmp_path_factory.mktemp("rspamd")).start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spamd]:
    peer = Spamd(tmp_path_factory.mktemp("spamd")).start()     # in a /tmp dir of its own
    try:
        yield peer
    finally:
        peer.stop()


def rspamd_client(url: str, controller_url: str = "", timeout: float = 10.0) -> RspamdClient:
    settings = SpamConfig(url=url, controller_url=controller_url or url, timeout=timeout)
    return RspamdClient(reactor, lambda: settings)


def spamd_client(address: str, timeout: float = 30.0) -> SpamdClient:
    settings = SpamConfig(backend="spamd", socket=address, timeout=timeout)
    return SpamdClient(reactor, lambda: settings)


def message(n: int) -> bytes:
    """A message of its own: rspamd learns a text once (it keeps a digest of what it
    learnt), so each has words of its own."""
    words = " ".join(f"w{n}x{k} item{n * 7 + k} note{n}q{k}" for k in range(15))
    return HAM.replace(b"<h1@", f"<h{n}x@".encode()).replace(WORDS.encode(),
                                                              words.encode())


# --- the clients ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_rspamd_scores_and_learns(rspamd: Rspamd) -> None:
    client = rspamd_client(rspamd.url, rspamd.controller_url)
    verdict = await client.check(SPAM, REQUEST)
    assert verdict.action == "reject" and "GTUBE" in verdict.symbols
    assert verdict.message                # rspamd's smtp_message
    verdict = await client.check(HAM, REQUEST)
    assert verdict.action == "no action"
    assert verdict.required_score > verdict.score
    before = rspamd.stat()["learned"]
    await client.learn("spam", message(900), "bob@example.test")
    await client.learn("ham", message(901), "bob@example.test")
    assert rspamd.stat()["learned"] == before + 2
    # Taught again: rspamd answers 208 ("already learned") or learns it anew (it
    # does either, by what its digest of the text remembers); neither is an error.
    await client.learn("spam", message(900), "bob@example.test")


@pytest_twisted.ensureDeferred
async def test_spamd_scores_and_learns(spamd: Spamd) -> None:
    client = spamd_client(spamd.address)
    verdict = await client.check(SPAM, REQUEST)
    assert verdict.action == "reject" and "GTUBE" in verdict.symbols
    verdict = await client.check(HAM, REQUEST)
    assert verdict.action == "no action"
    await client.learn("spam", message(950), "bob@example.test")
    learned = await in_thread(spamd.learned)
    assert learned.get("nspam") == 1, learned


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", ["hang", "garbage", "close"])
async def test_a_misbehaving_rspamd_is_an_error(tmp_path: Path, mode: str) -> None:
    fake = FakeScanner(mode, tmp_path, unix=False, close_after=200,
                       garbage=b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!")
    try:
        with pytest.raises(ScannerError):
            await rspamd_client(fake.url, timeout=1.5).check(SPAM, REQUEST)
        with pytest.raises(ScannerError):
            await rspamd_client(fake.url, timeout=1.5).learn("spam", SPAM, "")
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", ["hang", "garbage", "close"])
async def test_a_misbehaving_spamd_is_an_error(tmp_path: Path, mode: str) -> None:
    fake = FakeScanner(mode, tmp_path, garbage=b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n")
    try:
        with pytest.raises(ScannerError):
            await spamd_client(fake.address, timeout=1.5).check(SPAM, REQUEST)
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_nobody_listening_is_an_error() -> None:
    with pytest.raises(ScannerError, match="cannot reach rspamd"):
        await rspamd_client("http://127.0.0.1:9").check(HAM, REQUEST)
    with pytest.raises(ScannerError, match="cannot reach the spamd"):
        await spamd_client("tcp:127.0.0.1:9").check(HAM, REQUEST)


# --- on a running LightMail ---------------------------------------------------------------

def spam_server(tmp_path: Path, spam: str) -> Any:
    timeout = "" if "timeout" in spam else "timeout = 3s\n"
    return start(tmp_path, extra=(
        "[directory]\nauth_over_plaintext = yes\n"
        f"[spam]\n{timeout}{spam}"
        "[listener:filtered]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "checks = spam\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"))


def rspamd_config(peer: Rspamd, more: str = "") -> str:
    return f"url = {peer.url}\ncontroller_url = {peer.controller_url}\n{more}"


def send(port: int, data: bytes) -> Any:
    def go() -> Any:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            try:
                return client.sendmail("ann@sender.example", ["bob@example.test"], data)
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code, exc.smtp_error.decode()
    return in_thread(go)


def header(data: bytes, name: bytes) -> list[bytes]:
    head = data.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
            if line.lower().startswith(name.lower() + b":")]


@pytest_twisted.inlineCallbacks
def test_rspamd_actions_reject_tag_and_junk(tmp_path: Path, rspamd: Rspamd) -> Any:
    server = yield spam_server(tmp_path, rspamd_config(rspamd))
    try:
        code, text = yield send(server.ports["filtered"], SPAM)
        assert (code, text.split()[0]) == (550, "5.7.1"), text
        assert (yield send(server.ports["filtered"], PRE_MARKED + HAM)) == {}
        [delivered] = yield server.delivered("bob@example.test", 1)
        assert header(delivered, b"X-Spam-Flag") == [b"NO"]
        [status] = header(delivered, b"X-Spam-Status")
        assert status.startswith(b"No, score=") and b"action=no_action" in status
        # The fields the message came with are gone: only rspamd's verdict is left.
        [score] = header(delivered, b"X-Spam-Score")
        assert score != b"-50" and b"score=-50" not in delivered
        assert b"NONE" not in delivered and b"\trequired=15" not in delivered
    finally:
        yield server.stop()
    # "no action" mapped to junk: filed in Junk, made when missing.
    server = yield spam_server(tmp_path / "junk", rspamd_config(
        rspamd, "actions = no action: junk\njunk_folder = Spam\n"))
    try:
        assert (yield send(server.ports["filtered"], HAM)) == {}
        [delivered] = yield server.delivered("bob@example.test", 1, mailbox="Spam")
        assert header(delivered, b"X-Spam-Status")
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_spamd_backend_rejects_gtube(tmp_path: Path, spamd: Spamd) -> Any:
    server = yield spam_server(tmp_path, f"backend = spamd\nsocket = {spamd.address}\n"
                                         "timeout = 30s\n")
    try:
        code, text = yield send(server.ports["filtered"], SPAM)
        assert (code, text.split()[0]) == (550, "5.7.1"), text
        assert (yield send(server.ports["filtered"], PRE_MARKED + HAM)) == {}
        [delivered] = yield server.delivered("bob@example.test", 1)
        [status] = header(delivered, b"X-Spam-Status")
        assert b"scanner=spamd" in status
        assert header(delivered, b"X-Spam-Score") != [b"-50"]
        assert len(header(delivered, b"X-Spam-Flag")) == 1
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_scanner_down_accepts_and_tags_or_tempfails(tmp_path: Path) -> Any:
    fake = FakeScanner("hang", tmp_path, unix=False)
    server = yield spam_server(tmp_path / "a", f"url = {fake.url}\n")
    try:
        assert (yield send(server.ports["filtered"], HAM)) == {}
        [delivered] = yield server.delivered("bob@example.test", 1)
        assert header(delivered, b"X-Spam-Status") == [b"Unscanned (scanner not available)"]
    finally:
        yield server.stop()
    server = yield spam_server(tmp_path / "b", f"url = {fake.url}\non_error = tempfail\n")
    try:
        code, text = yield send(server.ports["filtered"], HAM)
        assert (code, text.split()[0]) == (451, "4.7.1")
    finally:
        yield server.stop()
        yield fake.stop()


# --- Junk training ------------------------------------------------------------------------

def imap(port: int, *commands: tuple[str, ...]) -> Any:
    """Log in as bob, select INBOX, run each (command, args...) with imaplib's uid()
    or a plain method; the results in order."""
    def go() -> Any:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        try:
            client.login("bob@example.test", "bob-secret")
            results = []
            for name, *args in commands:
                if name == "select":
                    results.append(client.select(*args))
                else:
                    results.append(client.uid(name, *args))
            return results
        finally:
            client.logout()
    return in_thread(go)


@defer.inlineCallbacks
def wait_for(condition: Any, what: str, seconds: float = 20.0) -> Any:
    for _ in range(int(seconds / 0.1)):
        value = yield condition()
        if value:
            return value
        yield task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"{what} never happened")


@pytest_twisted.inlineCallbacks
def test_moving_into_and_out_of_junk_teaches_rspamd(tmp_path: Path, rspamd: Rspamd) -> Any:
    server = yield spam_server(tmp_path, rspamd_config(rspamd))
    lessons = server.parts.lessons
    try:
        for n in range(3):
            assert (yield send(server.ports["filtered"], message(100 + n))) == {}
        yield server.delivered("bob@example.test", 3)
        before = rspamd.stat()["learned"]
        port = server.ports["imap"]
        # Into Junk: spam; out of Junk into another mailbox: ham; to Trash: nothing.
        [_, moved] = yield imap(port, ("select", "INBOX"), ("move", "1:2", "Junk"))
        assert moved[0] == "OK"
        yield wait_for(lambda: in_thread(lambda: rspamd.stat()["learned"] == before + 2),
                       "two spam lessons")
        yield wait_for(lambda: lessons.pending().addCallback(lambda rows: rows == []),
                       "the queue emptying")
        [_, copied, trashed] = yield imap(port, ("select", "Junk"), ("copy", "1", "lists"),
                                          ("move", "2", "Trash"))
        assert copied[0] == "OK" and trashed[0] == "OK"
        yield wait_for(lambda: in_thread(lambda: rspamd.stat()["learned"] == before + 3),
                       "the ham lesson")
        assert (yield lessons.pending()) == []
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_lessons_wait_and_retry_while_the_scanner_is_down(tmp_path: Path) -> Any:
    """The IMAP MOVE completes at once; the lesson stays queued, its attempt and
    error recorded, for a later try."""
    fake = FakeScanner("close", tmp_path, unix=False, close_after=1)
    server = yield spam_server(tmp_path / "s", f"controller_url = {fake.url}\n"
                                                f"url = {fake.url}\n")
    try:
        yield send(server.ports["filtered"], message(300))
        yield server.delivered("bob@example.test", 1)
        started = reactor.seconds()  # type: ignore[attr-defined]
        [_, moved] = yield imap(server.ports["imap"], ("select", "INBOX"),
                                ("move", "1", "Junk"))
        assert moved[0] == "OK"
        assert reactor.seconds() - started < 5  # type: ignore[attr-defined]
        [row] = yield wait_for(
            lambda: server.parts.lessons.pending().addCallback(
                lambda rows: rows if rows and rows[0]["attempts"] else None),
            "a failed attempt")
        assert row["kind"] == "spam" and row["user_address"] == "bob@example.test"
        assert "rspamd" in row["last_error"]
        assert row["next_attempt"] > row["created"] + 20_000
    finally:
        yield server.stop()
        yield fake.stop()
