"""LightMail with its blobs on S3 ([storage] blob_backend = s3), against the S3
server of tests/s3server.py: mail over SMTP, and what happens while S3 is away."""

from __future__ import annotations

import hashlib
import imaplib
import json
import os
import smtplib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness import ServerProcess, free_port, run_cli
from inprocess import in_thread, session, start

from tests.s3server import S3Server


def deliver(port: int, subject: str) -> list[str]:
    return session(port, "EHLO client.test", "MAIL FROM:<alice@remote.example>",
                   "RCPT TO:<bob@example.test>", "DATA",
                   f"Subject: {subject}\r\n\r\nA message about {subject}.\r\n.", "QUIT")


@pytest_twisted.inlineCallbacks
def test_smtp_answers_451_while_s3_is_away_and_loses_nothing(tmp_path: Path) -> Any:
    s3 = S3Server()
    server = None
    try:
        server = yield start(tmp_path, extra="[storage]\nblob_backend = s3\n"
                             + s3.config(tmp_path, timeout="1s", retries=0))
        mx = server.ports["mx"]
        replies = yield in_thread(deliver, mx, "before")
        assert replies[4].startswith("250 "), replies
        s3.pause()
        try:
            replies = yield in_thread(deliver, mx, "during")
        finally:
            s3.resume()
        # Not stored: not accepted, and the sender keeps it to try again.
        assert replies[4].startswith("451 4.3.0"), replies
        replies = yield in_thread(deliver, mx, "after")
        assert replies[4].startswith("250 "), replies
        found = yield server.delivered("bob@example.test", 2)
        assert sorted(content.split(b"\r\n\r\n", 1)[1] for content in found) == [
            b"A message about after.\r\n", b"A message about before.\r\n"]
        # Every message row's blob is in the bucket.
        listed = s3.client().list_objects_v2(Bucket=s3.bucket)
        keys = {item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", [])}
        messages = yield server.parts.mailstore.list_messages(
            (yield server.parts.mailstore.get_mailbox(
                (yield server.parts.directory.get_user("bob@example.test")).id,
                "INBOX")).id)
        assert {info.blob_id for info in messages} <= keys
    finally:
        if server is not None:
            yield server.stop()
        s3.stop()


def server_config(tmp: Path, s3: S3Server, backend: str = "s3", **more: Any) -> Path:
    """A server started from a file (so with its writer process), blobs on ``s3``
    (or, with ``backend`` filesystem, where [s3] names them for a migration)."""
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    path = tmp / "lightmail.conf"
    path.write_text(
        f"[server]\nstate_dir = {state}\nhostname = mx.s3.test\nshutdown_timeout = 5s\n"
        f"[storage]\nblob_backend = {backend}\n[directory]\nauth_over_plaintext = yes\n"
        f"[outbound]\nrelay_host = [127.0.0.1]:{free_port()}\nmin_backoff = 1h\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        + s3.config(tmp, **more))
    return path


def rfc822(subject: str, body: bytes) -> bytes:
    return (f"From: <alice@remote.example>\r\nTo: <bob@s3.test>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@remote.example>\r\n\r\n").encode() + body


def test_a_server_with_blobs_on_s3_takes_mail_over_smtp_and_serves_it_over_imap(
        tmp_path: Path) -> None:
    s3 = S3Server()
    try:
        config = server_config(tmp_path, s3, multipart_threshold="5M", part_size="5M")
        run_cli(config, "domain", "add", "s3.test")
        run_cli(config, "user", "add", "bob@s3.test", "--password-stdin",
                stdin="bob-secret\n")
        line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
        sent = {"small": rfc822("small", line),
                "spooled": rfc822("spooled", line * 20_000),      # 1.3 MB
                "parts": rfc822("parts", line * 100_000)}         # 6.4 MB: multipart
        server = ServerProcess(config)
        try:
            ports = server.ports(expected=2)
            server.wait_for(r"writer process started")
            server.wait_for(r"blobs in s3://lightmail-test/")
            with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=60) as smtp:
                for content in sent.values():
                    assert smtp.sendmail("alice@remote.example", ["bob@s3.test"],
                                         content) == {}
                # S3 away: the writer process's upload fails, and so does the DATA.
                s3.pause()
                try:
                    with pytest.raises(smtplib.SMTPDataError) as refused:
                        smtp.sendmail("alice@remote.example", ["bob@s3.test"],
                                      rfc822("refused", line))
                finally:
                    s3.resume()
                assert refused.value.smtp_code == 451
            imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=60)
            try:
                assert imap.login("bob@s3.test", "bob-secret")[0] == "OK"
                status, count = imap.select("INBOX", readonly=True)
                assert (status, count) == ("OK", [b"3"])
                fetched = {}
                for number in (1, 2, 3):
                    status, data = imap.fetch(str(number), "(BODY.PEEK[])")
                    assert status == "OK", data
                    content = data[0][1]
                    subject = content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]
                    fetched[subject.decode()] = content
                    status, data = imap.fetch(str(number), "(BODY.PEEK[TEXT]<0.63>)")
                    assert data[0][1] == line
            finally:
                imap.logout()
        finally:
            assert server.terminate() in (0, -15), server.output
        # As sent, after the Received: field the server put on top.
        assert set(fetched) == set(sent)
        for subject, content in sent.items():
            assert fetched[subject].endswith(content)
        # In the bucket, under their SHA-256, the large one uploaded in parts.
        client = s3.client()
        objects = client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])
        assert {item["Key"] for item in objects} == {
            f"{digest[:2]}/{digest}" for digest in
            (hashlib.sha256(content).hexdigest() for content in fetched.values())}
        assert [item["ETag"].strip('"')[-2:] for item in objects
                if item["Size"] > 5 * 1024 * 1024] == ["-2"]
        assert not any(name.endswith(".tmp") for name in
                       os.listdir(tmp_path / "state" / "s3-spool"))
    finally:
        s3.stop()


