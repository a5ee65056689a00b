"""Managing users from the ``lightmail`` command (issue 20, points 2 and 5): app
passwords scoped to protocols, enable/disable, quota, expiring a password, and the
last logins; tried against a running server with Python's imaplib, poplib and
smtplib."""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ServerProcess, run_cli

USER, PASSWORD = "ann@accounts.test", "ann-secret"


@pytest.fixture
def server(write_config: Any, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.accounts.test\n"
        "[storage]\nwriter_process = no\n"
        "[directory]\nauth_over_plaintext = yes\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:submission]\nprotocol = submission\n"
        "endpoint = tcp:0:interface=127.0.0.1\n")
    run_cli(config, "domain", "add", "accounts.test")
    run_cli(config, "user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
    proc = ServerProcess(config)
    try:
        proc.ports(expected=3)
        yield proc, config
    finally:
        proc.kill()


def imap_login(port: int, password: str) -> str:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    try:
        imap.login(USER, password)
        imap.logout()
        return "OK"
    except imaplib.IMAP4.error as exc:
        return str(exc)


def pop3_login(port: int, password: str) -> str:
    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        pop.user(USER)
        pop.pass_(password)
        pop.quit()
        return "OK"
    except poplib.error_proto as exc:
        return str(exc)


def smtp_login(port: int, password: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo()
        try:
            smtp.login(USER, password)
            return "OK"
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_error.decode()


def test_app_passwords_are_shown_once_scoped_and_revocable(
        server: tuple[ServerProcess, Path]) -> None:
    proc, config = server
    ports = proc.ports(expected=3)
    out = run_cli(config, "user", "app-password", "add", USER, "phone",
                  "--protocols", "imap")
    secret = out.strip().splitlines()[-1]
    assert re.fullmatch(r"[a-z2-9]{5}(-[a-z2-9]{5}){3}", secret), out
    everywhere = run_cli(config, "user", "app-password", "add", USER, "laptop")
    laptop = everywhere.strip().splitlines()[-1]
    assert imap_login(ports["imap"], secret) == "OK"
    assert "Authentication failed" in pop3_login(ports["pop3"], secret)   # not for POP3
    assert "credentials invalid" in smtp_login(ports["submission"], secret)
    for login, port in ((imap_login, "imap"), (pop3_login, "pop3"),
                        (smtp_login, "submission")):
        assert login(ports[port], laptop) == "OK", port
    listed = run_cli(config, "user", "app-password", "list", USER)
    phone = next(line for line in listed.splitlines() if line.startswith("phone"))
    assert "\timap\t" in phone and "never used" not in phone, listed
    assert secret not in listed and laptop not in listed        # never shown again
    run_cli(config, "user", "app-password", "revoke", USER, "phone")
    assert "AUTHENTICATIONFAILED" in imap_login(ports["imap"], secret)
    assert imap_login(ports["imap"], PASSWORD) == "OK"          # the password still works


def test_disable_expire_quota_and_last_logins(server: tuple[ServerProcess, Path]) -> None:
    proc, config = server
    ports = proc.ports(expected=3)
    laptop = run_cli(config, "user", "app-password", "add", USER, "laptop") \
        .strip().splitlines()[-1]
    assert run_cli(config, "user", "logins").split("\t")[1].startswith("never")
    assert imap_login(ports["imap"], PASSWORD) == "OK"
    logins = run_cli(config, "user", "logins", "accounts.test")
    assert USER in logins and "imap 127.0.0.1" in logins, logins

    run_cli(config, "user", "disable", USER)
    assert "AUTHENTICATIONFAILED" in imap_login(ports["imap"], PASSWORD)
    assert "disabled" in run_cli(config, "user", "list")
    run_cli(config, "user", "enable", USER)
    assert imap_login(ports["imap"], PASSWORD) == "OK"

    run_cli(config, "user", "expire", USER)
    assert "EXPIRED" in imap_login(ports["imap"], PASSWORD)       # RFC 5530
    assert "expired" in pop3_login(ports["pop3"], PASSWORD)
    assert "expired" in smtp_login(ports["submission"], PASSWORD)
    assert "AUTHENTICATIONFAILED" in imap_login(ports["imap"], "not it")
    assert imap_login(ports["imap"], laptop) == "OK"              # app passwords work
    run_cli(config, "user", "passwd", USER, "--password-stdin", stdin="new-secret\n")
    assert imap_login(ports["imap"], "new-secret") == "OK"

    run_cli(config, "user", "quota", USER, "2M")
    assert f"{USER}\tquota={2 * 1024 * 1024}" in run_cli(config, "user", "list")
    run_cli(config, "user", "quota", USER, "0")
    assert f"{USER}\tquota=none" in run_cli(config, "user", "list")
