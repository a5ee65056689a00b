"""`lightmail backup` and `lightmail restore` against real servers and databases.

A store is filled through a running `twistd -n lightmail` (SMTP, submission, IMAP),
backed up while it runs, restored into another database (SQLite, PostgreSQL,
MariaDB), and read back over IMAP from a second server on the restored store: the
same mailboxes, UIDVALIDITY, UIDs, flags, internal dates and bodies, the same
subscriptions, logins, app passwords and queue.
"""

from __future__ import annotations

import hashlib
import imaplib
import json
import os
import re
import resource
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from conftest import empty_database
from harness import ServerProcess, free_port, run_cli

LIGHTMAIL = [sys.executable, "-m", "lightmail.admin.cli"]
USER, PASSWORD = "ann@backup.test", "ann-secret"
OTHER, OTHER_PASSWORD = "bob@backup.test", "bob-secret"


def server_config(tmp: Path, name: str, url: str, extra: str = "") -> Path:
    """A server on ``url`` whose state lives in ``tmp/name``."""
    state = tmp / name
    state.mkdir()
    path = tmp / f"{name}.conf"
    path.write_text(
        f"[server]\nstate_dir = {state}\nhostname = mx.backup.test\nshutdown_timeout = 5s\n"
        f"[storage]\nurl = {url}\nblob_gc_grace = 0s\n"
        "[directory]\nauth_over_plaintext = yes\n"
        f"[outbound]\nrelay_host = [127.0.0.1]:{free_port()}\nmin_backoff = 1h\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:submission]\nprotocol = submission\n"
        "endpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n" + extra)
    return path


def cli(config: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIGHTMAIL, "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300, **kw)


def message(subject: str, body: str = "") -> bytes:
    """A message; ``body`` is cut into lines of 76 characters."""
    text = body or f"The body of {subject}"
    lines = "\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    return (f"From: Someone <someone@example.org>\r\nTo: {USER}\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject}@example.org>\r\n\r\n"
            f"{lines}.\r\n").encode()


def ok(result: tuple[str, Any]) -> Any:
    status, data = result
    assert status == "OK", data
    return data


def fill(ports: dict[str, int]) -> None:
    """Mail of every kind: delivered, appended with flags and keywords, moved,
    expunged, in folders (one unsubscribed), a deferred remote recipient."""
    with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=30) as smtp:
        for number in range(6):
            assert smtp.sendmail("someone@example.org", [USER], message(f"m{number}")) == {}
        assert smtp.sendmail("someone@example.org", [OTHER], message("for-bob")) == {}
    with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=30) as smtp:
        smtp.login(USER, PASSWORD)
        assert smtp.sendmail(USER, ["far@remote.example"], message("queued")) == {}
    imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
    try:
        ok(imap.login(USER, PASSWORD))
        ok(imap.create("Projects/&ANw-n&AO8-code"))
        ok(imap.create("Later"))
        ok(imap.unsubscribe("Later"))
        ok(imap.append("Projects/&ANw-n&AO8-code", r"(\Flagged $Important custom-kw)",
                       '"01-Feb-2021 10:20:30 +0000"', message("appended", "x" * 5000)))
        ok(imap.select("INBOX"))
        ok(imap.store("1:2", "+FLAGS", r"(\Seen)"))
        ok(imap.store("3", "+FLAGS", r"(\Answered $Label1)"))
        ok(imap.store("4", "+FLAGS", r"(\Deleted)"))
        ok(imap.expunge())
        ok(imap.copy("1", "Later"))
        ok(imap.uid("MOVE", "6", "Projects/&ANw-n&AO8-code"))
        ok(imap.create("Gone"))
        ok(imap.subscribe("Gone"))
        ok(imap.delete("Gone"))             # its subscription stays (RFC 9051 §6.3.7)
    finally:
        imap.logout()


_ITEM = {
    "uid": re.compile(rb"UID (\d+)"),
    "flags": re.compile(rb"FLAGS \(([^)]*)\)"),
    "date": re.compile(rb'INTERNALDATE "([^"]+)"'),
    "size": re.compile(rb"RFC822\.SIZE (\d+)"),
}


