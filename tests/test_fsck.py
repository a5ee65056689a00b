"""``lightmail fsck`` (issue 21, point 6) on SQLite, PostgreSQL and MariaDB: a store
damaged on purpose (a blob's bytes flipped, a blob deleted, a blob no row knows, a
mailbox's uidnext and highestmodseq set back, a reference count wrong, a row whose
parent is gone) is checked, each problem found, repaired, and checked clean again;
the mail is read back through the storage API."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa

from lightmail.storage import schema as s
from tests.conftest import StorageStack
from tests.harness import ServerProcess

LIGHTMAIL = [sys.executable, "-m", "lightmail.admin.cli"]
ONE = b"From: a@example.org\r\nSubject: one\r\n\r\nThe first message.\r\n"
TWO = b"From: a@example.org\r\nSubject: two\r\n\r\nThe second, in two mailboxes.\r\n"
GONE = b"From: a@example.org\r\nSubject: gone\r\n\r\nIts file will be deleted.\r\n"
STRAY = b"From: a@example.org\r\nSubject: stray\r\n\r\nNo row refers to me.\r\n"


def fsck(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIGHTMAIL, "--config", str(config), "fsck", *args],
                          capture_output=True, text=True, timeout=300)


def report(config: Path, *args: str, status: int) -> dict[str, Any]:
    result = fsck(config, "--json", *args)
    assert result.returncode == status, (result.stdout, result.stderr)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def make_store(stack: StorageStack) -> tuple[int, int]:
    """alice with INBOX (ONE, TWO, GONE) and Saved (TWO again)."""
    await stack.directory.add_domain("fsck.test")
    user = await stack.directory.add_user("alice@fsck.test", None)
    inbox = await stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    saved = await stack.mailstore.get_or_create_mailbox(user.id, "Saved")
    for content, box in ((ONE, inbox), (TWO, inbox), (GONE, inbox), (TWO, saved)):
        ref = await stack.blobs.put(content)
        await stack.mailstore.append(box.id, ref, ["\\Seen"])
    return inbox.id, saved.id


def without_foreign_keys(url: str, statement: str) -> None:
    """Run ``statement`` as something other than LightMail would: its foreign keys
    not enforced (SQLite's default, PostgreSQL's replica role, MariaDB's switch)."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET session_replication_role = replica")
            elif conn.dialect.name == "mysql":
                conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
            conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


@pytest_twisted.ensureDeferred
async def test_fsck_finds_and_repairs_a_damaged_store(db_url: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "lightmail.conf"
    config.write_text(f"[server]\nstate_dir = {state}\n[storage]\nurl = {db_url}\n")
    stack = StorageStack(db_url, state)
    try:
        inbox, saved = await make_store(stack)
        objects = stack.blobs.objects
    finally:
        stack.close()

    clean = fsck(config)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("fsck: 3 blobs (3 files, ")
    assert clean.stdout.rstrip().endswith("4 messages in 2 mailboxes: no problems")

    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        uidnext, highestmodseq = conn.execute(sa.select(
            s.mailboxes.c.uidnext, s.mailboxes.c.highestmodseq).where(
            s.mailboxes.c.id == inbox)).one()
    assert uidnext == 4

    # The damage.
    one = objects / sha(ONE)[:2] / sha(ONE)
    flipped = bytearray(ONE)
    flipped[-5] ^= 0x20                                 # "message" -> "messaGe"
    one.write_bytes(bytes(flipped))
    (objects / sha(GONE)[:2] / sha(GONE)).unlink()
    stray = objects / sha(STRAY)[:2] / sha(STRAY)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(STRAY)
    an_hour_ago = time.time() - 7200
    os.utime(stray, (an_hour_ago, an_hour_ago))         # past the GC grace period
    with engine.begin() as conn:
        conn.execute(s.mailboxes.update().where(s.mailboxes.c.id == inbox)
                     .values(uidnext=2, highestmodseq=1))
        conn.execute(s.blobs.update().where(s.blobs.c.id == sha(TWO))
                     .values(refcount=7))
    without_foreign_keys(db_url, "INSERT INTO expunged (mailbox_id, uid, modseq) "
                                 "VALUES (9999, 1, 1)")

    found = report(config, status=1)
    assert found["counts"] == {"corrupt-blob": 1, "missing-blob": 1, "orphan-blob": 1,
                               "uidnext": 1, "highestmodseq": 1, "refcount": 1,
                               "orphan-row": 1}
    by_kind = {f["kind"]: f for f in found["findings"]}
    assert by_kind["corrupt-blob"]["subject"] == sha(ONE)
    assert sha(bytes(flipped)) in by_kind["corrupt-blob"]["detail"]
    assert "alice@fsck.test/INBOX uid 1" in by_kind["corrupt-blob"]["detail"]
    assert by_kind["missing-blob"]["subject"] == sha(GONE)
    assert "alice@fsck.test/INBOX uid 3" in by_kind["missing-blob"]["detail"]
    assert by_kind["orphan-blob"]["subject"] == sha(STRAY)
    assert by_kind["uidnext"]["detail"] == "uidnext 2, but UID 3 exists"
    assert by_kind["refcount"]["detail"] == "reference count 7, referred to by 2"
    assert by_kind["orphan-row"]["subject"] == "expunged 9999/1"
    assert all(f["repaired"] is None for f in found["findings"])
    assert stray.exists() and one.exists()               # the check changed nothing

    repair = fsck(config, "--repair")
    assert repair.returncode == 1, repair.stderr          # the missing blob is left
    assert f"missing-blob {sha(GONE)}: " in repair.stdout
    assert "[NOT repaired]: kept: restore" in repair.stdout
    assert repair.stdout.count("[repaired]") == 6, repair.stdout
    assert "6 repaired, 1 left" in repair.stdout
    assert (state / "blobs" / "lost+found" / sha(STRAY)).read_bytes() == STRAY
    assert not stray.exists() and not one.exists()

    after = report(config, status=1)
    assert after["counts"] == {"missing-blob": 1}

    stack = StorageStack(db_url, state)
    try:
        box, infos = await stack.mailstore.select_mailbox(1, "INBOX")
        assert (box.uidnext, box.highestmodseq) == (uidnext, highestmodseq)
        assert [(i.uid, i.blob_id) for i in infos] == \
            [(1, sha(bytes(flipped))), (2, sha(TWO)), (3, sha(GONE))]
        # Kept, damaged as it is, under the name of what it holds.
        assert await stack.blobs.read(infos[0].blob_id) == bytes(flipped)
    finally:
        stack.close()
    with engine.connect() as conn:
        refcounts = dict(conn.execute(sa.select(s.blobs.c.id, s.blobs.c.refcount)).all())
    assert refcounts == {sha(bytes(flipped)): 1, sha(TWO): 2, sha(GONE): 1}

    result = fsck(config, "--expunge-missing")
    assert result.returncode == 2 and "goes with --repair" in result.stderr
    gone = report(config, "--repair", "--expunge-missing", status=0)
    assert gone["counts"] == {"missing-blob": 1} and gone["repaired"] == 1
    record = (state / "blobs" / "lost+found" / f"{sha(GONE)}.missing").read_bytes()
    assert b"mailbox=alice@fsck.test/INBOX" in record and b"uid=3" in record
    assert b"Subject: gone" in record                 # the header block SQL kept
    final = fsck(config)
    assert final.returncode == 0 and "no problems" in final.stdout, final.stdout
    stack = StorageStack(db_url, state)
    try:
        box, infos = await stack.mailstore.select_mailbox(1, "INBOX")
        assert [i.uid for i in infos] == [1, 2] and box.highestmodseq == highestmodseq + 1
        changes = await stack.mailstore.changes_since(inbox,
                                                                       highestmodseq)
        assert changes.expunged == [3]              # as an IMAP client will hear it
        _, kept = await stack.mailstore.select_mailbox(1, "Saved")
        assert [(i.mailbox_id, i.blob_id) for i in kept] == [(saved, sha(TWO))]
    finally:
        stack.close()
    engine.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fsck_repair_refuses_while_a_server_runs(db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "lightmail.conf"
    config.write_text(
        f"[server]\nstate_dir = {tmp_path / 'state'}\n[storage]\nurl = {db_url}\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n")
    server = ServerProcess(config)
    try:
        server.ports(expected=1, timeout=120)
        checked = fsck(config)
        assert checked.returncode == 0 and "no problems" in checked.stdout, checked.stderr
        refused = fsck(config, "--repair")
        assert refused.returncode == 1
        assert refused.stderr.startswith("lightmail: a LightMail server is running on ")
    finally:
        server.kill()
    assert fsck(config, "--repair").returncode == 0
