"""`lightmail import` and `lightmail export` with real peers: a Maildir that Dovecot
wrote (LMTP deliveries, IMAP APPEND and STORE) imported and read back over IMAP from a
`twistd -n lightmail` with the same flags, keywords, dates and bodies; an export that
Dovecot serves over IMAP as LightMail did (UIDs and UIDVALIDITY too); mbox files as
Python's mailbox module and mutt write them; and memory that does not grow with the
size of the mailbox."""

from __future__ import annotations

import hashlib
import imaplib
import json
import mailbox
import os
import re
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
import twisted.mail.imap4  # noqa: F401  (registers the imap4-utf-7 codec)
from dovecot import DovecotInstance
from harness import ServerProcess, run_cli

LIGHTMAIL = [sys.executable, "-m", "lightmail.admin.cli"]
USER, PASSWORD = "alice@dovecot.test", "alice-secret"


def lightmail_config(tmp: Path) -> Path:
    path = tmp / "lm.conf"
    path.write_text(
        f"[server]\nstate_dir = {tmp / 'state'}\nhostname = mx.dovecot.test\n"
        "shutdown_timeout = 5s\n"
        "[directory]\nauth_over_plaintext = yes\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n")
    run_cli(path, "domain", "add", "dovecot.test")
    run_cli(path, "user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIGHTMAIL, "--config", str(config), *args],
                          capture_output=True, text=True, timeout=600)


def ok(result: tuple[str, Any]) -> Any:
    status, data = result
    assert status == "OK", data
    return data


def message(subject: str, body: str = "") -> bytes:
    """A message; ``body`` is cut into lines of 76 characters."""
    text = body or f"The body of {subject}"
    lines = "\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    return (f"From: Someone <someone@example.org>\r\nTo: {USER}\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject}@example.org>\r\n\r\n"
            f"{lines}.\r\n").encode()


_ITEM = {
    "uid": re.compile(rb"UID (\d+)"),
    "flags": re.compile(rb"FLAGS \(([^)]*)\)"),
    "date": re.compile(rb'INTERNALDATE "([^"]+)"'),
}
_LIST = re.compile(rb'\((?P<attrs>[^)]*)\) (?:"(?P<sep>[^"]*)"|NIL) (?P<name>.+)$')


def imap_view(port: int, user: str = USER, password: str = PASSWORD,
              uids: bool = False) -> dict[str, Any]:
    """Each mailbox (by its name with '/' between levels, decoded) and its messages in
    order: flags (without \\Recent), internal date, the SHA-256 of the body; with
    ``uids``, also each UID and the mailbox's UIDVALIDITY."""
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    view: dict[str, Any] = {}
    try:
        ok(imap.login(user, password))
        for line in ok(imap.list()):
            match = _LIST.match(line)
            assert match, line
            if b"\\Noselect" in match.group("attrs") or b"\\NonExistent" in \
                    match.group("attrs"):
                continue
            raw = match.group("name").decode().strip('"')
            sep = (match.group("sep") or b"/").decode()
            name = raw.encode().decode("imap4-utf-7").replace(sep, "/")
            count = int(ok(imap.select(f'"{raw}"', readonly=True))[0])
            box: dict[str, Any] = {}
            if uids:
                box["uidvalidity"] = imap.response("UIDVALIDITY")[1][0].decode()
            messages = []
            if count:
                for part in ok(imap.fetch("1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[])")):
                    if not isinstance(part, tuple):
                        continue
                    head, body = part
                    found = {key: regex.search(head) for key, regex in _ITEM.items()}
                    assert all(found.values()), head
                    one = {"flags": sorted(flag for flag in
                                           found["flags"].group(1).decode().split()
                                           if flag != "\\Recent"),
                           "date": found["date"].group(1).decode(),
                           "sha256": hashlib.sha256(body).hexdigest()}
                    if uids:
                        one["uid"] = int(found["uid"].group(1))
                    messages.append(one)
            box["messages"] = messages
            view[name] = box
    finally:
        imap.logout()
    return view


