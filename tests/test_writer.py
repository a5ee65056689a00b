"""The writer process (lightmail.storage.writer): grouped writes in a process of their own.

First its group on its own (blobs made durable with one flush, operations in one
transaction, one answer each, on every database backend), then its loop over a socket,
then a real server: mail goes through the writer process, and when that process is
killed, nothing that got a 250 is lost or filed twice and the server starts another.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness import ServerProcess, run_cli, started_as, stored_messages
from test_crash import USERS, Sender, filed_messages
from twisted.internet import defer

from lightmail.storage import blobs as blob_module
from lightmail.storage import writer
from lightmail.storage.interfaces import DurableBlob, Filing, FilingTarget, NotFiled
from lightmail.storage.writerlink import WriterLost


def _pending(stack: Any, data: bytes) -> Any:
    blob_writer = stack.blobs.writer()
    blob_writer.write(data)
    return blob_writer.stage().result       # fires at once: nothing in flight


def _request(op: str, args: tuple[Any, ...], blob: Any = None,
             durable: bool = True) -> writer.WriteRequest:
    # No peer: run_group only runs the group; answering is the loop's.
    return writer.WriteRequest(None, b"1", op, args, blob, durable)


def _outcomes(batch: list[writer.WriteRequest], stack: Any,
              writes: Any = None) -> list[tuple[bool, Any]]:
    """run_group's (ok, result) for each request; an error as its exception."""
    ran = writer.run_group(batch, stack.db, stack.blobs, writes or stack.writes)
    return [(ok, value if ok else value.value) for ok, value in ran]


def _bob(user: Any) -> Filing:
    return Filing((FilingTarget(user.id, user.address),), "smtp/QID1/0", fresh=True)


