"""The Dovecot harness works: a private Dovecot takes mail over LMTP and serves it
back over POP3 and IMAP, and leaves no process behind.

Dovecot is the reference peer for LightMail's LMTP, POP3 and IMAP servers (tests and
``bench/lmtp.py``, ``bench/pop3.py``); these tests only prove the harness, not LightMail.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
from collections.abc import Iterator

import pytest
from dovecot import DovecotInstance, group_members

USER, PASSWORD = "alice@dovecot.test", "secret-1"


def message(subject: str) -> bytes:
    return (f"From: sender@client.test\r\nTo: {USER}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@client.test>\r\n\r\nBody of {subject}.\r\n"
            "A line.\r\n").encode()


@pytest.fixture
def dovecot() -> Iterator[DovecotInstance]:
    instance = DovecotInstance()
    instance.add_user(USER, PASSWORD)
    instance.add_user("bob@dovecot.test", "secret-2")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def test_lmtp_over_tcp_then_pop3_retr_dele_quit(dovecot: DovecotInstance) -> None:
    with smtplib.LMTP("127.0.0.1", dovecot.lmtp_port, timeout=30) as lmtp:
        for number in range(3):
            refused = lmtp.sendmail("sender@client.test", [USER], message(f"pop-{number}"))
            assert refused == {}
    assert dovecot.count(USER) == 3
    assert dovecot.count("bob@dovecot.test") == 0

    pop = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=30)
    try:
        assert pop.getwelcome().startswith(b"+OK")
        pop.user(USER)
        pop.pass_(PASSWORD)
        count, _size = pop.stat()
        assert count == 3
        _resp, lines, _octets = pop.retr(1)
        text = b"\r\n".join(lines)
        assert b"Subject: pop-0" in text and b"Body of pop-0." in text, text
        assert pop.dele(1).startswith(b"+OK")
    finally:
        assert pop.quit().startswith(b"+OK")
    # QUIT committed the deletion.
    assert dovecot.count(USER) == 2


def test_pop3_refuses_a_wrong_password(dovecot: DovecotInstance) -> None:
    pop = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=30)
    try:
        pop.user(USER)
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong")
    finally:
        pop.close()


def test_lmtp_over_unix_socket_then_imap_fetch(dovecot: DovecotInstance) -> None:
    with smtplib.LMTP(str(dovecot.lmtp_socket), timeout=30) as lmtp:
        # LMTP answers DATA once per recipient: smtplib's data() reads the first reply,
        # getreply() the next.
        lmtp.ehlo()
        assert lmtp.mail("sender@client.test")[0] == 250
        assert lmtp.rcpt(USER)[0] == 250
        assert lmtp.rcpt("bob@dovecot.test")[0] == 250
        assert lmtp.data(message("imap-0"))[0] == 250
        assert lmtp.getreply()[0] == 250
    assert dovecot.count(USER) == 1
    assert dovecot.count("bob@dovecot.test") == 1

    imap = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=30)
    try:
        assert imap.login(USER, PASSWORD)[0] == "OK"
        status, data = imap.select("INBOX")
        assert (status, data) == ("OK", [b"1"])
        status, fetched = imap.fetch("1", "(BODY.PEEK[] BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert status == "OK"
        parts = [part for part in fetched if isinstance(part, tuple)]
        body = next(content for spec, content in parts if b"BODY[]" in spec)
        assert b"Body of imap-0." in body and b"Message-ID: <imap-0@client.test>" in body
        subject = next(content for spec, content in parts if b"HEADER.FIELDS" in spec)
        assert subject.strip() == b"Subject: imap-0"
    finally:
        imap.logout()


def test_lmtp_refuses_an_unknown_user(dovecot: DovecotInstance) -> None:
    with smtplib.LMTP("127.0.0.1", dovecot.lmtp_port, timeout=30) as lmtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            lmtp.sendmail("sender@client.test", ["nobody@dovecot.test"], message("lost"))
    code, _text = refused.value.recipients["nobody@dovecot.test"]
    assert code == 550


def test_users_added_while_running_and_stop_leaves_nothing() -> None:
    instance = DovecotInstance()
    instance.start()
    try:
        instance.add_user("late@dovecot.test", "late-password")
        with smtplib.LMTP("127.0.0.1", instance.lmtp_port, timeout=30) as lmtp:
            lmtp.sendmail("sender@client.test", ["late@dovecot.test"], message("late"))
        assert instance.count("late@dovecot.test") == 1
        assert instance.proc is not None
        group = instance.proc.pid
        base = instance.base
    finally:
        instance.stop()
    assert group_members(group) == []
    assert not base.exists()
