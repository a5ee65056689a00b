"""IMAP against real clients: imaplib and IMAPClient over sockets.

Covers the session end to end: login (LOGIN, AUTHENTICATE, STARTTLS, implicit TLS),
mailboxes (LIST, CREATE, RENAME, DELETE, STATUS, special use), APPEND/FETCH/STORE/
COPY/MOVE/EXPUNGE with UIDPLUS results, untagged updates between two sessions, IDLE,
CONDSTORE and QRESYNC, limits (also under COMPRESS, against a deflate bomb), pipelined
commands, and malformed input answered BAD without a disconnect.
"""

from __future__ import annotations

import imaplib
import socket
import ssl
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from imapwire import Client
from inprocess import in_thread, start
from recordingreader import RecordingReader
from twisted.internet import defer

from lightmail.imap import core

IMAP = ("[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "tls = starttls\ntls_cert = {cert}\ntls_key = {key}\n"
        "[listener:imaps]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "tls = implicit\ntls_cert = {cert}\ntls_key = {key}\n"
        "[listener:imap-plain]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n")
PLAINTEXT = "[directory]\nauth_over_plaintext = yes\n"


def message(number: int, subject: str = "", extra: str = "") -> bytes:
    return (f"From: Sender <sender@example.org>\r\nTo: bob@example.test\r\n"
            f"Subject: {subject or f'imap-{number}'}\r\n"
            f"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
            f"Message-ID: <m{number}@example.org>\r\n{extra}"
            f"\r\nBody of message {number}\r\n").encode()


@defer.inlineCallbacks
def start_imap(tmp: Path, extra: str = "", count: int = 3) -> Any:
    server = yield start(tmp, IMAP.format(cert=tmp / "cert.pem", key=tmp / "key.pem")
                         + extra)
    parts = server.parts
    bob = yield parts.directory.get_user("bob@example.test")
    inbox = yield parts.mailstore.get_or_create_mailbox(bob.id, "INBOX")
    for number in range(1, count + 1):
        blob = yield parts.blobs.put(message(number))
        yield parts.mailstore.append(inbox.id, blob)
    server.inbox_id = inbox.id
    server.bob = bob
    return server


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def login(port: int, timeout: float = 20) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=timeout)
    imap.login("bob@example.test", "bob-secret")
    return imap


def ok(result: tuple[str, Any]) -> Any:
    status, data = result
    assert status == "OK", data
    return data


@pytest_twisted.inlineCallbacks
def test_login_list_select_fetch_store(tmp_path: Path) -> None:
    server = yield start_imap(tmp_path, PLAINTEXT)
    try:
        def run() -> dict[str, Any]:
            out: dict[str, Any] = {}
            imap = login(server.ports["imap-plain"])
            out["caps"] = imap.capabilities
            out["list"] = ok(imap.list())
            out["select"] = ok(imap.select("INBOX"))
            out["untagged"] = dict(imap.untagged_responses)
            out["flags"] = ok(imap.fetch("1:*", "(UID FLAGS RFC822.SIZE)"))
            out["body"] = ok(imap.fetch("2", "(BODY.PEEK[])"))
            out["seen_after_peek"] = ok(imap.fetch("2", "(FLAGS)"))
            out["rfc822"] = ok(imap.fetch("2", "(RFC822)"))
            out["seen_after_fetch"] = ok(imap.fetch("2", "(FLAGS)"))
            out["store"] = ok(imap.store("1", "+FLAGS", "(\\Flagged $Work)"))
            out["uid_store"] = ok(imap.uid("STORE", "3", "-FLAGS.SILENT", "(\\Seen)"))
            out["status"] = ok(imap.status("INBOX", "(MESSAGES UNSEEN UIDNEXT SIZE)"))
            assert imap.logout()[0] == "BYE"
            return out
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert "IMAP4REV2" in out["caps"] and "IDLE" in out["caps"]
    names = [line.decode() for line in out["list"]]
    assert any(n.endswith('"/" INBOX') for n in names)
    assert any("\\Sent" in n and n.endswith("Sent") for n in names), names
    assert out["select"] == [b"3"]
    flags = b" ".join(x for x in out["flags"] if isinstance(x, bytes))
    # An IMAP4rev1 session (imaplib does not ENABLE rev2) sees \\Recent on new mail.
    assert b"1 (UID 1 FLAGS (\\Recent) RFC822.SIZE" in flags
    assert out["body"][0][1] == message(2)
    assert b"\\Seen" not in out["seen_after_peek"][0]
    assert out["rfc822"][0][1] == message(2)
    assert b"\\Seen" in out["seen_after_fetch"][0]
    assert b"\\Flagged" in out["store"][0] and b"$Work" in out["store"][0]
    assert out["status"][0].startswith(b"INBOX (MESSAGES 3 UNSEEN 2 UIDNEXT 4 SIZE ")


