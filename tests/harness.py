"""Run LightMail as administrators do: `twistd -n lightmail` in a child process.

The child's listeners bind port 0; the harness reads the real ports from the
"listening: NAME speaks PROTOCOL on HOST:PORT" log lines.  Every process started here
is killed at the end of the test that started it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

TWISTD = str(Path(sys.executable).parent / "twistd")
LISTENING = re.compile(r"listening: (?P<name>\S+) speaks (?P<protocol>\S+)"
                       r"(?: over TLS)? on (?P<host>[^\s]+):(?P<port>\d+)")


def default_sigint() -> None:
    """Give the child the default SIGINT and SIGTERM disposition, unblocked.

    A process started from a background job inherits SIGINT ignored, and a CI runner
    may start us with signals blocked; both survive exec, and then neither Python nor
    Twisted installs a handler: Ctrl-C would do nothing.  Tests that send signals need
    the child as an administrator's shell would start it.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def signal_state(pid: int) -> str:
    """The signal lines of /proc/PID/status, to explain a process that ignored one."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        return f"no status for {pid}: {e}"
    return " ".join(line for line in status.splitlines() if line.startswith("Sig"))



def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports that were free a moment ago (for servers that need
    a number, not 0): each socket is held until all are bound, so that the kernel
    cannot hand the same port out twice (it did: Dovecot then refused a configuration
    with a duplicate listener)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    return free_ports(1)[0]

class ServerProcess:
    def __init__(self, config: Path, args: tuple[str, ...] = ()) -> None:
        self.config = config
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "lightmail", "--config", str(config), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            preexec_fn=default_sigint)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0, count: int = 1) -> list[re.Match[str]]:
        """Wait until ``count`` log lines match ``pattern``; fail with the log if not."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in map(regex.search, self.lines) if m]
                if len(found) >= count:
                    return found
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"server exited ({self.proc.returncode}) before "
                                         f"{pattern!r}:\n{self.output}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.output}")
                self._cond.wait(min(left, 0.2))

    def ports(self, expected: int, timeout: float = 30.0) -> dict[str, int]:
        found = self.wait_for(LISTENING.pattern, timeout, count=expected)
        self.wait_for(r"LightMail ready", timeout)
        return {m.group("name"): int(m.group("port")) for m in found}

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._reader.join(5)


def started_as(pid: int, timeout: float = 10.0) -> tuple[str, str]:
    """How LightMail's child process ``pid`` started, and what it is: ("forked",
    "worker") for one forked from the main process as it started
    (lightmail/workers/prefork.py names it lm-worker or lm-writer), ("exec", "writer")
    for a new interpreter (``python -m lightmail.workers.writer``).  Waits for a fork
    or an exec just made to show: the log line that names the pid may come first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            comm, args = "", []
        if comm in ("lm-worker", "lm-writer"):
            return "forked", comm[3:]
        for kind in ("worker", "writer"):
            if f"lightmail.workers.{kind}".encode() in args:
                return "exec", kind
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} is no LightMail child: {comm} {args}")
        time.sleep(0.05)


def run_cli(config: Path, *args: str, stdin: str | None = None) -> str:
    """Run the `lightmail` admin command against ``config``; fail on a non-zero exit."""
    result = subprocess.run([sys.executable, "-m", "lightmail.admin.cli", "--config",
                             str(config), *args], capture_output=True, text=True,
                            timeout=120, input=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


def stored_messages(state: Path) -> list[tuple[str, str, bytes]]:
    """(user local part, mailbox, content) of every filed message, read straight from
    an SQLite state directory (read-only: the server may still be running)."""
    import sqlite3
    db = sqlite3.connect(f"file:{state / 'lightmail.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "select m.blob_id, u.localpart, b.name from messages m join mailboxes b on "
            "b.id = m.mailbox_id join users u on u.id = b.user_id").fetchall()
    finally:
        db.close()
    return [(user, mailbox, (state / "blobs" / "objects" / blob_id[:2]
                             / blob_id).read_bytes()) for blob_id, user, mailbox in rows]


def inbox_subjects(state: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for user, mailbox, content in stored_messages(state):
        match = re.search(rb"Subject: (\S+)", content)
        assert match, content[:200]
        found.setdefault(match.group(1).decode(), []).append(f"{user}/{mailbox}")
    return found


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """(In a test running on the reactor.)  Until ``condition()`` holds, looking
    every 20 ms; fails after ``timeout`` seconds."""
    from twisted.internet import reactor, task
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("not within the time")
