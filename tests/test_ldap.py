"""Users in LDAP (``directory/ldap.py``, ``ldappool.py``, ``routing.py``) against a
private OpenLDAP slapd from Debian (``tests/slapd.py``): logins over SMTP submission,
IMAP and POP3 with search-then-bind (StartTLS) and bind-as-user (LDAPS), mail to an
LDAP user and to an alias filed in their mailbox, disabled users, SCRAM refused like
a wrong password, and slapd down: temporary failures, never a crash or an accept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import scramp
from twisted.cred import credentials, error
from twisted.logger import formatEvent, globalLogPublisher

from lightmail.config import parse_config
from lightmail.directory.interfaces import DirectoryError, DirectoryUnavailable
from lightmail.directory.ldap import LDAPBackend, substitute
from tests.inprocess import in_thread, start
from tests.mailclients import imap_login, listeners, pop3_login, send, smtp_login
from tests.slapd import PEOPLE, SERVICE_DN, SERVICE_PW, Slapd, base_dit, user
from tests.test_scram import Wire, connect
from tests.testca import TestCA

ALICE, ALICE_PW = "alice@corp.test", "alice-secret"
BOB, BOB_PW = "bob@corp.test", "bob-secret"          # {CRYPT} (SHA-512) in LDAP
CAROL, CAROL_PW = "carol@corp.test", "carol-secret"  # mailEnabled: FALSE


def dit() -> str:
    return (base_dit()
            + user("alice", ALICE, ALICE_PW, aliases=("sales@corp.test",), quota=10_000_000)
            + user("bob", BOB, BOB_PW, scheme="{CRYPT}")
            + user("carol", CAROL, CAROL_PW, enabled=False))


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    root = tmp_path_factory.mktemp("ldap")
    server = Slapd(root / "slapd", TestCA(root / "ca"))
    server.start()
    try:
        server.add(dit())
        yield server
    finally:
        server.stop()


def backend_section(server: Slapd, tmp: Path, *, auth: str = "search", ldaps: bool = False,
                    caches: bool = True) -> str:
    secret = tmp / "ldap.secret"
    secret.write_text(SERVICE_PW + "\n")
    lines = [
        "[backend:corp]", "type = ldap", "domains = corp.test",
        f"uri = {server.ldaps_uri if ldaps else server.uri}",
        f"ca_file = {server.ca.ca_file}", f"auth = {auth}",
        f"bind_dn = {SERVICE_DN}", f"bind_password_file = {secret}", f"base = {PEOPLE}",
        "user_filter = (&(objectClass=inetOrgPerson)(mail=%u))",
        "recipient_filter = (&(objectClass=inetOrgPerson)(|(mail=%u)(mailLocalAddress=%u)))",
        "user_dn = uid=%n,ou=people,dc=example,dc=test",
        "alias_attribute = mailLocalAddress", "quota_attribute = mailQuota",
        "enabled_attribute = mailEnabled", "timeout = 3s"]
    if not caches:
        lines += ["auth_cache_ttl = 0", "lookup_cache_ttl = 0"]
    return "\n".join(lines) + "\n"


def backend(server: Slapd, tmp: Path, **options: Any) -> LDAPBackend:
    config = parse_config(backend_section(server, tmp, **options), str(tmp / "lm.conf"))
    return LDAPBackend(config.backends[0])


def password(address: str, secret: str) -> credentials.UsernamePassword:
    return credentials.UsernamePassword(address.encode(), secret.encode())


# -- the backend on its own ------------------------------------------------------------

def test_filter_and_dn_values_are_escaped() -> None:
    from ldap3.utils.conv import escape_filter_chars
    from ldap3.utils.dn import escape_rdn
    assert substitute("(mail=%u)", "*)(uid=*@x.test", escape_filter_chars) \
        == r"(mail=\2a\29\28uid=\2a@x.test)"
    assert substitute("uid=%n,dc=%d%%", "a,b+c@x.test", escape_rdn) == r"uid=a\,b\+c,dc=x.test%"


@pytest_twisted.inlineCallbacks
def test_search_then_bind_over_starttls(slapd: Slapd, tmp_path: Path) -> None:
    ldap = backend(slapd, tmp_path)
    try:
        found = yield ldap.find_recipient("sales@corp.test")
        assert (found.address, found.aliases, found.quota_bytes, found.enabled) == \
            (ALICE, ("sales@corp.test",), 10_000_000, True)
        assert (yield ldap.find_user("carol@corp.test")).enabled is False
        assert (yield ldap.find_user("nobody@corp.test")) is None
        assert (yield ldap.find_user("*@corp.test")) is None      # escaped: no wildcard
        assert (yield ldap.checker.requestAvatarId(password("Alice@Corp.Test", ALICE_PW))) \
            == ALICE
        assert (yield ldap.checker.requestAvatarId(password(BOB, BOB_PW))) == BOB
        for who, secret in ((ALICE, "wrong"), (CAROL, CAROL_PW), ("nobody@corp.test", "x"),
                            (ALICE, "")):
            with pytest.raises(error.UnauthorizedLogin):
                yield ldap.checker.requestAvatarId(password(who, secret))
    finally:
        ldap.stop()


@pytest_twisted.inlineCallbacks
def test_bind_as_user_over_ldaps(slapd: Slapd, tmp_path: Path) -> None:
    ldap = backend(slapd, tmp_path, auth="bind", ldaps=True, caches=False)
    try:
        assert (yield ldap.checker.requestAvatarId(password(ALICE, ALICE_PW))) == ALICE
        with pytest.raises(error.UnauthorizedLogin):
            yield ldap.checker.requestAvatarId(password(ALICE, "wrong"))
        with pytest.raises(error.UnauthorizedLogin):
            yield ldap.checker.requestAvatarId(password(CAROL, CAROL_PW))   # disabled
    finally:
        ldap.stop()


@pytest_twisted.inlineCallbacks
def test_a_server_certificate_from_another_ca_is_refused(slapd: Slapd,
                                                         tmp_path: Path) -> None:
    other = TestCA(tmp_path / "other-ca")
    section = backend_section(slapd, tmp_path).replace(str(slapd.ca.ca_file),
                                                       str(other.ca_file))
    ldap = LDAPBackend(parse_config(section, str(tmp_path / "lm.conf")).backends[0])
    try:
        with pytest.raises(DirectoryUnavailable):
            yield ldap.find_user(ALICE)
    finally:
        ldap.stop()


# -- through the server: SMTP, IMAP, POP3 ----------------------------------------------

@pytest_twisted.inlineCallbacks
def test_ldap_users_log_in_and_get_mail(slapd: Slapd, tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    server = yield start(tmp_path, listeners()
                         + "[directory]\nauth_over_plaintext = yes\nlogin_delay_after = 20\n"
                         + backend_section(slapd, tmp_path))
    ports = server.ports
    try:
        # Her shadow row is made on first sight; a folder for +lists mail in it.
        alice = yield server.parts.directory.get_user(ALICE)
        yield server.parts.mailstore.create_mailbox(alice.id, "lists")
        refused = yield in_thread(send, ports["mx"], ALICE, "sales@corp.test",
                                  "alice+lists@corp.test", CAROL, "nobody@corp.test")
        assert set(refused) == {CAROL, "nobody@corp.test"}
        assert all(code == 550 for code, _ in refused.values()), refused
        yield server.delivered(ALICE, 1)      # her address and alias: one copy
        yield server.delivered(ALICE, 1, "lists")
        # An SQL alias in an SQL domain that leads to her resolves through LDAP.
        yield server.parts.directory.add_alias("team@example.test", ALICE)
        assert (yield in_thread(send, ports["mx"], "team@example.test")) == {}
        yield server.delivered(ALICE, 2)
        alice = yield server.parts.directory.get_user(ALICE)
        assert alice.quota_bytes == 10_000_000      # the shadow row, from mailQuota

        assert (yield in_thread(smtp_login, ports["submissions"], ALICE, ALICE_PW))[0] == 235
        assert (yield in_thread(smtp_login, ports["submissions"], BOB, BOB_PW))[0] == 235
        assert (yield in_thread(smtp_login, ports["submissions"], ALICE, "bad"))[0] == 535
        assert (yield in_thread(imap_login, ports["imap"], ALICE, ALICE_PW)) == "OK 2"
        # A disabled user, a wrong password and an unknown user: one answer.
        answers = set()
        for who, secret in ((CAROL, CAROL_PW), (ALICE, "wrong"), ("nobody@corp.test", "x")):
            answers.add((yield in_thread(imap_login, ports["imap"], who, secret)))
        assert len(answers) == 1 and "AUTHENTICATIONFAILED" in answers.pop()
        assert (yield in_thread(pop3_login, ports["pop3"], ALICE, ALICE_PW)) == "+OK 2"
        assert "[AUTH]" in (yield in_thread(pop3_login, ports["pop3"], "x@corp.test", "x"))
        for change in (lambda d: d.add_user("new@corp.test", "pw"),
                       lambda d: d.set_password(ALICE, "pw"),
                       lambda d: d.add_alias("x@corp.test", ALICE)):
            with pytest.raises(DirectoryError, match=r"live in \[backend:corp\]"):
                yield change(server.parts.directory)
        assert [u.address for u in (yield server.parts.directory.list_users("corp.test"))] \
            == [ALICE, BOB]                     # the shadow rows of the users seen
        senders = yield server.parts.directory.allowed_senders(alice)
        assert senders == [ALICE, "sales@corp.test"]
        # SQL users are as they were, beside the LDAP domain.
        assert (yield in_thread(imap_login, ports["imap"], "bob@example.test",
                                "bob-secret")).startswith("OK")
        logged = "\n".join(formatEvent(event) or "" for event in events)
        assert "authentication failed for alice@corp.test" in logged
        for secret in (SERVICE_PW, ALICE_PW, BOB_PW, CAROL_PW):
            assert secret not in logged
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_bind_as_user_over_ldaps_through_imap_and_pop3(slapd: Slapd, tmp_path: Path) -> None:
    server = yield start(tmp_path, listeners() + "[directory]\nauth_over_plaintext = yes\n"
                         + backend_section(slapd, tmp_path, auth="bind", ldaps=True))
    ports = server.ports
    try:
        assert (yield in_thread(imap_login, ports["imap"], BOB, BOB_PW)) == "OK 0"
        assert (yield in_thread(pop3_login, ports["pop3"], ALICE, ALICE_PW)) == "+OK 0"
        assert "AUTHENTICATIONFAILED" in (yield in_thread(imap_login, ports["imap"], BOB,
                                                          ALICE_PW))
        assert (yield in_thread(smtp_login, ports["submissions"], ALICE, ALICE_PW))[0] == 235
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_scram_fails_for_ldap_users_like_a_wrong_password(slapd: Slapd,
                                                         tmp_path: Path) -> None:
    from tests.test_scram import tls_listeners
    server = yield start(tmp_path, tls_listeners(tmp_path) + backend_section(slapd, tmp_path))
    try:
        def scram_login(address: str, secret: str) -> tuple[bool, str]:
            wire = Wire("imap", connect(server.ports["imaps"]))
            try:
                client = scramp.ScramClient(["SCRAM-SHA-256"], address, secret)
                try:
                    return wire.authenticate("SCRAM-SHA-256", client)
                except scramp.ScramException as exc:
                    return False, f"client refused: {exc}"
            finally:
                wire.close()
        ok, last = yield in_thread(scram_login, ALICE, ALICE_PW)
        assert not ok and "AUTHENTICATIONFAILED" in last, last
        ok, unknown = yield in_thread(scram_login, "nobody@corp.test", "x")
        assert not ok and unknown == last
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_slapd_down_gives_temporary_failures(tmp_path: Path) -> None:
    own = Slapd(tmp_path / "slapd", TestCA(tmp_path / "ca"))
    own.start()
    own.add(dit())
    server = yield start(tmp_path, listeners() + "[directory]\nauth_over_plaintext = yes\n"
                         + backend_section(own, tmp_path, caches=False))
    ports = server.ports
    try:
        assert (yield in_thread(imap_login, ports["imap"], ALICE, ALICE_PW)).startswith("OK")
        own.stop()
        assert "[UNAVAILABLE]" in (yield in_thread(imap_login, ports["imap"], ALICE, ALICE_PW))
        assert (yield in_thread(pop3_login, ports["pop3"], ALICE, ALICE_PW)) \
            .startswith("-ERR [SYS/TEMP]")
        code, text = yield in_thread(smtp_login, ports["submissions"], ALICE, ALICE_PW)
        assert (code, text[:5]) == (454, "4.7.0"), (code, text)
        refused = yield in_thread(send, ports["mx"], ALICE, "bob@example.test")
        assert refused[ALICE][0] == 451 and refused[ALICE][1].startswith("4.3.0"), refused
        yield server.delivered("bob@example.test", 1)      # SQL domains still take mail
        own.start()                                         # back: logins work again
        assert (yield in_thread(imap_login, ports["imap"], ALICE, ALICE_PW)).startswith("OK")
    finally:
        yield server.stop()
        own.stop()


# -- configuration -----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("type = ldap\ndomains = a.test\nbase = dc=a\n",
     r":1: \[backend:a\] uri: type = ldap needs 'uri'"),
    ("type = ldap\ndomains = a.test\nbase = dc=a\nuri = ldaps://h\nstarttls = yes\n",
     r":6: \[backend:a\] starttls: starttls is for ldap:// uris"),
    ("type = ldap\ndomains = a.test\nbase = dc=a\nuri = ldap://h\nauth = bind\n",
     r":6: \[backend:a\] user_dn: auth = bind needs 'user_dn'"),
    ("type = ldap\ndomains = a.test\nbase = dc=a\nuri = ldap://h\nbind_dn = cn=x\n",
     r":6: \[backend:a\] bind_password_file: bind_dn needs 'bind_password_file'"),
    ("type = ldap\ndomains = a.test\nbase = dc=a\nuri = http://h\n",
     r":5: \[backend:a\] uri: expected ldap://host"),
    ("type = ldap\ndomains = a.test\nbase = dc=a\nuri = ldaps://h\nca_file = none.pem\n",
     r":6: \[backend:a\] ca_file: cannot read .*none.pem: no such file"),
    ("type = passwd-file\ndomains = a.test\npath = lm.conf\nuri = ldap://h\n",
     r":5: \[backend:a\] uri: uri is an LDAP setting"),
    ("type = ldap\ndomains = a.test, example.test\nbase = dc=a\nuri = ldap://h\n"
     "[backend:b]\ntype = ldap\ndomains = b.test, example.test\nbase = dc=b\n"
     "uri = ldap://h\n",
     r":8: \[backend:b\] domains: example.test is served by \[backend:a\] already"),
])
def test_bad_backend_sections_stop_start_up_with_file_and_line(
        tmp_path: Path, text: str, message: str) -> None:
    from lightmail.config import ConfigError
    (tmp_path / "lm.conf").write_text("")
    with pytest.raises(ConfigError, match=message):
        parse_config("[backend:a]\n" + text, str(tmp_path / "lm.conf"))


def test_the_service_password_is_read_from_its_file_and_never_shown(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret-value\nignored\n")
    config = parse_config(f"[backend:a]\ntype = ldap\ndomains = a.test\nbase = dc=a\n"
                          f"uri = ldaps://h\nbind_dn = cn=x\nbind_password_file = {secret}\n")
    assert config.backends[0].bind_password == "s3cret-value"
    assert "s3cret" not in repr(config)
    assert "s3cret" not in repr(LDAPBackend(config.backends[0]).pool)


@pytest_twisted.inlineCallbacks
def test_a_server_that_never_answers_is_unavailable_after_the_timeout(
        slapd: Slapd, tmp_path: Path) -> None:
    """A server that takes the connection and says nothing (hung, or a firewall that
    swallows packets) holds a pool thread for ``timeout``, never the reactor."""
    import socket
    import time
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    section = backend_section(slapd, tmp_path).replace(
        slapd.uri, f"ldap://127.0.0.1:{port}").replace("timeout = 3s", "timeout = 1s")
    ldap = LDAPBackend(parse_config(section, str(tmp_path / "lm.conf")).backends[0])
    try:
        began = time.monotonic()
        with pytest.raises(DirectoryUnavailable):
            yield ldap.find_user(ALICE)
        assert time.monotonic() - began < 10
    finally:
        ldap.stop()
        silent.close()