class Wire:
    """A bare IMAP connection: send lines as they are, read until a tagged reply."""

    def __init__(self, port: int, tls: bool = False) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock = tls_context().wrap_socket(sock) if tls else sock
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline()

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline()
            lines.append(line)
            if not line or line.startswith(tag + b" "):
                return lines

    def cmd(self, tag: str, text: str) -> list[bytes]:
        self.send(f"{tag} {text}\r\n".encode())
        return self.until(tag.encode())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def wire_login(port: int) -> Wire:
    wire = Wire(port)
    assert wire.cmd("l", "LOGIN bob@example.test bob-secret")[-1].startswith(b"l OK")
    return wire


@pytest_twisted.inlineCallbacks
def test_limits_and_malformed_input_keep_the_session(tmp_path: Path) -> None:
    limits = ("[imap]\nmax_line_length = 1024\nmax_literal = 2048\nmax_errors = 50\n")
    server = yield start_imap(tmp_path, PLAINTEXT + limits)
    try:
        def run() -> dict[str, Any]:
            out: dict[str, Any] = {}
            wire = wire_login(server.ports["imap-plain"])
            out["garbage"] = wire.cmd("g1", "FROBNICATE now")
            out["no_tag"] = (wire.send(b"\r\n"), wire.line())[1]
            out["nul"] = wire.cmd("g2", "SELECT IN\0BOX")
            out["bad_set"] = (wire.cmd("s", "SELECT INBOX"), wire.cmd("g3", "FETCH 1:x FLAGS"))[1]
            out["out_of_range"] = wire.cmd("g4", "FETCH 99 FLAGS")
            out["unclosed"] = wire.cmd("g5", "FETCH 1 (FLAGS")
            out["bad_item"] = wire.cmd("g6", "FETCH 1 (NOTANITEM)")
            wire.send(b"g7 NOOP " + b"x" * 5000 + b"\r\n")
            out["long"] = wire.line()
            out["after_long"] = wire.cmd("g8", "NOOP")
            # A synchronising literal over the limit is refused before it is sent.
            wire.send(b"g9 APPEND INBOX {4096}\r\n")
            out["big_sync"] = wire.line()
            out["after_sync"] = wire.cmd("g10", "NOOP")
            # A non-synchronising one is read and dropped, then the command refused.
            wire.send(b"g11 APPEND INBOX {4096+}\r\n" + b"y" * 4096 + b"\r\n")
            out["big_nonsync"] = wire.until(b"g11")
            out["small"] = wire.cmd("g12", "APPEND INBOX {5+}\r\nhello")
            out["fine"] = wire.cmd("g13", "FETCH 1 (FLAGS)")
            wire.close()
            return out
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert out["garbage"][-1].startswith(b"g1 BAD")
    assert out["no_tag"] == b"* BAD Missing or invalid tag\r\n", out["no_tag"]
    assert len(out["nul"]) == 1 and out["nul"][-1].startswith(b"g2 BAD"), out["nul"]
    assert out["bad_set"][-1].startswith(b"g3 BAD")
    assert out["out_of_range"][-1].startswith(b"g4 BAD")
    assert out["unclosed"][-1].startswith(b"g5 BAD")
    assert out["bad_item"][-1].startswith(b"g6 BAD")
    assert out["long"].startswith(b"* BAD") and b"too long" in out["long"], out["long"]
    assert out["after_long"][-1].startswith(b"g8 OK")
    assert out["big_sync"].startswith(b"g9 NO [TOOBIG]")
    assert out["after_sync"][-1].startswith(b"g10 OK")
    assert out["big_nonsync"][-1].startswith(b"g11 NO [TOOBIG]"), out["big_nonsync"]
    assert out["small"][-1].startswith(b"g12 OK [APPENDUID")
    assert out["fine"][-1].startswith(b"g13 OK")


