"""``lightmail user import FILE.csv`` (issue 21, point 6): a few hundred users at once,
all or none, checked line by line; then some of them log in over IMAP (imaplib)
against a running server."""

from __future__ import annotations

import csv
import imaplib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from tests.harness import ServerProcess

LIGHTMAIL = [sys.executable, "-m", "lightmail.admin.cli"]
COUNT = 300


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIGHTMAIL, "--config", str(config), *args],
                          capture_output=True, text=True, timeout=600)


def ok(config: Path, *args: str) -> str:
    result = run(config, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def users() -> list[dict[str, str]]:
    """COUNT users: every tenth with a password (hashed by the import: argon2 as
    LightMail makes it, seconds each on a loaded test machine), most with an argon2
    hash made elsewhere (cheap parameters: any argon2 hash must do), some with
    neither; every 25th disabled; quotas of all kinds."""
    elsewhere = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    rows = []
    for n in range(COUNT):
        row = {"address": f"User{n}@Import.Test", "password": "", "password_hash": "",
               "quota": ["", "1G", "500M", "0"][n % 4], "enabled": "no" if n % 25 == 7
               else ["yes", "", "true"][n % 3]}
        if n % 30 == 3:
            pass                                        # no password login
        elif n % 10 == 0:
            row["password"] = f"pass word {n}"
        else:
            row["password_hash"] = elsewhere.hash(f"hashed {n}")
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], extra: str = "") -> Path:
    columns = ["enabled", "address", "quota", "password", "password_hash"]  # any order
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)          # quotes the hashes: they hold commas
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)
        f.write(extra)
    return path


def listed(config: Path) -> dict[str, str]:
    found = {}
    for line in ok(config, "user", "list", "import.test").splitlines():
        address, rest = line.split("\t", 1)
        found[address] = rest
    return found


@pytest.mark.timeout(900)
@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_import_hundreds_of_users_then_they_log_in(db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "lightmail.conf"
    config.write_text(
        f"[server]\nstate_dir = {tmp_path / 'state'}\n[storage]\nurl = {db_url}\n"
        "writer_process = no\n[directory]\nauth_over_plaintext = yes\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n")
    ok(config, "domain", "add", "import.test")
    ok(config, "user", "add", "taken@import.test", "--no-password")
    rows = users()

    # A file with bad lines adds nobody, and says which lines and why.
    bad = write_csv(tmp_path / "bad.csv", rows,
                    "no,user5@import.test,,again,\n"
                    "yes,someone@elsewhere.test,,pw,\n"
                    "yes,taken@import.test,,pw,\n"
                    "perhaps,x@import.test,,pw,\n"
                    "yes,y@import.test,12Q,pw,\n"
                    "yes,z@import.test,,pw,$argon2id$nonsense\n"
                    "yes,w@import.test,,pw,\n"
                    "yes,too@import.test,,pw,,extra\n")
    result = run(config, "user", "import", str(bad))
    first = COUNT + 2
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{bad}:{first}: user5@import.test: also on line 7",
        f"{bad}:{first + 1}: someone@elsewhere.test: elsewhere.test is not a local domain "
        "(lightmail domain add)",
        f"{bad}:{first + 2}: taken@import.test: the user exists already",
        f"{bad}:{first + 3}: x@import.test: enabled: expected yes or no, got 'perhaps'",
        f"{bad}:{first + 4}: y@import.test: quota: expected a size such as 512, 64K, 50M "
        "or 2G, got '12Q'",
        f"{bad}:{first + 5}: z@import.test: a password or a password_hash, not both",
        f"{bad}:{first + 7}: 6 fields, the header has 5",
        "lightmail: 7 lines with problems: no user was added"]
    assert "pw" not in result.stderr.replace("password", "")    # no password is echoed
    assert list(listed(config)) == ["taken@import.test"]

    good = write_csv(tmp_path / "users.csv", rows)
    out = ok(config, "user", "import", str(good), "--dry-run")
    assert out == f"{good}: {COUNT} users can be added (dry run: nothing was changed)\n"
    assert list(listed(config)) == ["taken@import.test"]

    report = json.loads(ok(config, "user", "import", str(good), "--json"))
    assert report == {"file": str(good), "dry_run": False, "users": COUNT,
                      "added": COUNT, "problems": []}
    found = listed(config)
    assert len(found) == COUNT + 1
    assert found["user1@import.test"] == f"quota={1024**3}"
    assert found["user2@import.test"] == f"quota={500 * 1024**2}"
    assert found["user3@import.test"] == "quota=none"
    assert found["user7@import.test"] == "quota=none disabled"

    again = run(config, "user", "import", str(good), "--json")
    assert again.returncode == 1
    problems = json.loads(again.stdout)["problems"]
    assert len(problems) == COUNT and problems[0] == {
        "line": 2, "error": "user0@import.test: the user exists already"}

    server = ServerProcess(config)
    try:
        port = server.ports(expected=1, timeout=120)["imap"]

        def login(address: str, password: str) -> str:
            imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
            try:
                imap.login(address, password)
                typ, _ = imap.select("INBOX")
                return typ
            except imaplib.IMAP4.error as exc:
                return str(exc)
            finally:
                imap.shutdown()

        for n in (0, 150, 290):                         # passwords hashed here
            assert login(f"user{n}@import.test", f"pass word {n}") == "OK", n
        for n in (1, 13, 295):                          # hashes made elsewhere
            assert login(f"user{n}@import.test", f"hashed {n}") == "OK", n
        assert "AUTHENTICATIONFAILED" in login("user0@import.test", "pass word 1")
        assert "AUTHENTICATIONFAILED" in login("user3@import.test", "x")    # none set
        assert login("user7@import.test", "hashed 7") != "OK"               # disabled
        assert login("user32@import.test", "hashed 32") != "OK"             # disabled
    finally:
        server.kill()