@pytest.fixture
def dovecot() -> Iterator[DovecotInstance]:
    instance = DovecotInstance()
    instance.add_user(USER, PASSWORD)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def fill_dovecot(dovecot: DovecotInstance) -> None:
    """Mail as Dovecot writes it: LMTP deliveries, then folders, APPENDs with flags,
    keywords and dates, and STOREs that rename the files."""
    with smtplib.LMTP("127.0.0.1", dovecot.lmtp_port, timeout=30) as lmtp:
        for number in range(5):
            assert lmtp.sendmail("someone@example.org", [USER],
                                 message(f"delivered-{number}", "line " * number)) == {}
    imap = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=30)
    try:
        ok(imap.login(USER, PASSWORD))
        ok(imap.create("Work"))
        ok(imap.create("Work.Caf&AOk-"))
        ok(imap.append("Work", r"(\Seen \Flagged $Label1 project-x)",
                       '"01-Feb-2021 10:20:30 +0000"', message("appended-1")))
        ok(imap.append("Work.Caf&AOk-", r"(\Draft)", '"02-Mar-2019 01:02:03 +0100"',
                       message("appended-2", "x" * 3000)))
        ok(imap.select("INBOX"))
        ok(imap.store("1:2", "+FLAGS", r"(\Seen)"))
        ok(imap.store("3", "+FLAGS", r"(\Answered $Work)"))
        ok(imap.store("4", "+FLAGS", r"(\Draft \Flagged)"))
        ok(imap.store("5", "+FLAGS", r"(\Deleted $Label1)"))
    finally:
        imap.logout()


@pytest.mark.slow
@pytest.mark.timeout(1200)   # many processes; minutes on a loaded machine
def test_a_maildir_dovecot_wrote_is_imported_with_its_flags_keywords_and_dates(
        tmp_path: Path, dovecot: DovecotInstance) -> None:
    fill_dovecot(dovecot)
    expected = imap_view(dovecot.imap_port)
    assert set(expected) == {"INBOX", "Work", "Work/Café"}
    assert expected["INBOX"]["messages"][2]["flags"] == ["$Work", "\\Answered"]
    config = lightmail_config(tmp_path)
    result = cli(config, "import", USER, str(dovecot.maildir(USER)), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["mailboxes"] == {"INBOX": 5, "Work": 1, "Work/Café": 1}
    assert summary["messages"] == 7
    server = ServerProcess(config)
    try:
        ports = server.ports(expected=2)
        seen = imap_view(ports["imap"])
    finally:
        server.kill()
    # LightMail makes the special-use mailboxes (Sent, Drafts...) for a new user.
    assert {name: box for name, box in seen.items() if name in expected} == expected
    assert all(not box["messages"] for name, box in seen.items() if name not in expected)


@pytest.mark.slow
@pytest.mark.timeout(1200)   # many processes; minutes on a loaded machine
def test_an_export_is_served_by_dovecot_as_lightmail_served_it(
        tmp_path: Path, dovecot: DovecotInstance) -> None:
    config = lightmail_config(tmp_path)
    server = ServerProcess(config)
    try:
        ports = server.ports(expected=2)
        with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=30) as smtp:
            for number in range(4):
                assert smtp.sendmail("someone@example.org", [USER],
                                     message(f"smtp-{number}")) == {}
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
        try:
            ok(imap.login(USER, PASSWORD))
            ok(imap.create("Projects/&ANw-n&AO8-code"))
            ok(imap.create("Archive/2020"))
            ok(imap.append("Projects/&ANw-n&AO8-code", r"(\Flagged $Important later)",
                           '"01-Feb-2021 10:20:30 +0000"', message("appended", "y" * 4000)))
            ok(imap.append("Archive/2020", r"(\Seen \Answered)",
                           '"24-Dec-2020 23:59:59 -0500"', message("old")))
            ok(imap.select("INBOX"))
            ok(imap.store("1", "+FLAGS", r"(\Seen $Label2)"))
            ok(imap.store("2", "+FLAGS", r"(\Deleted)"))
            ok(imap.expunge())                  # a gap in the UIDs
            ok(imap.store("2", "+FLAGS", r"(\Draft)"))
        finally:
            imap.logout()
        expected = imap_view(ports["imap"], uids=True)
        dest = tmp_path / "export"
        result = cli(config, "export", USER, str(dest), "--json")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
    finally:
        server.kill()
    assert summary["messages"] == 5 and summary["keywords_dropped"] == []
    # Dovecot's mail for the user is the export.
    maildir = dovecot.maildir(USER)
    maildir.parent.mkdir(parents=True, exist_ok=True)
    if maildir.exists():
        shutil.rmtree(maildir)
    shutil.copytree(dest, maildir)
    for path in [maildir.parent, *maildir.parent.rglob("*")]:
        os.chown(path, dovecot.uid, dovecot.gid)
    seen = imap_view(dovecot.imap_port, uids=True)
    # Dovecot shows every level of a hierarchy; LightMail has no mailbox "Projects".
    assert {name: box for name, box in seen.items() if name in expected} == expected
    assert set(expected) <= set(seen)


