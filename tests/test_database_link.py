"""The database link ([storage] password_file, tls, ca_file, cert_file, key_file)
against a PostgreSQL of the test's own that lets LightMail in over TLS only, with a
password and a client certificate (tests/pgpeer.py, started once for the module): a
server (its main process, writer process and the ``lightmail`` command) keeps its
mail there over TLS with the password from a file, which appears nowhere; a CA that
did not sign the server's certificate, no TLS, or no client certificate each stop
the start-up with one line saying why.  The same against a MariaDB of the test's own
(tests/mariadbpeer.py): the schema made over TLS, and a CA that did not sign its
certificate or a missing client certificate refused."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from lightmail.config import ConfigError, parse_config
from lightmail.service import validate
from lightmail.storage import migrate
from lightmail.storage.database import (
    Database,
    DatabaseUnreachable,
    DatabaseURLError,
    check_url,
    link_arguments,
)
from tests.harness import ServerProcess, run_cli
from tests.mariadbpeer import TLSMariaDB
from tests.pgpeer import PASSWORD, TLSPostgres
from tests.testca import TestCA


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSPostgres]:
    server = TLSPostgres(tmp_path_factory.mktemp("pg-ca"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSMariaDB]:
    server = TLSMariaDB(tmp_path_factory.mktemp("mariadb-ca"))
    try:
        yield server
    finally:
        server.stop()


def server_config(state: Path, storage: str) -> Path:
    state.mkdir()
    config = state / "lightmail.conf"
    config.write_text(
        f"[server]\nstate_dir = {state}\nhostname = mx.example.test\nshutdown_timeout = 5s\n"
        + storage +
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n")
    return config


def test_a_server_keeps_its_mail_in_postgresql_over_tls(postgres: TLSPostgres,
                                                        tmp_path: Path) -> None:
    config = server_config(tmp_path / "state", postgres.storage_section(tmp_path))
    run_cli(config, "domain", "add", "example.test")
    run_cli(config, "user", "add", "ann@example.test", "--password-stdin",
            stdin="ann-password\n")
    server = ServerProcess(config)          # with its writer process (the default)
    admin = postgres.admin_engine()
    try:
        port = server.ports(expected=1)["mx"]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("bob@elsewhere.test", ["ann@example.test"],
                          b"Subject: over-tls\r\n\r\nhello\r\n")
        with admin.connect() as conn:
            for _ in range(100):
                filed = conn.execute(sa.text("select count(*) from messages")).scalar()
                if filed:
                    break
                time.sleep(0.05)
            assert filed == 1
            # Every connection of LightMail's is over TLS (pg_hba.conf allows no other).
            assert conn.execute(sa.text(
                "select count(*), bool_and(s.ssl) from pg_stat_activity a join "
                "pg_stat_ssl s using (pid) where a.usename = 'lightmail' and "
                "a.pid <> pg_backend_pid()")).one() in [(n, True) for n in range(2, 100)]
        assert server.terminate() in (0, -15)
    finally:
        server.kill()
        admin.dispose()
    assert PASSWORD not in server.output
    checked = run_cli(config, "check-config")
    assert PASSWORD not in checked


@pytest.mark.parametrize("what", ["another CA", "no TLS", "no client certificate"])
def test_a_link_the_server_refuses_stops_the_start_with_one_line(
        postgres: TLSPostgres, tmp_path: Path, what: str) -> None:
    other = TestCA(tmp_path / "other", "Another CA")
    storage = postgres.storage_section(
        tmp_path, ca_file=other.ca_file if what == "another CA" else None,
        tls=what != "no TLS", client=what != "no client certificate")
    server = ServerProcess(server_config(tmp_path / "state", storage))
    try:
        line = server.wait_for(r"LightMail cannot run: .*", timeout=60)[0].group(0)
        assert server.proc.wait(30) != 0
    finally:
        server.kill()
    reason = {"another CA": "certificate verify failed",
              "no TLS": "no encryption",
              "no client certificate": "requires a valid client certificate"}[what]
    assert line.startswith(f"LightMail cannot run: storage failed: cannot connect to the "
                           f"postgresql database at {postgres.url}: ")
    assert reason in line
    assert "\n" not in line and PASSWORD not in server.output


def test_the_link_keys_are_checked_at_start_up(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    ca = TestCA(tmp_path / "ca")
    pg = "url = postgresql+psycopg://lm@db.example/mail\n"
    for text, message in (
            (f"password_file = {secret}\n", "for PostgreSQL and MariaDB"),
            (f"{pg}ca_file = {ca.ca_file}\n", "needs tls = yes"),
            (f"{pg}tls = yes\ncert_file = {ca.ca_file}\n", "go together"),
            (f"url = postgresql+psycopg://lm:inline@db.example/mail\n"
             f"password_file = {secret}\n", "keep it in password_file alone")):
        with pytest.raises(ConfigError, match=message):
            parse_config("[storage]\n" + text, validators=validate)
    config = parse_config(f"[storage]\n{pg}password_file = {secret}\ntls = yes\n")
    assert "s3cret" not in repr(config) and "s3cret" not in repr(config.database)
    assert config.database.password == "s3cret"
    # Without ca_file: the system's CAs (libpq 16 and later).
    assert link_arguments(config.database, "postgresql") == {
        "password": "s3cret", "sslmode": "verify-full", "sslrootcert": "system"}
    assert link_arguments(config.database, "mysql") == {
        "password": "s3cret", "ssl_verify_cert": True, "ssl_verify_identity": True}


def test_a_password_in_a_url_is_never_shown() -> None:
    for url in ("postgresql+nope://lm:s3cret@db/mail", "lm:s3cret@db"):
        with pytest.raises(DatabaseURLError) as raised:
            check_url(url)
        assert "s3cret" not in str(raised.value)


def test_mariadb_over_tls_with_a_client_certificate(mariadb: TLSMariaDB,
                                                    tmp_path: Path) -> None:
    config = parse_config(mariadb.storage_section(tmp_path), validators=validate)
    db = Database(config.database, threads=1)
    try:
        db.reach()
        migrate.upgrade(db.engine)
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SHOW SESSION STATUS LIKE 'Ssl_version'")
                                ).one()[1].startswith("TLSv1.")
        assert migrate.current_revision(db.engine) == migrate.HEAD
    finally:
        db.stop()
    other = TestCA(tmp_path / "other", "Another CA")
    for storage, reason in (
            (mariadb.storage_section(tmp_path, ca_file=other.ca_file),
             "certificate verify failed"),
            (mariadb.storage_section(tmp_path, client=False), "Access denied")):
        db = Database(parse_config(storage).database, threads=1)
        try:
            with pytest.raises(DatabaseUnreachable) as refused:
                db.reach()
        finally:
            db.stop()
        message = str(refused.value)
        assert message.startswith(f"cannot connect to the mysql database at {mariadb.url}: ")
        assert reason in message and "mariadb-link-secret" not in message
