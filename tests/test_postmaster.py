"""postmaster (RFC 5321 §4.5.1) and double bounces (issue: conformance and hardening,
point 12): <postmaster> and postmaster@ every local domain are accepted and reach
[server] postmaster; a notice that cannot be delivered goes to postmaster once, and
what cannot go anywhere stays in the queue, dead, for ``lightmail queue list``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from inprocess import in_thread, session, start
from twisted.internet import reactor, task

from lightmail.storage.interfaces import DurableBlob, Envelope, QueueRecipient


def _rcpts(port: int, *addresses: str) -> list[str]:
    lines = ["EHLO client.test", "MAIL FROM:<a@example.org>"]
    lines += [f"RCPT TO:<{address}>" for address in addresses]
    return session(port, *lines, "DATA", "Subject: to postmaster\r\n\r\nhello\r\n.",
                   "QUIT")[2:2 + len(addresses)]


@pytest_twisted.inlineCallbacks
def test_postmaster_is_accepted_everywhere_and_reaches_the_configured_address(
        tmp_path: Path) -> Any:
    server = yield start(tmp_path, server="postmaster = bob@example.test\n")
    try:
        yield server.parts.directory.add_domain("other.test")
        replies = yield in_thread(_rcpts, server.ports["mx"], "postmaster",
                                  "PostMaster@other.test", "postmaster@example.test")
        assert [reply[:9] for reply in replies] == ["250 2.1.5"] * 3
        # Two to bob through [server] postmaster, one through the directory's alias:
        # one message, filed once for bob.
        [message] = yield server.delivered("bob@example.test", 1)
        assert b"Subject: to postmaster" in message
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_without_a_postmaster_address_only_the_directory_says(tmp_path: Path) -> Any:
    server = yield start(tmp_path)
    try:
        yield server.parts.directory.add_domain("other.test")
        replies = yield in_thread(_rcpts, server.ports["mx"], "postmaster",
                                  "postmaster@other.test", "postmaster@example.test")
        assert [reply[:9] for reply in replies] == ["550 5.1.1", "550 5.1.1", "250 2.1.5"]
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def _settle(server: Any) -> Any:
    """Run the queue until it has nothing due."""
    runner = server.parts.queue_runner
    for _ in range(40):
        runner.kick()
        yield runner.idle()
        due = [row for row in (yield server.queued())
               if row["state"] in ("queued", "deferred")]
        if not due:
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("the queue never settled")


@pytest_twisted.inlineCallbacks
def _bounce_a_notice(server: Any) -> Any:
    """A notice (from <>) to a local address that does not exist: it bounces."""
    ref = yield server.parts.blobs.put(b"Subject: a notice\r\n\r\nabout something\r\n")
    yield server.parts.write_port.enqueue(
        Envelope("", [QueueRecipient("ghost@example.test", "local")], source="local"),
        DurableBlob(ref))
    yield _settle(server)


@pytest_twisted.inlineCallbacks
def test_a_double_bounce_goes_to_postmaster_once(tmp_path: Path) -> Any:
    server = yield start(tmp_path, server="postmaster = bob@example.test\n")
    try:
        yield _bounce_a_notice(server)
        [notice] = yield server.delivered("bob@example.test", 1)
        assert b"To: <bob@example.test>" in notice and b"ghost@example.test" in notice
        assert (yield server.queued()) == []        # nothing left, nothing dead
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_what_cannot_go_anywhere_is_kept_dead(tmp_path: Path) -> Any:
    # No postmaster: the bounced notice itself is kept.
    server = yield start(tmp_path)
    try:
        yield _bounce_a_notice(server)
        [row] = yield server.queued()
        assert (row["state"], row["recipient"]) == ("dead", "ghost@example.test")
        assert (yield server.parts.queue.manage("requeue")) == 1   # an admin's retry
    finally:
        yield server.stop()
    # A postmaster that does not exist: the notice to it is the one kept, once.
    server = yield start(tmp_path / "second", server="postmaster = nobody@example.test\n")
    try:
        yield _bounce_a_notice(server)
        [row] = yield server.queued()
        assert (row["state"], row["recipient"]) == ("dead", "nobody@example.test")
    finally:
        yield server.stop()