def write_mbox_by_python(path: Path) -> list[bytes]:
    """An mbox written by Python's mailbox module (mboxo: 'From ' lines in bodies
    quoted), with a flag in Status/X-Status as mail readers keep them."""
    box = mailbox.mbox(str(path))
    contents = []
    for number in range(3):
        text = message(f"py-{number}", "From the start of a line\r\nand more")
        msg = mailbox.mboxMessage(text)
        msg.set_from("someone@example.org", time.gmtime(1600000000 + number * 86400))
        if number == 1:
            msg.set_flags("RF")         # read, flagged
        box.add(msg)
        contents.append(text)
    box.close()
    return contents


MUTT_MBOX = (
    b"From someone@example.org Sat Jan  2 03:04:05 2021\n"
    b"From: Someone <someone@example.org>\n"
    b"Subject: by mutt\n"
    b"Status: RO\n"
    b"X-Status: AT\n"
    b"X-Keywords: $Label1 todo\n"
    b"\n"
    b">From me, with love\n"
    b">>From the other quoted\n"
    b"\n"
    b"From other@example.org Sun Jan  3 03:04:05 2021\n"
    b"From: Other <other@example.org>\n"
    b"Subject: second\n"
    b"\n"
    b"Short.\n"
    b"\n")


@pytest.mark.slow
@pytest.mark.timeout(1200)   # many processes; minutes on a loaded machine
def test_mbox_files_are_imported_with_their_flags_and_dates(tmp_path: Path) -> None:
    config = lightmail_config(tmp_path)
    python_box = tmp_path / "python.mbox"
    contents = write_mbox_by_python(python_box)
    result = cli(config, "import", USER, str(python_box), "--mailbox", "From Python",
                 "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mailboxes"] == {"From Python": 3}
    mutt = tmp_path / "mutt.mbox"
    mutt.write_bytes(MUTT_MBOX)
    result = cli(config, "import", USER, str(mutt))
    assert result.returncode == 0, result.stderr
    assert "imported 2 messages" in result.stdout
    not_mbox = tmp_path / "note.txt"
    not_mbox.write_text("Dear diary\n")
    result = cli(config, "import", USER, str(not_mbox))
    assert result.returncode == 1
    assert "not an mbox file: it does not begin with a 'From ' line" in result.stderr
    result = cli(config, "import", "nobody@dovecot.test", str(mutt))
    assert result.returncode == 1 and "no user nobody@dovecot.test" in result.stderr
    server = ServerProcess(config)
    try:
        ports = server.ports(expected=2)
        view = imap_view(ports["imap"])
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
        ok(imap.login(USER, PASSWORD))
        ok(imap.select("INBOX", readonly=True))
        first = ok(imap.fetch("1", "(BODY.PEEK[])"))[0][1]
        imap.logout()
    finally:
        server.kill()
    python_view = view["From Python"]["messages"]
    assert [m["sha256"] for m in python_view] == [hashlib.sha256(c).hexdigest()
                                                  for c in contents]
    assert [m["flags"] for m in python_view] == [[], ["\\Flagged", "\\Seen"], []]
    assert [m["date"] for m in python_view] == [
        "13-Sep-2020 12:26:40 +0000", "14-Sep-2020 12:26:40 +0000",
        "15-Sep-2020 12:26:40 +0000"]
    inbox = view["INBOX"]["messages"]
    assert [m["flags"] for m in inbox] == [
        ["$Label1", "\\Answered", "\\Draft", "\\Seen", "todo"], []]
    assert inbox[0]["date"] == "02-Jan-2021 03:04:05 +0000"
    # The mbox's bookkeeping is gone, the quoting undone, and the lines end in CRLF.
    assert first == (b"From: Someone <someone@example.org>\r\nSubject: by mutt\r\n\r\n"
                     b"From me, with love\r\n>From the other quoted\r\n")


# --- memory ----------------------------------------------------------------------------

