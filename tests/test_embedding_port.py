"""An embedder's own write port (docs/embedding.rst, "Your own write port"): SMTP and IMAP
run over docs/examples/write_port.py, and every write goes through it."""

from __future__ import annotations

import hashlib
import imaplib
import importlib.util
import smtplib
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytest_twisted
from inprocess import in_thread
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from lightmail.config import parse_config
from lightmail.service import get_services, makeService
from lightmail.storage.interfaces import IWritePort

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "write_port.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lightmail_example_write_port", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # as an import would
    spec.loader.exec_module(module)
    return module


ArchivingWritePort = _example().ArchivingWritePort

SENT = (b"From: Alice <alice@example.org>\r\nTo: bob@example.test\r\n"
        b"Subject: over smtp\r\nMessage-ID: <smtp-1@example.org>\r\n"
        b"\r\nFiled through the embedder's port.\r\n")
APPENDED = (b"From: Bob <bob@example.test>\r\nTo: bob@example.test\r\n"
            b"Subject: over imap\r\nMessage-ID: <imap-1@example.test>\r\n"
            b"\r\nAppended through the embedder's port.\r\n")


def test_the_documented_port_is_the_example() -> None:
    # embedding.rst shows the example module's code (after its docstring) verbatim.
    doc = (REPO / "docs" / "embedding.rst").read_text()
    start = doc.index(".. code-block:: python\n\n", doc.index("Your own write port"))
    lines = []
    for line in doc[start:].splitlines(True)[2:]:
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    shown = textwrap.dedent("".join(lines)).strip()
    code = EXAMPLE.read_text()
    assert shown == code[code.index("from __future__"):].strip()


def _config(tmp: Path, direct_delivery: bool) -> Any:
    return parse_config(
        f"[server]\nstate_dir = {tmp / 'state'}\nhostname = mx.example.test\n"
        "shutdown_timeout = 2s\n"
        "[directory]\nauth_over_plaintext = yes\n"
        f"[smtp]\ndirect_delivery = {'yes' if direct_delivery else 'no'}\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n",
        str(tmp / "lm.conf"))


