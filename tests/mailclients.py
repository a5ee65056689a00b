"""Blocking mail clients from the standard library (smtplib, imaplib, poplib) for
tests of logins and delivery against an in-process server (run them in a thread):
each logs in, does a little and says what happened as a short string or code."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import ssl
from typing import Any


def listeners() -> str:
    """Plaintext IMAP and POP3 listeners (with [directory] auth_over_plaintext)."""
    return ("[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
            "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n")


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def smtp_login(port: int, address: str, secret: str) -> tuple[int, str]:
    with smtplib.SMTP_SSL("127.0.0.1", port, context=unverified(), timeout=20) as client:
        client.ehlo("client.test")
        try:
            code, text = client.login(address, secret)
        except smtplib.SMTPAuthenticationError as exc:
            code, text = exc.smtp_code, exc.smtp_error
        except smtplib.SMTPResponseException as exc:
            code, text = exc.smtp_code, exc.smtp_error
        return code, text.decode() if isinstance(text, bytes) else text


def imap_login(port: int, address: str, secret: str) -> str:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    try:
        client.login(address, secret)
        client.select("INBOX")
        count = client.search(None, "ALL")[1][0].split()
        client.logout()
        return f"OK {len(count)}"
    except imaplib.IMAP4.error as exc:
        return str(exc)


def pop3_login(port: int, address: str, secret: str) -> str:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        client.user(address)
        client.pass_(secret)
        count = client.stat()[0]
        client.quit()
        return f"+OK {count}"
    except poplib.error_proto as exc:
        return exc.args[0].decode()


def send(port: int, *recipients: str, subject: str = "hello") -> dict[str, Any]:
    message = f"From: someone@remote.test\r\nSubject: {subject}\r\n\r\nhi\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("mx.remote.test")
        refused: dict[str, Any] = {}
        client.mail("someone@remote.test")
        accepted = []
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            if code == 250:
                accepted.append(rcpt)
            else:
                refused[rcpt] = (code, text.decode())
        if accepted:
            client.data(message)
        else:
            client.rset()
        return refused