# The listing's pieces are made small, so that both counts below sort on disk alike.
PEAK = ("import sys, tracemalloc\n"
        # Alembic is imported when the tool first migrates the new database
        # (lightmail.storage.migrate): before the measure, as the tool's own modules
        # are, so that the peak is the work's.
        "import alembic.command, alembic.config, alembic.script\n"
        "tracemalloc.start()\n"
        "from lightmail.admin import maildir\n"
        "maildir.SORT_CHUNK = 500\n"
        "from lightmail.admin.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('peak', tracemalloc.get_traced_memory()[1], file=sys.stderr)\n"
        "sys.exit(code)\n")


def make_maildir(root: Path, count: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    (root / "dovecot-keywords").write_text("0 $Label1\n")
    body = ("A line of text that fills the message a little.\n" * 20).encode()
    for number in range(count):
        flags = "FSa" if number % 3 == 0 else "S" if number % 3 == 1 else ""
        path = root / "cur" / f"{1600000000 + number}.M{number}P1.host,S=1:2,{flags}"
        path.write_bytes(b"From: someone@example.org\nSubject: m%d\n\n" % number + body)


def peak_of(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run([sys.executable, "-c", PEAK, "--config", str(config), *args,
                             "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peak = int(re.search(r"peak (\d+)", result.stderr).group(1))
    return peak, json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.timeout(1200)   # many processes; minutes on a loaded machine
def test_memory_does_not_grow_with_the_mailbox(tmp_path: Path) -> None:
    """Import and export of 1,000 and of 10,000 messages: the larger takes no more
    memory than the smaller, give or take the batches in flight (measured: 0.3-0.4 MB;
    a list of the 9,000 more messages' names alone would be 1.3 MB, their index
    entries 3 MB).
    100,000: bench/datatools.py, docs/benchmarks.rst."""
    peaks = {}
    for count in (1000, 10000):
        root = tmp_path / str(count)
        root.mkdir()
        config = lightmail_config(root)
        make_maildir(root / "Maildir", count)
        imported, summary = peak_of(config, "import", USER, str(root / "Maildir"))
        assert summary["messages"] == count
        exported, summary = peak_of(config, "export", USER, str(root / "export"))
        assert summary["messages"] == count
        assert len(os.listdir(root / "export" / "cur")) == count
        peaks[count] = (imported, exported)
    small, large = peaks[1000], peaks[10000]
    print(f"peak Python memory: import {small[0]:,} -> {large[0]:,} octets, "
          f"export {small[1]:,} -> {large[1]:,} octets")
    assert large[0] - small[0] < 800_000, peaks
    assert large[1] - small[1] < 800_000, peaks


# --- the storage it goes through ----------------------------------------------------------

class Heard(list[Any]):
    def mailbox_changed(self, change: Any) -> None:
        self.append(change)


@pytest_twisted.inlineCallbacks
def test_append_many_files_in_order_in_one_transaction(stack: Any) -> Any:
    yield stack.directory.add_domain("example.test")
    user = yield stack.directory.add_user("bob@example.test", None)
    box = yield stack.mailstore.get_or_create_mailbox(user.id, "INBOX")
    first = yield stack.mailstore.append(box.id, (yield stack.blobs.put(message("first"))))
    heard = Heard()
    stack.feed.add_listener(heard)      # what IMAP sessions are told
    staged = []
    for number in range(5):
        writer = stack.blobs.writer()
        writer.write(message(f"batch-{number}"))
        staged.append(((yield writer.stage()), ["\\Seen", f"kw{number}"],
                       1600000000000 + number))
    # The same content twice: one blob, two references.
    writer = stack.blobs.writer()
    writer.write(message("batch-0"))
    staged.append(((yield writer.stage()), [], 1))
    appended = yield stack.port.append_many(box.id, staged)
    assert [a.uid for a in appended] == [2, 3, 4, 5, 6, 7]
    assert {a.modseq for a in appended} == {first.modseq + 1}
    assert all(blob.durable for blob, _, _ in staged)
    page = yield stack.mailstore.messages_page(box.id, 2, 3)
    assert [m.uid for m in page] == [3, 4, 5]
    assert page[0].flags == frozenset({"\\Seen", "kw1"})
    assert page[0].internal_date == 1600000000001
    assert (yield stack.mailstore.messages_page(box.id, 7, 10)) == []
    everything = yield stack.mailstore.list_messages(box.id)
    assert everything[1:] == (yield stack.mailstore.messages_page(box.id, 1, 100))
    assert everything[1].blob_id == everything[6].blob_id
    with stack.db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT refcount FROM blobs WHERE id = :b"),
                            {"b": everything[1].blob_id}).scalar() == 2
    [change] = [c for c in heard if c.kind == "appended"]
    assert change.uids == (2, 3, 4, 5, 6, 7) and len(change.messages) == 6
    box = yield stack.mailstore.get_mailbox(user.id, "INBOX")
    assert box.uidnext == 8 and box.highestmodseq == first.modseq + 1
    assert (yield stack.port.append_many(box.id, [])) == []


def test_maildir_names_flags_and_keywords(tmp_path: Path) -> None:
    from lightmail.admin import maildir
    assert maildir.folder_name(".Work.Caf&AOk-") == "Work/Café"
    assert maildir.directory_name("Work/Café") == ".Work.Caf&AOk-"
    assert maildir.directory_name("v1.2/notes") == ".v1_2.notes"
    assert maildir.folder_name(".inbox.Sub") == "INBOX/Sub"
    keywords = {"a": "$Label1", "b": "todo"}
    assert maildir.parse_flags("123.M1P2.host,S=10:2,FRSTab", keywords) == (
        "\\Flagged", "\\Answered", "\\Seen", "\\Deleted", "$Label1", "todo")
    assert maildir.parse_flags("123.M1P2.host:2,DPz", keywords) == ("\\Draft", "$Forwarded")
    assert maildir.parse_flags("123.M1P2.host", keywords) == ()
    # More names than fit in memory at once (SORT_CHUNK) come out sorted all the same.
    root = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    names = [f"{1600000000 + (n * 7919) % 10007}.M{n}P1.h" for n in range(10007)]
    for n, name in enumerate(names):
        (root / ("new" if n % 2 else "cur") / (name + ("" if n % 2 else ":2,S"))) \
            .write_bytes(b"x")
    found = [m.path.name.partition(":")[0] for m in maildir.messages(root)]
    assert found == sorted(names) and maildir.SORT_CHUNK < len(names)


def test_a_message_a_server_renames_meanwhile_is_found(tmp_path: Path) -> None:
    from lightmail.admin import maildir
    root = tmp_path / "Maildir"
    maildir.make_root(root)
    for number in range(3):
        (root / "new" / f"160000000{number}.M1P1.h").write_bytes(b"x")
    found = maildir.messages(root)
    first = next(found)
    # Dovecot moves a message to cur/ when a client sees it, and renames it when its
    # flags change; another is expunged.
    (root / "new" / "1600000001.M1P1.h").rename(root / "cur" / "1600000001.M1P1.h:2,S")
    (root / "new" / "1600000002.M1P1.h").unlink()
    rest = list(found)
    assert first.path.name == "1600000000.M1P1.h"
    assert [(m.path.name, m.flags) for m in rest] == [("1600000001.M1P1.h:2,S",
                                                       ("\\Seen",))]


def test_messages_come_in_the_order_they_arrived(tmp_path: Path) -> None:
    from lightmail.admin import maildir
    root = tmp_path / "Maildir"
    maildir.make_root(root)
    names = ["1600000000.M99999P7.h", "1600000000.M123456P7.h", "1600000001.M5P7.h",
             "1599999999.M1P7.h", "1600000002.qmail.h"]
    for name in names:
        (root / "cur" / (name + ":2,")).write_bytes(b"x")
    # Without Dovecot's UID list: by the time in the names (microseconds as numbers).
    assert [m.path.name.partition(":")[0] for m in maildir.messages(root)] == [
        "1599999999.M1P7.h", "1600000000.M99999P7.h", "1600000000.M123456P7.h",
        "1600000001.M5P7.h", "1600000002.qmail.h"]
    # With it: its UIDs first (Dovecot's order), then what it does not list.
    (root / "dovecot-uidlist").write_text(
        "3 V1600000000 N4 G0123456789abcdef\n"
        "1 :1600000001.M5P7.h\n"
        "2 W1234 :1600000000.M123456P7.h\n"
        "3 :1600000000.M1P1.gone\n")
    assert [m.path.name.partition(":")[0] for m in maildir.messages(root)] == [
        "1600000001.M5P7.h", "1600000000.M123456P7.h", "1599999999.M1P7.h",
        "1600000000.M99999P7.h", "1600000002.qmail.h"]
