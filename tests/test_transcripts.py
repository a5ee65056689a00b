"""Protocol transcripts ([transcript]): real clients (smtplib, imaplib, poplib, and raw
lines where a library cannot say it) talk to a server whose listeners are chosen; each
transcript has the commands and replies, and neither the password (nor any base64 form
of it, nor a CRAM-MD5 digest or a bearer token) nor a message's content."""

from __future__ import annotations

import base64
import hashlib
import hmac
import imaplib
import io
import poplib
import re
import smtplib
import socket
import ssl
import stat
import time
import zlib
from pathlib import Path
from typing import Any

import pytest_twisted
from harness import ServerProcess
from inprocess import Raw, in_thread, start
from twisted.logger import globalLogPublisher

from lightmail.config import LoggingConfig
from lightmail.logs import make_observer

USER = "carol@example.test"
SECRET = "Tr4nscript-S3cret!"
BODY = "BODY-LINE-NOBODY-MAY-SEE"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjYXJvbCJ9.c2lnbmF0dXJlLXNlY3JldA"


def _listeners(tmp: Path) -> str:
    return ("[directory]\nauth_over_plaintext = yes\n"
            "mechanisms = PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256\n"
            "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
            f"tls = starttls\ntls_cert = {tmp / 'cert.pem'}\ntls_key = {tmp / 'key.pem'}\n"
            "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n"
            "[listener:lmtp]\nprotocol = lmtp\nendpoint = tcp:0:interface=127.0.0.1\n")


def _forms(secret: str) -> list[str]:
    """The secret and the base64 forms a SASL exchange would carry it in."""
    forms = [secret]
    for text in (secret, f"\0{USER}\0{secret}", f"{USER}\0{USER}\0{secret}",
                 f"n,,\x01auth=Bearer {secret}\x01\x01",
                 f"user={USER}\x01auth=Bearer {secret}\x01\x01"):
        encoded = base64.b64encode(text.encode()).decode()
        forms += [encoded, encoded.rstrip("=")]
    # Whatever precedes it, the base64 of the secret's middle is in the encoding.
    for shift in range(3):
        encoded = base64.b64encode(b"x" * shift + secret.encode()).decode()
        forms.append(encoded[(shift * 4 + 2) // 3 + 2:-4])
    return forms


def _cram_digest(challenge_b64: bytes) -> str:
    challenge = base64.b64decode(challenge_b64)
    return hmac.new(SECRET.encode(), challenge, hashlib.md5).hexdigest()


def _assert_clean(text: str, *secrets: str) -> None:
    for secret in (SECRET, TOKEN, *secrets):
        for form in _forms(secret):
            assert form not in text, f"{form!r} ({secret!r}) in the transcript:\n{text}"
    assert BODY not in text, text


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def _smtp_clients(ports: dict[str, int]) -> list[str]:
    digests = []
    message = f"From: {USER}\r\nTo: {USER}\r\nSubject: t\r\n\r\n{BODY}\r\n"
    with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=30) as client:
        client.starttls(context=_unverified())
        client.ehlo("client.test")
        client.user, client.password = USER, SECRET
        assert client.auth("PLAIN", client.auth_plain, initial_response_ok=True)[0] == 235
        client.sendmail(USER, [USER], message)
    with smtplib.SMTP_SSL("127.0.0.1", ports["submissions"], context=_unverified(),
                          timeout=30) as client:
        client.ehlo("client.test")
        client.user, client.password = USER, SECRET
        assert client.auth("LOGIN", client.auth_login, initial_response_ok=False)[0] == 235
    with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=30) as client:
        client.starttls(context=_unverified())
        client.ehlo("client.test")
        code, challenge = client.docmd("AUTH", "CRAM-MD5")
        assert code == 334
        digest = _cram_digest(challenge)
        digests.append(digest)
        answer = base64.b64encode(f"{USER} {digest}".encode()).decode()
        assert client.docmd(answer)[0] == 235
        # BDAT (RFC 3030), which smtplib does not speak.
        client.docmd("MAIL", f"FROM:<{USER}>")
        client.docmd("RCPT", f"TO:<{USER}>")
        chunk = message.encode()
        client.send(f"BDAT {len(chunk)} LAST\r\n".encode() + chunk)
        assert client.getreply()[0] == 250
    raw = Raw(ports["submission"])
    try:
        raw.cmd("EHLO client.test")
        # Mechanisms not offered here: refused, but what the client sent is masked all
        # the same.
        xoauth = base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode())
        raw.cmd(f"AUTH XOAUTH2 {xoauth.decode()}")
        bearer = base64.b64encode(f"n,,\x01auth=Bearer {TOKEN}\x01\x01".encode())
        raw.cmd(f"AUTH OAUTHBEARER {bearer.decode()}")
    finally:
        raw.close()
    with smtplib.LMTP("127.0.0.1", ports["lmtp"], timeout=30) as client:
        client.sendmail("someone@remote.example", [USER], message)
    return digests