@pytest_twisted.inlineCallbacks
def test_a_group_is_made_durable_with_one_flush_and_each_request_answered(
        stack: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    yield stack.directory.add_domain("example.test")
    bob = yield stack.directory.add_user("bob@example.test", None)
    real = blob_module._SYNCFS
    assert real is not None, "this kernel has no syncfs that reports errors"
    calls: list[int] = []
    monkeypatch.setattr(stack.blobs, "_syncfs", lambda fd: (calls.append(fd), real(fd))[1])
    contents = [b"Subject: one\r\n\r\nfirst", b"Subject: two\r\n\r\nsecond"]
    pendings = [_pending(stack, data) for data in contents]
    batch = [
        _request("accept", ([_bob(bob)], pendings[0].ref), pendings[0].handoff()),
        # Nobody to file for: left out alone (the blob is durable all the same).
        _request("accept", ([Filing((), "smtp/QID2/0", True)], pendings[1].ref),
                 pendings[1].handoff()),
        _request("no such operation", ()),
    ]
    outcomes = _outcomes(batch, stack)

    ok, (results, changes) = outcomes[0]
    assert ok and [filed.placed for filed in results] == [
        ("bob@example.test/INBOX uid=1",)]
    assert [c.kind for c in changes] == ["created", "appended"]
    ok, error = outcomes[1]
    assert not ok and isinstance(error, NotFiled)
    ok, error = outcomes[2]
    assert not ok and isinstance(error, LookupError)
    assert len(calls) == 1          # one flush for the group's blobs
    for data in contents:           # both durable (the second refers to nothing: GC)
        assert stack.blobs.path(blob_module.hashlib.sha256(data).hexdigest()
                                ).read_bytes() == data
    assert list(stack.blobs.tmp.iterdir()) == []
    box = yield stack.mailstore.get_mailbox(bob.id, "INBOX")
    listing = yield stack.mailstore.list_messages(box.id)
    assert len(listing) == 1


class _Link:
    """Stands in for the writer process's link: records what is sent; ``commits``:
    runs it here first, then dies before it answers (WriterLost); None: never
    answers."""

    ready = True

    def __init__(self, stack: Any, commits: bool | None = None) -> None:
        self.stack = stack
        self.commits = commits
        self.sent: list[tuple[str, bool]] = []

    def call(self, op: str, args: tuple[Any, ...], blob: Any = None,
             durable: bool = True) -> Any:
        from twisted.internet import defer
        self.sent.append((op, durable))
        if self.commits is None:
            return defer.Deferred()
        writes = self.stack.writes
        d = (self.stack.db.write(writes.operation(op), *args) if self.commits
             else defer.succeed(None))
        return d.addCallback(lambda _: defer.fail(WriterLost("it died")))


@pytest_twisted.inlineCallbacks
def test_a_commit_the_writer_could_not_answer_is_found_not_filed_again(stack: Any) -> Any:
    """The writer process commits and dies before it answers: the server finds the
    delivery ids and answers "delivered" (no 451, so no retry files it twice); had it
    not committed, the failure stands (the retry is then safe)."""
    from lightmail.delivery.local import LocalDeliveryAgent
    from lightmail.storage.writeport import WriterProcessPort
    yield stack.directory.add_domain("example.test")
    yield stack.directory.add_user("bob@example.test", None)
    port = WriterProcessPort(_Link(stack, commits=True), stack.port)  # type: ignore[arg-type]
    agent = LocalDeliveryAgent(stack.directory, port, "node")

    def blob(n: int) -> Any:
        return stack.blobs.put(f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())

    results = yield agent.deliver_at_acceptance(["bob@example.test"],
                                                DurableBlob((yield blob(1))), "Q1")
    assert [r.status for r in results] == ["delivered"]
    assert results[0].detail == "2.0.0 bob@example.test/INBOX uid=1"
    [result] = yield defer.gatherResults(agent.deliver_each(
        [("bob@example.test", "lmtp/Q2/0")], DurableBlob((yield blob(2)))))
    assert (result.status, result.detail) == ("delivered",
                                              "2.0.0 bob@example.test/INBOX uid=2")
    port.link = _Link(stack, commits=False)  # type: ignore[assignment]
    with pytest.raises(WriterLost):
        yield agent.deliver_at_acceptance(["bob@example.test"],
                                          DurableBlob((yield blob(3))), "Q3")
    bob = yield stack.directory.get_user("bob@example.test")
    box = yield stack.mailstore.get_mailbox(bob.id, "INBOX")
    assert [m.uid for m in (yield stack.mailstore.list_messages(box.id))] == [1, 2]
    # Queued (SMTP with a remote recipient, a notice): the queue id says.
    from lightmail.storage.interfaces import Envelope, QueueRecipient
    envelope = Envelope("a@example.org", [QueueRecipient("x@remote.test", "smtp")])
    port.link = _Link(stack, commits=True)  # type: ignore[assignment]
    assert (yield port.enqueue(envelope, DurableBlob((yield blob(4))), "Q4")) == "Q4"
    made = yield port.enqueue(envelope, DurableBlob((yield blob(5))))   # id made here
    port.link = _Link(stack, commits=False)  # type: ignore[assignment]
    with pytest.raises(WriterLost):
        yield port.enqueue(envelope, DurableBlob((yield blob(6))), "Q6")
    assert sorted({row["queue_id"] for row in (yield stack.queue.list_recipients())}) == \
        sorted(["Q4", made])


def test_the_loop_answers_what_was_sent_before_the_other_end_closed(
        sqlite_stack: Any) -> None:
    """The main process closes its end to stop the writer: every request it sent
    before is still answered, over AMP, then ``serve`` returns."""
    from twisted.protocols import amp

    from lightmail.storage.interfaces import Envelope, QueueRecipient
    from lightmail.storage.wire import Write
    staged = _pending(sqlite_stack, b"Subject: q\r\n\r\nqueued\r\n")
    staged.commit_now()
    ref = staged.ref
    ours, theirs = socket.socketpair()
    served = threading.Thread(target=writer.serve,
                              args=(theirs, sqlite_stack.db, sqlite_stack.blobs,
                                    sqlite_stack.writes))
    sent: list[bytes] = []

    class Out:
        def write(self, data: bytes) -> None:
            sent.append(data)
    client = amp.AMP()
    amp.BinaryBoxProtocol.makeConnection(client, Out())  # type: ignore[arg-type]
    envelope = Envelope("a@example.org", [QueueRecipient("b@example.test")])
    answers = [client.callRemote(Write, request=("enqueue", (envelope, ref, f"Q{n}"),
                                                 None, True)) for n in range(5)]
    served.start()
    try:
        ours.sendall(b"".join(sent))
        ours.shutdown(socket.SHUT_WR)
        served.join(10)
        assert not served.is_alive()
        theirs.close()
        while chunk := ours.recv(65536):
            client.dataReceived(chunk)
    finally:
        ours.close()
        theirs.close()
    assert [d.result["outcome"] for d in answers] == [(f"Q{n}", []) for n in range(5)]


def test_a_blob_discarded_before_its_call_fails_that_call_only(sqlite_stack: Any) -> None:
    """The server's end: a request whose staged blob was discarded (its session gave
    up) fails its own Deferred and sends nothing; a link that drops fails what waits
    with WriterLost."""
    from twisted.internet import error
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from lightmail.storage.interfaces import BlobMissing
    from lightmail.storage.writeport import WriterProcessPort
    from lightmail.storage.writerlink import WriterLink, _LinkFactory
    link = _Link(sqlite_stack)
    port = WriterProcessPort(link, sqlite_stack.port)  # type: ignore[arg-type]
    pending = _pending(sqlite_stack, b"Subject: gone\r\n\r\n")
    pending.discard()
    failures: list[Any] = []
    port.append(1, pending, [], 0).addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(BlobMissing) and link.sent == []
    fine = port.expunge(1, [1])
    assert link.sent == [("expunge", True)] and not fine.called   # waits for its answer
    # The link to a real writer: what waits when it goes away fails with WriterLost.
    real = WriterLink(connect="/nonexistent/writer.sock")
    proto = _LinkFactory(real).buildProtocol(None)
    proto.makeConnection(StringTransport())
    assert real.ready
    waiting = real.call("expunge", (1, [1]))
    assert proto.transport.value().startswith(b"\x00\x08_command")  # an AMP box
    lost: list[Any] = []
    waiting.addErrback(lost.append)
    real._stopping = True                          # no reconnecting from a test
    proto.connectionLost(Failure(error.ConnectionLost()))
    assert lost[0].check(WriterLost) and not real.ready


# -- a real server ------------------------------------------------------------------------

def _config(write_config: Any, extra: str = "") -> Path:
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.crash.test\n"
        "[logging]\nlevel = info\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n" + extra)
    run_cli(config, "domain", "add", "crash.test")
    for user in USERS:
        run_cli(config, "user", "add", user, "--no-password")
    return config


