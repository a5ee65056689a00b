"""The manhole over SSH, driven by OpenSSH's own client against a real
``twistd lightmail``: a key from authorized_keys logs in and reads live values (a
listener's port, the queue after a message sent with smtplib); another key, and a
wrong password, are refused.  And what the configuration refuses."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest
from harness import ServerProcess, free_port, run_cli

from lightmail.admin.manhole import password_line
from lightmail.config import ConfigError, parse_config

SSH_PORT = re.compile(r"manhole: SSH on [^\s:]+:(?P<port>\d+)")


def ssh_command(port: int, *options: str) -> list[str]:
    ssh = shutil.which("ssh")
    assert ssh, "OpenSSH's client is missing: run scripts/test-peers.sh"
    return [ssh, "-p", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=20", *options, "admin@127.0.0.1"]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, timeout=30)
    return path


def drive(command: list[str], lines: list[str], env: dict[str, str] | None = None) -> str:
    """Type ``lines`` into an interactive session (a terminal: -tt), each once the
    prompt is there, and return all it printed once ^D ends it (or, refused, what
    ssh said)."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    output = bytearray()
    reader = threading.Thread(target=lambda: [output.extend(chunk) for chunk in
                                              iter(lambda: proc.stdout.read1(4096), b"")],
                              daemon=True)
    reader.start()

    def prompts(count: int) -> bool:
        deadline = time.monotonic() + 30
        while output.count(b">>> ") < count and proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no prompt: {bytes(output)!r}")
            time.sleep(0.05)
        return proc.poll() is None
    try:
        # The first prompt is drawn twice (the terminal is cleared at once).
        for number, line in enumerate(lines, start=2):
            if not prompts(number):
                break
            proc.stdin.write(line.encode() + b"\r")
            proc.stdin.flush()
            time.sleep(0.5)         # a Deferred made by this line fires meanwhile
        if prompts(len(lines) + 2):
            proc.stdin.write(b"\x04")       # ^D: the manhole ends the session
            proc.stdin.flush()
        proc.wait(30)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    return output.decode("utf-8", "replace")


@pytest.fixture
def server(tmp_path: Path) -> object:
    key = keygen(tmp_path / "admin_key")
    (tmp_path / "authorized_keys").write_text((tmp_path / "admin_key.pub").read_text())
    (tmp_path / "passwords").write_text(password_line("admin", "right-password") + "\n")
    config = tmp_path / "lightmail.conf"
    config.write_text(
        "[server]\nstate_dir = state\nhostname = mx.example.test\nshutdown_timeout = 5s\n"
        f"[outbound]\nrelay_host = [127.0.0.1]:{free_port()}\nmin_backoff = 1h\n"
        "[manhole]\nenabled = yes\nendpoint = tcp:0:interface=127.0.0.1\n"
        "authorized_keys = authorized_keys\npasswords_file = passwords\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n")
    run_cli(config, "domain", "add", "example.test")
    run_cli(config, "alias", "add", "outside@example.test", "friend@far.example")
    proc = ServerProcess(config)
    try:
        ports = proc.ports(expected=1)
        ssh_port = int(proc.wait_for(SSH_PORT.pattern)[0].group("port"))
        yield {"proc": proc, "ports": ports, "ssh": ssh_port, "key": key, "tmp": tmp_path}
    finally:
        proc.kill()


def test_ssh_session_reads_live_values(server: dict) -> None:
    with smtplib.SMTP("127.0.0.1", server["ports"]["mx"], timeout=20) as smtp:
        smtp.sendmail("a@remote.example", ["outside@example.test"], b"Subject: q\r\n\r\nhi\r\n")
    command = ssh_command(server["ssh"], "-tt", "-i", str(server["key"]),
                          "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes")
    out = drive(command, [
        'print("PORT=%d=" % root.getServiceNamed("listener:mx").port.getHost().port)',
        "d = queue_store.list_recipients()",
        'print("QUEUED=%d=" % len(d.result))',
    ])
    assert re.search(r"PORT=(\d+)=", out).group(1) == str(server["ports"]["mx"]), out
    assert re.search(r"QUEUED=(\d+)=", out).group(1) == "1", out
    server["proc"].wait_for(r"manhole: admin logged in over SSH")
    # The host key was made on first start, readable by the server's user only.
    host_key = server["tmp"] / "state" / "manhole_host_key"
    assert host_key.stat().st_mode & 0o777 == 0o600


def test_other_keys_and_wrong_passwords_are_refused(server: dict) -> None:
    stranger = keygen(server["tmp"] / "stranger_key")
    result = subprocess.run(
        ssh_command(server["ssh"], "-i", str(stranger), "-o", "BatchMode=yes",
                    "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no"),
        input=b"", capture_output=True, timeout=60)
    assert result.returncode == 255
    assert b"Permission denied" in result.stderr
    # A password, through ssh's askpass program (no terminal here).
    for password, refused in (("wrong-password", True), ("right-password", False)):
        askpass = server["tmp"] / "askpass"
        askpass.write_text(f"#!/bin/sh\necho {password}\n")
        askpass.chmod(0o700)
        env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
               "DISPLAY": ":0"}
        command = ssh_command(server["ssh"], "-tt", "-o", "PubkeyAuthentication=no",
                              "-o", "PreferredAuthentications=password",
                              "-o", "NumberOfPasswordPrompts=1")
        out = drive(command, ['print("SUM=%d=" % (40 + 2))'], env=env)
        assert ("SUM=42=" in out) is not refused, out
    server["proc"].wait_for(r"manhole: password refused for admin")


def test_the_configuration_refuses_an_open_manhole(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x.conf:3: \[manhole\] telnet_endpoint: "
                                          r"telnet sends passwords in the clear"):
        parse_config("[manhole]\nenabled = yes\ntelnet_endpoint = tcp:8023\n", "x.conf")
    with pytest.raises(ConfigError, match=r"x.conf:2: \[manhole\] enabled: the manhole "
                                          r"needs authorized_keys or passwords_file"):
        parse_config("[manhole]\nenabled = yes\n", "x.conf")
    (tmp_path / "pw").write_text(password_line("admin", "x") + "\n")
    config = parse_config(f"[manhole]\nenabled = yes\npasswords_file = {tmp_path / 'pw'}\n"
                          "telnet_endpoint = tcp:8023:interface=127.0.0.1\n", "x.conf")
    assert config.manhole.telnet_endpoint.startswith("tcp:8023")