class RawIMAP:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.compress: Any = None
        self.inflate: Any = None
        self.buffer = b""

    def send(self, data: bytes) -> None:
        if self.compress is not None:
            data = self.compress.compress(data) + self.compress.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def readline(self) -> bytes:
        if self.inflate is None:
            return self.file.readline()
        while b"\n" not in self.buffer:
            self.buffer += self.inflate.decompress(self.sock.recv(65536))
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.readline()
            lines.append(line)
            if line.startswith(tag + b" ") or line.startswith(b"+"):
                return lines


def _imap_clients(port: int) -> None:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    client.login(USER, SECRET)
    client.append("INBOX", None, None,
                  f"Subject: appended\r\n\r\n{BODY}\r\n".encode())
    client.select("INBOX")
    assert BODY.encode() in client.fetch("1", "(BODY[])")[1][0][1]
    client.logout()
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    client.starttls(ssl_context=_unverified())
    plain = base64.b64encode(f"\0{USER}\0{SECRET}".encode())
    assert client.authenticate("PLAIN", lambda _: base64.b64decode(plain))[0] == "OK"
    client.logout()
    # LOGIN with both arguments as literals, then COMPRESS=DEFLATE.
    raw = RawIMAP(port)
    raw.send(b"a LOGIN {%d}\r\n" % len(USER))
    assert raw.until(b"a")[-1].startswith(b"+")
    raw.send(USER.encode() + b" {%d}\r\n" % len(SECRET))
    assert raw.until(b"a")[-1].startswith(b"+")
    raw.send(SECRET.encode() + b"\r\n")
    assert raw.until(b"a")[-1].startswith(b"a OK")
    raw.send(b"b COMPRESS DEFLATE\r\n")
    assert raw.until(b"b")[-1].startswith(b"b OK")
    raw.compress = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw.inflate = zlib.decompressobj(-15)
    raw.send(b"c NOOP-AFTER-COMPRESS\r\nd LOGOUT\r\n")
    assert b"c BAD" in b"".join(raw.until(b"c"))
    raw.until(b"d")
    raw.sock.close()


def _pop3_clients(port: int) -> str:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    client.user(USER)
    client.pass_(SECRET)
    assert any(BODY.encode() in line for line in client.retr(1)[1])
    client.quit()
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    plain = base64.b64encode(f"\0{USER}\0{SECRET}".encode()).decode()
    assert client._shortcmd(f"AUTH PLAIN {plain}").startswith(b"+OK")
    client.quit()
    # APOP is not offered (no timestamp in the greeting, which poplib.apop wants):
    # refused, and its digest masked all the same.
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    digest = hashlib.md5(f"<1.2@mx.example.test>{SECRET}".encode()).hexdigest()
    try:
        client._shortcmd(f"APOP {USER} {digest}")
    except poplib.error_proto:
        pass
    client.quit()
    return digest


def _read_transcripts(directory: Path, count: int) -> dict[str, str]:
    """The transcripts in ``directory`` once ``count`` of them are closed."""
    deadline = time.monotonic() + 30
    while True:
        files = {path.name: path.read_text() for path in directory.glob("*.txt")}
        closed = {name: text for name, text in files.items() if "-- closed" in text}
        if len(closed) >= count:
            return files
        assert time.monotonic() < deadline, f"{len(closed)} of {count} closed: {files}"
        time.sleep(0.1)


