"""Schema migrations (issue 21, point 7): Alembic builds exactly the schema in
schema.py on every backend; a database holding mail made by each older LightMail
(tests/fixtures/schema, see tests/schemafixtures.py) upgrades and its mail reads back
through the storage API and over IMAP; every migration's downgrade keeps the mail,
and ``lightmail db downgrade`` goes one step back and refuses what it cannot do."""

from __future__ import annotations

import imaplib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from twisted.internet import defer

from lightmail.storage import migrate
from lightmail.storage.database import create_engine
from lightmail.storage.schema import metadata
from tests import schemafixtures
from tests.conftest import StorageStack
from tests.harness import ServerProcess

REVISIONS = [step.revision for step in migrate.revisions()]
FIXTURES = schemafixtures.available()
LIGHTMAIL = [sys.executable, "-m", "lightmail.admin.cli"]


def test_the_head_known_without_alembic_is_alembics() -> None:
    """migrate.HEAD spares a process whose schema is current the import of Alembic:
    a new migration must move it."""
    assert migrate.HEAD == migrate.head_revision() == REVISIONS[-1]


def test_upgrade_matches_schema_and_downgrades_cleanly(db_url: str) -> None:
    engine = create_engine(db_url, pool_size=1)
    try:
        assert migrate.current_revision(engine) is None
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert schema_diff(engine) == []
        migrate.upgrade(engine)  # idempotent
        migrate.downgrade(engine, "base")
        tables = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set()
        migrate.upgrade(engine)
        assert set(metadata.tables) <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def schema_diff(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def test_every_revision_before_head_has_a_fixture() -> None:
    """A new migration needs the fixture of the revision it follows, made by the code
    before it: ``python tests/fixtures/schema/make_fixture.py`` (then add it)."""
    missing = [rev for rev in REVISIONS[:-1] if rev not in FIXTURES]
    assert not missing, (
        f"no upgrade fixture for revision(s) {', '.join(missing)} in "
        f"{schemafixtures.FIXTURES}: make it with tests/fixtures/schema/make_fixture.py "
        "(--commit COMMIT for an older revision's code)")
    assert set(FIXTURES) <= set(REVISIONS), "a fixture of a revision that does not exist"


@pytest.fixture
def stack_of(db_url: str, tmp_path: Path) -> Iterator[Any]:
    """Opens a StorageStack on the test's database (after the test has filled it)."""
    opened: list[StorageStack] = []

    def open_() -> StorageStack:
        opened.append(StorageStack(db_url, tmp_path / "state"))
        return opened[-1]
    yield open_
    for stack in opened:
        stack.close()


@pytest.mark.parametrize("revision", FIXTURES)
@pytest_twisted.inlineCallbacks
def test_upgrade_from_each_revision_keeps_the_mail(revision: str, db_url: str,
                                                   tmp_path: Path, stack_of: Any) -> Any:
    fixture = schemafixtures.load(revision)
    schemafixtures.install(fixture, db_url, tmp_path / "state")
    engine = create_engine(db_url, pool_size=1)
    try:
        assert migrate.current_revision(engine) == revision
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert schema_diff(engine) == []
    finally:
        engine.dispose()
    yield defer.ensureDeferred(schemafixtures.check_store(stack_of(), fixture))


@pytest.mark.parametrize("revision", [rev for rev in FIXTURES if rev != REVISIONS[0]])
@pytest_twisted.inlineCallbacks
def test_each_downgrade_keeps_the_mail(revision: str, db_url: str, tmp_path: Path,
                                       stack_of: Any) -> Any:
    """Each migration, undone on a database holding mail and done again: every row
    of the tables the older schema has is still there, and the mail reads back."""
    fixture = schemafixtures.load(revision)
    schemafixtures.install(fixture, db_url, tmp_path / "state")
    before = schemafixtures.table_counts(db_url)
    previous = REVISIONS[REVISIONS.index(revision) - 1]
    engine = create_engine(db_url, pool_size=1)
    try:
        migrate.downgrade(engine, previous)
        assert migrate.current_revision(engine) == previous
        after = schemafixtures.table_counts(db_url)
        assert after == {name: count for name, count in before.items() if name in after}
        migrate.upgrade(engine)
        assert schema_diff(engine) == []
    finally:
        engine.dispose()
    # What the undone migration had added (a table's rows) is gone; the rest is not.
    dropped = set(before) - set(after)
    kept = {**fixture, "tables": {name: ([] if name in dropped else rows)
                                  for name, rows in fixture["tables"].items()}}
    yield defer.ensureDeferred(schemafixtures.check_store(stack_of(), kept))


# -- over IMAP, and the lightmail command ------------------------------------------------

def config_for(tmp_path: Path, db_url: str, listeners: str = "") -> Path:
    path = tmp_path / "lightmail.conf"
    path.write_text(
        f"[server]\nstate_dir = {tmp_path / 'state'}\nhostname = mx.fixture.test\n"
        f"[storage]\nurl = {db_url}\nwriter_process = no\n"
        "[directory]\nauth_over_plaintext = yes\n" + listeners)
    return path


IMAP_LISTENER = "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIGHTMAIL, "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300)


