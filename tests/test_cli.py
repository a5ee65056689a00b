"""The `lightmail` admin command, run as administrators run it (a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LIGHTMAIL = [sys.executable, "-m", "lightmail.admin.cli"]


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "lm.conf"
    path.write_text(f"[server]\nstate_dir = state\n[storage]\nurl = {db_url}\n")
    return path


def run(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIGHTMAIL, "--config", str(config), *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def ok(config: Path, *args: str, stdin: str = "") -> str:
    result = run(config, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


# The storage suite covers every backend; the command line needs only to show that it
# reaches the configured one.
@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_domains_users_aliases_from_the_command_line(config: Path) -> None:
    assert "schema" in ok(config, "db", "upgrade")
    assert "schema at" in ok(config, "db", "current")
    ok(config, "domain", "add", "example.test")
    ok(config, "user", "add", "bob@example.test", "--password-stdin", stdin="pw one\n")
    ok(config, "user", "add", "carol@example.test", "--no-password", "--quota", "1G")
    ok(config, "alias", "add", "postmaster@example.test", "bob@example.test")
    assert ok(config, "domain", "list").split() == ["example.test"]
    users = ok(config, "user", "list")
    assert "bob@example.test\tquota=none" in users
    assert f"carol@example.test\tquota={1024**3}" in users
    assert "postmaster@example.test\tbob@example.test" in ok(config, "alias", "list")
    ok(config, "user", "passwd", "bob@example.test", "--password-stdin", stdin="pw two\n")
    assert "0 recipients" in ok(config, "queue", "list")
    # Errors: one line on stderr, status 1, no traceback.
    result = run(config, "user", "add", "bob@example.test", "--no-password")
    assert result.returncode == 1
    assert result.stderr.strip() == "lightmail: user bob@example.test exists already"
    result = run(config, "user", "add", "x@example.test")   # no tty, no --password-stdin
    assert result.returncode == 1 and "--password-stdin" in result.stderr
    ok(config, "alias", "remove", "postmaster@example.test")
    ok(config, "user", "remove", "carol@example.test")
    ok(config, "domain", "remove", "example.test")
    assert ok(config, "domain", "list") == ""


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_check_config_reports_file_line_and_key(tmp_path: Path, db_url: str) -> None:
    good = tmp_path / "good.conf"
    good.write_text("[server]\nstate_dir = s\n")
    result = subprocess.run([*LIGHTMAIL, "check-config", str(good)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "OK" in result.stdout
    bad = tmp_path / "bad.conf"
    bad.write_text("[server]\nstate_dir = s\n\n[storage]\nsql_threads = lots\n")
    result = subprocess.run([*LIGHTMAIL, "check-config", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (f"lightmail: {bad}:5: [storage] sql_threads: expected a whole "
                             "number, got 'lots'\n")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_demo_setup_is_idempotent(tmp_path: Path, config: Path) -> None:
    first = ok(config, "demo-setup")
    assert "added demo user demo@example.test" in first
    second = ok(config, "demo-setup")
    assert "added" not in second
    assert "demo@example.test" in ok(config, "user", "list")


def test_queue_administration_commands(config: Path) -> None:
    result = run(config, "queue", "hold", "--all")
    assert result.returncode == 0 and "held 0 recipients" in result.stdout, result.stderr
    for action in ("release", "requeue", "delete"):
        result = run(config, "queue", action, "2Q3Y86QSD0JZ6PK5K")
        assert result.returncode == 0, result.stderr
    result = run(config, "queue", "delete")
    assert result.returncode == 1
    assert "give queue ids or --all" in result.stderr