@pytest_twisted.inlineCallbacks
def test_transcripts_of_every_protocol_mask_every_secret(tmp_path: Path) -> Any:
    directory = tmp_path / "transcripts"
    server = yield start(tmp_path, _listeners(tmp_path) + (
        "[transcript]\nlisteners = submission submissions lmtp imap pop3\n"
        f"directory = {directory}\n"))
    try:
        yield server.parts.directory.add_user(USER, SECRET)
        digests = yield in_thread(_smtp_clients, server.ports)
        yield server.delivered(USER, 3)
        yield in_thread(_imap_clients, server.ports["imap"])
        digests.append((yield in_thread(_pop3_clients, server.ports["pop3"])))
        # The MX is not chosen: no transcript of its sessions.
        yield in_thread(lambda: smtplib.SMTP("127.0.0.1", server.ports["mx"],
                                             timeout=30).quit())
        files = yield in_thread(_read_transcripts, directory, 11)
    finally:
        yield server.stop()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert all(stat.S_IMODE((directory / name).stat().st_mode) == 0o600 for name in files)
    assert not any("-mx-" in name for name in files), sorted(files)
    everything = "\n".join(files.values())
    _assert_clean(everything, *digests)

    def one(listener: str, pattern: str) -> str:
        found = [text for name, text in files.items()
                 if f"-{listener}-" in name and re.search(pattern, text)]
        assert len(found) == 1, (pattern, sorted(files))
        return found[0]

    plain = one("submission", r"C: AUTH PLAIN \*\*\*\*\n")
    # The commands and replies are there, in order; after STARTTLS in plain text.
    for expected in ("S: 220 mx.example.test", "C: STARTTLS", "-- STARTTLS: TLS from here",
                     "C: ehlo client.test", "S: 235 2.7.0", f"C: mail FROM:<{USER}>",
                     "S: 354 ", "C: [message: ", "C: .", "S: 250 2.0.0 Ok: queued as ",
                     "C: QUIT", "S: 221 "):
        assert expected in plain, (expected, plain)
    assert plain.index("C: STARTTLS") < plain.index("C: AUTH PLAIN")
    login = one("submissions", r"C: AUTH LOGIN\n")
    assert "-- TLS handshake done" in login
    assert login.count("C: ****") == 2 and login.count("S: 334 ") == 2
    cram = one("submission", r"C: AUTH CRAM-MD5\n")
    assert re.search(r"C: BDAT \d+ LAST\n.* C: \[BDAT chunk: \d+ octets\]", cram)
    one("submission", r"C: AUTH XOAUTH2 \*\*\*\*\n")
    one("submission", r"C: AUTH OAUTHBEARER \*\*\*\*\n")
    one("lmtp", r"C: (?i:lhlo) .*\n.*S: 250-")
    imap_login = one("imap", r"C: \S+ LOGIN carol@example.test \*\*\*\*\n")
    assert re.search(r"C: \S+ APPEND INBOX.*\{\d+\}\n.*\n.*C: \[literal: \d+ octets\]",
                     imap_login)
    assert re.search(r"S: \* 1 FETCH \(BODY\[\] \{\d+\}\n.*S: \[literal: \d+ octets\]",
                     imap_login)
    one("imap", r"C: \S+ AUTHENTICATE PLAIN( \*\*\*\*)?\n")
    literals = one("imap", r"C: a LOGIN \{\d+\}\n")
    assert f"C: [literal] {USER}" in literals and "C: [literal: ****]" in literals
    assert "-- COMPRESS=DEFLATE: shown inflated from here" in literals
    assert "C: c NOOP-AFTER-COMPRESS" in literals and "S: c BAD" in literals
    pop = one("pop3", rf"(?s)C: USER {re.escape(USER)}\n.*C: PASS \*\*\*\*\n")
    assert re.search(r"C: RETR 1\n.*S: \+OK.*\n.*S: \[message: \d+ octets\]\n.*S: \.\n", pop)
    one("pop3", r"C: AUTH PLAIN \*\*\*\*\n")
    one("pop3", rf"C: APOP {re.escape(USER)} \*\*\*\*\n")


