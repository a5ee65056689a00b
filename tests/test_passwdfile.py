"""A passwd-file domain (``directory/passwdfile.py``): Dovecot's format, with hashes
made by Dovecot's own ``doveadm pw`` (ARGON2ID, SHA512-CRYPT, SHA256-CRYPT); logins
over IMAP and POP3, mail to its users, and a change to the file picked up."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from lightmail.directory.passwdfile import Entry, parse, verify
from tests.inprocess import in_thread, start
from tests.mailclients import imap_login, listeners, pop3_login, send

DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"


def doveadm_pw(scheme: str, password: str) -> str:
    if not Path(DOVEADM).exists():
        raise AssertionError("doveadm is missing: run scripts/test-peers.sh")
    return subprocess.run([DOVEADM, "pw", "-s", scheme, "-p", password], check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def test_lines_schemes_and_extra_fields() -> None:
    warnings: list[str] = []
    text = "\n".join([
        "# users of small.test",
        f"ann@small.test:{doveadm_pw('ARGON2ID', 'ann-pw')}:1000:1000::/home/ann::"
        "userdb_quota_rule=*:storage=1G",
        f"Ben@Small.Test:{doveadm_pw('SHA512-CRYPT', 'ben-pw')}::::::",
        f"cy@small.test:{doveadm_pw('SHA256-CRYPT', 'cy-pw')}::::::nologin",
        "dot@small.test:{PLAIN}dot-pw",
        "eve@small.test:{MD5}abc",
        "out@other.test:{PLAIN}x",
        "not an address:{PLAIN}x",
        "ann@small.test:{PLAIN}again",
    ])
    users = parse(text, ("small.test",), "users", warnings.append)
    assert sorted(users) == ["ann@small.test", "ben@small.test", "cy@small.test",
                             "dot@small.test", "eve@small.test"]
    assert users["ann@small.test"].account.quota_bytes == 1024**3
    assert users["cy@small.test"].account.enabled is False
    assert len(warnings) == 4, warnings      # MD5, other domain, not an address, again
    for address, good in (("ann@small.test", "ann-pw"), ("ben@small.test", "ben-pw"),
                          ("cy@small.test", "cy-pw"), ("dot@small.test", "dot-pw")):
        assert verify(users[address], good), address
        assert not verify(users[address], good + "x"), address
    assert not verify(users["eve@small.test"], "abc")     # unknown scheme: never
    assert not verify(None, "anything")
    assert not verify(Entry(users["dot@small.test"].account, "PLAIN", ""), "")


def passwd_lines(**passwords: str) -> str:
    schemes = {"ann": "ARGON2ID", "ben": "SHA512-CRYPT", "cy": "SHA256-CRYPT"}
    return "".join(f"{name}@small.test:{doveadm_pw(schemes.get(name, 'ARGON2ID'), pw)}"
                   f":1000:1000::/home/{name}::\n" for name, pw in passwords.items())


@pytest_twisted.inlineCallbacks
def test_a_passwd_file_domain_logs_in_gets_mail_and_follows_the_file(
        tmp_path: Path) -> None:
    users = tmp_path / "users.passwd"
    users.write_text(passwd_lines(ann="ann-pw", ben="ben-pw", cy="cy-pw")
                     + "off@small.test:{PLAIN}off-pw::::::nologin\n")
    server = yield start(tmp_path, listeners() + "[directory]\nauth_over_plaintext = yes\n"
                         f"[backend:small]\ntype = passwd-file\ndomains = small.test\n"
                         f"path = {users}\n")
    ports = server.ports
    try:
        refused = yield in_thread(send, ports["mx"], "ann@small.test", "off@small.test",
                                  "nobody@small.test")
        assert sorted(refused) == ["nobody@small.test", "off@small.test"], refused
        yield server.delivered("ann@small.test", 1)
        for name in ("ann", "ben", "cy"):
            answer = yield in_thread(imap_login, ports["imap"], f"{name}@small.test",
                                     f"{name}-pw")
            assert answer.startswith("OK"), (name, answer)
        assert (yield in_thread(pop3_login, ports["pop3"], "ann@small.test", "ann-pw")) \
            == "+OK 1"
        for name, pw in (("ann", "wrong"), ("off", "off-pw"), ("zed", "zed-pw")):
            answer = yield in_thread(imap_login, ports["imap"], f"{name}@small.test", pw)
            assert "AUTHENTICATIONFAILED" in answer, (name, answer)

        # A new password for ann, and a new user: seen once the file has changed.
        users.write_text(passwd_lines(ann="ann-new", ben="ben-pw", zed="zed-pw"))
        yield task.deferLater(reactor, 1.2, lambda: None)
        assert "AUTHENTICATIONFAILED" in (yield in_thread(
            imap_login, ports["imap"], "ann@small.test", "ann-pw"))
        for name, pw in (("ann", "ann-new"), ("zed", "zed-pw")):
            answer = yield in_thread(imap_login, ports["imap"], f"{name}@small.test", pw)
            assert answer.startswith("OK"), (name, answer)
        # The file gone for a moment: the users read before stay.
        users.unlink()
        yield task.deferLater(reactor, 1.2, lambda: None)
        assert (yield in_thread(imap_login, ports["imap"], "zed@small.test",
                                "zed-pw")).startswith("OK")
    finally:
        yield server.stop()


def test_start_up_refuses_a_missing_file(tmp_path: Path) -> None:
    from lightmail.config import ConfigError, parse_config
    with pytest.raises(ConfigError, match=r"lm.conf:4: \[backend:small\] path: cannot read"):
        parse_config("[backend:small]\ntype = passwd-file\ndomains = small.test\n"
                     f"path = {tmp_path / 'none'}\n", str(tmp_path / "lm.conf"))


@pytest_twisted.inlineCallbacks
def test_an_unknown_user_is_checked_like_a_known_one_and_refused(tmp_path: Path) -> None:
    """Against a real entry of the file's usual scheme (so that an argon2 check does
    not set unknown users apart in a file of SHA-crypt hashes), answered no even
    when the password is that entry's."""
    from twisted.cred import credentials, error

    from lightmail.config import parse_config
    from lightmail.directory.passwdfile import PasswdFileBackend
    users = tmp_path / "users.passwd"
    users.write_text(f"ann@small.test:{doveadm_pw('ARGON2ID', 'ann-pw')}\n"
                     f"ben@small.test:{doveadm_pw('SHA512-CRYPT', 'same-pw')}\n"
                     f"cy@small.test:{doveadm_pw('SHA512-CRYPT', 'cy-pw')}\n")
    config = parse_config(f"[backend:small]\ntype = passwd-file\ndomains = small.test\n"
                          f"path = {users}\n")
    backend = PasswdFileBackend(config.backends[0])
    assert (yield backend.find_user("ben@small.test")).address == "ben@small.test"
    assert backend.stand_in() is not None and backend.stand_in().scheme == "SHA512-CRYPT"
    for who, secret in (("nobody@small.test", "same-pw"), ("nobody@small.test", "cy-pw")):
        with pytest.raises(error.UnauthorizedLogin):
            yield backend.checker.requestAvatarId(
                credentials.UsernamePassword(who.encode(), secret.encode()))
