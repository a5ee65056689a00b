"""`twistd -n lightmail --config ...` as a real process: start-up, logs, shutdown,
config errors, JSON logs, and the embedding example."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from harness import TWISTD, ServerProcess, default_sigint, free_port, run_cli, signal_state

REPO = Path(__file__).resolve().parent.parent
# After a clean shutdown twistd ends itself with the signal it got (as systemd expects).
CLEAN_TERM = (0, -signal.SIGTERM)


def config_text(extra: str = "") -> str:
    return ("[server]\nstate_dir = state\nhostname = mx.example.test\nshutdown_timeout = 5s\n"
            "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
            "[listener:submission]\nprotocol = submission\n"
            "endpoint = tcp:0:interface=127.0.0.1\n" + extra)


def test_starts_logs_listeners_and_stops_cleanly_on_sigterm(write_config) -> None:
    server = ServerProcess(write_config(config_text()))
    try:
        ports = server.ports(expected=2)
        assert set(ports) == {"mx", "submission"}
        server.wait_for(r"storage ready: sqlite database")
        server.wait_for(r"directory ready: sql backend, 0 local domains")
        with socket.create_connection(("127.0.0.1", ports["mx"]), timeout=10) as sock:
            assert sock.recv(100).startswith(b"220 ")
        assert server.terminate() in CLEAN_TERM
        server.wait_for(r"stopped listening: mx")
        server.wait_for(r"LightMail stopped")
    finally:
        server.kill()


def test_ctrl_c_stops_cleanly(write_config) -> None:
    server = ServerProcess(write_config(config_text()))
    try:
        server.ports(expected=2)
        state = signal_state(server.proc.pid)
        server.proc.send_signal(signal.SIGINT)
        try:
            code = server.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGINT ignored; {state}; output: {server.lines}") from None
        assert code in (0, -signal.SIGINT), server.lines
        server.wait_for(r"LightMail stopped")
    finally:
        server.kill()


def test_bad_config_fails_at_start_with_one_line_naming_the_key(write_config) -> None:
    path = write_config(config_text("[smtp]\nmax_recipients = a hundred\n"))
    result = subprocess.run([TWISTD, "--pidfile=", "-n", "lightmail", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    error_lines = [line for line in (result.stdout + result.stderr).splitlines()
                   if "max_recipients" in line]
    assert error_lines, result.stdout + result.stderr
    assert f"{path}:12: [smtp] max_recipients: expected a whole number" in error_lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_json_logs_carry_structured_fields(write_config, tmp_path: Path) -> None:
    log_file = tmp_path / "lightmail.json"
    server = ServerProcess(write_config(config_text(
        f"[logging]\nformat = json\nfile = {log_file}\n")))
    try:
        # stdout is quiet: the log goes to the file.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log_file.read_text() if log_file.exists() else ""
            if text.count('"listening: ') >= 2:
                break
            time.sleep(0.1)
        assert server.terminate() in CLEAN_TERM
        events = [json.loads(line) for line in log_file.read_text().splitlines()]
        listening = [e for e in events if e.get("log_format", "").startswith("listening:")]
        assert {e["name"] for e in listening} == {"mx", "submission"}
        assert all("log_time" in e and "log_level" in e for e in events)
    finally:
        server.kill()


def test_embedding_example_runs_lightmail_inside_another_app(write_config) -> None:
    config = write_config(config_text())
    run_cli(config, "demo-setup")
    http_port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "docs/examples/embed.py"),
                             str(config), str(http_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_sigint)
    try:
        body = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=5) as r:
                    body = r.read()
                break
            except OSError:
                time.sleep(0.2)
        assert body == b"demo@example.test: 0 messages in INBOX\n"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode in CLEAN_TERM, output
        assert "listening: mx speaks smtp" in output and "LightMail stopped" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("section", ["listener:mx"])
def test_port_in_use_is_reported(write_config, section: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = config_text().replace("tcp:0:interface=127.0.0.1",
                                     f"tcp:{port}:interface=127.0.0.1", 1)
        server = ServerProcess(write_config(text))
        try:
            server.wait_for(rf"listener mx \(tcp:{port}:interface=127.0.0.1\) could not start")
            assert server.proc.wait(30) == 1
            server.wait_for(r"LightMail cannot run: listener mx could not start")
        finally:
            server.kill()
