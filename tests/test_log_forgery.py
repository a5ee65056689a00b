"""Log forgery (issue: conformance and hardening, point 10): what a client sends reaches
log lines, and a CR, LF or ESC in it must not start a line of its own or drive the
terminal.  Forged SASL PLAIN user names over SMTP submission, IMAP and POP3, through
LightMail's text log format; and the escape itself."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest_twisted
from inprocess import Raw, in_thread, start
from twisted.logger import globalLogPublisher

from lightmail.config import LoggingConfig
from lightmail.logs import escape, make_observer

FORGED = "2026-12-07T00:00:00.000+0000 info [smtp] authenticated as admin@example.test"
USER = f"nobody\r\n{FORGED}\x1b[2K\u2028x"


def test_escape_keeps_every_log_line_one_line() -> None:
    assert escape("plain text, é, \\Seen") == "plain text, é, \\Seen"
    assert escape("a\r\nb\x1b[31m\x7f\x85\u2028") == "a\\r\\nb\\x1b[31m\\x7f\\x85\\u2028"
    # No character at all ends a line or reaches a terminal as a control once escaped.
    for code in range(0x110000):
        if not 0xd800 <= code < 0xe000:
            text = escape(f"a{chr(code)}b")
            assert len(text.splitlines()) == 1 and "\x1b" not in text, hex(code)


def _plain(user: str) -> str:
    return base64.b64encode(f"\0{user}\0wrong".encode()).decode()


def _forge_everywhere(ports: dict[str, int]) -> None:
    smtp = Raw(ports["submission"])
    try:
        smtp.cmd("EHLO client.test")
        assert smtp.cmd(f"AUTH PLAIN {_plain(USER)}").startswith("535")
    finally:
        smtp.close()
    imap = Raw(ports["imap"])
    try:
        assert " NO " in imap.cmd(f"a AUTHENTICATE PLAIN {_plain(USER)}")
    finally:
        imap.close()
    pop3 = Raw(ports["pop3"])
    try:
        assert pop3.cmd(f"AUTH PLAIN {_plain(USER)}").startswith("-ERR")
    finally:
        pop3.close()


@pytest_twisted.inlineCallbacks
def test_a_forged_user_name_stays_inside_its_log_line(tmp_path: Path) -> Any:
    out = io.StringIO()
    observer = make_observer(LoggingConfig(), out=out)
    globalLogPublisher.addObserver(observer)
    server = yield start(
        tmp_path, "[directory]\nauth_over_plaintext = yes\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n")
    try:
        yield in_thread(_forge_everywhere, server.ports)
    finally:
        yield server.stop()
        globalLogPublisher.removeObserver(observer)
    lines = out.getvalue().splitlines()
    failed = [line for line in lines if "authentication failed for nobody" in line]
    assert len(failed) == 3, lines                  # one per protocol
    for line in failed:
        assert "nobody\\r\\n2026-12-07" in line and "\\x1b[2K\\u2028x" in line
    assert not any(line.startswith(FORGED[:25]) for line in lines)
    assert "\x1b" not in out.getvalue() and "\u2028" not in out.getvalue()