def _wchar(pid: int) -> int:
    """Octets the process has written with write(2) and the like (/proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar")


def _tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets the process ``pid`` listens on (local addresses, as the
    kernel's /proc/net/tcp and tcp6 write them)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    listening = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:         # 0A: LISTEN
                listening.append(fields[1])
    return listening


def _writer_pids(server: ServerProcess, count: int = 1) -> list[int]:
    found = server.wait_for(r"writer process started \(pid (\d+)\)", count=count)
    return [int(m.group(1)) for m in found]


@pytest.mark.parametrize("prefork", ["yes", "no"])
def test_the_server_files_mail_through_its_writer_process(write_config: Any,
                                                          tmp_path: Path,
                                                          prefork: str) -> None:
    """Forked from the main process as it starts ([server] prefork), or a new
    interpreter: the same writer process."""
    config = _config(write_config)
    config.write_text(config.read_text().replace("[server]\n",
                                                 f"[server]\nprefork = {prefork}\n", 1))
    server = ServerProcess(config)
    try:
        port = server.ports(expected=1)["mx"]
        (pid,) = _writer_pids(server)
        assert started_as(pid) == ("forked" if prefork == "yes" else "exec", "writer")
        body = b"Subject: via writer\r\n\r\n" + b"hello from the writer\r\n" * 200
        written = _wchar(pid)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            assert smtp.sendmail("a@client.test", ["bob@crash.test"], body) == {}
        assert [(user, box) for user, box, _ in stored_messages(tmp_path / "state")] == \
            [("bob", "INBOX")]
        # The writer process, not the server's, wrote the message's blob.
        assert _wchar(pid) - written >= len(body)
        # A big one: the server has written most of it to the temporary file already
        # (the writer appends the rest to that file).
        big = b"Subject: big\r\n\r\n" + b"".join(
            b"line %06d of a big message\r\n" % n for n in range(30000))
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            assert smtp.sendmail("a@client.test", ["bob@crash.test"], big) == {}
        contents = [content for _, _, content in stored_messages(tmp_path / "state")]
        assert len(contents) == 2 and any(
            content.endswith(big) and content.startswith(b"Received: ")
            for content in contents)
        assert server.terminate() in (0, -signal.SIGTERM)   # twistd: clean
        assert "LightMail stopped" in server.output
        assert not Path(f"/proc/{pid}").exists() or \
            "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    finally:
        server.kill()


def test_workers_write_through_the_main_process_writer(write_config: Any,
                                                       tmp_path: Path) -> None:
    """[server] workers: each worker connects to the one writer process (a socket in
    state_dir/run, a directory of the main process's own, removed at the end)."""
    config = _config(write_config)
    text = config.read_text().replace("[server]\n", "[server]\nworkers = 2\n", 1)
    config.write_text(text)
    server = ServerProcess(config)
    try:
        port = server.ports(expected=1)["mx"]
        server.wait_for(r"worker=\d\] connected to the writer process", count=2)
        (pid,) = _writer_pids(server)
        socket_path = tmp_path / "state" / "run" / "writer.sock"
        # Private to this host and user: a Unix socket (no TCP port), 0600, in a
        # directory of this user's that only it can open (0700).
        assert socket_path.is_socket() and (socket_path.stat().st_mode & 0o777) == 0o600
        assert (socket_path.parent.stat().st_mode & 0o777) == 0o700
        assert socket_path.stat().st_uid == socket_path.parent.stat().st_uid == os.getuid()
        assert _tcp_listeners(pid) == []
        written = _wchar(pid)
        body = b"hello through a worker\r\n" * 100
        for number in range(6):         # over both workers
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                assert smtp.sendmail("a@client.test", ["bob@crash.test"],
                                     f"Subject: w{number}\r\n\r\n".encode() + body) == {}
        assert len(stored_messages(tmp_path / "state")) == 6
        # The writer process wrote them (the workers' own writers would not count).
        assert _wchar(pid) - written >= 6 * len(body)
        assert server.terminate() in (0, -signal.SIGTERM)
        assert not socket_path.exists()
    finally:
        server.kill()


def test_imap_writes_go_through_the_writer_process(write_config: Any,
                                                  tmp_path: Path) -> None:
    """APPEND, STORE, COPY, MOVE and EXPUNGE from a real IMAP client are committed by
    the writer process (it writes for each), with the answers IMAP expects."""
    import imaplib
    config = _config(write_config, "[directory]\nauth_over_plaintext = yes\n"
                     "[listener:imap]\nprotocol = imap\n"
                     "endpoint = tcp:0:interface=127.0.0.1\n")
    run_cli(config, "user", "passwd", "bob@crash.test", "--password-stdin",
            stdin="bob-secret\n")
    server = ServerProcess(config)
    try:
        ports = server.ports(expected=2)
        (pid,) = _writer_pids(server)
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=20)
        imap.login("bob@crash.test", "bob-secret")

        def through_writer(command: Any, *args: Any) -> list[Any]:
            written = _wchar(pid)
            typ, data = command(*args)
            assert typ == "OK", (command, args, data)
            assert _wchar(pid) > written, f"{command.__name__} did not reach the writer"
            return data
        message = b"Subject: imap\r\n\r\n" + b"kept by the writer\r\n" * 50
        through_writer(imap.append, "INBOX", "(\\Flagged)", None, message)
        through_writer(imap.append, "INBOX", None, None, message + b"second\r\n")
        imap.select("INBOX")
        through_writer(imap.uid, "STORE", "1", "+FLAGS", "(\\Seen)")
        through_writer(imap.uid, "COPY", "1", "Archive")
        through_writer(imap.uid, "MOVE", "2", "Trash")
        through_writer(imap.uid, "STORE", "1", "+FLAGS", "(\\Deleted)")
        through_writer(imap.expunge)
        typ, data = imap.select("INBOX")
        assert (typ, data) == ("OK", [b"0"])
        typ, data = imap.select("Archive")
        assert data == [b"1"]
        typ, data = imap.fetch("1", "(FLAGS BODY.PEEK[])")
        assert b"\\Seen" in data[0][0] and b"\\Flagged" in data[0][0]
        assert data[0][1] == message
        imap.logout()
        assert server.terminate() in (0, -signal.SIGTERM)
    finally:
        server.kill()


