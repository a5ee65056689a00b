"""Reloading the configuration (SIGHUP, ``lightmail reload``) of a running server.

The settling rules are tested on their own (which settings change live, which wait
for a restart); everything else against a real ``twistd -n lightmail``, with and
without worker processes: Postfix's ``smtp-source`` keeps sending while SIGHUPs
arrive, and every session must succeed; a changed limit and a replaced certificate
reach new sessions while a session (a TLS session) opened before goes on; a bad
file is refused with its file, line and reason, and the old configuration runs on.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import ServerProcess, run_cli

from lightmail.admin.certs import write_self_signed
from lightmail.config import parse_config
from lightmail.reload.settle import settle

SMTP_SOURCE = "/usr/sbin/smtp-source"
RCPT = "rcpt@example.test"
RELOADED = r"configuration reloaded from"
REFUSED = r"reload refused"


# -- which settings change live ---------------------------------------------------

BASE = """\
[server]
state_dir = /var/tmp/lightmail-settle
[storage]
io_threads = 4
[smtp]
max_recipients = 10
[listener:mx]
protocol = smtp
endpoint = tcp:2525:interface=127.0.0.1
max_connections = 100
"""


def test_settle_takes_live_settings_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "lightmail.conf"
    path.write_text(BASE)
    started = parse_config(BASE, str(path))
    new_text = (BASE.replace("max_recipients = 10", "max_recipients = 3")
                .replace("io_threads = 4", "io_threads = 8")
                .replace("tcp:2525", "tcp:2526")
                .replace("max_connections = 100", "max_connections = 7")
                + "[listener:imap]\nprotocol = imap\nendpoint = tcp:1430\n")
    path.write_text(new_text)
    settled = settle(started, parse_config(new_text, str(path)))
    config = settled.config
    assert config.smtp.max_recipients == 3
    assert config.storage.io_threads == 4
    [mx] = config.listeners
    assert (mx.endpoint, mx.max_connections) == ("tcp:2525:interface=127.0.0.1", 7)
    assert settled.restart == (
        f"{path}:4: [storage] io_threads: needs a restart",
        f"{path}:9: [listener:mx] endpoint: needs a restart",
        f"{path}:11: [listener:imap]: new: needs a restart to listen",
    )


def test_settle_measures_against_the_started_config_not_the_last_reload(
        tmp_path: Path) -> None:
    # A worker started after several reloads settles the first and the last texts:
    # it must end with what the main process runs.
    path = tmp_path / "lightmail.conf"
    started = parse_config(BASE, str(path))
    first_text = BASE.replace("io_threads = 4", "io_threads = 8").replace("= 10", "= 5")
    path.write_text(first_text)
    first = settle(started, parse_config(first_text, str(path)))
    assert first.config.storage.io_threads == 4
    assert first.restart == (f"{path}:4: [storage] io_threads: needs a restart",)
    # Back to the value it started with: nothing waits for a restart any more.
    second_text = BASE.replace("= 10", "= 6")
    path.write_text(second_text)
    second = settle(started, parse_config(second_text, str(path)))
    assert second.restart == ()
    assert (second.config.storage.io_threads, second.config.smtp.max_recipients) == (4, 6)


def test_oauth_mechanisms_wait_for_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "lightmail.conf")
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    started = parse_config(BASE, path)
    new = parse_config(BASE + "[directory]\nmechanisms = PLAIN, OAUTHBEARER\n"
                       f"[oauth]\nissuer = https://id.example\njwks = {jwks}\n", path)
    settled = settle(started, new)
    assert settled.config.directory.mechanisms == started.directory.mechanisms
    assert any("[directory] mechanisms: OAuth mechanisms need a restart" in note
               for note in settled.restart)
    assert any("[oauth] jwks: needs a restart" in note for note in settled.restart)


# -- a running server ---------------------------------------------------------------

class Server:
    """``twistd -n lightmail`` with an MX (STARTTLS) and a submission listener over
    implicit TLS, sharing one certificate; ``smtp`` holds the [smtp] settings."""

    def __init__(self, base: Path, workers: int = 0, **smtp: Any) -> None:
        self.base = base
        self.state = base / "state"
        self.config = base / "lightmail.conf"
        self.cert, self.key = base / "cert.pem", base / "key.pem"
        write_self_signed(self.cert, self.key, name="one.test")
        self.workers = workers
        self.smtp = {"max_recipients": 2, "max_message_size": "100k", **smtp}
        self.mx_endpoint = "tcp:0:interface=127.0.0.1"
        self.extra = ""
        self.write()
        run_cli(self.config, "domain", "add", "example.test")
        run_cli(self.config, "user", "add", RCPT, "--no-password")
        self.process = ServerProcess(self.config)
        ports = self.process.ports(expected=2, timeout=120)
        self.mx, self.smtps = ports["mx"], ports["smtps"]
        if workers:
            self.process.wait_for(r"worker processes serve the listeners", timeout=120)

    def text(self) -> str:
        smtp = "".join(f"{key} = {value}\n" for key, value in self.smtp.items())
        return (f"[server]\nstate_dir = {self.state}\nhostname = mx.example.test\n"
                f"workers = {self.workers}\n"
                f"[smtp]\n{smtp}"
                f"[listener:mx]\nprotocol = smtp\nendpoint = {self.mx_endpoint}\n"
                f"tls = starttls\ntls_cert = {self.cert}\ntls_key = {self.key}\n"
                "max_connections_per_ip = 200\n"
                "[listener:smtps]\nprotocol = submission\n"
                f"endpoint = tcp:0:interface=127.0.0.1\ntls = implicit\n"
                f"tls_cert = {self.cert}\ntls_key = {self.key}\n" + self.extra)

    def write(self) -> None:
        # A new file renamed into place, as editors and configuration tools do: the
        # server never reads half a file.
        temporary = self.config.with_suffix(".new")
        temporary.write_text(self.text())
        os.replace(temporary, self.config)

    def reload(self) -> subprocess.CompletedProcess[str]:
        """``lightmail reload``, as an administrator runs it."""
        return subprocess.run([sys.executable, "-m", "lightmail.admin.cli", "--config",
                               str(self.config), "reload", "--timeout", "120"],
                              capture_output=True, text=True, timeout=180)

    def hup(self) -> None:
        os.kill(self.process.proc.pid, signal.SIGHUP)

    def outcomes(self) -> int:
        return len(re.findall(f"{RELOADED}|{REFUSED}", self.process.output))

    def delivered(self) -> int:
        db = sqlite3.connect(f"file:{self.state / 'lightmail.db'}?mode=ro", uri=True)
        try:
            return int(db.execute("select count(*) from messages").fetchone()[0])
        finally:
            db.close()

    def stop(self) -> None:
        try:
            code = self.process.terminate(timeout=60)
        finally:
            self.process.kill()
        assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), self.process.output


@pytest.fixture(params=[0, 2], ids=["one-process", "two-workers"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    s = Server(tmp_path, workers=request.param)
    try:
        yield s
    finally:
        s.stop()


def smtp_session(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=60)
    client.ehlo("client.test")
    return client


def accepted_recipients(client: smtplib.SMTP, count: int) -> int:
    """RCPT ``count`` recipients in a new transaction; how many got 250."""
    client.rset()
    assert client.mail("sender@client.test")[0] == 250
    codes = [client.rcpt(f"rcpt+{n}@example.test")[0] for n in range(count)]
    assert set(codes) <= {250, 452}, codes
    return codes.count(250)


def tls_certificate(port: int) -> bytes:
    """The certificate a new implicit-TLS connection is shown (DER)."""
    context = ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def pem_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_smtp_source_sees_no_failed_session_while_sighup_reloads(server: Server) -> None:
    if not os.path.exists(SMTP_SOURCE):
        raise AssertionError("smtp-source is missing: install Debian's postfix package "
                             "(scripts/test-peers.sh, part of `make test`)")
    messages = 3000
    errors = server.base / "smtp-source.err"
    with errors.open("w") as stderr:
        load = subprocess.Popen(
            [SMTP_SOURCE, "-s", "10", "-m", str(messages), "-l", "2000", "-f",
             "sender@client.test", "-t", RCPT, f"127.0.0.1:{server.mx}"],
            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        reloads = 0
        sizes = ["200k", "100k"]
        deadline = time.monotonic() + 900
        while load.poll() is None:
            assert time.monotonic() < deadline, "smtp-source did not finish"
            # Every reload changes something: a limit, and the certificate (in place).
            server.smtp["max_message_size"] = sizes[reloads % 2]
            server.write()
            write_self_signed(server.cert, server.key, name=f"n{reloads}.test")
            before = server.outcomes()
            server.hup()
            server.process.wait_for(f"{RELOADED}|{REFUSED}", timeout=120,
                                    count=before + 1)
            if load.poll() is None:
                reloads += 1
        load.wait(timeout=600)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    err = errors.read_text()
    assert load.returncode == 0, f"smtp-source failed: {err}\n{server.process.output}"
    assert err == "", err
    assert REFUSED not in server.process.output
    # Several reloads while smtp-source had sessions open (if it finished first, the
    # test proved nothing: send more messages).
    assert reloads >= 3, f"only {reloads} reloads during the load"
    deadline = time.monotonic() + 120
    while server.delivered() < messages and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.delivered() == messages


def test_a_changed_limit_reaches_new_sessions_only(server: Server) -> None:
    before = smtp_session(server.mx)
    assert before.esmtp_features["size"] == str(100 * 1024)
    server.smtp.update(max_recipients=5, max_message_size="300k")
    server.write()
    result = server.reload()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"reloaded {server.config}\n"
    # New sessions (several: with workers, each may land on either) take it...
    for _ in range(4):
        after = smtp_session(server.mx)
        assert after.esmtp_features["size"] == str(300 * 1024)
        assert accepted_recipients(after, 6) == 5
        after.quit()
    # ...the session opened before keeps what it started with.
    assert accepted_recipients(before, 3) == 2
    before.quit()


def test_a_replaced_certificate_reaches_new_connections_and_old_ones_go_on(
        server: Server) -> None:
    first = pem_der(server.cert)
    assert tls_certificate(server.smtps) == first
    # A TLS session opened before the reload (STARTTLS on the MX)...
    old = smtp_session(server.mx)
    old.starttls(context=ssl._create_unverified_context())
    old.ehlo("client.test")
    assert old.sock is not None
    assert old.sock.getpeercert(binary_form=True) == first  # type: ignore[attr-defined]
    write_self_signed(server.cert, server.key, name="two.test")
    second = pem_der(server.cert)
    assert second != first
    result = server.reload()
    assert result.returncode == 0, result.stderr
    for _ in range(4):
        assert tls_certificate(server.smtps) == second
        fresh = smtp_session(server.mx)
        fresh.starttls(context=ssl._create_unverified_context())
        assert fresh.sock is not None
        assert fresh.sock.getpeercert(binary_form=True) == second  # type: ignore[attr-defined]
        fresh.quit()
    # ...goes on: a message over it is accepted and filed.
    old.sendmail("sender@client.test", [RCPT], b"Subject: over-the-old-session\r\n\r\nhi\r\n")
    old.quit()
    deadline = time.monotonic() + 60
    while server.delivered() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.delivered() == 1


def test_a_bad_config_is_refused_and_the_old_one_runs_on(server: Server) -> None:
    server.smtp["max_recipients"] = "lots"
    server.write()
    line = server.text().splitlines().index("max_recipients = lots") + 1
    result = server.reload()
    where = f"{server.config}:{line}: [smtp] max_recipients: expected a whole number, got 'lots'"
    assert result.returncode == 1
    assert result.stderr == (f"lightmail: reload refused, the running configuration "
                             f"stays: {where}\n")
    server.process.wait_for(re.escape(f"reload refused, the running configuration stays: "
                                      f"{where}"))
    # A certificate whose key is another's: refused too, naming tls_key.
    other_key = server.base / "other-key.pem"
    write_self_signed(server.base / "other-cert.pem", other_key)
    server.smtp["max_recipients"] = 4
    server.write()
    first = pem_der(server.cert)
    text = server.config.read_text().replace(f"tls_key = {server.key}",
                                             f"tls_key = {other_key}", 1)
    server.config.write_text(text)
    key_line = text.splitlines().index(f"tls_key = {other_key}") + 1
    result = server.reload()
    assert result.returncode == 1
    assert (f"{server.config}:{key_line}: [listener:mx] tls_key: {other_key}: not the key "
            f"of the certificate {server.cert}") in result.stderr
    # Still the configuration of the start: 2 recipients, the first certificate.
    for _ in range(4):
        client = smtp_session(server.mx)
        assert accepted_recipients(client, 3) == 2
        client.quit()
        assert tls_certificate(server.smtps) == first
    # Fixed, the same file is taken.
    server.write()
    assert server.reload().returncode == 0
    client = smtp_session(server.mx)
    assert accepted_recipients(client, 5) == 4
    client.quit()


def test_settings_that_need_a_restart_are_named_and_keep_their_value(
        server: Server) -> None:
    server.mx_endpoint = "tcp:0:interface=127.0.0.2"
    server.extra = "[storage]\nio_threads = 7\n"
    server.smtp["max_recipients"] = 3
    server.write()
    lines = server.text().splitlines()
    result = server.reload()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"reloaded {server.config}",
        f"{server.config}:{lines.index('io_threads = 7') + 1}: [storage] io_threads: "
        "needs a restart; the running value stays",
        f"{server.config}:{lines.index('endpoint = tcp:0:interface=127.0.0.2') + 1}: "
        "[listener:mx] endpoint: needs a restart; the running value stays",
    ]
    server.process.wait_for(r"\[listener:mx\] endpoint: needs a restart; the running "
                            r"value stays")
    client = smtp_session(server.mx)        # the same port, the new limit
    assert accepted_recipients(client, 4) == 3
    client.quit()


def test_a_restarted_worker_runs_the_reloaded_config_not_the_file(tmp_path: Path) -> None:
    server = Server(tmp_path, workers=1)
    try:
        server.smtp["max_recipients"] = 5
        server.write()
        assert server.reload().returncode == 0
        # Edited again, not reloaded: a worker started now must not run this.
        server.smtp["max_recipients"] = 7
        server.write()
        [started] = server.process.wait_for(r"worker 0 started \(pid (\d+)\)")
        os.kill(int(started.group(1)), signal.SIGKILL)
        server.process.wait_for(r"worker 0 started \(pid (\d+)\)", timeout=60, count=2)
        server.process.wait_for(r"worker 0: mx on", timeout=60, count=2)
        client = smtp_session(server.mx)
        assert accepted_recipients(client, 7) == 5
        client.quit()
    finally:
        server.stop()


def test_reload_without_a_running_server_says_so(tmp_path: Path) -> None:
    config = tmp_path / "lightmail.conf"
    config.write_text(f"[server]\nstate_dir = {tmp_path / 'state'}\n")
    result = subprocess.run([sys.executable, "-m", "lightmail.admin.cli", "--config",
                             str(config), "reload"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr == (f"lightmail: reload: no server is running with this state "
                             f"directory ({tmp_path / 'state' / 'lightmail.pid'} does not "
                             "exist)\n")
