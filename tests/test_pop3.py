"""POP3 against real clients: raw commands, poplib, fetchmail and getmail6.

The maildrop is the INBOX; deletions happen only at QUIT, a dropped connection
deletes nothing, a second session finds the maildrop locked, and UIDLs are the IMAP
UIDs (with UIDVALIDITY), stable across sessions.
"""

from __future__ import annotations

import poplib
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from inprocess import Raw, in_thread, start
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from lightmail.storage.interfaces import MailboxChange

POP3 = ("[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n"
        "tls = starttls\ntls_cert = {cert}\ntls_key = {key}\n"
        "[listener:pop3s]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n"
        "tls = implicit\ntls_cert = {cert}\ntls_key = {key}\n"
        "[listener:pop3-plain]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n")


def message(number: int, extra: str = "") -> bytes:
    return (f"From: sender@example.org\r\nTo: bob@example.test\r\nSubject: pop-{number}\r\n"
            f"\r\nLine one of {number}\r\n.dot line\r\n{extra}last line\r\n").encode()


@defer.inlineCallbacks
def start_pop3(tmp: Path, extra: str = "", count: int = 3) -> Any:
    server = yield start(tmp, POP3.format(cert=tmp / "cert.pem", key=tmp / "key.pem")
                         + extra)
    parts = server.parts
    bob = yield parts.directory.get_user("bob@example.test")
    inbox = yield parts.mailstore.get_or_create_mailbox(bob.id, "INBOX")
    for number in range(count):
        blob = yield parts.blobs.put(message(number))
        yield parts.mailstore.append(inbox.id, blob)
    server.inbox_id = inbox.id
    return server


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


@pytest_twisted.inlineCallbacks
def test_poplib_reads_and_deletes_only_at_quit(tmp_path: Path) -> None:
    server = yield start_pop3(tmp_path, "[directory]\nauth_over_plaintext = yes\n")
    changes: list[MailboxChange] = []
    server.parts.mailstore.add_listener(type("L", (), {"mailbox_changed":
                                                       lambda self, c: changes.append(c)})())
    try:
        def first() -> dict[str, Any]:
            pop = poplib.POP3("127.0.0.1", server.ports["pop3-plain"], timeout=20)
            out: dict[str, Any] = {"welcome": pop.getwelcome()}
            out["capa"] = pop.capa()
            pop.user("bob@example.test")
            pop.pass_("bob-secret")
            out["stat"] = pop.stat()
            out["list"] = pop.list()[1]
            out["uidl"] = pop.uidl()[1]
            out["retr"] = pop.retr(2)[1]
            out["top"] = pop.top(1, 1)[1]
            pop.dele(1)
            out["stat_after_dele"] = pop.stat()
            out["retr_deleted"] = _error(lambda: pop.retr(1))
            out["changes_before_quit"] = len(changes)
            out["quit"] = pop.quit()
            return out
        out = yield in_thread(first)
        assert out["welcome"].startswith(b"+OK")
        for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER",
                    "SASL", "EXPIRE", "IMPLEMENTATION"):
            assert cap in out["capa"], out["capa"]
        size = len(message(0))
        assert out["stat"] == (3, 3 * size)
        assert out["list"] == [f"{n} {size}".encode() for n in (1, 2, 3)]
        assert out["uidl"][0].startswith(b"1 00000001") and len(out["uidl"][0]) == 18
        assert b"\r\n".join(out["retr"]) + b"\r\n" == message(1)     # un-stuffed by poplib
        assert out["top"] == [b"From: sender@example.org", b"To: bob@example.test",
                              b"Subject: pop-0", b"", b"Line one of 0"]
        assert out["stat_after_dele"] == (2, 2 * size)
        assert out["retr_deleted"].startswith("-ERR")
        assert out["changes_before_quit"] == 0                 # nothing until QUIT
        assert out["quit"].startswith(b"+OK")
        # The deletion happened at QUIT, as an expunge every session of the mailbox sees.
        expunged = [c for c in changes if c.kind == "expunged"]
        assert expunged and expunged[0].uids == (1,)

        def second() -> tuple[Any, Any]:
            pop = poplib.POP3("127.0.0.1", server.ports["pop3-plain"], timeout=20)
            pop.user("bob@example.test")
            pop.pass_("bob-secret")
            result = pop.stat(), pop.uidl()[1]
            pop.quit()
            return result
        stat, uidl = yield in_thread(second)
        assert stat == (2, 2 * size)
        # UIDLs stay with their messages: the numbers changed, the ids did not.
        assert [line.split()[1] for line in uidl] == [u.split()[1] for u in out["uidl"][1:]]
    finally:
        yield server.root.stopService()