def test_unsynced_flag_changes_and_expunges_survive_kill_9(write_config: Any,
                                                           tmp_path: Path) -> None:
    """[storage] sync_flag_changes = no (the default): STORE and EXPUNGE are answered
    before their commit is flushed, but it is in the operating system's cache, so a
    kill -9 of the whole server (writer process included) right after keeps them."""
    import imaplib
    config = _config(write_config, "[directory]\nauth_over_plaintext = yes\n"
                     "[listener:imap]\nprotocol = imap\n"
                     "endpoint = tcp:0:interface=127.0.0.1\n")
    run_cli(config, "user", "passwd", "bob@crash.test", "--password-stdin",
            stdin="bob-secret\n")

    def session(server: ServerProcess) -> Any:
        imap = imaplib.IMAP4("127.0.0.1", server.ports(expected=2)["imap"], timeout=20)
        imap.login("bob@crash.test", "bob-secret")
        return imap

    server = ServerProcess(config)
    try:
        imap = session(server)
        for number in range(3):
            assert imap.append("INBOX", None, None,
                               b"Subject: m%d\r\n\r\nbody\r\n" % number)[0] == "OK"
        imap.select("INBOX")
        assert imap.uid("STORE", "1", "+FLAGS", "(\\Seen $Kept)")[0] == "OK"
        assert imap.uid("STORE", "2", "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert imap.expunge()[0] == "OK"
        server.kill()                                  # SIGKILL to the process group
    finally:
        server.kill()
    server = ServerProcess(config)
    try:
        imap = session(server)
        imap.select("INBOX")
        typ, data = imap.uid("FETCH", "1:*", "(FLAGS)")
        assert typ == "OK" and len(data) == 2, data
        assert b"UID 1 " in data[0] and b"\\Seen" in data[0] and b"$Kept" in data[0]
        assert b"UID 3 " in data[1] and b"\\Seen" not in data[1]
        imap.logout()
    finally:
        server.kill()


def test_writer_process_off_files_in_the_server_process(write_config: Any,
                                                        tmp_path: Path) -> None:
    config = _config(write_config, "[storage]\nwriter_process = no\n")
    server = ServerProcess(config)
    try:
        port = server.ports(expected=1)["mx"]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            assert smtp.sendmail("a@client.test", ["bob@crash.test"],
                                 b"Subject: here\r\n\r\nhello\r\n") == {}
        assert len(stored_messages(tmp_path / "state")) == 1
        assert "writer process" not in server.output
    finally:
        server.kill()


def test_kill_9_of_the_writer_process_loses_nothing_and_it_comes_back(
        write_config: Any, tmp_path: Path) -> None:
    """SIGKILL the writer while three clients send: what got a 250 is filed exactly
    once; meanwhile the server writes in its own process, then starts a new writer,
    through which mail goes again."""
    config = _config(write_config)
    server = ServerProcess(config)
    accepted: set[int] = set()
    lock = threading.Lock()
    numbers = iter(range(1, 10**9))
    stop = threading.Event()
    try:
        port = server.ports(expected=1)["mx"]
        senders = [Sender(port, numbers, accepted, lock, stop) for _ in range(3)]
        for sender in senders:
            sender.start()
        for round_ in range(1, 3):
            (pid,) = _writer_pids(server, count=round_)[-1:]
            time.sleep(0.7)
            os.kill(pid, signal.SIGKILL)
            server.wait_for("writer process ended", count=round_)
        new = _writer_pids(server, count=3)[-1]
        time.sleep(0.7)
        stop.set()
        for sender in senders:
            sender.join(15)
        assert Path(f"/proc/{new}").exists()
        assert len(accepted) > 20, "too few messages were accepted to prove anything"
        assert server.terminate() in (0, -signal.SIGTERM)   # twistd: clean
        assert "LightMail stopped" in server.output
    finally:
        stop.set()
        server.kill()
    filed = filed_messages(tmp_path / "state")
    missing = sorted(accepted - set(filed))
    assert not missing, f"accepted (250) but not filed: {missing[:20]}"
    twice = {n: users for n, users in filed.items() if len(users) > 1}
    assert not twice, f"filed more than once: {twice}"


def test_unsynced_requests_commit_without_a_flush_only_in_a_group_of_their_own(
        stack: Any) -> None:
    """The durable flag a request carries reaches the writer's group: a group of
    unsynced requests only commits at SQLite's NORMAL level, any other at FULL."""
    def level(conn: Any) -> Any:
        value = conn.exec_driver_sql("PRAGMA synchronous").scalar() \
            if stack.db.backend == "sqlite" else None
        return value, []

    class Writes:           # one operation: what the group's connection says
        def operation(self, name: str) -> Any:
            return level

    def run(*durables: bool) -> list[Any]:
        batch = [_request("level", (), None, durable) for durable in durables]
        return [value[0] for _, value in _outcomes(batch, stack, Writes())]
    alone, mixed = run(False, False), run(False, True)
    if stack.db.backend == "sqlite":
        assert alone == [1, 1] and mixed == [2, 2]
    else:
        assert alone == [None, None]


def test_the_port_tells_the_writer_which_writes_need_no_flush(stack: Any) -> None:
    from lightmail.storage.interfaces import BlobRef
    from lightmail.storage.writeport import WriterProcessPort
    link = _Link(stack)
    port = WriterProcessPort(link, stack.port)  # type: ignore[arg-type]
    for sync in (False, True):
        port.sync_flag_changes = sync
        port.set_flags(1, [1], ["\\Seen"], "add")
        port.expunge(1, [1])
    port.append(1, DurableBlob(BlobRef("0" * 64, 1, b"")), [], 0)
    assert link.sent == [("set_flags", False), ("expunge", False), ("set_flags", True),
                         ("expunge", True), ("append", True)]


def test_a_writer_socket_path_too_long_for_unix_goes_to_a_directory_of_its_own(
        tmp_path: Path) -> None:
    from lightmail.config import load_config
    from lightmail.wiring import Role, wire
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    config_file = tmp_path / "lightmail.conf"
    config_file.write_text(f"[server]\nstate_dir = {deep}\nworkers = 2\n")
    storage = wire(load_config(config_file), Role.SERVER).storage
    socket_path = storage.writer_socket
    assert socket_path is not None and len(socket_path) <= 100
    directory = Path(socket_path).parent
    assert directory.is_dir() and (directory.stat().st_mode & 0o777) == 0o700
    storage._close()        # what stopping does after the writer is gone
    assert not directory.exists()
