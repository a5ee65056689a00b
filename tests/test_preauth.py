"""Sessions that have not logged in (issue: conformance and hardening, points 9 and 11):
they get a short time to log in, and their input is small, refused before it is sent.
Over real sockets, against the in-process server."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from inprocess import in_thread, start

LISTENERS = ("[directory]\nauth_over_plaintext = yes\n"
             "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
             "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n")


class Line:
    """A raw line client: what the server says, line by line."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> str:
        return self.file.readline().decode("utf-8", "replace").rstrip("\r\n")

    def until(self, prefix: str) -> list[str]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(prefix) or not line:
                return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _big_literals(ports: dict[str, int]) -> dict[str, Any]:
    imap = Line(ports["imap"])
    try:
        # 45 MB announced before login: refused at once, never a "+ Ready".
        imap.send(b"a LOGIN {47185920}\r\n")
        refused = imap.line()
        # A non-synchronising one is read and dropped, never kept: then the session
        # goes on.
        imap.send(b"b LOGIN {20000+}\r\n" + b"x" * 20000 + b" secret\r\n")
        dropped = imap.until("b ")
        # A line over the limit before login.
        imap.send(b"c LOGIN " + b"y" * 9000 + b" secret\r\n")
        long_line = imap.until("* BAD")
        imap.send(b"d LOGIN bob@example.test bob-secret\r\n")
        login = imap.until("d ")
        # Logged in: the session's own limits (a 100 KB message APPENDs).
        imap.send(b"e APPEND INBOX {102400}\r\n")
        go_ahead = imap.line()
        imap.send(b"Subject: big\r\n\r\n" + b"z" * (102400 - 17) + b"\r\n")
        appended = imap.until("e ")
        return {"refused": refused, "dropped": dropped, "long": long_line,
                "login": login, "go": go_ahead, "appended": appended}
    finally:
        imap.close()


@pytest_twisted.inlineCallbacks
def test_literals_before_login_are_small_and_refused_up_front(tmp_path: Path) -> Any:
    server = yield start(tmp_path, LISTENERS)
    try:
        seen = yield in_thread(_big_literals, server.ports)
    finally:
        yield server.stop()
    assert seen["refused"].startswith("a NO [TOOBIG]") and "before login" in seen["refused"]
    assert seen["dropped"][-1].startswith("b NO [TOOBIG]")
    assert seen["long"][-1] == "* BAD Command line too long"
    assert seen["login"][-1].startswith("d OK")
    assert seen["go"].startswith("+ ")
    assert seen["appended"][-1].startswith("e OK [APPENDUID")


def _held_without_login(ports: dict[str, int]) -> dict[str, Any]:
    imap, pop3 = Line(ports["imap"]), Line(ports["pop3"])
    started = time.monotonic()
    try:
        # Busy, but never logging in: NOOP every 0.2 s.
        ends: dict[str, Any] = {}
        while len(ends) < 2 and time.monotonic() - started < 8:
            for name, client, noop in (("imap", imap, b"n NOOP\r\n"),
                                       ("pop3", pop3, b"NOOP\r\n")):
                if name in ends:
                    continue
                try:
                    client.send(noop)
                    line = client.line()
                except OSError:
                    line = ""
                if line.startswith(("* BYE", "-ERR Disconnected")):
                    ends[name] = (line, time.monotonic() - started, client.line())
            time.sleep(0.2)
        return ends
    finally:
        imap.close()
        pop3.close()


@pytest_twisted.inlineCallbacks
def test_a_session_that_does_not_log_in_is_closed(tmp_path: Path) -> Any:
    server = yield start(tmp_path, LISTENERS + "[imap]\nlogin_timeout = 1s\n"
                                               "[pop3]\nlogin_timeout = 1s\n")
    try:
        ends = yield in_thread(_held_without_login, server.ports)
    finally:
        yield server.stop()
    assert set(ends) == {"imap", "pop3"}, ends
    for name, (line, after, then) in ends.items():
        assert 0.9 < after < 4, (name, after)
        assert then == "", f"{name} not closed after {line!r}"
    assert "log in sooner" in ends["imap"][0] and "log in sooner" in ends["pop3"][0]
