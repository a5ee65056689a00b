"""Connections that have not logged in are capped apart (issue: conformance and
hardening, point 11): idle connections nobody logs in on cannot fill a listener for
everyone.  In one process, and across worker processes (the main process counts)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from harness import ServerProcess, run_cli
from inprocess import in_thread, start

PASSWORD = "cap-secret"


def _connect(port: int) -> tuple[socket.socket, str]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.makefile("rb").readline().decode()


def _login(sock: socket.socket, user: str, password: str) -> str:
    sock.sendall(f"a LOGIN {user} {password}\r\n".encode())
    reader = sock.makefile("rb")
    while True:
        line = reader.readline().decode()
        if line.startswith("a ") or not line:
            return line


def _exercise(port: int, user: str, password: str) -> list[str]:
    """Two not logged in fill the cap of 2; a third is refused; one logs in and a new
    one is let in; the logged-in one leaves: still full; one not logged in leaves:
    room again."""
    seen = []
    first, greeting = _connect(port)
    second, _ = _connect(port)
    seen.append(greeting[:4])
    third, refused = _connect(port)
    seen.append(refused)
    third.close()
    seen.append(_login(first, user, password)[:4])
    fourth, admitted = _connect(port)
    seen.append(admitted[:4])
    first.close()                        # logged in: frees no slot of the two
    fifth, refused_again = _connect(port)
    seen.append(refused_again)
    fifth.close()
    second.close()                       # not logged in: frees one
    sixth = None
    for _ in range(50):                  # the release reaches the counter at once,
        sixth, again = _connect(port)    # or a worker's notice a moment later
        if again.startswith("* OK"):
            break
        sixth.close()
        time.sleep(0.05)
    seen.append(again[:4])
    for sock in (fourth, sixth):
        if sock is not None:
            sock.close()
    return seen


def _check(seen: list[str]) -> None:
    assert seen[0] == "* OK" and seen[2] == "a OK" and seen[3] == "* OK", seen
    # (max_connections is 1000 and max_connections_per_ip 20: only the cap of two
    # not logged in can refuse these.)
    assert seen[1].startswith("* BYE [UNAVAILABLE]"), seen
    assert seen[4].startswith("* BYE [UNAVAILABLE]"), seen
    assert seen[5] == "* OK", seen


@pytest_twisted.inlineCallbacks
def test_connections_not_logged_in_have_a_cap_of_their_own(tmp_path: Path) -> Any:
    server = yield start(tmp_path, "[directory]\nauth_over_plaintext = yes\n"
                         "[listener:imap]\nprotocol = imap\n"
                         "endpoint = tcp:0:interface=127.0.0.1\nmax_unauthenticated = 2\n")
    try:
        seen = yield in_thread(_exercise, server.ports["imap"], "bob@example.test",
                               "bob-secret")
    finally:
        yield server.stop()
    _check(seen)


def test_the_cap_holds_across_worker_processes(write_config: Any) -> None:
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.cap.test\nworkers = 2\n"
        "[directory]\nauth_over_plaintext = yes\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "max_unauthenticated = 2\n")
    run_cli(config, "domain", "add", "cap.test")
    run_cli(config, "user", "add", "ann@cap.test", "--password-stdin", stdin=PASSWORD + "\n")
    server = ServerProcess(config)
    try:
        port = server.ports(expected=1)["imap"]
        _check(_exercise(port, "ann@cap.test", PASSWORD))
    finally:
        server.kill()
