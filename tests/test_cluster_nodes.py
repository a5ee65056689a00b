"""Several LightMail nodes (``twistd lightmail`` each) on one PostgreSQL database, one
blob directory and the Redis of this machine (database 9, a key prefix per test run):
mail submitted to node A is read over IMAP on node B, an IDLE client on node C (whose
sessions are in a worker process) hears of it within a second, a flag set on B reaches
an IDLE client on A, \\Recent goes to one session of three, the per-user session limit
and the login guard count across nodes, the POP3 maildrop lock holds across nodes and
is freed by a node's death (kill -9) within its lease, a node whose Redis is away says
so in /readyz, refuses POP3 logins and serves the rest, and a node whose Redis link
goes silent notices it and, when Redis is back, reads again what its IDLE sessions
missed.  Each node's log is kept as server.log in its state directory.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import re
import smtplib
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS, empty_database

from tests.harness import ServerProcess, free_port, run_cli

PASSWORD = "cluster-secret"
USER = "ann@cluster.test"
ADMIN = re.compile(r"admin listener on [^\s:]+:(?P<port>\d+)")


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


class Nodes:
    """Writes a node's configuration and starts it; every node is killed at the end."""

    def __init__(self, root: Path, database: str) -> None:
        self.root = root
        self.database = database
        self.prefix = f"lmtest{uuid.uuid4().hex[:8]}:"
        self.started: list[ServerProcess] = []

    def config(self, name: str, redis: str = REDIS, extra: str = "",
               storage: str = "") -> Path:
        state = self.root / name
        state.mkdir()
        path = state / "lightmail.conf"
        path.write_text(
            f"[server]\nstate_dir = {state}\nhostname = {name}.cluster.test\n"
            f"node_id = {name}\nshutdown_timeout = 5s\n{extra}"
            f"[storage]\nurl = {self.database}\nblob_dir = {self.root / 'blobs'}\n"
            f"{storage}"
            f"[cluster]\nredis = {redis}\nprefix = {self.prefix}\nlease = 3s\n"
            "redis_timeout = 0.5s\n"
            "[logging]\nlevel = info\n"
            "[directory]\nauth_over_plaintext = yes\naccount_lockout_after = 3\n"
            "lockout_after = 50\n"
            "[imap]\nmax_connections_per_user = 4\n"
            "[admin]\nenabled = yes\nendpoint = tcp:0:interface=127.0.0.1\n"
            "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
            "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
            "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n")
        return path

    def start(self, name: str, redis: str = REDIS, extra: str = "",
              storage: str = "") -> Node:
        proc = ServerProcess(self.config(name, redis, extra, storage))
        self.started.append(proc)
        ports = proc.ports(expected=3, timeout=90)
        admin = int(proc.wait_for(ADMIN.pattern)[0].group("port"))
        return Node(proc, ports, admin)

    def kill(self) -> None:
        for proc in self.started:
            proc.kill()
            # Kept for a look after a failure (pytest keeps the last runs' tmp dirs).
            (proc.config.parent / "server.log").write_text(proc.output)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nodes, dict[str, Node]]]:
    """Nodes a (with the writer process), b (without) and c (one worker process)."""
    subprocess.run(["redis-cli", "ping"], check=True, capture_output=True)
    root = tmp_path_factory.mktemp("cluster")
    with empty_database("postgresql", root) as database:
        nodes = Nodes(root, database)
        try:
            # The first node makes the schema; the others find it made.
            running = {"a": nodes.start("a")}
            config = running["a"].proc.config
            run_cli(config, "domain", "add", "cluster.test")
            for user in (USER, "bob@cluster.test", "carl@cluster.test", "dave@cluster.test"):
                run_cli(config, "user", "add", user, "--password-stdin",
                        stdin=PASSWORD + "\n")
            running["b"] = nodes.start("b", storage="writer_process = no\n")
            running["c"] = nodes.start("c", extra="workers = 1\n")
            yield nodes, running
        finally:
            nodes.kill()


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
    assert verdict["checks"]["redis"] == "no answer within 0.5s"
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
