"""Nothing is lost, nothing is filed twice: kill -9 a real server while it works.

Clients send numbered messages over SMTP to a `twistd lightmail` child process, which
is killed with SIGKILL at random moments and restarted.  At the end, every message that
got a 250 must be in its recipient's INBOX exactly once, and no message may be there
twice (one that was cut off before its 250 may be there once, or not at all).
"""

from __future__ import annotations

import random
import re
import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ServerProcess, run_cli, stored_messages

USERS = ["ann@crash.test", "bob@crash.test", "cat@crash.test"]
ROUNDS = 4


class Sender(threading.Thread):
    """Sends numbered messages until told to stop; records those that got a 250."""

    def __init__(self, port: int, numbers: Iterator[int], accepted: set[int],
                 lock: threading.Lock, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.numbers, self.accepted = port, numbers, accepted
        self.lock, self.stop = lock, stop

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
                    while not self.stop.is_set():
                        with self.lock:
                            number = next(self.numbers)
                        rcpt = USERS[number % len(USERS)]
                        body = (f"From: sender@client.test\r\nTo: {rcpt}\r\n"
                                f"Subject: crash-{number}\r\n\r\n" + "x" * (number % 5000)
                                + f"\r\nnumber {number}\r\n")
                        smtp.sendmail("sender@client.test", [rcpt], body.encode())
                        with self.lock:
                            self.accepted.add(number)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)   # the server is down: try again until told to stop


def filed_messages(state: Path) -> dict[int, list[str]]:
    """number -> the users whose INBOX holds it."""
    filed: dict[int, list[str]] = {}
    for user, _, content in stored_messages(state):
        match = re.search(rb"Subject: crash-(\d+)", content)
        assert match, content[:200]
        filed.setdefault(int(match.group(1)), []).append(user)
    return filed


@pytest.mark.parametrize("direct_delivery,workers", [("yes", 0), ("no", 0), ("yes", 2),
                                                     ("no", 2)])
def test_kill_9_loses_nothing_and_files_nothing_twice(write_config, tmp_path: Path,
                                                      direct_delivery: str,
                                                      workers: int) -> None:
    """With direct_delivery (the default) a 250 means filed; without, queued (and
    then delivered by the main process when the sessions are in workers)."""
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.crash.test\nnode_id = crash-node\n"
        f"workers = {workers}\n"
        "[logging]\nlevel = info\n"
        f"[smtp]\ndirect_delivery = {direct_delivery}\n"
        # The write path is under test, not the inbound checks: their DNS lookups
        # (to this machine's resolver) would only eat the short windows between kills.
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "checks = none\n")
    run_cli(config, "domain", "add", "crash.test")
    for user in USERS:
        run_cli(config, "user", "add", user, "--no-password")
    accepted: set[int] = set()
    lock = threading.Lock()
    numbers = iter(range(1, 10**9))
    rng = random.Random()
    for _ in range(ROUNDS):
        server = ServerProcess(config)
        try:
            port = server.ports(expected=1)["mx"]
            stop = threading.Event()
            senders = [Sender(port, numbers, accepted, lock, stop) for _ in range(3)]
            for sender in senders:
                sender.start()
            # Let some mail through, then kill at a random moment.
            time.sleep(rng.uniform(0.8, 2.5))
            server.kill()
            stop.set()
            for sender in senders:
                sender.join(15)
        finally:
            server.kill()
    assert len(accepted) > 20, "too few messages were accepted to prove anything"

    # A last, clean run delivers whatever the crashes left queued.
    server = ServerProcess(config)
    try:
        server.ports(expected=1)
        state = tmp_path / "state"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            filed = filed_messages(state)
            if accepted <= set(filed):
                break
            time.sleep(0.5)
        assert server.terminate() in (0, -15)
    finally:
        server.kill()
    filed = filed_messages(state)
    missing = sorted(accepted - set(filed))
    assert not missing, f"accepted (250) but not delivered: {missing[:20]}"
    twice = {n: users for n, users in filed.items() if len(users) > 1}
    assert not twice, f"filed more than once: {twice}"
    for number, users in filed.items():
        assert users == [USERS[number % len(USERS)].split("@")[0]]
