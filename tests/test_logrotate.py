"""Log rotation with a real `twistd -n lightmail` writing its log to a file: SIGUSR1
opens the file again in the main process and in the workers, and the shipped
etc/logrotate.d/lightmail, run by the real logrotate, rotates a running server's log
without losing a line."""

from __future__ import annotations

import gzip
import re
import shutil
import signal
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest
from harness import ServerProcess

REPO = Path(__file__).resolve().parent.parent
LOGROTATE_CONF = REPO / "etc" / "logrotate.d" / "lightmail"
CONNECT = re.compile(r"connect from 127\.0\.0\.1 to mx")


def _config(log: Path, workers: int) -> str:
    return ("[server]\nstate_dir = state\nhostname = mx.example.test\nshutdown_timeout = 5s\n"
            f"workers = {workers}\n"
            f"[logging]\nfile = {log}\n"
            "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n")


def _wait_in(path: Path, pattern: str, timeout: float = 120.0, count: int = 1) -> list[str]:
    """Lines of ``path`` matching ``pattern``, once there are ``count``."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        found = [line for line in text.splitlines() if regex.search(line)]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} x {pattern!r} in {path} within {timeout}s:\n"
                                 f"{text[-4000:]}")
        time.sleep(0.1)


def _port(log: Path) -> int:
    line = _wait_in(log, r"listening: mx speaks smtp")[0]
    _wait_in(log, r"LightMail ready")
    match = re.search(r" on 127\.0\.0\.1:(\d+)", line)
    assert match, line
    return int(match.group(1))


def _session(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        assert client.ehlo("client.test")[0] == 250
        assert client.noop()[0] == 250


class Sessions:
    """SMTP sessions one after another in a thread, until stopped: the traffic that
    goes on while the log is rotated."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                _session(self.port)
                self.count += 1
        except BaseException as exc:      # reported by finish()
            self.error = exc

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(60)
        assert self.error is None, self.error
        return self.count


def _connects(*paths: Path) -> int:
    total = 0
    for path in paths:
        if path.suffix == ".gz":
            text = gzip.decompress(path.read_bytes()).decode()
        else:
            text = path.read_text() if path.exists() else ""
        total += sum(1 for line in text.splitlines() if CONNECT.search(line))
    return total


def _server(tmp_path: Path, write_config, workers: int) -> tuple[ServerProcess, Path]:
    log = tmp_path / "log" / "lightmail.log"
    server = ServerProcess(write_config(_config(log, workers)))
    return server, log


def test_sigusr1_reopens_the_log_in_the_main_process_and_the_workers(
        tmp_path: Path, write_config) -> None:
    server, log = _server(tmp_path, write_config, workers=2)
    try:
        port = _port(log)
        _wait_in(log, r"2 worker processes serve the listeners")
        for _ in range(3):
            _session(port)
        traffic = Sessions(port)
        _wait_in(log, CONNECT.pattern, count=6)
        rotated = log.with_name("lightmail.log.1")
        log.rename(rotated)
        server.proc.send_signal(signal.SIGUSR1)
        # Each process says so in the new file, once it writes there.
        _wait_in(log, r"\] log file reopened")
        _wait_in(log, r"worker=0\] worker 0: log file reopened")
        _wait_in(log, r"worker=1\] worker 1: log file reopened")
        _wait_in(log, CONNECT.pattern, count=3)        # traffic goes on, logged anew
        sessions = traffic.finish()
        for _ in range(3):
            _session(port)
        _wait_in(log, CONNECT.pattern, count=6)
        assert server.proc.poll() is None, "SIGUSR1 ended the server"
        # Nothing lost: every session's connect line is in one of the two files.
        assert _connects(rotated, log) == 3 + sessions + 3
        # And the old file gets nothing once everyone reopened.
        size = rotated.stat().st_size
        for _ in range(3):
            _session(port)
        _wait_in(log, CONNECT.pattern, count=9)
        assert rotated.stat().st_size == size
        assert "SIGUSR1: reopening the log file" in rotated.read_text()
        assert server.terminate() in (0, -signal.SIGTERM)
    finally:
        server.kill()


def _logrotate_conf(tmp_path: Path, log: Path, pid: int) -> Path:
    """The shipped configuration, for this log file and this server (not systemd's:
    the postrotate line signals the test's server the way systemctl kill would)."""
    text = LOGROTATE_CONF.read_text()
    assert "/var/log/lightmail/lightmail.log {" in text
    assert "systemctl kill --signal=SIGUSR1 --kill-whom=main lightmail.service" in text
    text = text.replace("/var/log/lightmail/lightmail.log", str(log))
    text = re.sub(r"systemctl kill --signal=SIGUSR1 --kill-whom=main lightmail\.service",
                  f"kill -USR1 {pid}", text)
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text)
    conf.chmod(0o644)       # logrotate ignores a configuration others may write
    return conf


def _logrotate(conf: Path, state: Path) -> None:
    tool = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not Path(tool).exists():
        pytest.fail("logrotate is missing: scripts/test-peers.sh installs it "
                    "(Debian's logrotate package)", pytrace=False)
    result = subprocess.run([tool, "--force", "--verbose", "--state", str(state),
                             str(conf)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_shipped_logrotate_config_rotates_a_running_server(
        tmp_path: Path, write_config) -> None:
    server, log = _server(tmp_path, write_config, workers=1)
    state = tmp_path / "logrotate.state"
    try:
        port = _port(log)
        conf = _logrotate_conf(tmp_path, log, server.proc.pid)
        traffic = Sessions(port)
        _wait_in(log, CONNECT.pattern, count=3)
        _logrotate(conf, state)
        first = log.with_name("lightmail.log.1")
        assert first.exists() and "LightMail ready" in first.read_text()
        _wait_in(log, r"worker 0: log file reopened")
        _wait_in(log, CONNECT.pattern, count=3)
        # Second rotation: the first file is compressed now (delaycompress).
        _logrotate(conf, state)
        _wait_in(log, r"worker 0: log file reopened")
        _wait_in(log, CONNECT.pattern, count=3)
        sessions = traffic.finish()
        _session(port)
        _wait_in(log, CONNECT.pattern, count=1)
        oldest = log.with_name("lightmail.log.2.gz")
        assert oldest.exists(), sorted(p.name for p in log.parent.iterdir())
        assert "LightMail ready" in gzip.decompress(oldest.read_bytes()).decode()
        # Every session of the run, across the three files.
        _wait_in(log, CONNECT.pattern, count=1)
        assert _connects(oldest, first, log) == sessions + 1
        assert server.terminate() in (0, -signal.SIGTERM)
    finally:
        server.kill()
