"""Access lists (lightmail/policy/access.py): trusted networks that relay, allow- and
blocklists of clients, senders and recipients, managed with `lightmail access` and
in force on a running server within [access] refresh, without a restart."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from inprocess import in_thread, start

from lightmail.policy.access import AccessEntry, AccessError, Snapshot, normalise


def entry(list_name: str, kind: str, value: str) -> AccessEntry:
    return AccessEntry(list_name, kind, normalise(kind, value))


def test_the_longest_prefix_decides_then_trusted_allow_block() -> None:
    snap = Snapshot([entry("block", "client", "192.0.2.0/24"),
                     entry("allow", "client", "192.0.2.7"),
                     entry("block", "client", "2001:db8::/32"),
                     entry("allow", "client", "2001:db8::/32")], networks=["10.0.0.0/8"])
    assert snap.client("192.0.2.7") == "allow"
    assert snap.client("192.0.2.8") == "block"
    assert snap.client("::ffff:192.0.2.9") == "block"        # IPv4-mapped is IPv4
    assert snap.client("2001:db8::1") == "allow"              # same prefix: allow wins
    assert snap.client("10.1.2.3") == "trusted"
    assert snap.client("198.51.100.1") is None
    assert snap.client("not an address") is None


def test_addresses_then_domains_then_parent_domains() -> None:
    snap = Snapshot([entry("block", "sender", ".spam.example"),
                     entry("allow", "sender", "friend@mail.spam.example"),
                     entry("block", "sender", "@bad.example"),
                     entry("block", "recipient", "noreply@example.test")])
    assert snap.address("sender", "friend@mail.spam.example") == "allow"
    assert snap.address("sender", "x@mail.spam.example") == "block"
    assert snap.address("sender", "x@spam.example") is None       # .parent: below only
    assert snap.address("sender", "X@Bad.Example") == "block"
    assert snap.address("recipient", "noreply@example.test") == "block"
    assert snap.address("recipient", "bob@example.test") is None
    assert snap.address("sender", "noreply@example.test") is None


@pytest.mark.parametrize("kind,value", [("client", "300.1.1.1"), ("client", "mail.test"),
                                        ("sender", "a b@example"), ("sender", "@"),
                                        ("sender", "x@a..b"), ("nothing", "x")])
def test_bad_entries_say_why(kind: str, value: str) -> None:
    with pytest.raises(AccessError):
        normalise(kind, value)


def send(port: int, sender: str, rcpt: str) -> Any:
    def go() -> Any:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            try:
                return smtp.sendmail(sender, [rcpt], b"Subject: x\r\n\r\nhi\r\n")
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients[rcpt]
                return code, text.decode()
    return in_thread(go)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lightmail.admin.cli", "--config",
                           str(config), "access", *args], capture_output=True, text=True,
                          timeout=120)


@pytest_twisted.inlineCallbacks
def test_lists_managed_from_the_command_apply_without_a_restart(tmp_path: Path) -> Any:
    server = yield start(tmp_path, extra="[access]\nrefresh = 0s\n")
    config = tmp_path / "cli.conf"
    config.write_text(f"[server]\nstate_dir = {tmp_path / 'state'}\n")
    try:
        port = server.ports["mx"]
        assert (yield send(port, "a@sender.test", "bob@example.test")) == {}
        done = yield in_thread(cli, config, "add", "block", "sender", ".sender.test")
        assert done.returncode == 0, done.stderr
        done = yield in_thread(cli, config, "add", "block", "sender", "sender.test",
                               "--note", "spam run")
        assert done.returncode == 0, done.stderr
        code, text = yield send(port, "a@sender.test", "bob@example.test")
        assert (code, text.split()[0]) == (554, "5.7.1") and "Sender address" in text
        code, _ = yield send(port, "a@mx.sender.test", "bob@example.test")
        assert code == 554
        done = yield in_thread(cli, config, "add", "block", "sender", "sender.test")
        assert done.returncode != 0 and "already" in done.stderr
        listed = yield in_thread(cli, config, "list")
        assert "block\tsender\tsender.test\t" in listed.stdout and "spam run" in listed.stdout
        for value in (".sender.test", "sender.test"):
            done = yield in_thread(cli, config, "remove", "block", "sender", value)
            assert done.returncode == 0, done.stderr
        assert (yield send(port, "a@sender.test", "bob@example.test")) == {}
        done = yield in_thread(cli, config, "add", "block", "client", "127.0.0.0/8")
        assert done.returncode == 0, done.stderr
        code, text = yield send(port, "a@other.test", "bob@example.test")
        assert code == 554 and "Client host [127.0.0.1]" in text
        yield server.parts.access.add("allow", "client", "127.0.0.1")   # longer prefix
        assert (yield send(port, "a@other.test", "bob@example.test")) == {}
        yield server.parts.access.add("block", "recipient", "bob@example.test")
        code, text = yield send(port, "a@other.test", "bob@example.test")
        assert code == 554 and "Recipient address" in text
        done = yield in_thread(cli, config, "add", "trusted", "sender", "x.test")
        assert done.returncode != 0 and "only clients" in done.stderr
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_trusted_networks_relay_without_auth(tmp_path: Path) -> Any:
    untrusted = tmp_path / "untrusted"
    untrusted.mkdir()
    server = yield start(untrusted)
    try:
        code, _ = yield send(server.ports["mx"], "a@example.test", "x@remote.example")
        assert code == 554                              # no open relay
    finally:
        yield server.stop()
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    server = yield start(trusted, extra="[access]\ntrusted_networks = 127.0.0.0/8\n"
                         "[outbound]\nrelay_host = [127.0.0.1]:9\n")
    try:
        assert (yield send(server.ports["mx"], "a@example.test", "x@remote.example")) == {}
        queued = yield server.queued()
        assert any(row["recipient"] == "x@remote.example" for row in queued), queued
    finally:
        yield server.stop()