def imap_view(port: int, user: str, password: str) -> dict[str, Any]:
    """What a client sees of a user's mail: every mailbox's UIDVALIDITY, UIDNEXT and
    HIGHESTMODSEQ, and each message's UID, flags, internal date, size and body."""
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    view: dict[str, Any] = {}
    try:
        ok(imap.login(user, password))
        names = sorted(re.search(rb'"([^"]*)"$|(\S+)$', line).group(0).strip(b'"').decode()
                       for line in ok(imap.list()) if line)
        view["subscribed"] = sorted(line.decode() for line in ok(imap.lsub()) if line)
        for name in names:
            status = ok(imap.status(f'"{name}"',
                                    "(MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ)"))
            box: dict[str, Any] = {"status": status[0].decode().split(" ", 1)[1]}
            count = int(ok(imap.select(f'"{name}"', readonly=True))[0])
            messages = []
            if count:
                data = ok(imap.fetch("1:*", "(UID FLAGS INTERNALDATE RFC822.SIZE "
                                            "BODY.PEEK[])"))
                for part in data:
                    if not isinstance(part, tuple):
                        continue
                    head, body = part
                    found = {key: regex.search(head) for key, regex in _ITEM.items()}
                    messages.append({key: match.group(1).decode() if match else None
                                     for key, match in found.items()}
                                    | {"sha256": hashlib.sha256(body).hexdigest()})
                    # \Recent is the first session's to see a message, not the store's.
                    messages[-1]["flags"] = sorted(
                        flag for flag in messages[-1]["flags"].split() if flag != "\\Recent")
            box["messages"] = messages
            view[name] = box
    finally:
        imap.logout()
    return view


def queue_lines(config: Path) -> list[str]:
    """The queue as `lightmail queue list` shows it, without the attempt counters and
    errors (the restored server has not tried yet)."""
    return sorted("\t".join(line.split("\t")[:5]) for line in
                  run_cli(config, "queue", "list").splitlines()[:-1])


def prepare(config: Path) -> None:
    run_cli(config, "domain", "add", "backup.test")
    run_cli(config, "user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
    run_cli(config, "user", "add", OTHER, "--password-stdin", stdin=OTHER_PASSWORD + "\n")
    run_cli(config, "alias", "add", "postmaster@backup.test", USER)


@pytest.mark.slow
@pytest.mark.timeout(1200)   # many processes; minutes on a loaded machine
@pytest.mark.parametrize("source,target", [
    ("sqlite", "postgresql"), ("postgresql", "sqlite"), ("sqlite", "mariadb"),
    ("mariadb", "postgresql")])
def test_backup_of_a_running_server_restores_into_another_database(
        tmp_path: Path, source: str, target: str) -> None:
    with empty_database(source, tmp_path, "source") as source_url, \
            empty_database(target, tmp_path, "target") as target_url:
        config = server_config(tmp_path, "source", source_url)
        prepare(config)
        app_password = run_cli(config, "user", "app-password", "add", USER, "phone") \
            .splitlines()[-1]
        server = ServerProcess(config)
        try:
            ports = server.ports(expected=3)
            fill(ports)
            # The remote recipient has been tried (and deferred) before the backup.
            server.wait_for(r"status=deferred", timeout=60)
            before = {user: imap_view(ports["imap"], user, password)
                      for user, password in ((USER, PASSWORD), (OTHER, OTHER_PASSWORD))}
            queued = queue_lines(config)
            backup = tmp_path / "backup"
            result = cli(config, "backup", str(backup), "--json")
            assert result.returncode == 0, result.stderr
            summary = json.loads(result.stdout)
            # Still serving: the backup took nothing from it.
            assert imap_view(ports["imap"], USER, PASSWORD) == before[USER]
        finally:
            server.kill()
        assert summary["ok"] and summary["tables"]["messages"] == 8
        assert summary["tables"]["queue_messages"] == 1
        assert summary["tables"]["app_passwords"] == 1
        assert summary["tables"]["expunged"] == 2 and summary["tables"]["subscriptions"] == 1
        assert summary["blobs"] == summary["tables"]["blobs"] == 9   # one unreferenced
        assert not list((tmp_path / "backup").glob("*.partial"))
        assert "b64" in (backup / "tables" / "blobs.jsonl").read_text()   # headers

        restored = server_config(tmp_path, "restored", target_url)
        result = cli(restored, "restore", str(backup), "--json")
        assert result.returncode == 0, result.stderr
        done = json.loads(result.stdout)
        assert done["rows"] == summary["rows"] and done["blobs"] == summary["blobs"]
        server = ServerProcess(restored)
        try:
            ports = server.ports(expected=3)
            after = {user: imap_view(ports["imap"], user, password)
                     for user, password in ((USER, PASSWORD), (OTHER, OTHER_PASSWORD))}
            assert after == before
            assert queue_lines(restored) == queued
            # The app password and the alias came along.
            imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
            ok(imap.login(USER, app_password))
            imap.logout()
            with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=30) as smtp:
                smtp.sendmail("someone@example.org", ["postmaster@backup.test"],
                              message("after-restore"))
            # New rows get new ids (PostgreSQL's sequences went on after the restored).
            imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
            ok(imap.login(USER, PASSWORD))
            ok(imap.create("After-the-restore"))
            count = int(ok(imap.select("INBOX"))[0])
            assert count == len(before[USER]["INBOX"]["messages"]) + 1
            imap.logout()
        finally:
            server.kill()