@pytest_twisted.inlineCallbacks
def test_a_chosen_user_gets_a_transcript_from_the_start_in_the_log(tmp_path: Path) -> Any:
    out = io.StringIO()
    observer = make_observer(LoggingConfig(), out=out)
    globalLogPublisher.addObserver(observer)
    server = yield start(tmp_path, _listeners(tmp_path) + f"[transcript]\nusers = {USER}\n"
                         "body_octets = 1K\n")
    try:
        yield server.parts.directory.add_user(USER, SECRET)
        yield server.parts.directory.add_user("dave@example.test", "dave-secret")

        def clients() -> None:
            for user, secret in ((USER, SECRET), ("dave@example.test", "dave-secret")):
                client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
                client.login(user, secret)
                client.append("INBOX", None, None, f"Subject: x\r\n\r\n{BODY}\r\n".encode())
                client.logout()
        yield in_thread(clients)
    finally:
        yield server.stop()
        globalLogPublisher.removeObserver(observer)
    lines = [line for line in out.getvalue().splitlines() if "transcript: " in line]
    conns = {re.search(r"conn=(\w+)", line).group(1) for line in lines}  # type: ignore[union-attr]
    assert len(conns) == 1, lines                   # carol's session, not dave's
    text = "\n".join(lines)
    assert "# LightMail transcript: listener imap (imap)" in text    # held till login
    assert re.search(r"(?s)S: \* OK \[CAPABILITY .*\n.* C: \S+ LOGIN carol@example.test "
                     r"\*\*\*\*\n.*-- logged in as carol@example.test", text)
    assert all("[lightmail.transcript conn=" in line for line in lines)
    assert "dave" not in text
    # body_octets = 1K: the appended message is shown, as much as that.
    assert f"C: | {BODY}" in text and "the first " in text
    for form in _forms(SECRET):
        assert form not in text


def test_worker_processes_write_transcripts_too(tmp_path: Path, write_config) -> None:
    directory = tmp_path / "transcripts"
    server = ServerProcess(write_config(
        "[server]\nstate_dir = state\nhostname = mx.example.test\nshutdown_timeout = 5s\n"
        "workers = 1\n[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        f"[transcript]\nclients = 127.0.0.0/8\ndirectory = {directory}\n"))
    try:
        server.wait_for(r"1 worker processes serve the listeners", timeout=120)
        line = server.wait_for(r"listening: mx speaks smtp on 127\.0\.0\.1:(\d+)")[0]
        with smtplib.SMTP("127.0.0.1", int(line.group(1)), timeout=30) as client:
            client.ehlo("worker-test.example")
        files = _read_transcripts(directory, 1)
        (name, text), = files.items()
        conn = name.removesuffix(".txt").rsplit("-", 1)[1]
        assert "C: ehlo worker-test.example" in text and "S: 221 " in text
        # Its name has the connection id of the worker's log lines.
        server.wait_for(rf"worker=0 conn={conn}\] connect from 127\.0\.0\.1")
        assert server.terminate() in (0, -15)
    finally:
        server.kill()


# -- the scribes alone, fed what a client and a server would send -------------------

def test_imap_login_masks_a_quoted_password_with_escapes_and_spaces() -> None:
    from lightmail.transcripts.scribes import IMAPScribe
    scribe = IMAPScribe()
    lines = scribe.client(b'a1 LOGIN "carol" "se\\"cr et"\r\n')
    assert lines == ['C: a1 LOGIN "carol" ****']
    # After the command, lines are shown again; a SASL-IR is masked, and its
    # continuation too until the tagged answer.
    assert scribe.client(b"a2 AUTHENTICATE PLAIN AGNhcm9sAHNlY3JldA==\r\n") == [
        "C: a2 AUTHENTICATE PLAIN ****"]
    assert scribe.server(b"+ \r\n") == ["S: + "]
    assert scribe.client(b"c2VjcmV0\r\n") == ["C: ****"]
    assert scribe.server(b"a2 NO [AUTHENTICATIONFAILED] no\r\n")
    assert scribe.client(b"a3 NOOP\r\n") == ["C: a3 NOOP"]


def test_smtp_data_shows_body_octets_and_pipelined_commands_around_it() -> None:
    from lightmail.transcripts.scribes import SMTPScribe
    scribe = SMTPScribe(body_octets=8)
    scribe.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    scribe.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
    lines = scribe.client(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert lines == ["C: | Subject:", "C: [message: 20 octets, the first 8 shown above]",
                     "C: .", "C: QUIT"]


def test_pop3_pipelined_answers_are_told_apart() -> None:
    from lightmail.transcripts.scribes import POP3Scribe
    scribe = POP3Scribe()
    scribe.client(b"LIST\r\nRETR 1\r\nLIST 1\r\n")
    lines = scribe.server(b"+OK 1 messages\r\n1 120\r\n.\r\n+OK 120 octets\r\n"
                          b"Subject: secret body\r\n\r\nhi\r\n.\r\n+OK 1 120\r\n")
    assert lines == ["S: +OK 1 messages", "S: 1 120", "S: .", "S: +OK 120 octets",
                     "S: [message: 28 octets]", "S: .", "S: +OK 1 120"]