@pytest_twisted.inlineCallbacks
def test_too_many_errors_idle_timeout_and_per_user_limit(tmp_path: Path) -> None:
    limits = "[imap]\nmax_errors = 3\nidle_timeout = 1s\nmax_connections_per_user = 2\n"
    server = yield start_imap(tmp_path, PLAINTEXT + limits)
    try:
        def run() -> dict[str, Any]:
            out: dict[str, Any] = {}
            port = server.ports["imap-plain"]
            wire = Wire(port)
            out["errors"] = [wire.cmd(f"e{i}", "BOGUS") for i in range(3)]
            wire.send(b"e3 BOGUS\r\n")
            out["bye"] = [wire.line(), wire.line(), wire.line()]
            wire.close()
            first, second = wire_login(port), wire_login(port)
            third = Wire(port)
            out["third"] = third.cmd("l", "LOGIN bob@example.test bob-secret")
            third.close()
            second.close()
            time.sleep(0.3)
            fourth = Wire(port)
            out["after_close"] = fourth.cmd("l", "LOGIN bob@example.test bob-secret")
            # IDLE starts the timer again; without a command the session ends.
            out["idle_bye"] = [fourth.line(), fourth.line()]
            fourth.close()
            first.close()
            return out
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert all(r[-1].split()[1] == b"BAD" for r in out["errors"])
    assert any(line.startswith(b"* BYE") for line in out["bye"]), out["bye"]
    assert out["bye"][-1] == b""          # then the connection is closed
    assert out["third"][-1].startswith(b"l NO"), out["third"]
    assert out["third"][-1].startswith(b"l NO [LIMIT]"), out["third"]
    assert out["after_close"][-1].startswith(b"l OK")
    assert out["idle_bye"][0].startswith(b"* BYE") and out["idle_bye"][1] == b""


@pytest_twisted.inlineCallbacks
def test_hostile_arguments_are_refused_and_the_session_goes_on(tmp_path: Path) -> None:
    """Numbers too large for int() or the database, and LIST patterns that would
    backtrack a regex for ever: BAD (not [SERVERBUG], not a stalled reactor)."""
    server = yield start_imap(tmp_path, PLAINTEXT + "[imap]\nmax_errors = 100\n")
    big = "9" * 5000
    cases = [
        (f"FETCH 1 BODY[]<{big}.1>", "BAD"), ("FETCH 1 BODY[]<4294967296.1>", "BAD"),
        ("FETCH 1 BODY[]<-1.5>", "BAD"), (f"FETCH {big} FLAGS", "BAD"),
        (f"UID FETCH 1:{big} FLAGS", "BAD"), ("UID FETCH 4294967296 FLAGS", "BAD"),
        ("FETCH 1:99999999999999999999 FLAGS", "BAD"), (f"FETCH 1 BINARY[{big}]", "BAD"),
        ("FETCH 1 BODY[1.2.3.4.5.6.7.8.9.10.11.12.MIME]", "OK"),
        ("FETCH 1 FLAGS (CHANGEDSINCE \u00b2)", "BAD"),
        (f"FETCH 1 FLAGS (CHANGEDSINCE {big})", "BAD"),
        ("STORE 1 (UNCHANGEDSINCE 99999999999999999999) +FLAGS (x)", "BAD"),
        ("UID FETCH 1:* FLAGS (CHANGEDSINCE 99999999999999999999 VANISHED)", "BAD"),
        ("STORE 1 +FLAGS (\\Bogus", "BAD"), ("SEARCH " + "NOT " * 5000 + "ALL", "BAD"),
        ("SORT (FOO) UTF-8 ALL", "BAD"), ("RENAME INBOX INBOX", "NO"),
        ('LIST "" "' + "*a" * 300 + '"', "OK"), ('LIST "" "' + "%" * 500 + '"', "OK"),
    ]
    try:
        def run() -> list[tuple[str, bytes, bytes]]:
            wire = wire_login(server.ports["imap-plain"])
            wire.cmd("e", "ENABLE QRESYNC")
            wire.cmd("s", "SELECT INBOX")
            wire.cmd("c", "CREATE " + "a" * 200 + "b")
            out = [(want, wire.cmd(f"t{i}", text)[-1], wire.cmd(f"n{i}", "NOOP")[-1])
                   for i, (text, want) in enumerate(cases)]
            wire.close()
            return out
        out = yield in_thread(run)
    finally:
        yield server.stop()
    for i, (want, reply, noop) in enumerate(out):
        assert reply.startswith(f"t{i} {want} ".encode()), (cases[i][0][:60], reply[:100])
        assert noop.startswith(f"n{i} OK".encode())