@pytest.mark.timeout(1200)   # many processes; minutes on a loaded machine
def test_restore_refuses_a_full_database_or_another_revision(tmp_path: Path) -> None:
    config = server_config(tmp_path, "source", f"sqlite:///{tmp_path / 'source.db'}")
    prepare(config)
    backup = tmp_path / "backup"
    assert cli(config, "backup", str(backup)).returncode == 0
    # Into itself: not empty.
    result = cli(config, "restore", str(backup))
    assert result.returncode == 1
    assert "the database is not empty (aliases 1, domains 1, users 2)" in result.stderr
    assert "--replace" in result.stderr
    # --replace: what it held is replaced by the backup.
    run_cli(config, "domain", "add", "extra.test")
    result = cli(config, "restore", str(backup), "--replace", "--json")
    assert result.returncode == 0, result.stderr
    assert run_cli(config, "domain", "list").split() == ["backup.test"]
    # A database at another schema revision.
    other = server_config(tmp_path, "other", f"sqlite:///{tmp_path / 'other.db'}")
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    from lightmail.storage import migrate
    migrate.upgrade(engine, "0005")
    engine.dispose()
    result = cli(other, "restore", str(backup))
    assert result.returncode == 1
    head = migrate.head_revision()
    assert result.stderr.strip() == (
        f"lightmail: the database's schema is at revision 0005 and the backup's at "
        f"{head}: restore into an empty database (it is made at {head}, filled, then "
        "upgraded)")
    # A backup of an older revision goes into an empty database and is upgraded.
    old = tmp_path / "old-backup"
    result = cli(other, "backup", str(old), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema_revision"] == "0005"
    fresh = server_config(tmp_path, "fresh", f"sqlite:///{tmp_path / 'fresh.db'}")
    result = cli(fresh, "restore", str(old), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema_now"] == migrate.head_revision()
    # A backup from a newer LightMail.
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["schema_revision"] = "9999"
    (backup / "manifest.json").write_text(json.dumps(manifest))
    result = cli(fresh, "restore", str(backup), "--replace")
    assert result.returncode == 1
    assert "schema revision 9999 is unknown to this LightMail" in result.stderr
    # Not a backup at all, or an unfinished one.
    (backup / "manifest.json").unlink()
    result = cli(fresh, "restore", str(backup), "--json")
    assert result.returncode == 1 and "has no manifest.json" in result.stderr
    assert json.loads(result.stdout)["ok"] is False


@pytest.mark.timeout(1200)   # many processes; minutes on a loaded machine
def test_restore_checks_every_blob(tmp_path: Path) -> None:
    config = server_config(tmp_path, "source", f"sqlite:///{tmp_path / 'source.db'}")
    prepare(config)
    server = ServerProcess(config)
    try:
        ports = server.ports(expected=3)
        with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=30) as smtp:
            smtp.sendmail("someone@example.org", [USER], message("one"))
    finally:
        server.kill()
    backup = tmp_path / "backup"
    assert cli(config, "backup", str(backup)).returncode == 0
    [blob] = (backup / "blobs").glob("*/*")
    blob.write_bytes(blob.read_bytes().replace(b"one", b"two"))
    target = server_config(tmp_path, "target", f"sqlite:///{tmp_path / 'target.db'}")
    result = cli(target, "restore", str(backup))
    assert result.returncode == 1
    assert f"blob {blob.name} in the backup is damaged" in result.stderr
    # Nothing was committed, and no temporary file is left.
    assert "0 recipients" in run_cli(target, "queue", "list")
    assert run_cli(target, "domain", "list") == ""
    assert list((tmp_path / "target" / "blobs" / "tmp").iterdir()) == []
    blob.unlink()
    result = cli(target, "restore", str(backup))
    assert result.returncode == 1
    assert f"the backup lacks blob {blob.name}" in result.stderr


def test_backup_refuses_an_existing_directory(tmp_path: Path) -> None:
    config = server_config(tmp_path, "source", f"sqlite:///{tmp_path / 'source.db'}")
    prepare(config)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("mine")
    result = cli(config, "backup", str(tmp_path / "used"))
    assert result.returncode == 1
    assert "exists already: give a new directory" in result.stderr
    assert (tmp_path / "used" / "file").read_text() == "mine"


# --- consistency under load ------------------------------------------------------------

class Sender(threading.Thread):
    """Sends messages to the MX, one connection after another, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.sent = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
                    for _ in range(20):
                        smtp.sendmail("someone@example.org", [USER],
                                      message(f"load-{self.sent}", "y" * (self.sent % 4000)))
                        self.sent += 1
        except BaseException as exc:
            self.error = exc


def store_is_consistent(db: Path, blobs: Path) -> tuple[int, int]:
    """Every message and queued message has its blob, whole; each blob's reference
    count is what refers to it.  (messages, blobs)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        refs: dict[str, int] = {}
        for (blob_id,) in conn.execute("select blob_id from messages union all "
                                       "select blob_id from queue_messages"):
            refs[blob_id] = refs.get(blob_id, 0) + 1
        counted = dict(conn.execute("select id, refcount from blobs where refcount > 0"))
        messages = conn.execute("select count(*) from messages").fetchone()[0]
    finally:
        conn.close()
    assert counted == refs
    for blob_id in refs:
        content = (blobs / "objects" / blob_id[:2] / blob_id).read_bytes()
        assert hashlib.sha256(content).hexdigest() == blob_id
    return messages, len(refs)


@pytest.mark.slow
@pytest.mark.timeout(1200)   # many processes; minutes on a loaded machine
def test_backup_while_mail_is_delivered_is_consistent(tmp_path: Path) -> None:
    config = server_config(tmp_path, "source", f"sqlite:///{tmp_path / 'source.db'}")
    prepare(config)
    server = ServerProcess(config)
    sender = None
    try:
        ports = server.ports(expected=3)
        sender = Sender(ports["mx"])
        sender.start()
        deadline = time.monotonic() + 60
        while sender.sent < 300 and time.monotonic() < deadline and sender.error is None:
            time.sleep(0.05)
        started_with = sender.sent
        result = cli(config, "backup", str(tmp_path / "backup"), "--json")
        assert result.returncode == 0, result.stderr
        ended_with = sender.sent
    finally:
        if sender is not None:
            sender.stop.set()
            sender.join(60)
        server.kill()
    assert sender.error is None, sender.error
    summary = json.loads(result.stdout)
    # Mail went on arriving while the backup ran, and the snapshot holds a moment
    # within it: what had been accepted when it began, not all that came later.
    snapshot = summary["tables"]["messages"]
    assert started_with <= snapshot <= ended_with + 1, (started_with, snapshot, ended_with)
    assert ended_with > started_with
    target = server_config(tmp_path, "target", f"sqlite:///{tmp_path / 'target.db'}")
    result = cli(target, "restore", str(tmp_path / "backup"))
    assert result.returncode == 0, result.stderr
    messages, blobs = store_is_consistent(tmp_path / "target.db",
                                          tmp_path / "target" / "blobs")
    assert messages == snapshot and blobs == summary["blobs"]


# --- a target that runs out of space ---------------------------------------------------

def small_filesystem(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path``; False where mounting is not allowed."""
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                             str(path)], capture_output=True, text=True)
    return result.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(1200)   # many processes; minutes on a loaded machine
@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_a_backup_that_runs_out_of_space_fails_cleanly_and_the_server_goes_on(
        tmp_path: Path, how: str) -> None:
    """A full disk: a 256 KB tmpfs where this process may mount one (root); and a
    file size limit on the backup's process (RLIMIT_FSIZE: its writes get EFBIG), which
    works anywhere and stands in for the tmpfs where mounting is not allowed."""
    config = server_config(tmp_path, "source", f"sqlite:///{tmp_path / 'source.db'}")
    prepare(config)
    server = ServerProcess(config)
    full = tmp_path / "full"
    mounted = how == "tmpfs" and small_filesystem(full, "256k")
    if not mounted:
        full.mkdir(exist_ok=True)
        print("out of space: RLIMIT_FSIZE 64 KB" + (" (no tmpfs: mounting is not "
                                                      "allowed here)" if how == "tmpfs"
                                                      else ""))
    try:
        ports = server.ports(expected=3)
        with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=30) as smtp:
            for number in range(40):        # about 400 KB
                smtp.sendmail("someone@example.org", [USER],
                              message(f"big-{number}", "z" * 10000))
            smtp.sendmail("someone@example.org", [USER], message("bigger", "w" * 100000))
        if mounted:
            result = cli(config, "backup", str(full / "backup"))
        else:
            def limited() -> None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
            result = cli(config, "backup", str(full / "backup"), preexec_fn=limited)
        assert result.returncode == 1
        assert "the backup's target ran out of space" in result.stderr, result.stderr
        assert f"the partial backup {full / 'backup'} was removed" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (full / "backup").exists()
        # The server goes on: it takes and serves mail.
        with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=30) as smtp:
            assert smtp.sendmail("someone@example.org", [USER], message("after")) == {}
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
        ok(imap.login(USER, PASSWORD))
        assert int(ok(imap.select("INBOX"))[0]) == 42
        imap.logout()
        # And a backup where there is room works.
        assert cli(config, "backup", str(tmp_path / "roomy")).returncode == 0
    finally:
        server.kill()
        if mounted:
            subprocess.run(["umount", "-l", str(full)], check=False)


# --- the snapshot and the pin ------------------------------------------------------------

def test_the_snapshot_sees_one_moment(db_url: str) -> None:
    from lightmail.admin.backup import snapshot
    from lightmail.storage import migrate
    from lightmail.storage.database import create_engine
    engine = create_engine(db_url, pool_size=2)
    mysql = engine.dialect.name == "mysql"
    try:
        migrate.upgrade(engine)
        insert = sa.text("INSERT INTO domains (name, created) VALUES (:n, 0)")
        count = sa.text("SELECT count(*) FROM domains")
        with engine.begin() as conn:
            conn.execute(insert, {"n": "before.test"})
        with snapshot(engine) as conn:
            if mysql:
                # MariaDB's consistent snapshot is taken at START TRANSACTION, not at
                # the first read (SQLite's and PostgreSQL's first read comes next).
                with engine.begin() as other:
                    other.execute(insert, {"n": "early.test"})
            first = conn.execute(count).scalar_one()
            with engine.begin() as other:
                other.execute(insert, {"n": "later.test"})
            assert conn.execute(count).scalar_one() == first == 1
            if engine.dialect.name != "sqlite":     # SQLite's is read-only by our use
                with pytest.raises(sa.exc.DBAPIError, match=r"(?i)read.only"):
                    conn.execute(insert, {"n": "inside.test"})
        with engine.connect() as conn:
            assert conn.execute(count).scalar_one() == (3 if mysql else 2)
    finally:
        engine.dispose()


def test_a_pin_puts_garbage_collection_off(sqlite_stack: Any) -> None:
    blobs = sqlite_stack.blobs
    with blobs.collecting_now() as free:
        assert free
    with blobs.pin_now():
        with blobs.collecting_now() as free:
            assert not free
        with blobs.pin_now():           # pins share
            pass
    with blobs.collecting_now() as free:
        assert free


@pytest_twisted.inlineCallbacks
def test_garbage_collection_waits_while_the_store_is_pinned(sqlite_stack: Any) -> Any:
    stack = sqlite_stack
    user = yield stack.directory.add_domain("example.test").addCallback(
        lambda _: stack.directory.add_user("bob@example.test", None))
    box = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    expunged = yield stack.blobs.put(message("expunged"))
    orphan = yield stack.blobs.put(message("never referenced"))
    yield stack.mailstore.append(box.id, expunged)
    yield stack.mailstore.expunge(box.id, [1])
    time.sleep(0.05)
    with stack.blobs.pin_now():
        assert (yield stack.mailstore.collect_garbage(0)) == 0
        assert stack.blobs.exists_now(expunged.id) and stack.blobs.exists_now(orphan.id)
    assert (yield stack.mailstore.collect_garbage(0)) == 2
    assert not stack.blobs.exists_now(expunged.id)


def test_a_pin_held_by_another_process_puts_collection_off(tmp_path: Path,
                                                          sqlite_stack: Any) -> None:
    code = ("import sys, time\n"
            "from lightmail.storage.blobs import FilesystemBlobStore\n"
            f"store = FilesystemBlobStore({str(sqlite_stack.blobs.root)!r}, None)\n"
            "with store.pin_now():\n"
            "    print('pinned', flush=True)\n"
            "    sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout is not None and child.stdout.readline() == "pinned\n"
        with sqlite_stack.blobs.collecting_now() as free:
            assert not free
    finally:
        child.communicate("\n", timeout=30)
    with sqlite_stack.blobs.collecting_now() as free:
        assert free


def test_progress_shows_on_a_terminal_only() -> None:
    import io

    from lightmail.admin.datatools import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        progress = Progress(stream)
        progress.start("blobs", 4)
        progress.advance(1)
        progress.advance(3)
        progress.start("rows")
        progress.advance(7)
        progress.finish()
        text = stream.getvalue()
        if shown:
            assert "\rblobs: 4/4 [" in text and "100%" in text and "\rrows: 7 " in text
            assert text.endswith("\n") and text.count("\n") == 2
        else:
            assert text == ""