def _error(fn: Any) -> str:
    try:
        fn()
    except poplib.error_proto as exc:
        return str(exc.args[0].decode() if isinstance(exc.args[0], bytes) else exc)
    return "no error"


@pytest_twisted.inlineCallbacks
def test_tls_is_required_for_passwords_stls_and_implicit(tmp_path: Path) -> None:
    server = yield start_pop3(tmp_path)
    try:
        def run() -> dict[str, Any]:
            out: dict[str, Any] = {}
            pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=20)
            out["capa_plain"] = pop.capa()
            out["user_plain"] = _error(lambda: pop.user("bob@example.test"))
            out["auth_plain"] = _error(lambda: pop._shortcmd("AUTH PLAIN AGJvYgB4"))
            pop.stls(tls_context())
            out["capa_tls"] = pop.capa()
            pop.user("bob@example.test")
            out["wrong"] = _error(lambda: pop.pass_("wrong"))
            pop.user("bob@example.test")
            pop.pass_("bob-secret")
            out["stat"] = pop.stat()
            pop.quit()
            pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], timeout=20,
                                  context=tls_context())
            pop.user("bob@example.test")
            pop.pass_("bob-secret")
            out["ssl_stat"] = pop.stat()
            pop.quit()
            return out
        out = yield in_thread(run)
        assert "USER" not in out["capa_plain"] and "SASL" not in out["capa_plain"]
        assert "STLS" in out["capa_plain"]
        assert out["user_plain"].startswith("-ERR [AUTH]")
        assert out["auth_plain"].startswith("-ERR [AUTH]")
        assert "USER" in out["capa_tls"] and "STLS" not in out["capa_tls"]
        assert out["capa_tls"]["SASL"] == ["PLAIN", "LOGIN", "SCRAM-SHA-256",
                                          "SCRAM-SHA-256-PLUS"]
        assert out["wrong"].startswith("-ERR [AUTH]")
        assert out["stat"][0] == 3 and out["ssl_stat"][0] == 3
    finally:
        yield server.root.stopService()


def login_when_unlocked(port: int) -> Raw:
    """Log in once the server has noticed the previous session's connection is gone."""
    deadline = time.monotonic() + 10
    while True:
        client = Raw(port)
        client.cmd("USER bob@example.test")
        reply = client.cmd("PASS bob-secret")
        if reply.startswith("+OK"):
            return client
        client.close()
        assert reply.startswith("-ERR [IN-USE]") and time.monotonic() < deadline, reply
        time.sleep(0.05)


