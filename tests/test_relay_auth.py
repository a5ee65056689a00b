"""SMTP AUTH (RFC 4954) to a relay host: a real Postfix smart host that authenticates
through Dovecot (SASL) and only over TLS (``smtpd_tls_auth_only``).

Correct credentials: the mail goes through the smart host.  A wrong password: the
recipients are deferred (4.7.x), nothing bounces and the password is not logged.  A
relay without STARTTLS: the credentials are not sent at all.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from dovecot import DovecotInstance
from harness import free_port, free_ports
from inprocess import in_thread, start
from test_outbound import ReceivingMX, queue_state, submit, until
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from lightmail.admin.certs import write_self_signed
from lightmail.config import ConfigError, parse_config

GOOD, WRONG = "relay-s3cret-Pw", "wrong-Pa55word-xyz"


class CleartextAuthRelay(threading.Thread):
    """Offers AUTH but no STARTTLS, and records everything the client sends."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", port))
        self.received = b""
        self.sessions = 0

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.sessions += 1
            with conn, conn.makefile("rb") as f:
                conn.sendall(b"220 cleartext ESMTP\r\n")
                while line := f.readline():
                    self.received += line
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        conn.sendall(b"250-cleartext\r\n250-AUTH PLAIN LOGIN\r\n"
                                     b"250 8BITMIME\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        break
                    else:
                        conn.sendall(b"250 ok\r\n")

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def smarthost() -> Iterator[dict[str, Any]]:
    auth_port, smtp_port = free_ports(2)
    dovecot = DovecotInstance(services=(
        "service auth {\n"
        f"  inet_listener sasl {{\n    address = 127.0.0.1\n    port = {auth_port}\n  }}\n"
        "}\n"))
    dovecot.add_user("relay@example.test", GOOD)
    dovecot.start()
    certs = Path(os.environ.get("TMPDIR", "/tmp")) / f"lightmail-relayauth-{smtp_port}"
    certs.mkdir(mode=0o755)
    cert, key = certs / "cert.pem", certs / "key.pem"
    write_self_signed(cert, key, "smarthost.test")
    os.chmod(key, 0o644)
    mx = None
    try:
        mx = ReceivingMX(smtp_port, ["alice@remote.test", "zed@wrong.test"], main={
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": f"inet:127.0.0.1:{auth_port}",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key),
            "smtpd_tls_auth_only": "yes",
            "smtpd_sasl_authenticated_header": "yes",
        })
        clear = CleartextAuthRelay(free_port())
        clear.start()
        try:
            yield {"mx": mx, "port": smtp_port, "clear": clear, "dovecot": dovecot}
        finally:
            clear.stop()
    finally:
        if mx is not None:
            mx.stop()
        dovecot.stop()
        for path in (cert, key):
            path.unlink(missing_ok=True)
        certs.rmdir()


@pytest_twisted.inlineCallbacks
def test_relay_host_with_smtp_auth(tmp_path: Path, smarthost: dict[str, Any]) -> None:
    mx, clear = smarthost["mx"], smarthost["clear"]
    (tmp_path / "good.pw").write_text(GOOD + "\n")
    (tmp_path / "wrong.pw").write_text(WRONG + "\n")
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent
        logged.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    relay = f"[127.0.0.1]:{smarthost['port']}"
    server = yield start(
        tmp_path,
        f"[outbound]\ndns_servers = 127.0.0.1:9\nmin_backoff = 1h\nrelay_host = {relay}\n"
        f"auth_user = relay@example.test\nauth_password_file = {tmp_path / 'good.pw'}\n"
        f"[transport:wrong.test]\nrelay = {relay}\nauth_user = relay@example.test\n"
        f"auth_password_file = {tmp_path / 'wrong.pw'}\n"
        f"[transport:clear.test]\nrelay = [127.0.0.1]:{clear.sock.getsockname()[1]}\n"
        f"auth_user = relay@example.test\nauth_password_file = {tmp_path / 'good.pw'}\n")
    server.parts.queue_runner.poll_interval = 0.5
    try:
        yield in_thread(submit, server.ports["submissions"],
                        ("alice@remote.test", "via-smarthost"),
                        ("zed@wrong.test", "wrong-password"),
                        ("carl@clear.test", "no-tls"))
        # Correct password: relayed by the smart host, which saw an authenticated
        # client over TLS.
        [message] = yield until(lambda: mx.messages("alice@remote.test"))
        assert b"Subject: via-smarthost" in message
        assert b"(Authenticated sender: relay@example.test)" in message
        assert b"with ESMTPSA" in message                # TLS and AUTH
        assert "sasl_username=relay@example.test" in mx.postfix.logtext()
        # The next message reuses the authenticated session (no new connection).
        connects = mx.postfix.logtext().count("]: connect from")
        yield in_thread(submit, server.ports["submissions"], ("alice@remote.test", "again"))
        yield until(lambda: len(mx.messages("alice@remote.test")) == 2)
        assert mx.postfix.logtext().count("]: connect from") <= connects + 1

        @defer.inlineCallbacks
        def settled() -> Any:
            state = yield queue_state(server)
            done = {rcpt: s for rcpt, s in state.items()
                    if rcpt != "alice@remote.test" and s[0] == "deferred"}
            return state if len(done) == 2 else None
        state = yield until(settled)
        # A wrong password: deferred with 4.7.8, not bounced; nothing arrives.
        assert state["zed@wrong.test"][1].startswith("4.7.8"), state
        assert "SMTP AUTH as relay@example.test" in state["zed@wrong.test"][1]
        assert "535" in state["zed@wrong.test"][1]
        assert mx.messages("zed@wrong.test") == []
        # No STARTTLS: the credentials were never sent.
        assert state["carl@clear.test"][1].startswith("4.7.0"), state
        assert "not encrypted" in state["carl@clear.test"][1]
        assert clear.sessions >= 1
        assert b"AUTH" not in clear.received and b"MAIL FROM" not in clear.received
        assert GOOD.encode() not in clear.received
        # Nobody was told of a failure: no bounces, no delay notices.
        inbox = yield server.inbox("bob@example.test")
        assert not [m for m in inbox if b"report-type=delivery-status" in m]
        # The log says why, and never shows a password.
        text = "\n".join(logged)
        assert "check auth_user and auth_password_file" in text
        assert GOOD not in text and WRONG not in text
        assert GOOD not in repr(server.parts) and GOOD not in repr(
            parse_config(f"[outbound]\nauth_user = u\nauth_password_file = "
                         f"{tmp_path / 'good.pw'}\n"))
    finally:
        globalLogPublisher.removeObserver(observe)
        yield server.root.stopService()


def test_auth_config_errors_name_the_file_and_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pw"
    with pytest.raises(ConfigError) as caught:
        parse_config("[outbound]\nrelay_host = [mail.example]:587\nauth_user = me\n"
                     f"auth_password_file = {missing}\n", str(tmp_path / "lm.conf"))
    assert caught.value.line == 4 and str(missing) in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_config("[transport:x.test]\nrelay = [mail.example]:587\nauth_user = me\n",
                     str(tmp_path / "lm.conf"))
    assert caught.value.line == 3 and "auth_password_file" in str(caught.value)
    (tmp_path / "pw").write_text("s3cret\nignored\n")
    config = parse_config(f"[transport:x.test]\nauth_user = me\nauth_password_file = "
                          f"{tmp_path / 'pw'}\n", str(tmp_path / "lm.conf"))
    assert config.transports[0].auth_password == "s3cret"
    assert "s3cret" not in repr(config)
