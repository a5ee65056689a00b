"""Databases holding mail made by older LightMails, for the upgrade and downgrade tests.

A fixture (``tests/fixtures/schema/NNNN.json``, made by ``make_fixture.py`` there
with the code of revision NNNN) holds every row that server wrote, and the files of
its blob store.  :func:`install` builds the schema of that revision with its own
migrations on any backend and inserts the rows with SQLAlchemy Core (the JSON is
database-neutral); :func:`check_store` then reads everything back through
LightMail's storage API and compares it with the fixture's rows.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from lightmail.directory.passwords import verify_password
from lightmail.storage import migrate
from lightmail.storage.database import create_engine

FIXTURES = Path(__file__).parent / "fixtures" / "schema"


def available() -> list[str]:
    """The revisions that have a fixture, oldest first."""
    return sorted(path.stem for path in FIXTURES.glob("[0-9][0-9][0-9][0-9].json"))


def load(revision: str) -> dict[str, Any]:
    fixture: dict[str, Any] = json.loads((FIXTURES / f"{revision}.json").read_text())
    assert fixture["revision"] == revision, f"{revision}.json holds {fixture['revision']}"
    return fixture


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        return (value["text"].encode("utf-8") if "text" in value
                else base64.b64decode(value["base64"]))
    return value


def install(fixture: dict[str, Any], url: str, state: Path) -> None:
    """The database at ``url`` at the fixture's revision, holding its rows; its blob
    store's files under ``state`` (``state/blobs``), in the layout they were written."""
    engine = create_engine(url, pool_size=1)
    try:
        migrate.upgrade(engine, fixture["revision"])
        meta = sa.MetaData()
        with engine.begin() as conn:
            meta.reflect(conn)
            for table in meta.sorted_tables:
                rows = fixture["tables"].get(table.name)
                if rows:
                    conn.execute(table.insert(), [{key: decode(value) for key, value
                                                   in row.items()} for row in rows])
            if conn.dialect.name == "postgresql":
                # Rows came with their ids: move the sequences past them, as a
                # restored dump does.
                for table in meta.sorted_tables:
                    if "id" in table.c and isinstance(table.c.id.type, sa.Integer):
                        conn.exec_driver_sql(
                            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                            f"COALESCE(MAX(id), 1), MAX(id) IS NOT NULL) FROM {table.name}")
    finally:
        engine.dispose()
    for name, content in fixture["files"].items():
        path = state / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(decode(content))


def blob_content(fixture: dict[str, Any], blob_id: str) -> bytes:
    """The content the fixture's blob store holds for ``blob_id`` (in any layout)."""
    for name, content in fixture["files"].items():
        if name.endswith("/" + blob_id):
            return bytes(decode(content))
    raise AssertionError(f"the fixture has no file for blob {blob_id}")


def addresses(fixture: dict[str, Any]) -> dict[int, str]:
    """User id -> address."""
    domains = {row["id"]: row["name"] for row in fixture["tables"]["domains"]}
    return {row["id"]: f"{row['localpart']}@{domains[row['domain_id']]}"
            for row in fixture["tables"]["users"]}


def table_counts(url: str) -> dict[str, int]:
    """Rows per table (alembic's own left out), whatever the schema's revision."""
    engine = create_engine(url, pool_size=1)
    try:
        meta = sa.MetaData()
        with engine.connect() as conn:
            meta.reflect(conn)
            return {table.name: int(conn.execute(
                sa.select(sa.func.count()).select_from(table)).scalar_one())
                for table in meta.sorted_tables if table.name != "alembic_version"}
    finally:
        engine.dispose()


async def check_store(stack: Any, fixture: dict[str, Any], file_one: bool = True) -> None:
    """Everything the fixture holds, read back through the storage API of this
    LightMail (``stack``: tests/conftest.py's StorageStack, on the upgraded
    database), then (``file_one``) one new message filed after the old ones."""
    tables = fixture["tables"]
    passwords = fixture["notes"]["passwords"]
    by_user = addresses(fixture)
    for row in tables["users"]:
        address = by_user[row["id"]]
        user = await stack.directory.get_user(address)
        assert user is not None, address
        assert (user.id, user.quota_bytes, user.enabled) == \
            (row["id"], row["quota_bytes"], bool(row["enabled"]))
        _, stored = await stack.directory.password_hash(address)
        assert verify_password(stored, passwords[address]), address
    for row in tables["aliases"]:
        source = f"{row['localpart']}@{addresses_domain(fixture, row['domain_id'])}"
        resolution = await stack.directory.resolve(source)
        assert [t.user.address for t in resolution.local] == [row["destination"]]
    for row in tables.get("app_passwords", []):    # (logged in with: test_migrations)
        listed = await stack.directory.list_app_passwords(by_user[row["user_id"]])
        assert [(found.name, found.created) for found in listed] == \
            [(row["name"], row["created"])]

    for box in tables["mailboxes"]:
        selected = await stack.mailstore.select_mailbox(box["user_id"], box["name"])
        assert selected is not None, box["name"]
        mailbox, infos = selected
        assert (mailbox.id, mailbox.uidvalidity, mailbox.uidnext, mailbox.highestmodseq,
                mailbox.special_use, mailbox.subscribed) == \
            (box["id"], box["uidvalidity"], box["uidnext"], box["highestmodseq"],
             box["special_use"], bool(box["subscribed"])), box
        expected = sorted((m for m in tables["messages"] if m["mailbox_id"] == box["id"]),
                          key=lambda m: m["uid"])
        assert [(i.uid, i.modseq, i.blob_id, i.size, i.internal_date, i.flags)
                for i in infos] == \
            [(m["uid"], m["modseq"], m["blob_id"], m["size"], m["internal_date"],
              frozenset(m["flags"].split())) for m in expected], box["name"]
        for info in infos:
            content = await stack.blobs.read(info.blob_id)
            assert hashlib.sha256(content).hexdigest() == info.blob_id
            assert content == blob_content(fixture, info.blob_id)
            assert len(content) == info.size
    for row in tables.get("subscriptions", []):
        names = await stack.mailstore.subscriptions_without_mailbox(row["user_id"])
        assert row["name"] in names
    changes_seen = {(row["mailbox_id"], row["uid"]) for row in tables["expunged"]}
    for mailbox_id, uid in changes_seen:
        changes = await stack.mailstore.changes_since(mailbox_id, 0)
        assert uid in changes.expunged, (mailbox_id, uid, changes)

    queued = await stack.queue.list_recipients()
    assert [(r["id"], r["queue_id"], r["recipient"], r["state"]) for r in queued] == \
        [(r["id"], r["queue_id"], r["recipient"], r["state"])
         for r in tables["queue_recipients"]]
    for row in tables["queue_messages"]:
        content = await stack.blobs.read(row["blob_id"])
        assert content == blob_content(fixture, row["blob_id"])

    if not file_one:
        return
    # New mail after the old: the next UID, and (PostgreSQL) no id taken twice.
    inbox = next(box for box in tables["mailboxes"]
                 if box["name"] == "INBOX" and by_user[box["user_id"]].startswith("alice@"))
    ref = await stack.blobs.put(b"Subject: after the upgrade\r\n\r\nNew.\r\n")
    appended = await stack.mailstore.append(inbox["id"], ref, ["\\Seen"])
    assert appended.uid == inbox["uidnext"]


def addresses_domain(fixture: dict[str, Any], domain_id: int) -> str:
    return next(row["name"] for row in fixture["tables"]["domains"] if row["id"] == domain_id)
