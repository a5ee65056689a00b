"""CRAM-MD5 (RFC 2195), off unless named: the stored secret (MD5 states after HMAC's
pad blocks, as Dovecot keeps it) checks what Python's smtplib and imaplib send, and is
made at the next password login of a user who had none."""

from __future__ import annotations

import base64
import hmac
import imaplib
import smtplib
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa

from lightmail.directory import crammd5
from lightmail.storage import schema
from tests.inprocess import in_thread, start
from tests.saslwire import Wire, b64, connect, tls_listeners

USER, PASSWORD = "bob@example.test", "bob-secret"


@pytest.mark.parametrize("password", ["tanstaaftanstaaf", "", "x" * 70, "pässwörd"])
def test_the_stored_secret_answers_like_hmac_md5(password: str) -> None:
    secret = crammd5.make_secret(password)
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"      # RFC 2195's example
    digest = hmac.new(password.encode(), challenge, "md5").hexdigest()
    assert crammd5.response_matches(secret, challenge, digest)
    assert not crammd5.response_matches(secret, challenge + b"x", digest)
    assert not crammd5.response_matches(secret, challenge, "0" * 32)


def tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def smtp_login(port: int, password: str) -> Any:
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=tls()) as smtp:
        smtp.ehlo()
        assert smtp.esmtp_features["auth"].split()[0] == "CRAM-MD5"
        try:
            return smtp.login(USER, password)[0]     # smtplib picks CRAM-MD5 first
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code


def imap_login(port: int, password: str) -> str:
    imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=tls(), timeout=20)
    try:
        return imap.login_cram_md5(USER, password)[0]
    except imaplib.IMAP4.error as exc:
        return str(exc)
    finally:
        imap.shutdown()


@pytest_twisted.inlineCallbacks
def test_cram_md5_with_python_clients_and_keys_made_at_the_next_login(
        tmp_path: Path) -> None:
    server = yield start(tmp_path, tls_listeners(tmp_path, "CRAM-MD5 PLAIN"))
    try:
        yield server.parts.directory.set_password(USER, PASSWORD)    # keeps the secret
        smtp, imap = server.ports["submissions"], server.ports["imaps"]
        assert (yield in_thread(smtp_login, smtp, PASSWORD)) == 235
        assert (yield in_thread(imap_login, imap, PASSWORD)) == "OK"
        assert (yield in_thread(pop3_login, server.ports["pop3s"], PASSWORD))
        assert not (yield in_thread(pop3_login, server.ports["pop3s"], "wrong"))
        assert (yield in_thread(smtp_login, smtp, "wrong")) == 535
        assert "AUTHENTICATIONFAILED" in (yield in_thread(imap_login, imap, "wrong"))
        # A user whose password was set before CRAM-MD5 was on has no secret yet...
        yield in_thread(_forget_secret, server.parts.storage.db.engine)
        assert "AUTHENTICATIONFAILED" in (yield in_thread(imap_login, imap, PASSWORD))

        def plain() -> str:
            client = imaplib.IMAP4_SSL("127.0.0.1", imap, ssl_context=tls(), timeout=20)
            try:
                return client.login(USER, PASSWORD)[0]
            finally:
                client.shutdown()
        # ...until a password login makes it (in the background).
        assert (yield in_thread(plain)) == "OK"
        for _ in range(100):
            if (yield in_thread(_secret_of, server.parts.storage.db.engine)):
                break
            yield in_thread(time.sleep, 0.05)
        assert (yield in_thread(imap_login, imap, PASSWORD)) == "OK"
    finally:
        yield server.stop()


def pop3_login(port: int, password: str) -> bool:
    """POP3 AUTH CRAM-MD5 (RFC 5034), the digest made with the standard library."""
    wire = Wire("pop3", connect(port))
    try:
        wire.send("AUTH CRAM-MD5")               # no initial response: the challenge first
        challenge = base64.b64decode(wire.line()[2:])
        digest = hmac.new(password.encode(), challenge, "md5").hexdigest()
        wire.send(b64(f"{USER} {digest}"))
        return wire.line().startswith("+OK")
    finally:
        wire.close()


def _forget_secret(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(schema.users).values(cram_md5=None))


def _secret_of(engine: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.users.c.cram_md5).where(
            schema.users.c.localpart == "bob")).scalar()