def _smtp(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        refused = client.sendmail("alice@example.org", ["bob@example.test"], SENT)
        assert refused == {}


def ok(result: tuple[str, Any]) -> Any:
    status, data = result
    assert status == "OK", data
    return data


def _imap(port: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    try:
        ok(imap.login("bob@example.test", "bob-secret"))
        # A copy: imaplib adds later EXISTS responses to the list it returned.
        out["select"] = list(ok(imap.select("INBOX")))
        out["fetch"] = ok(imap.fetch("1", "(BODY.PEEK[])"))
        out["store"] = ok(imap.store("1", "+FLAGS", "(\\Seen)"))
        out["append"] = ok(imap.append("INBOX", "(\\Flagged)", None, APPENDED))
        out["after_append"] = ok(imap.fetch("1:*", "(UID FLAGS)"))
        ok(imap.create("Kept"))
        out["copy"] = ok(imap.copy("1", "Kept"))
        out["move"] = ok(imap.uid("MOVE", "2", "Kept"))
        ok(imap.store("1", "+FLAGS.SILENT", "(\\Deleted)"))
        out["expunge"] = ok(imap.expunge())
        out["inbox"] = ok(imap.status("INBOX", "(MESSAGES)"))
        out["kept"] = ok(imap.status("Kept", "(MESSAGES)"))
        ok(imap.select("Kept"))
        out["kept_messages"] = ok(imap.fetch("1:*", "(FLAGS BODY.PEEK[])"))
    finally:
        imap.logout()
    return out


@pytest.mark.parametrize("direct_delivery", [True, False],
                         ids=["filed-at-acceptance", "queued"])
@pytest_twisted.inlineCallbacks
def test_smtp_and_imap_write_through_the_embedders_port(
        tmp_path: Path, direct_delivery: bool) -> Any:
    ports: list[Any] = []

    def archiving(engine: IWritePort) -> IWritePort:
        port = ArchivingWritePort(engine)
        ports.append(port)
        return port

    root = makeService(_config(tmp_path, direct_delivery), write_port=archiving)
    parts = get_services(root)
    [port] = ports
    assert parts.write_port is port and verifyObject(IWritePort, port)
    assert IWritePort.providedBy(port.inner) and port.inner is not port
    root.startService()
    try:
        yield parts.storage.ready
        listening = {}
        for name in ("mx", "imap"):
            listener = yield root.getServiceNamed(f"listener:{name}").listening
            listening[name] = listener.getHost().port
        yield parts.directory.add_domain("example.test")
        bob = yield parts.directory.add_user("bob@example.test", "bob-secret")

        yield in_thread(_smtp, listening["mx"])
        inbox = yield parts.mailstore.get_or_create_mailbox(bob.id, "INBOX")
        smtp_blob = yield _one_message(parts, inbox.id)

        out = yield in_thread(_imap, listening["imap"])
    finally:
        yield root.stopService()

    # What the IMAP client saw.
    assert out["select"] == [b"1"]
    assert out["fetch"][0][1].endswith(SENT)      # after LightMail's Received: header
    assert b"\\Seen" in out["store"][0]
    assert b"APPENDUID" in out["append"][0]
    first, second = out["after_append"]
    assert first.startswith(b"1 (UID 1 FLAGS (") and b"\\Seen" in first
    assert second.startswith(b"2 (UID 2 FLAGS (") and b"\\Flagged" in second
    assert b"COPYUID" in out["copy"][0]
    assert out["inbox"][0].endswith(b"(MESSAGES 0)")
    assert out["kept"][0].endswith(b"(MESSAGES 2)")
    bodies = [x[1] for x in out["kept_messages"] if isinstance(x, tuple)]
    assert bodies[0].endswith(SENT) and bodies[1] == APPENDED

    # What the port saw: the SMTP message and the APPEND archived once durable...
    appended_blob = hashlib.sha256(APPENDED).hexdigest()
    assert set(port.archive) == {smtp_blob, appended_blob}
    [smtp_record] = port.archive[smtp_blob]
    if direct_delivery:
        assert smtp_record == "accepted bob@example.test/INBOX uid=1"
    else:
        assert smtp_record.startswith("queued ")
    [append_record] = port.archive[appended_blob]
    assert append_record.startswith(f"appended mailbox={inbox.id} uid=2")

    # ... and every other write in the journal, in order.
    ops = [entry[0] for entry in port.journal]
    assert ops == ((["file_queued"] if not direct_delivery else [])
                   + ["set_flags", "copy", "move", "set_flags", "expunge"])
    if not direct_delivery:
        _, queue_id, filed = port.journal[0]
        assert smtp_record == f"queued {queue_id}"
        assert filed.placed == ("bob@example.test/INBOX uid=1",)
    store = port.journal[ops.index("set_flags")]
    assert store[1:4] == (inbox.id, ("\\Seen",), "add")
    [changed] = store[4]
    assert changed.uid == 1 and "\\Seen" in changed.flags
    expunge = port.journal[-1]
    assert expunge[1:] == (inbox.id, [1])


@defer.inlineCallbacks
def _one_message(parts: Any, mailbox_id: int) -> Any:
    """The blob id of the one message in the mailbox, once there (the queue runner
    files it a moment after SMTP's 250 when direct delivery is off)."""
    from twisted.internet import reactor
    for _ in range(200):
        messages = yield parts.mailstore.list_messages(mailbox_id)
        if messages:
            [message] = messages
            return message.blob_id
        parts.queue_runner.kick()
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("the SMTP message never reached INBOX")


def test_a_write_port_of_the_application_refuses_worker_processes(tmp_path: Path) -> None:
    """Workers are wired from the configuration file, in processes of their own: the
    application's port could not reach them, and their writes would go past it."""
    config_file = tmp_path / "lightmail.conf"
    config_file.write_text(f"[server]\nstate_dir = {tmp_path / 'state'}\nworkers = 2\n")
    from lightmail.config import load_config
    with pytest.raises(ValueError, match="workers = 0"):
        makeService(load_config(config_file), write_port=ArchivingWritePort)