def ok(config: Path, *args: str) -> str:
    result = run(config, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(config: Path, *args: str) -> str:
    result = run(config, *args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr


def check_imap(port: int, fixture: dict[str, Any]) -> None:
    """Every user logs in with their password (and app password) and finds each of
    their mailboxes with its UIDVALIDITY, UIDs, flags and contents as the fixture
    has them."""
    tables = fixture["tables"]
    notes = fixture["notes"]
    for user_id, address in schemafixtures.addresses(fixture).items():
        secrets = [notes["passwords"][address]]
        if any(row["user_id"] == user_id for row in tables.get("app_passwords", [])):
            secrets.append(notes["app_passwords"][address])
        for secret in secrets:
            imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
            try:
                assert imap.login(address, secret)[0] == "OK"
                check_mailboxes(imap, fixture, user_id)
            finally:
                imap.logout()


def check_mailboxes(imap: imaplib.IMAP4, fixture: dict[str, Any], user_id: int) -> None:
    boxes = [box for box in fixture["tables"]["mailboxes"] if box["user_id"] == user_id]
    typ, listed = imap.list()
    assert typ == "OK"
    names = {name.group(1) or name.group(2) for name in (
        re.search(r'(?:"((?:[^"\\]|\\.)*)"|(\S+))$', line.decode())
        for line in listed if isinstance(line, bytes)) if name}
    # (A first IMAP login may add the special-use folders to what an older one made.)
    assert {box["name"] for box in boxes} <= names, names
    for box in boxes:
        typ, _ = imap.select(box["name"], readonly=True)
        assert typ == "OK", box["name"]
        assert imap.response("UIDVALIDITY")[1] == [str(box["uidvalidity"]).encode()]
        expected = {m["uid"]: m for m in fixture["tables"]["messages"]
                    if m["mailbox_id"] == box["id"]}
        if not expected:
            continue
        typ, data = imap.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
        assert typ == "OK"
        found = {}
        for item in data:
            if isinstance(item, tuple):
                meta = item[0].decode()
                uid = int(re.search(r"UID (\d+)", meta).group(1))       # type: ignore[union-attr]
                flags = set(re.search(r"FLAGS \(([^)]*)\)", meta).group(1).split())  # type: ignore[union-attr]
                found[uid] = (flags - {"\\Recent"}, item[1])
        assert found == {uid: (set(m["flags"].split()),
                               schemafixtures.blob_content(fixture, m["blob_id"]))
                         for uid, m in expected.items()}, box["name"]
        # The parsed caches older servers kept (envelope, bodystructure) still serve.
        typ, data = imap.uid("FETCH", "1:*", "(ENVELOPE BODYSTRUCTURE)")
        assert typ == "OK" and len([d for d in data if d]) >= len(expected)
        subjects = b" ".join(d if isinstance(d, bytes) else d[0] for d in data if d)
        assert b"fixture" in subjects


# A server each: the oldest schema (its blob store in the first layout too) and the
# one before head.  Every revision's mail is read back through the storage API above;
# a server per revision and database was 24 start-ups, minutes of the suite.
@pytest.mark.parametrize("revision", sorted({FIXTURES[0], FIXTURES[-1]}))
def test_imap_reads_the_upgraded_mail(revision: str, db_url: str, tmp_path: Path) -> None:
    """A server of this LightMail on a database made by an older one upgrades it at
    start-up (auto_upgrade) and serves the old mail over IMAP to imaplib."""
    fixture = schemafixtures.load(revision)
    schemafixtures.install(fixture, db_url, tmp_path / "state")
    config = config_for(tmp_path, db_url, IMAP_LISTENER)
    if fixture["tables"]["queue_recipients"]:
        # Held: a retry or a bounce (its notice to alice) would change her INBOX.
        assert "held 1 recipient" in ok(config, "queue", "hold", "--all")
    server = ServerProcess(config)
    try:
        ports = server.ports(expected=1, timeout=120)
        check_imap(ports["imap"], fixture)
        # No downgrade under a running server, whose code expects this schema.
        assert "server is running" in refused(config, "db", "downgrade")
    finally:
        server.kill()


@pytest_twisted.ensureDeferred
async def test_db_downgrade_goes_one_step_back_with_the_mail(db_url: str, tmp_path: Path,
                                                             stack_of: Any) -> None:
    """`lightmail db downgrade` from head on a database holding mail, then `lightmail
    db upgrade`: the mail is all there, over the storage API and over IMAP."""
    revision = max(rev for rev in FIXTURES if rev != REVISIONS[-1])
    fixture = schemafixtures.load(revision)
    schemafixtures.install(fixture, db_url, tmp_path / "state")
    config = config_for(tmp_path, db_url, IMAP_LISTENER)
    ok(config, "db", "upgrade")
    head, previous = REVISIONS[-1], REVISIONS[-2]
    counts = schemafixtures.table_counts(db_url)

    out = ok(config, "db", "downgrade")
    assert f"undoing {head}: " in out and f"schema {head} -> {previous}" in out
    assert f"schema at {previous} " in ok(config, "db", "current")
    after = schemafixtures.table_counts(db_url)
    assert after == {name: count for name, count in counts.items() if name in after}
    assert "is not older" in refused(config, "db", "downgrade", "--to", previous)
    assert "lightmail db upgrade goes forward" in refused(config, "db", "downgrade",
                                                          "--to", head)
    assert "unknown revision '9999'" in refused(config, "db", "downgrade", "--to", "9999")

    assert f"schema {previous} -> {head}" in ok(config, "db", "upgrade")
    dropped = set(counts) - set(after)
    kept = {**fixture, "tables": {name: ([] if name in dropped else rows)
                                  for name, rows in fixture["tables"].items()}}
    await schemafixtures.check_store(stack_of(), kept, file_one=False)
    ok(config, "queue", "hold", "--all")
    server = ServerProcess(config)
    try:
        check_imap(server.ports(expected=1, timeout=120)["imap"], kept)
    finally:
        server.kill()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_db_downgrade_refuses_what_it_cannot_do(db_url: str, tmp_path: Path) -> None:
    config = config_for(tmp_path, db_url)
    assert "has no LightMail schema" in refused(config, "db", "downgrade")
    engine = create_engine(db_url, pool_size=1)
    try:
        migrate.upgrade(engine, REVISIONS[0])
        assert "the first revision" in refused(config, "db", "downgrade")
        assert migrate.current_revision(engine) == REVISIONS[0]
        out = ok(config, "db", "upgrade")
        assert f"-> {REVISIONS[-1]}" in out
        out = ok(config, "db", "downgrade", "--to", REVISIONS[0])
        assert [line.split(":")[0] for line in out.splitlines()[:-1]] == \
            [f"undoing {rev}" for rev in reversed(REVISIONS[1:])]
        assert migrate.current_revision(engine) == REVISIONS[0]
        with engine.begin() as conn:       # as a newer LightMail would leave it
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
        assert "which this LightMail does not know" in refused(config, "db", "downgrade")
    finally:
        engine.dispose()