def imap_messages(port: int) -> list[bytes]:
    """Bob's INBOX, each message whole, in UID order."""
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=60)
    try:
        assert imap.login("bob@s3.test", "bob-secret")[0] == "OK"
        status, count = imap.select("INBOX", readonly=True)
        assert status == "OK", count
        found = []
        for number in range(1, int(count[0]) + 1):
            status, data = imap.fetch(str(number), "(BODY.PEEK[])")
            assert status == "OK", data
            found.append(data[0][1])
        return found
    finally:
        imap.logout()


def send(port: int, *contents: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        for content in contents:
            assert smtp.sendmail("alice@remote.example", ["bob@s3.test"], content) == {}


def test_blobs_migrate_to_s3_and_back_with_progress(tmp_path: Path) -> None:
    import io

    from lightmail.admin.blobmigrate import migrate
    from lightmail.admin.datatools import Progress
    from lightmail.config import load_config

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    s3 = S3Server()
    try:
        config = server_config(tmp_path, s3, backend="filesystem")
        run_cli(config, "domain", "add", "s3.test")
        run_cli(config, "user", "add", "bob@s3.test", "--password-stdin",
                stdin="bob-secret\n")
        line = b"Some text to move from one store to the other and back again.\r\n"
        server = ServerProcess(config)
        try:
            ports = server.ports(expected=2)
            send(ports["mx"], rfc822("one", line), rfc822("two", line * 20_000),
                 rfc822("three", line * 5000))
            on_disk = imap_messages(ports["imap"])
        finally:
            assert server.terminate() in (0, -15), server.output
        assert len(on_disk) == 3
        # To S3: each blob checked and uploaded; a progress line on a terminal.
        terminal = Terminal()
        summary = migrate(load_config(config), "s3", Progress(terminal))
        assert (summary["copied"], summary["present"], summary["gone"]) == (3, 0, 0)
        assert summary["target"].startswith("s3://lightmail-test/")
        assert "\rblobs to s3: 3/3 [" in terminal.getvalue()
        assert "100%" in terminal.getvalue()
        # Again: nothing to copy (it may run beside the server, then once more).
        again = json.loads(run_cli(config, "blobs", "migrate", "--to", "s3", "--json"))
        assert (again["copied"], again["present"]) == (0, 3)
        # The server on S3, with the files out of the way: the same mail, and more.
        config.write_text(config.read_text().replace("blob_backend = filesystem",
                                                     "blob_backend = s3"))
        (tmp_path / "state" / "blobs").rename(tmp_path / "state" / "blobs.before")
        server = ServerProcess(config)
        try:
            ports = server.ports(expected=2)
            assert imap_messages(ports["imap"]) == on_disk
            send(ports["mx"], rfc822("four", line * 3))
            on_s3 = imap_messages(ports["imap"])
        finally:
            assert server.terminate() in (0, -15), server.output
        assert len(on_s3) == 4 and on_s3[:3] == on_disk
        # And back to a filesystem store (a new one): all four.
        back = json.loads(run_cli(config, "blobs", "migrate", "--to", "filesystem",
                                  "--json"))
        assert (back["copied"], back["present"], back["gone"]) == (4, 0, 0)
        config.write_text(config.read_text().replace("blob_backend = s3",
                                                     "blob_backend = filesystem"))
        s3.pause()          # S3 is not asked any more
        try:
            server = ServerProcess(config)
            try:
                ports = server.ports(expected=2)
                assert imap_messages(ports["imap"]) == on_s3
            finally:
                assert server.terminate() in (0, -15), server.output
        finally:
            s3.resume()
    finally:
        s3.stop()