@pytest_twisted.inlineCallbacks
def test_sasl_pipelining_lock_and_dropped_connections(tmp_path: Path) -> None:
    big = "x" * 998 + "\r\n"
    server = yield start_pop3(tmp_path, "[directory]\nauth_over_plaintext = yes\n")
    parts = server.parts
    blob = yield parts.blobs.put(message(99, big * 5000))            # ~5 MB
    yield parts.mailstore.append(server.inbox_id, blob)
    try:
        port = server.ports["pop3-plain"]

        def run() -> dict[str, Any]:
            out: dict[str, Any] = {}
            first = Raw(port)
            out["cancel"] = [first.cmd("AUTH PLAIN"), first.cmd("*")]
            out["login"] = [first.cmd("AUTH LOGIN"), first.cmd("Ym9iQGV4YW1wbGUudGVzdA=="),
                            first.cmd("Ym9iLXNlY3JldA==")]
            second = Raw(port)
            out["locked"] = second.cmd("AUTH PLAIN AGJvYkBleGFtcGxlLnRlc3QAYm9iLXNlY3JldA==")
            # Pipelined: all at once, answered in order.
            first.send("STAT\r\nDELE 1\r\nDELE 2\r\nNOOP\r\nLIST 1\r\nBOGUS\r\n")
            out["pipelined"] = [first.reply()[0] for _ in range(6)]
            first.close()                       # dropped: DELE must not take effect
            third = login_when_unlocked(port)
            out["relogin"] = "+OK"
            out["stat"] = third.cmd("STAT")
            third.send("RETR 4\r\n")
            out["first_line"] = third.file.readline()
            third.file.read(100_000)
            third.close()                       # dropped in the middle of RETR
            fourth = login_when_unlocked(port)
            fourth.send("RETR 4\r\n")
            fourth.file.readline()
            received = b""
            while not received.endswith(b"\r\n.\r\n"):
                chunk = fourth.file.read1(65536)
                assert chunk, "connection closed mid-message"
                received += chunk
            out["retr_size"] = len(received) - 3
            out["quit"] = fourth.cmd("QUIT")
            second.close()
            return out
        out = yield in_thread(run)
        assert out["cancel"][0] == "+ " and out["cancel"][1].startswith("-ERR")
        assert out["login"][0] == "+ VXNlcm5hbWU6" and out["login"][2].startswith("+OK")
        assert out["locked"].startswith("-ERR [IN-USE]")
        assert [line[:4] for line in out["pipelined"]] == [
            "+OK ", "+OK ", "+OK ", "+OK", "-ERR", "-ERR"]
        assert out["relogin"].startswith("+OK")       # the lock went with the connection
        assert out["stat"].startswith("+OK 4 ")       # and nothing was deleted
        assert out["first_line"].startswith(f"+OK {blob.size} octets".encode())
        stuffed = len(message(99, big * 5000).replace(b"\n.", b"\n.."))
        assert out["retr_size"] == stuffed
        assert out["quit"].startswith("+OK")
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_login_delay_expire_limits(tmp_path: Path) -> None:
    server = yield start_pop3(
        tmp_path, "[directory]\nauth_over_plaintext = yes\n"
        "[pop3]\nlogin_delay = 1h\nexpire = 30\nmax_errors = 3\nmax_line_length = 300\n")
    try:
        port = server.ports["pop3-plain"]

        def run() -> dict[str, Any]:
            out: dict[str, Any] = {}
            one = Raw(port)
            one.send("CAPA\r\n")
            out["capa"] = []
            while (line := one.file.readline()) != b".\r\n":
                out["capa"].append(line.decode().strip())
            out["stat_early"] = one.cmd("STAT")
            out["long"] = one.cmd("NOOP " + "y" * 400)
            one.cmd("USER bob@example.test")
            out["login"] = one.cmd("PASS bob-secret")
            out["quit"] = one.cmd("QUIT")
            two = Raw(port)
            two.cmd("USER bob@example.test")
            out["again"] = two.cmd("PASS bob-secret")
            out["errors"] = [two.cmd("FOO") for _ in range(3)]
            out["closed"] = [two.reply(), two.reply()]
            return out
        out = yield in_thread(run)
        assert "LOGIN-DELAY 3600" in out["capa"] and "EXPIRE 30" in out["capa"]
        assert out["stat_early"].startswith("-ERR")
        assert out["long"].startswith("-ERR Line too long")
        assert out["login"].startswith("+OK") and out["quit"].startswith("+OK")
        assert out["again"].startswith("-ERR [LOGIN-DELAY]")
        # The LOGIN-DELAY refusal and three unknown commands: over max_errors = 3.
        assert all(reply.startswith("-ERR Unknown") for reply in out["errors"])
        assert out["closed"] == [["-ERR Too many errors, closing"], ["<closed>"]]
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_fetchmail_and_getmail_fetch_and_delete(tmp_path: Path) -> None:
    for tool in ("fetchmail", "getmail"):
        assert shutil.which(tool), f"{tool} is missing: run scripts/test-peers.sh"
    server = yield start_pop3(tmp_path, "[directory]\nauth_over_plaintext = yes\n", count=4)
    try:
        port = server.ports["pop3-plain"]
        # fetchmail: keep the first pass (-k), then fetch and delete.
        rc = tmp_path / "fetchmailrc"
        rc.write_text(f'set no syslog\npoll 127.0.0.1 service {port} protocol POP3 '
                      f'auth password user "bob@example.test" password "bob-secret" '
                      f'sslproto "" no sslcertck\n')
        rc.chmod(0o600)
        out = tmp_path / "fetched.bsmtp"

        def fetchmail(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["fetchmail", "-f", str(rc), "-i", str(tmp_path / "fetchids"), "--bsmtp",
                 str(out), "--nodetach", *args], capture_output=True, text=True, timeout=60,
                env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
        kept = yield in_thread(fetchmail, "-k")
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert out.read_text().count("Subject: pop-") == 4
        assert len((yield server.inbox("bob@example.test"))) == 4
        fetched = yield in_thread(fetchmail, "-a")
        assert fetched.returncode == 0, fetched.stdout + fetched.stderr
        assert out.read_text().count("Subject: pop-") == 8
        assert (yield server.inbox("bob@example.test")) == []

        # getmail6 into an mbox, deleting what it fetched.
        parts = server.parts
        for number in range(10, 13):
            blob = yield parts.blobs.put(message(number))
            yield parts.mailstore.append(server.inbox_id, blob)
        mbox = tmp_path / "getmail.mbox"
        mbox.write_text("")
        (tmp_path / "getmail").mkdir()
        (tmp_path / "getmail" / "getmailrc").write_text(
            "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
            f"port = {port}\nusername = bob@example.test\npassword = bob-secret\n"
            # An external MDA: getmail's own mbox writer refuses to run as root.
            f"[destination]\ntype = MDA_external\npath = /bin/sh\n"
            f"arguments = ('-c', 'cat >> {mbox}')\nallow_root_commands = true\n"
            "[options]\ndelete = true\nread_all = true\nverbose = 0\n")
        got = yield in_thread(subprocess.run,
                              ["getmail", "--getmaildir", str(tmp_path / "getmail")],
                              capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stdout + got.stderr
        assert [f"Subject: pop-{n}" in mbox.read_text() for n in (10, 11, 12)] == [True] * 3
        assert (yield server.inbox("bob@example.test")) == []
    finally:
        yield server.root.stopService()


def test_refused_connection_gets_an_answer() -> None:
    from lightmail.config import ListenerConfig
    from lightmail.metrics.registry import Metrics
    from lightmail.pop3.session import POP3Factory

    class Services:
        metrics = Metrics()

        class config:
            hostname = "h"
    factory = POP3Factory(ListenerConfig(name="x", protocol="pop3", endpoint="tcp:0",
                                         max_connections=0), Services())
    proto = factory.buildProtocol(type("A", (), {"host": "1.2.3.4"})())
    from twisted.internet.testing import StringTransport
    transport = StringTransport()
    assert proto is not None
    proto.makeConnection(transport)
    assert transport.value().startswith(b"-ERR [SYS/TEMP]")


_ = socket


@pytest_twisted.inlineCallbacks
def test_concurrent_imap_session_sees_pop3_deletions_as_expunges(tmp_path: Path) -> None:
    """An IMAP client has the INBOX selected (and another sits in IDLE) while a POP3
    client deletes: nothing changes for IMAP until QUIT, then both see EXPUNGE."""
    from test_imap import IMAP
    server = yield start_pop3(
        tmp_path, "[directory]\nauth_over_plaintext = yes\n"
        + IMAP.format(cert=tmp_path / "cert.pem", key=tmp_path / "key.pem"))
    try:
        def run() -> dict[str, Any]:
            import imaplib
            out: dict[str, Any] = {}
            imap = imaplib.IMAP4("127.0.0.1", server.ports["imap-plain"], timeout=20)
            imap.login("bob@example.test", "bob-secret")
            out["select"] = imap.select("INBOX")[1]
            idler = imaplib.IMAP4("127.0.0.1", server.ports["imap-plain"], timeout=20)
            idler.login("bob@example.test", "bob-secret")
            idler.select("INBOX")
            idler.send(b"i1 IDLE\r\n")
            out["idle_go"] = idler.readline()
            pop = poplib.POP3("127.0.0.1", server.ports["pop3-plain"], timeout=20)
            pop.user("bob@example.test")
            pop.pass_("bob-secret")
            # IMAP keeps working while POP3 holds the maildrop.
            out["uids_during"] = imap.uid("SEARCH", "ALL")[1]
            pop.dele(1)
            pop.dele(3)
            imap.noop()
            out["expunged_before_quit"] = imap.response("EXPUNGE")[1]
            pop.quit()
            out["idle_pushed"] = [idler.readline(), idler.readline()]
            idler.send(b"DONE\r\n")
            out["idle_done"] = idler.readline()
            idler.logout()
            time.sleep(0.2)
            imap.noop()
            out["expunged_after_quit"] = imap.response("EXPUNGE")[1]
            out["uids_after"] = imap.uid("SEARCH", "ALL")[1]
            imap.logout()
            return out
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert out["select"] == [b"3"]
    assert out["idle_go"].startswith(b"+")
    assert out["expunged_before_quit"] == [None]
    # One expunge of UIDs 1 and 3, told in ascending UID order: UID 1 is message 1,
    # and after it UID 3 has become message 2.
    assert out["idle_pushed"] == [b"* 1 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"], out["idle_pushed"]
    assert out["idle_done"].startswith(b"i1 OK")
    assert out["expunged_after_quit"] == [b"1", b"2"], out
    assert out["uids_during"] == [b"1 2 3"]
    assert out["uids_after"] == [b"2"]


@pytest_twisted.inlineCallbacks
def test_small_messages_are_read_ahead_in_runs_and_sent_whole(tmp_path: Path) -> None:
    from lightmail.pop3.maildrop import READ_AHEAD

    server = yield start_pop3(tmp_path, "[directory]\nauth_over_plaintext = yes\n",
                              count=40)
    parts = server.parts
    big = yield parts.blobs.put(message(40, ("y" * 98 + "\r\n") * (READ_AHEAD // 90)))
    yield parts.mailstore.append(server.inbox_id, big)          # message 41: streamed
    reads: list[int] = []
    ranges: list[int] = []
    read_many, read_range = parts.blobs.read_many, parts.blobs.read_range

    def counted_many(ids: Any) -> Any:
        reads.append(len(ids))
        return read_many(ids)

    def counted_range(blob_id: str, offset: int, length: int) -> Any:
        ranges.append(length)
        return read_range(blob_id, offset, length)
    parts.blobs.read_many, parts.blobs.read_range = counted_many, counted_range
    try:
        port = server.ports["pop3-plain"]

        def run() -> dict[str, Any]:
            client = login_when_unlocked(port)
            # Pipelined, as fetchmail does: every answer must come, in order, whole.
            client.send("".join(f"RETR {n}\r\n" for n in range(1, 41)))
            bodies = [read_multiline(client) for _ in range(40)]
            client.send("DELE 3\r\nRETR 3\r\nTOP 2 1\r\nRETR 41\r\nQUIT\r\n")
            dele, retr3 = client.reply()[0], client.reply()[0]
            top = read_multiline(client)
            retr41 = read_multiline(client)
            quit = client.reply()[0]
            client.close()
            return {"bodies": bodies, "dele": dele, "retr3": retr3, "top": top,
                    "retr41": retr41, "quit": quit}
        out = yield in_thread(run)
    finally:
        parts.blobs.read_many, parts.blobs.read_range = read_many, read_range
        yield server.root.stopService()
    for number, body in enumerate(out["bodies"]):
        content = message(number)
        assert body == (f"+OK {len(content)} octets\r\n".encode()
                        + content.replace(b"\n.", b"\n..") + b".\r\n")
    # 40 small messages in one read (they fit in READ_AHEAD); TOP 2 reads again (what
    # was read ahead went with each RETR), with 4 to 40 but the deleted 3, and not the
    # big one, which streams in ranges.
    assert reads == [40, 38], reads
    assert ranges and sum(ranges) == big.size
    assert out["dele"].startswith("+OK") and out["retr3"].startswith("-ERR")
    assert out["top"] == (f"+OK {len(message(1))} octets\r\n".encode()
                          + b"From: sender@example.org\r\nTo: bob@example.test\r\n"
                            b"Subject: pop-1\r\n\r\nLine one of 1\r\n.\r\n")
    assert out["retr41"].startswith(f"+OK {big.size} octets\r\n".encode())
    assert len(out["retr41"]) > READ_AHEAD
    assert out["quit"].startswith("+OK")


def read_multiline(client: Raw) -> bytes:
    """One multi-line POP3 answer, status line to terminator, as sent."""
    received = client.file.readline()
    if not received.startswith(b"+OK"):
        return received
    while not received.endswith(b"\r\n.\r\n"):
        line = client.file.readline()
        assert line, "connection closed mid-answer"
        received += line
    return received


@pytest_twisted.inlineCallbacks
def test_pipelined_retrs_of_a_client_that_does_not_read_are_held_back(
        tmp_path: Path) -> None:
    """Small messages are sent whole, but still with flow control: a client that
    pipelines RETRs and reads nothing makes the server hold back, not buffer them all."""
    server = yield start_pop3(tmp_path, "[directory]\nauth_over_plaintext = yes\n",
                              count=0)
    parts = server.parts
    body = ("z" * 98 + "\r\n") * 600                           # 60 KB each
    for number in range(10):
        blob = yield parts.blobs.put(message(number, body))
        yield parts.mailstore.append(server.inbox_id, blob)
    size = len(message(0, body))
    listener = server.root.getServiceNamed("listener:pop3-plain")
    try:
        port = server.ports["pop3-plain"]
        client = yield in_thread(login_when_unlocked, port)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        count = 400                                            # 24 MB of answers
        yield in_thread(client.send, "".join(f"RETR {n % 10 + 1}\r\n"
                                             for n in range(count)))
        yield deferLater(reactor, 1.0, lambda: None)           # the server writes...
        sessions = [p for p in listener.factory.active if p.maildrop is not None]
        assert len(sessions) == 1
        transport = sessions[0].transport
        held = len(transport.dataBuffer) + transport._tempDataLen
        assert held < 4 * size, held                          # ...and then waits

        def read_all() -> int:
            done = 0
            for _ in range(count):
                answer = read_multiline(client)
                assert answer.startswith(f"+OK {size} octets".encode()), answer[:80]
                done += 1
            client.cmd("QUIT")
            client.close()
            return done
        assert (yield in_thread(read_all)) == count
    finally:
        yield server.root.stopService()


@pytest_twisted.inlineCallbacks
def test_quit_answers_once_the_maildrop_lock_is_released(tmp_path: Path) -> None:
    """+OK to QUIT goes out only when the lock is free: with worker processes the
    release is a question to the main process, and a client that logged in again at
    once through another worker found its maildrop IN-USE (seen at 10 clients)."""
    import select

    from lightmail.pop3.maildrop import Locks
    server = yield start_pop3(tmp_path, "[directory]\nauth_over_plaintext = yes\n")
    released: defer.Deferred[None] = defer.Deferred()

    class AnsweredLater(Locks):       # as RemoteLocks: the main process answers later
        def release(self, user_id: int) -> defer.Deferred[None]:
            super().release(user_id)
            return released
    server.parts.pop3_locks = AnsweredLater()
    try:
        port = server.ports["pop3-plain"]

        def log_in_and_quit() -> tuple[Raw, list[Any]]:
            client = Raw(port)
            assert client.cmd("USER bob@example.test").startswith("+OK")
            assert client.cmd("PASS bob-secret").startswith("+OK")
            client.send("QUIT\r\n")
            return client, select.select([client.sock], [], [], 0.5)[0]
        client, readable = yield in_thread(log_in_and_quit)
        assert readable == []                  # no answer while the lock is held
        released.callback(None)
        reply = yield in_thread(client.reply)
        assert reply[0].startswith("+OK Logging out"), reply
        client.close()
    finally:
        yield server.root.stopService()
