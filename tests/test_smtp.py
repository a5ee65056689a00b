"""The SMTP server against real clients over real sockets: raw commands, smtplib, swaks.

The server runs in-process (``makeService`` with listeners on port 0); every client runs
in a thread so the reactor keeps serving it.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from inprocess import Raw, in_thread, session, start

from lightmail.admin.certs import write_self_signed

ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3} ")


@pytest_twisted.inlineCallbacks
def test_ehlo_offers_the_right_extensions_per_listener(tmp_path: Path) -> None:
    server = yield start(tmp_path)
    try:
        [mx] = yield in_thread(session, server.ports["mx"], "EHLO client.test")
        for ext in ("PIPELINING", "SIZE 52428800", "8BITMIME", "SMTPUTF8", "CHUNKING",
                    "DSN", "ENHANCEDSTATUSCODES", "STARTTLS"):
            assert f"250-{ext}" in mx or f"250 {ext}" in mx, mx
        assert "AUTH" not in mx                      # no AUTH on the MX
        [sub] = yield in_thread(session, server.ports["submission"], "EHLO c")
        assert "AUTH" not in sub                     # not before TLS
        [tls] = yield in_thread(session, server.ports["submissions"], "EHLO c", tls=True)
        assert "250 AUTH PLAIN LOGIN SCRAM-SHA-256 SCRAM-SHA-256-PLUS" in tls
        assert "STARTTLS" not in tls
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_every_reply_carries_an_enhanced_code(tmp_path: Path) -> None:
    server = yield start(tmp_path, "[smtp]\nmax_errors = 50\n")
    try:
        replies = yield in_thread(
            session, server.ports["mx"], "MAIL FROM:<a@example.org>", "HELO client.test",
            "FROBNICATE", "RCPT TO:<bob@example.test>", "MAIL FROM:<a@example.org> BOGUS=1",
            "MAIL FROM:a@example.org", "MAIL FROM:<a@example.org>",
            "MAIL FROM:<a@example.org>", "RCPT TO:<nobody@example.test>",
            "RCPT TO:<someone@remote.example>", "RCPT TO:<bob@example.test> NOTIFY=SOMETIMES",
            "VRFY bob", "EXPN staff", "HELP", "NOOP", "RSET", "DATA", "QUIT")
        expected = ["503 5.5.1", None, "500 5.5.2", "503 5.5.1", "555 5.5.4", "501 5.5.4",
                    "250 2.1.0", "503 5.5.1", "550 5.1.1", "554 5.7.1", "555 5.5.4",
                    "252 2.5.0", "502 5.5.1", "214 2.0.0", "250 2.0.0", "250 2.0.0",
                    "503 5.5.1", "221 2.0.0"]
        for reply, want in zip(replies, expected, strict=True):
            if want is not None:
                assert reply.startswith(want), (want, reply)
                assert all(ENHANCED.match(line) for line in reply.splitlines()), reply
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_smtplib_message_is_queued_delivered_and_transparent(tmp_path: Path) -> None:
    server = yield start(tmp_path)
    try:
        body = (b"From: a@example.org\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\n"
                b".leading dot\r\n..two dots\r\nend\r\n")

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=20) as smtp:
                return smtp.sendmail("a@example.org", ["bob@example.test"], body)
        assert (yield in_thread(send)) == {}
        [message] = yield server.delivered("bob@example.test", 1)
        assert message.startswith(b"Received: from ")
        assert b"by mx.example.test (LightMail) with ESMTP id " in message
        assert b"for <bob@example.test>;" in message
        assert message.endswith(body)                     # dot-unstuffed exactly
        assert (yield server.queued()) == []
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_smtputf8_addresses_need_the_parameter(tmp_path: Path) -> None:
    server = yield start(tmp_path)
    try:
        # Without the SMTPUTF8 parameter a UTF-8 address is refused (RFC 6531 §3.5).
        refused = yield in_thread(session, server.ports["mx"], "EHLO c",
                                  "MAIL FROM:<a@example.org>", "RCPT TO:<jörg@example.test>")
        assert refused[2].startswith("553 5.6.7")

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=20) as smtp:
                return smtp.sendmail("ä@example.org", ["jörg@example.test"],
                                     "Subject: grüße\r\n\r\nUTF-8 all the way\r\n".encode(),
                                     mail_options=["SMTPUTF8"])
        assert (yield in_thread(send)) == {}
        [message] = yield server.delivered("jörg@example.test", 1)
        assert b"with UTF8SMTP id" in message and "grüße".encode() in message
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_address_lengths_are_held_to_the_path_limit(tmp_path: Path) -> None:
    """A sender's local part over RFC 5321's 64 octets is taken (as Postfix takes
    it: VERP and SRS addresses of lists and forwarders run longer); a local
    recipient's is not (no such user can exist); any path over 256 octets is
    refused with 553 5.1.3."""
    server = yield start(tmp_path)
    try:
        long_sender = "list-bounces+" + "v" * 120 + "@lists.example.org"
        replies = yield in_thread(session, server.ports["mx"], "EHLO c",
                                  f"MAIL FROM:<{long_sender}>", "RCPT TO:<bob@example.test>",
                                  "RSET", f"MAIL FROM:<{'w' * 250}@example.org>",
                                  "MAIL FROM:<a@example.org>",
                                  f"RCPT TO:<{'z' * 65}@example.test>")
        assert [reply[:9] for reply in replies[1:]] == [
            "250 2.1.0", "250 2.1.5", "250 2.0.0", "553 5.1.3", "250 2.1.0", "553 5.1.3"]
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_bdat_chunks_and_pipelining(tmp_path: Path) -> None:
    server = yield start(tmp_path)
    try:
        def run() -> list[str]:
            client = Raw(server.ports["mx"])
            client.cmd("EHLO client.test")
            # Pipelined envelope and two chunks in one write (RFC 2920, RFC 3030).
            chunk1 = b"Subject: chunked\r\n\r\nfirst part "
            chunk2 = b"second part\r\n"
            client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.test>\r\n"
                        b"RCPT TO:<nobody@example.test>\r\n"
                        + b"BDAT %d\r\n" % len(chunk1) + chunk1
                        + b"BDAT %d LAST\r\n" % len(chunk2) + chunk2 + b"NOOP\r\n")
            replies = ["\n".join(client.reply()) for _ in range(6)]
            client.close()
            return replies
        replies = yield in_thread(run)
        assert [r[:9] for r in replies] == ["250 2.1.0", "250 2.1.5", "550 5.1.1",
                                            "250 2.0.0", "250 2.0.0", "250 2.0.0"]
        assert "octets received" in replies[3] and "queued as" in replies[4]
        [message] = yield server.delivered("bob@example.test", 1)
        assert message.endswith(b"Subject: chunked\r\n\r\nfirst part second part\r\n")

        def zero_last() -> list[str]:
            client = Raw(server.ports["mx"])
            client.cmd("EHLO c")
            client.cmd("MAIL FROM:<a@example.org>")
            client.cmd("RCPT TO:<bob@example.test>")
            client.send(b"BDAT 5\r\nhello")      # the chunk follows the command at once
            one = "\n".join(client.reply())
            two = client.cmd("BDAT 0 LAST")
            client.send(b"BDAT 3 LAST\r\nabc")   # no transaction any more
            three = "\n".join(client.reply())
            client.close()
            return [one, two, three]
        one, two, three = yield in_thread(zero_last)
        assert one.startswith("250 2.0.0 5 octets") and "queued as" in two
        assert three.startswith("503 5.5.1")
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_bad_content_is_refused_whole(tmp_path: Path) -> None:
    server = yield start(tmp_path, "[smtp]\nmax_message_size = 2K\n")
    try:
        def run(payload: bytes) -> str:
            client = Raw(server.ports["mx"])
            for line in ("EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<bob@example.test>",
                         "DATA"):
                client.cmd(line)
            client.send(payload)
            reply = "\n".join(client.reply())
            after = client.cmd("NOOP")
            client.close()
            return reply + "|" + after
        bare_lf = yield in_thread(run, b"Subject: x\n\nbare\n.\r\n\r\n.\r\n")
        assert bare_lf.startswith("550 5.5.2") and bare_lf.endswith("250 2.0.0 Ok")
        smuggled = yield in_thread(run, b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x>\r\n.\r\n")
        assert smuggled.startswith("550 5.5.2")
        nul = yield in_thread(run, b"Subject: x\r\n\r\nnul\0here\r\n.\r\n")
        assert nul.startswith("554 5.6.0")
        big = yield in_thread(run, b"Subject: x\r\n\r\n" + b"y" * 70 + b"\r\n" * 0
                              + (b"z" * 70 + b"\r\n") * 60 + b".\r\n")
        assert big.startswith("552 5.3.4")
        declared = yield in_thread(session, server.ports["mx"], "EHLO c",
                                   "MAIL FROM:<a@example.org> SIZE=999999")
        assert declared[1].startswith("552 5.3.4")
        assert (yield server.queued()) == []
        assert (yield server.inbox("bob@example.test")) == []
    finally:
        yield server.root.stopService()


def test_bare_line_ends_are_found_however_bdat_cuts_the_content() -> None:
    """bare_line_ends over random chunkings agrees with a reading of the whole
    content: a CR or LF outside a CR LF, or a CR at the very end."""
    import random

    from lightmail.smtp.lines import bare_line_ends
    rng = random.Random(5321)
    for _ in range(3000):
        content = bytes(rng.choice(b"ab\r\n") for _ in range(rng.randrange(0, 12)))
        rest = content.replace(b"\r\n", b"")
        whole = rest.count(b"\r") + rest.count(b"\n") > 0
        cuts = sorted(rng.sample(range(len(content) + 1),
                                 rng.randrange(0, min(4, len(content) + 2))))
        bare, cr = False, False
        for begin, end in zip([0, *cuts], [*cuts, len(content)], strict=True):
            if content[begin:end]:
                found, cr = bare_line_ends(content[begin:end], cr)
                bare = bare or found
        assert (bare or cr) == whole, (content, cuts)


@pytest_twisted.inlineCallbacks
def test_bdat_refuses_bare_line_ends_as_data_does(tmp_path: Path) -> None:
    """The bytes DATA refuses (a bare LF or CR: SMTP smuggling) are refused in BDAT
    too, wherever the chunks cut them; a CR LF cut in two is fine."""
    server = yield start(tmp_path)
    try:
        def run(*chunks: bytes) -> str:
            client = Raw(server.ports["mx"])
            for line in ("EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<bob@example.test>"):
                client.cmd(line)
            for index, chunk in enumerate(chunks):
                last = b" LAST" if index == len(chunks) - 1 else b""
                client.send(b"BDAT %d%s\r\n" % (len(chunk), last) + chunk)
                reply = "\n".join(client.reply())
            after = client.cmd("NOOP")
            client.close()
            return reply + "|" + after
        smuggled = yield in_thread(run, b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x>\r\n")
        assert smuggled.startswith("550 5.5.2") and smuggled.endswith("250 2.0.0 Ok")
        bare_cr = yield in_thread(run, b"Subject: x\r\n\r\nhi\r.\r\n")
        assert bare_cr.startswith("550 5.5.2")
        across = yield in_thread(run, b"Subject: x\r\n\r\nhi\r", b"X\r\n")
        assert across.startswith("550 5.5.2")          # CR, then not LF
        cr_at_end = yield in_thread(run, b"Subject: x\r\n\r\nhi\r")
        assert cr_at_end.startswith("550 5.5.2")
        assert (yield server.inbox("bob@example.test")) == []
        split = yield in_thread(run, b"Subject: y\r\n\r\nhi\r", b"\nthere\r\n")
        assert "queued as" in split
        [message] = yield server.delivered("bob@example.test", 1)
        assert message.endswith(b"Subject: y\r\n\r\nhi\r\nthere\r\n")
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_abuse_gets_answers_not_crashes(tmp_path: Path) -> None:
    server = yield start(tmp_path, "[smtp]\nmax_recipients = 5\nmax_errors = 3\n")
    try:
        def long_line() -> tuple[str, str]:
            client = Raw(server.ports["mx"])
            client.send(b"NOOP " + b"x" * (1024 * 1024) + b"\r\n")
            first = "\n".join(client.reply())
            second = client.cmd("NOOP")
            client.close()
            return first, second
        first, second = yield in_thread(long_line)
        assert first.startswith("500 5.5.2 Line too long") and second.startswith("250")

        def many_rcpts() -> list[str]:
            client = Raw(server.ports["mx"])
            client.cmd("EHLO c")
            client.cmd("MAIL FROM:<a@example.org>")
            client.send(b"RCPT TO:<bob@example.test>\r\n" * 1000)
            replies = [client.reply()[0][:9] for _ in range(1000)]
            client.close()
            return replies
        replies = yield in_thread(many_rcpts)
        assert replies[:5] == ["250 2.1.5"] * 5 and set(replies[5:]) == {"452 4.5.3"}

        errors = yield in_thread(session, server.ports["mx"], "X1", "X2", "X3", "X4", "NOOP")
        assert errors[3].startswith("500 5.5.2")
        assert errors[4].startswith("421 4.7.0 Too many errors")   # then the server hangs up

        def garbage_tls() -> bytes:
            with socket.create_connection(("127.0.0.1", server.ports["submissions"]),
                                          timeout=10) as sock:
                sock.sendall(b"\x16\x03\x01\x00\x05garbage-not-a-handshake" * 10)
                try:
                    return sock.recv(100)
                except OSError:
                    return b""
        yield in_thread(garbage_tls)

        def hang_up_mid_data() -> None:
            client = Raw(server.ports["mx"])
            for line in ("EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<bob@example.test>",
                         "DATA"):
                client.cmd(line)
            client.send(b"Subject: cut\r\n\r\n" + b"half a message\r\n" * 100)
            client.close()
        yield in_thread(hang_up_mid_data)
        # Still serving normally, and nothing was queued or left in the blob store.
        ok = yield in_thread(session, server.ports["mx"], "EHLO c", "NOOP")
        assert ok[1].startswith("250 2.0.0")
        assert (yield server.queued()) == []
        objects = server.tmp / "state" / "blobs" / "objects"
        assert not any(p.is_file() for p in objects.rglob("*")) if objects.exists() else True
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_submission_needs_tls_and_auth_and_owns_its_sender(tmp_path: Path) -> None:
    server = yield start(tmp_path)
    # Keep the relayed message in the queue to look at it: a running queue would try
    # remote.example at once, fail its lookup and bounce it (a race seen in CI).
    server.parts.queue_runner.stopService()
    try:
        plain = yield in_thread(session, server.ports["submission"], "EHLO c",
                                "MAIL FROM:<bob@example.test>",
                                "AUTH PLAIN AGJvYkBleGFtcGxlLnRlc3QAYm9iLXNlY3JldA==")
        assert plain[1].startswith("530 5.7.0") and plain[2].startswith("538 5.7.11")

        def submit(sender: str, rcpts: list[str], password: str = "bob-secret") -> Any:
            with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=20) as smtp:
                smtp.starttls(context=ssl._create_unverified_context())
                smtp.login("bob@example.test", password)
                return smtp.sendmail(sender, rcpts, b"Subject: submitted\r\n\r\nhi\r\n",
                                     rcpt_options=["NOTIFY=SUCCESS,FAILURE",
                                                   "ORCPT=rfc822;x@remote.example"])
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            yield in_thread(submit, "bob@example.test", ["bob@example.test"], "wrong")
        assert bad.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            yield in_thread(submit, "someone.else@example.test", ["bob@example.test"])
        assert refused.value.smtp_code == 553
        # Own address and own alias are fine; relaying works once authenticated.
        yield in_thread(submit, "postmaster@example.test", ["x@remote.example"])
        rows = yield server.queued()
        assert [(r["recipient"], r["transport"]) for r in rows] == [
            ("x@remote.example", "smtp")]
        with server.parts.storage.db.engine.connect() as conn:
            notify, orcpt = conn.exec_driver_sql(
                "select notify, orcpt from queue_recipients").one()
        assert (notify, orcpt) == ("SUCCESS,FAILURE", "rfc822;x@remote.example")

        def implicit_login() -> Any:
            ctx = ssl._create_unverified_context()
            with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], timeout=20,
                                  context=ctx) as smtp:
                smtp.login("bob@example.test", "bob-secret")   # smtplib picks a mechanism
                return smtp.sendmail("bob@example.test", ["bob+lists@example.test"],
                                     b"Subject: to lists\r\n\r\nhi\r\n")
        assert (yield in_thread(implicit_login)) == {}
        [message] = yield server.delivered("bob@example.test", 1, "lists")
        assert b"with ESMTPSA id" in message and b"(using TLSv1.3 with cipher" in message
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_aliases_and_dsn_parameters_reach_the_queue(tmp_path: Path) -> None:
    server = yield start(tmp_path)
    server.parts.queue_runner.stopService()     # keep rows in the queue to look at them
    try:
        replies = yield in_thread(
            session, server.ports["mx"], "EHLO c",
            "MAIL FROM:<a@example.org> RET=HDRS ENVID=env+2B1 BODY=8BITMIME",
            "RCPT TO:<outside@example.test> NOTIFY=NEVER",
            "RCPT TO:<Bob+Lists@example.test> ORCPT=rfc822;bob+lists@example.test", "DATA",
            "Subject: dsn\r\n\r\nhi\r\n.")
        assert replies[-1].startswith("250 2.0.0 Ok: queued as")
        with server.parts.storage.db.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "select r.recipient, r.transport, r.notify, r.orcpt, m.ret, m.envid, m.body "
                "from queue_recipients r join queue_messages m on m.id = r.queue_id "
                "order by r.id").all()
        assert [tuple(row) for row in rows] == [
            ("friend@remote.example", "smtp", "NEVER", "rfc822;outside@example.test",
             "HDRS", "env+2B1", "8BITMIME"),
            ("bob+lists@example.test", "local", None, "rfc822;bob+lists@example.test",
             "HDRS", "env+2B1", "8BITMIME")]
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_swaks_tls_auth_pipelining(tmp_path: Path) -> None:
    swaks = shutil.which("swaks")
    assert swaks, "swaks is missing: run scripts/test-peers.sh (part of `make test`)"
    server = yield start(tmp_path)
    try:
        result = yield in_thread(lambda: subprocess.run(
            [swaks, "--server", f"127.0.0.1:{server.ports['submission']}", "--tls",
             "--auth", "PLAIN", "--auth-user", "bob@example.test", "--auth-password",
             "bob-secret", "--from", "bob@example.test", "--to", "bob@example.test",
             "--pipeline", "--header", "Subject: from swaks"],
            capture_output=True, text=True, timeout=60))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "250 2.0.0 Ok: queued as" in result.stdout
        [message] = yield server.delivered("bob@example.test", 1)
        assert b"Subject: from swaks" in message
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_shutdown_says_421_to_idle_sessions(tmp_path: Path) -> None:
    server = yield start(tmp_path)
    client = yield in_thread(Raw, server.ports["mx"])
    yield in_thread(client.cmd, "EHLO c")
    started = time.monotonic()
    yield server.root.stopService()
    goodbye = yield in_thread(client.reply)
    client.close()
    assert goodbye[0].startswith("421 4.3.2")
    assert time.monotonic() - started < 2


@pytest_twisted.inlineCallbacks
def test_connection_limits_and_idle_timeout(tmp_path: Path) -> None:
    server = yield start(tmp_path, "[smtp]\ncommand_timeout = 1s\n"
                         "[listener:tight]\nprotocol = smtp\n"
                         "endpoint = tcp:0:interface=127.0.0.1\nmax_connections_per_ip = 2\n")
    try:
        port = server.ports["tight"]

        def crowd() -> list[str]:
            first, second = Raw(port), Raw(port)
            third = Raw(port)              # one too many from this address
            greetings = [first.greeting[0], second.greeting[0], third.greeting[0]]
            for client in (first, second, third):
                client.close()
            return greetings
        greetings = yield in_thread(crowd)
        assert greetings[0].startswith("220 ") and greetings[1].startswith("220 ")
        assert greetings[2].startswith("421 4.7.0") and "too many connections" in greetings[2]

        def idle() -> list[str]:
            client = Raw(server.ports["mx"])
            time.sleep(2)                  # say nothing for longer than command_timeout
            reply = client.reply()
            client.close()
            return reply
        assert (yield in_thread(idle))[0].startswith("421 4.4.2")
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_session_limit_and_commands_before_auth(tmp_path: Path) -> None:
    server = yield start(tmp_path, "[smtp]\nsession_timeout = 1s\nmax_commands_before_auth = 3\n")
    try:
        def busy_but_too_long() -> list[str]:
            client = Raw(server.ports["mx"])
            replies = []
            for _ in range(8):                 # keeps talking: idle timeout never fires
                replies.append(client.cmd("NOOP"))
                if replies[-1].startswith("421"):
                    break
                time.sleep(0.25)
            client.close()
            return replies
        replies = yield in_thread(busy_but_too_long)
        assert replies[0].startswith("250") and any(r.startswith("421") for r in replies)

        chatty = yield in_thread(session, server.ports["submission"], "EHLO c", "NOOP",
                                 "NOOP", "NOOP", "NOOP")
        assert chatty[2].startswith("250") and chatty[3].startswith("421 4.7.0")
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_sni_picks_the_certificate_for_the_name_asked(tmp_path: Path) -> None:
    for name in ("other.test", "third.test"):
        write_self_signed(tmp_path / f"{name}.pem", tmp_path / f"{name}.key", name)
    server = yield start(tmp_path, "[listener:sni]\nprotocol = submission\n"
                         "endpoint = tcp:0:interface=127.0.0.1\ntls = implicit\n"
                         f"tls_cert = {tmp_path / 'cert.pem'}\ntls_key = {tmp_path / 'key.pem'}\n"
                         f"tls_sni = {tmp_path}/other.test.pem:{tmp_path}/other.test.key, "
                         f"{tmp_path}/third.test.pem:{tmp_path}/third.test.key\n")
    try:
        port = server.ports["sni"]

        def names() -> list[str]:
            seen = []
            for asked in ("other.test", "third.test", "unknown.test"):
                ctx = ssl._create_unverified_context()
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    with ctx.wrap_socket(raw, server_hostname=asked) as sock:
                        der = sock.getpeercert(binary_form=True)
                from cryptography import x509
                cert = x509.load_der_x509_certificate(der)
                seen.append(cert.subject.rfc4514_string())
            return seen
        assert (yield in_thread(names)) == ["CN=other.test", "CN=third.test",
                                            "CN=mx.example.test"]
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_local_mail_is_filed_at_acceptance_and_logged(tmp_path: Path) -> None:
    from twisted.logger import globalLogPublisher
    server = yield start(tmp_path)
    server.parts.queue_runner.stopService()     # the queue plays no part here
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        replies = yield in_thread(
            session, server.ports["mx"], "EHLO c", "MAIL FROM:<a@example.org>",
            "RCPT TO:<postmaster@example.test>", "RCPT TO:<Bob+lists@example.test>",
            "DATA", "Subject: now\r\n\r\nhi\r\n.")
        assert replies[-1].startswith("250 2.0.0 Ok: queued as")
        queue_id = replies[-1].rsplit(" ", 1)[1]
        # Filed by the time of the 250, nothing queued.
        assert len((yield server.inbox("bob@example.test"))) == 1
        assert len((yield server.inbox("bob@example.test", "lists"))) == 1
        assert (yield server.queued()) == []
        filed = sorted(e["detail"] for e in events
                       if "status=delivered" in e.get("log_format", ""))
        assert filed == ["2.0.0 bob@example.test/INBOX uid=1",
                         "2.0.0 bob@example.test/lists uid=1"]
        assert all(e["msg_id"] == queue_id and e["conn_id"] for e in events
                   if "status=delivered" in e.get("log_format", ""))
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_what_cannot_be_filed_at_once_is_queued(tmp_path: Path) -> None:
    server = yield start(tmp_path)
    server.parts.queue_runner.stopService()
    try:
        yield server.parts.directory.add_user("tiny@example.test", None, quota_bytes=10)
        replies = yield in_thread(
            session, server.ports["mx"], "EHLO c", "MAIL FROM:<a@example.org>",
            "RCPT TO:<bob@example.test>", "RCPT TO:<tiny@example.test>",
            "DATA", "Subject: full\r\n\r\nhi\r\n.")
        assert replies[-1].startswith("250 2.0.0 Ok: queued as")
        # All or nothing: one recipient over quota sends the whole message the old way.
        assert (yield server.inbox("bob@example.test")) == []
        queued = yield server.queued()
        assert sorted((r["recipient"], r["state"]) for r in queued) == [
            ("bob@example.test", "queued"), ("tiny@example.test", "queued")]
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_direct_delivery_can_be_turned_off(tmp_path: Path) -> None:
    server = yield start(tmp_path, "[smtp]\ndirect_delivery = no\n")
    server.parts.queue_runner.stopService()
    try:
        replies = yield in_thread(
            session, server.ports["mx"], "EHLO c", "MAIL FROM:<a@example.org>",
            "RCPT TO:<bob@example.test>", "DATA", "Subject: q\r\n\r\nhi\r\n.")
        assert replies[-1].startswith("250 2.0.0 Ok: queued as")
        assert [r["recipient"] for r in (yield server.queued())] == ["bob@example.test"]
        assert (yield server.inbox("bob@example.test")) == []
    finally:
        yield server.root.stopService()


def _line_by_line_data_input(self: Any) -> bool:
    """The DATA reader as it was before it went block by block: one Python loop
    iteration per line, the obvious reading of RFC 5321 (the reference for the test
    below)."""
    from lightmail.smtp import codes
    end = self.buffer.rfind(b"\n")
    if end < 0:
        if len(self.buffer) > self.cfg.max_line_length:
            self.content_error = self.content_error or codes.LONG_LINES
            self.buffer = self.buffer[-1:]
            self.previous_crlf = False
        return False
    block, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
    lines = block.split(b"\n")[:-1]
    out: list[bytes] = []
    for index, line in enumerate(lines):
        crlf = line.endswith(b"\r")
        if line == b".\r" and self.previous_crlf:
            self._add_text(b"".join(out))
            rest = lines[index + 1:]
            if rest:
                self.buffer = b"\n".join(rest) + b"\n" + self.buffer
            self._end_content()
            return True
        if not crlf or b"\r" in line[:-1]:
            self.content_error = self.content_error or codes.BARE_NEWLINE
        if len(line) + 1 > self.cfg.max_line_length:
            self.content_error = self.content_error or codes.LONG_LINES
        if line.startswith(b"."):
            line = line[1:]
        out.append(line + b"\n" if crlf else line + b"\r\n")
        self.previous_crlf = crlf
    self._add_text(b"".join(out))
    return True


def test_data_input_matches_the_line_by_line_reading_of_rfc_5321() -> None:
    """The block-at-a-time DATA reader ends DATA at the same place, with the same
    content and the same error, as the line-by-line reader, for random input fed in
    the same random pieces to both."""
    import random

    from lightmail.smtp.session import SMTPServerSession

    pieces = [b"a", b"bc", b".", b"..", b"\r\n", b"\n", b"\r", b"\r\n.\r\n", b".\r\n",
              b"x" * 30, b"\r\n.\n", b"\n.\r\n", b"\0"]
    rng = random.Random(5321)

    def reader(limit: int, line_by_line: bool) -> Any:
        session_ = SMTPServerSession.__new__(SMTPServerSession)
        session_.cfg = type("Cfg", (), {"max_line_length": limit,
                                        "max_message_size": 10 ** 9})()
        session_.buffer, session_.previous_crlf, session_.content_error = b"", True, None
        session_.content_size, session_.writer = 0, None
        session_.got, session_.ended = [], []
        session_._add_content = session_.got.append             # type: ignore[method-assign]
        session_._end_content = lambda: session_.ended.append(   # type: ignore[method-assign]
            len(session_.buffer))
        if line_by_line:
            session_._data_input = lambda: _line_by_line_data_input(session_)  # type: ignore[method-assign]
        return session_

    ended = 0
    for _ in range(4000):
        limit = rng.choice([8, 20, 1000])
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        data += rng.choice([b"", b"\r\n.\r\n", b"\r\n.\r\nQUIT\r\n"])
        new, old = reader(limit, False), reader(limit, True)
        fed = 0
        while fed < len(data) and not old.ended:
            step = rng.randint(1, 12)
            for one in (new, old):
                one.buffer += data[fed:fed + step]
                while not one.ended and one._data_input():
                    pass
            fed += step
        assert new.ended == old.ended and new.buffer == old.buffer, data
        assert new.content_error is old.content_error, (data, limit)
        if old.content_error is None:
            assert b"".join(new.got) == b"".join(old.got), data
        ended += bool(old.ended)
    assert ended > 1000                  # many of the random inputs ended DATA


def test_scan_lines_answers_each_question_of_rfc_5321() -> None:
    from lightmail.smtp.lines import scan_lines, undot
    good = b"Subject: x\r\n\r\n" + b"y" * 78 + b"\r\n" + b"..dot\r\n.\r\n"
    scan = scan_lines(good, 80)
    assert (scan.bare_newline, scan.too_long) == (False, False)
    assert scan.dots == [good.index(b"..dot"), good.index(b".\r\n", good.index(b"dot"))]
    assert undot(good, scan.dots).endswith(b"\r\n.dot\r\n\r\n")
    assert scan_lines(good, 79).too_long                   # 78 + CR LF > 79
    assert scan_lines(b".a\r\n", 80).dots == [0]
    for bare in (b"\n", b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"a\n\rb\r\n", b"a\r\n\n"):
        assert scan_lines(bare, 80).bare_newline, bare
    big = b"z" * 1000 + b"\r\n"
    assert scan_lines(b"a\r\n" * 500 + big, 1002).too_long is False
    assert scan_lines(b"a\r\n" * 500 + big, 1001).too_long is True