@pytest_twisted.inlineCallbacks
def test_pipelined_commands_done_at_once_do_not_nest(tmp_path: Path) -> None:
    """Each command that finishes at once goes back to the reading loop: 3000
    pipelined NOOPs used to nest 3000 calls deep and die of RecursionError."""
    server = yield start_imap(tmp_path, PLAINTEXT)
    try:
        def run() -> list[bytes]:
            wire = wire_login(server.ports["imap-plain"])
            wire.cmd("s", "SELECT INBOX")
            wire.send(b"".join(b"n%d NOOP\r\n" % i for i in range(3000)))
            out = wire.until(b"n2999")
            wire.close()
            return out
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert out == [b"n%d OK NOOP completed\r\n" % i for i in range(3000)]


def deflated(deflate: Any, pieces: Iterator[bytes]) -> bytes:
    """``pieces`` through the client's DEFLATE stream, one at a time (a bomb's 100 MB
    are never held), then a sync flush."""
    out = [deflate.compress(piece) for piece in pieces]
    return b"".join(out) + deflate.flush(zlib.Z_SYNC_FLUSH)


def bomb(total: int, octet: bytes) -> Iterator[bytes]:
    for _ in range(total // 2**20):
        yield octet * 2**20


@pytest_twisted.inlineCallbacks
def test_compress_deflate_bomb_is_refused_without_being_inflated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """100 MB of one octet, deflated to about 100 KB, as a literal over the limit and
    as one line: the same answers as without COMPRESS (NO [TOOBIG], BAD), and the
    server inflates no more than a line's worth at a time."""
    monkeypatch.setattr(core, "CommandReader", RecordingReader)
    server = yield start_imap(tmp_path, PLAINTEXT)
    size = 100 * 2**20
    try:
        def run() -> dict[str, Any]:
            client = Client(server.ports["imap-plain"], timeout=60)
            client.login("bob@example.test", "bob-secret")
            client.compress().ok()
            literal = deflated(client.deflate, iter(
                [b"a APPEND INBOX {%d+}\r\n" % size, *bomb(size, b"\0"), b"\r\nb NOOP\r\n"]))
            line = deflated(client.deflate, iter(
                [b"c NOOP ", *bomb(size, b"x"), b"\r\nd NOOP\r\n"]))
            RecordingReader.longest = 0
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                client.sock.sendall(literal)
                out = {"a": client.read_until("a"), "b": client.read_until("b")}
                client.sock.sendall(line)
                out["c"] = client.read_until("d")
                out["grew"] = tracemalloc.get_traced_memory()[1] - before
            finally:
                tracemalloc.stop()
            out["sent"] = len(literal) + len(line)
            out["after"] = client.cmd("NOOP")
            client.close()
            return out
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert out["sent"] < 2**20                  # a bomb indeed
    assert RecordingReader.longest <= 65536 + 2      # [imap] max_line_length + CRLF
    assert out["grew"] < 8 * 2**20, out["grew"]
    assert out["a"].status == "NO" and out["a"].text.startswith("[TOOBIG]"), str(out["a"])
    assert out["b"].status == "OK"
    # One BAD for the whole line: its rest is not taken for more commands.
    assert [u.text for u in out["c"].untagged] == ["* BAD Command line too long"]
    assert out["c"].status == "OK"
    assert out["after"].status == "OK"


@pytest_twisted.inlineCallbacks
def test_compressed_input_waits_while_a_command_runs(tmp_path: Path) -> None:
    """Commands pipelined behind COMPRESS (in its own packet) and behind a command
    that is still running stay compressed until their turn, and none is lost; a
    corrupt stream right after COMPRESS is answered BYE."""
    server = yield start_imap(tmp_path, PLAINTEXT)
    port = server.ports["imap-plain"]
    try:
        def run() -> dict[str, Any]:
            client = Client(port)
            client.login("bob@example.test", "bob-secret")
            deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
            client.sock.sendall(b"z COMPRESS DEFLATE\r\n" + deflated(
                deflate, iter([b"s SELECT INBOX\r\n", b"f FETCH 1:* (FLAGS)\r\n",
                               b"".join(b"n%d NOOP\r\n" % i for i in range(500))])))
            out = {"z": client.read_until("z")}
            client.deflate, client.inflate = deflate, zlib.decompressobj(-15)
            client.buffer = client.inflate.decompress(client.buffer)
            out["s"], out["f"] = client.read_until("s"), client.read_until("f")
            out["n"] = [client.read_until(f"n{i}").status for i in range(500)]
            client.close()
            corrupt = Client(port)
            corrupt.sock.sendall(b"z COMPRESS DEFLATE\r\n\xff\xff\xff\xff")
            out["corrupt"] = corrupt.read_until("z")
            corrupt.inflate = zlib.decompressobj(-15)
            corrupt.buffer = corrupt.inflate.decompress(corrupt.buffer)
            out["bye"] = corrupt.read_until("never")
            corrupt.close()
            return out
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert out["z"].status == "OK"
    assert out["s"].status == "OK" and out["s"].one("EXISTS").number == 3
    assert sorted(out["f"].fetches()) == [1, 2, 3] and out["f"].status == "OK"
    assert out["n"] == ["OK"] * 500
    assert out["corrupt"].status == "OK"
    assert [u.text for u in out["bye"].untagged] == ["* BYE Compression error"]
    assert out["bye"].text == "<connection closed>"


@pytest_twisted.inlineCallbacks
def test_append_date_time_out_of_range_is_bad(tmp_path: Path) -> None:
    """RFC 9051 §6.3.12: a date-time that cannot be (31-Feb, 25:00:00, zone +2400) is
    a BAD APPEND, not a date rolled over into the next month; the session goes on."""
    server = yield start_imap(tmp_path, PLAINTEXT)
    bad = ["31-Feb-2024 12:00:00 +0000", "29-Feb-2023 12:00:00 +0000",
           "32-Jan-2024 12:00:00 +0000", " 0-Jan-2024 12:00:00 +0000",
           "01-Jan-2024 25:00:00 +0000", "01-Jan-2024 24:00:00 +0000",
           "01-Jan-2024 12:60:00 +0000", "01-Jan-2024 12:00:61 +0000",
           "01-Jan-2024 12:00:00 +2400", "01-Jan-2024 12:00:00 +0075",
           "01-Jan-2024 12:00:00 -1300", "01-Jan-0000 12:00:00 +0000"]
    good = {"29-Feb-2024 23:30:00 -0100": "01-Mar-2024 00:30:00 +0000",
            "31-Dec-2016 23:59:60 +0000": "01-Jan-2017 00:00:00 +0000",   # leap second
            "01-Jan-2024 12:00:00 +1400": "31-Dec-2023 22:00:00 +0000",
            "01-Jan-2024 12:00:00 -1259": "02-Jan-2024 00:59:00 +0000"}
    try:
        def run() -> dict[str, Any]:
            wire = wire_login(server.ports["imap-plain"])
            out: dict[str, Any] = {"bad": [], "good": {}}
            for i, when in enumerate(bad):
                reply = wire.cmd(f"b{i}", f'APPEND INBOX "{when}" {{5+}}\r\nhello')
                out["bad"].append((reply[-1], wire.cmd(f"n{i}", "NOOP")[-1]))
            wire.cmd("s", "SELECT INBOX")
            for i, when in enumerate(good):
                reply = wire.cmd(f"g{i}", f'APPEND INBOX "{when}" {{5+}}\r\nhello')
                uid = reply[-1].split(b"]")[0].split()[-1].decode()
                fetched = wire.cmd(f"f{i}", f"UID FETCH {uid} INTERNALDATE")
                out["good"][when] = fetched[0].split(b'"')[1].decode()
            wire.close()
            return out
        out = yield in_thread(run)
    finally:
        yield server.stop()
    for i, (reply, noop) in enumerate(out["bad"]):
        assert reply.startswith(f"b{i} BAD ".encode()), (bad[i], reply)
        assert noop.startswith(f"n{i} OK".encode())
    assert out["good"] == good
