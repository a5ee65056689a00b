"""LightMail with its blobs on S3 ([storage] blob_backend = s3), against the S3
server of tests/s3server.py: mail over SMTP, and what happens while S3 is away."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
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
