"""``[server] workers``: sessions in worker processes, one main process in charge.

Each test runs ``twistd lightmail`` with two workers and finds out, from /proc, which
worker serves each client connection, so that what must hold across processes is
shown with sessions that really live in different ones: IDLE updates, \\Recent in
exactly one session, the per-user IMAP limit, the listeners' connection limits, the
POP3 maildrop lock, and what happens when a worker is killed.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import signal
import smtplib
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ServerProcess, run_cli, started_as

PASSWORD = "worker-secret"
USER = "ann@workers.test"


def socket_owner(pids: list[int], client: socket.socket) -> int:
    """Which of ``pids`` holds the server end of ``client``'s TCP connection."""
    local_port = client.getsockname()[1]
    server_port = client.getpeername()[1]
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        here, there = fields[1], fields[2]
        if int(here.split(":")[1], 16) == server_port \
                and int(there.split(":")[1], 16) == local_port:
            inode = fields[9]
            break
    assert inode, "the server end of the connection is not in /proc/net/tcp"
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    raise AssertionError(f"no process of {pids} holds {target}")


def worker_pids(server: ServerProcess) -> list[int]:
    found = server.wait_for(r"worker (\d+) started \(pid (\d+)\)", count=2)
    return [int(m.group(2)) for m in found[-2:]]


@pytest.fixture
def server(write_config: Any, tmp_path: Path) -> Iterator[ServerProcess]:
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.workers.test\nworkers = 2\n"
        "[logging]\nlevel = info\n"
        "[directory]\nauth_over_plaintext = yes\n"
        "[imap]\nmax_connections_per_user = 6\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n"
        "max_connections_per_ip = 4\n"
        "[listener:lmtp]\nprotocol = lmtp\nendpoint = tcp:0:interface=127.0.0.1\n")
    run_cli(config, "domain", "add", "workers.test")
    for user in (USER, "bob@workers.test"):
        run_cli(config, "user", "add", user, "--password-stdin", stdin=PASSWORD + "\n")
    proc = ServerProcess(config)
    try:
        proc.ports(expected=4)
        yield proc
    finally:
        proc.kill()


def ports(server: ServerProcess) -> dict[str, int]:
    return server.ports(expected=4)


def spread(connect: Any, close: Any, pids: list[int], count: int,
           burst: int = 0) -> list[tuple[Any, int]]:
    """``count`` connections held by both workers (with their owners' pids).

    Connections opened one after another tend to land in the same worker (the one
    that wins the race to accept); a burst of ``burst`` (default twice ``count``)
    opened at once lands in both.  ``connect`` returns (connection, socket), or None
    when the server refused it (over a limit)."""
    burst = burst or 2 * count
    for _ in range(20):
        with ThreadPoolExecutor(burst) as pool:
            opened = [c for c in pool.map(lambda _: connect(), range(burst)) if c]
        owned = [(conn, socket_owner(pids, sock)) for conn, sock in opened]
        chosen: list[tuple[Any, int]] = []
        for pid in pids:                 # one of each worker first, then any
            chosen += [pair for pair in owned if pair[1] == pid][:1]
        chosen += [pair for pair in owned if pair not in chosen][:count - len(chosen)]
        for pair in owned:
            if pair not in chosen:
                close(pair[0])
        if {owner for _, owner in chosen} == set(pids) and len(chosen) == count:
            return chosen
        for conn, _ in chosen:
            close(conn)
    raise AssertionError(f"20 bursts of {burst} connections did not reach both workers")


def imap_connection(port: int) -> tuple[imaplib.IMAP4, socket.socket]:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    return imap, imap.sock


def imap_sessions(port: int, pids: list[int], count: int) -> list[tuple[Any, int]]:
    """``count`` logged-in IMAP sessions held by both workers."""
    sessions = spread(lambda: imap_connection(port), imaplib.IMAP4.shutdown, pids, count)
    for imap, _ in sessions:
        imap.login(USER, PASSWORD)
    return sessions


def imap_session(port: int) -> tuple[imaplib.IMAP4, socket.socket]:
    imap, sock = imap_connection(port)
    imap.login(USER, PASSWORD)
    return imap, sock


def send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.sendmail("someone@elsewhere.test", [USER],
                      f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def test_idle_sessions_in_every_worker_hear_new_mail_and_one_sees_it_recent(
        server: ServerProcess) -> None:
    pids = worker_pids(server)
    port = ports(server)
    sessions = imap_sessions(port["imap"], pids, 4)
    for imap, _ in sessions:
        imap.select("INBOX")
        tag = imap._new_tag().decode()
        imap.send(f"{tag} IDLE\r\n".encode())
        assert imap.readline().startswith(b"+ ")
    send(port["mx"], "to every worker")
    recent = []
    for imap, owner in sessions:
        lines = [imap.readline(), imap.readline()]
        assert lines[0] == b"* 1 EXISTS\r\n", (owner, lines)
        recent.append(int(re.match(rb"\* (\d+) RECENT", lines[1]).group(1)))
        imap.send(b"DONE\r\n")
        assert b"OK" in imap.readline()
    # RFC 3501 2.3.2: recent in exactly one session, whichever process it is in.
    assert sorted(recent) == [0] * (len(sessions) - 1) + [1]
    # A flag set in one worker reaches a session in the other.
    (first, _), (second, _) = next(
        (a, b) for a in sessions for b in sessions if a[1] != b[1])
    first.store("1", "+FLAGS", "\\Flagged")
    assert second.noop()[0] == "OK"
    fetched = [r for r in second.untagged_responses.get("FETCH", [])]
    assert any(b"\\Flagged" in r for r in fetched), fetched
    # LMTP delivers through a worker too; the other sessions hear of it.
    lmtp = smtplib.LMTP("127.0.0.1", port["lmtp"], timeout=20)
    assert lmtp.sendmail("someone@elsewhere.test", [USER],
                         b"Subject: over LMTP\r\n\r\nbody\r\n") == {}
    lmtp.quit()
    for imap, owner in sessions:
        imap.noop()             # with workers, NOOP reads the store: no race
        exists = imap.untagged_responses.get("EXISTS", [])
        assert exists[-1:] == [b"2"], (owner, imap.untagged_responses)
    for imap, _ in sessions:
        imap.logout()


def test_messages_appended_in_one_worker_are_recent_to_a_session_of_the_other(
        server: ServerProcess) -> None:
    """RFC 3501 2.3.2 across processes: APPENDs in one worker, then the first SELECT
    in the other worker sees them as recent, and only that one; also after the
    mailbox is deleted and made again (SQLite gives the new one the old id)."""
    pids = worker_pids(server)
    port = ports(server)
    (writer, _), (reader, _) = imap_sessions(port["imap"], pids, 2)
    for _round in range(2):
        writer.delete("Fresh")
        assert writer.create("Fresh")[0] == "OK"
        for number in (1, 2):
            assert writer.append("Fresh", "", None,
                                 f"Subject: {number}\r\n\r\nbody\r\n".encode())[0] == "OK"
        assert writer.status("Fresh", "(RECENT)")[1] == [b'Fresh (RECENT 2)']
        assert reader.select("Fresh")[0] == "OK"
        assert reader.untagged_responses.get("RECENT") == [b"2"]
        assert reader.search(None, "RECENT") == ("OK", [b"1 2"])
        assert writer.status("Fresh", "(RECENT)")[1] == [b'Fresh (RECENT 0)']
        reader.close()
    for imap in (writer, reader):
        imap.logout()


def test_the_per_user_imap_limit_counts_sessions_of_all_workers(
        server: ServerProcess) -> None:
    pids = worker_pids(server)
    port = ports(server)
    # Six sessions (the limit), held by both workers.
    sessions = imap_sessions(port["imap"], pids, 6)
    extra = imaplib.IMAP4("127.0.0.1", port["imap"], timeout=20)
    with pytest.raises(imaplib.IMAP4.error, match=r"\[LIMIT\]"):
        extra.login(USER, PASSWORD)
    sessions.pop()[0].logout()
    deadline = time.monotonic() + 10
    while True:                        # the logout reaches the main process
        again = imaplib.IMAP4("127.0.0.1", port["imap"], timeout=20)
        try:
            again.login(USER, PASSWORD)
            break
        except imaplib.IMAP4.error:
            again.shutdown()
            assert time.monotonic() < deadline, "the ended session was not counted out"
            time.sleep(0.1)
    again.logout()
    for imap, _ in sessions:
        imap.logout()


def pop3_connection(port: int) -> tuple[poplib.POP3, socket.socket] | None:
    try:
        pop = poplib.POP3("127.0.0.1", port, timeout=20)
    except poplib.error_proto:        # refused: over the connection limit
        return None
    return pop, pop.sock


def test_connection_limits_and_the_maildrop_lock_hold_across_workers(
        server: ServerProcess) -> None:
    pids = worker_pids(server)
    port = ports(server)
    # Four connections (max_connections_per_ip), held by both workers.
    conns = spread(lambda: pop3_connection(port["pop3"]), poplib.POP3.quit, pids, 4,
                   burst=4)
    refused = socket.create_connection(("127.0.0.1", port["pop3"]), timeout=20)
    assert refused.recv(200).startswith(b"-ERR")
    refused.close()
    # The maildrop lock: logged in through one worker, refused through the other.
    (first, _), (second, _) = next(
        (a, b) for a in conns for b in conns if a[1] != b[1])
    first.user(USER)
    first.pass_(PASSWORD)
    second.user(USER)
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        second.pass_(PASSWORD)
    for pop, _ in conns:
        pop.quit()


def test_a_maildrop_is_free_as_soon_as_quit_is_answered_in_any_worker(
        server: ServerProcess) -> None:
    """QUIT answers only once the main process has released the lock: a client that
    logs in again at once, through the other worker, never finds it IN-USE.  (The
    race itself needs load to show; tests/test_pop3.py holds the release back to
    prove the order.)"""
    pids = worker_pids(server)
    port = ports(server)
    for _ in range(10):
        pairs = spread(lambda: pop3_connection(port["pop3"]), poplib.POP3.quit, pids, 2,
                       burst=4)
        (first, _), (second, _) = pairs
        first.user(USER)
        first.pass_(PASSWORD)
        second.user(USER)
        first.quit()
        second.pass_(PASSWORD)            # raised error_proto (IN-USE) before
        second.quit()


def test_a_killed_worker_is_restarted_and_what_it_held_is_released(
        server: ServerProcess) -> None:
    pids = worker_pids(server)
    port = ports(server)
    conns = spread(lambda: pop3_connection(port["pop3"]), poplib.POP3.quit, pids, 2,
                   burst=4)
    victim_pop, victim = conns[0]
    victim_pop.user(USER)
    victim_pop.pass_(PASSWORD)            # holds the maildrop lock in the victim
    # Forked as the server started ([server] prefork); started again, a new
    # interpreter (the main process has threads by then).
    assert started_as(victim) == ("forked", "worker")
    os.kill(victim, signal.SIGKILL)
    server.wait_for(r"worker \d+ ended: .*starting it again")
    restarted = server.wait_for(r"worker (\d+) started \(pid (\d+)\)", count=3)[-1]
    assert started_as(int(restarted.group(2))) == ("exec", "worker")
    server.wait_for(r"worker \d+: pop3 on", count=3)
    # The lock and the connection count the dead worker held are released: four
    # connections (the limit) and a login as the same user all work.
    for pop, _ in conns[1:]:
        pop.quit()
    fresh = []
    for _ in range(4):
        opened = pop3_connection(port["pop3"])
        assert opened is not None, "refused: the dead worker's connections still count"
        fresh.append(opened[0])
    fresh[0].user(USER)
    assert fresh[0].pass_(PASSWORD).startswith(b"+OK")
    for pop in fresh:
        pop.quit()
    # And mail still arrives and is read.
    send(port["mx"], "after the restart")
    imap, _ = imap_session(port["imap"])
    assert imap.select("INBOX")[1] == [b"1"]
    imap.logout()


def test_sigterm_stops_the_workers_and_the_main_process(server: ServerProcess) -> None:
    pids = worker_pids(server)
    port = ports(server)
    send(port["mx"], "before the stop")
    # After a clean shutdown twistd ends itself with the signal it got.
    assert server.terminate(timeout=60) in (0, -signal.SIGTERM)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    assert "LightMail stopped" in server.output
    assert "worker 0 ended" not in server.output   # stopped, not restarted


def test_workers_need_a_config_file() -> None:
    from lightmail.config import ConfigError, parse_config
    from lightmail.service import validate
    with pytest.raises(ConfigError, match="worker processes read the config file"):
        parse_config("[server]\nworkers = 2\n", "<embedded>", validate)


def test_a_worker_that_cannot_start_stops_start_up(write_config: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No restart loop: the main process says which worker failed and exits 1."""
    # A sitecustomize that fails the worker's interpreter only (not twistd's): a new
    # interpreter (prefork = no), as a forked worker has no start-up to break.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(
        "import sys\n"
        "if 'lightmail.workers.worker' in sys.orig_argv:\n"
        "    raise SystemExit('worker refuses to start (test)')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(broken)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.workers.test\nworkers = 1\n"
        "prefork = no\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n")
    proc = ServerProcess(config)
    try:
        proc.wait_for(r"worker 0 could not start")
        proc.wait_for(r"LightMail cannot run: worker 0 could not start")
        assert proc.proc.wait(30) == 1
        assert "worker refuses to start (test)" in proc.output
        assert "starting it again" not in proc.output
    finally:
        proc.kill()


def test_sigterm_with_a_unix_socket_listener_stops_every_part_cleanly(
        write_config: Any, tmp_path: Path) -> None:
    """Workers serving a Unix socket (LMTP behind Postfix) stop without removing the
    main process's socket file, so that each worker's storage is stopped too: no
    traceback, and the spare temporary blob files are gone."""
    import tempfile
    short = Path(tempfile.mkdtemp(prefix="lm-", dir="/tmp"))    # sun_path is short
    sock = short / "lmtp.sock"
    try:
        config = write_config(
            "[server]\nstate_dir = state\nhostname = mx.workers.test\nworkers = 2\n"
            "[logging]\nlevel = info\n"
            f"[listener:lmtp]\nprotocol = lmtp\nendpoint = unix:{sock}\n")
        run_cli(config, "domain", "add", "workers.test")
        run_cli(config, "user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        proc = ServerProcess(config)
        try:
            worker_pids(proc)
            deadline = time.monotonic() + 30
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            for number in range(6):          # over both workers, most likely
                with smtplib.LMTP(str(sock)) as client:
                    client.sendmail("s@example.org", [USER],
                                    f"Subject: unix {number}\r\n\r\nbody\r\n")
            assert proc.terminate(timeout=60) in (0, -signal.SIGTERM)
        finally:
            proc.kill()
        assert "LightMail stopped" in proc.output
        assert "Traceback" not in proc.output, proc.output
        assert not sock.exists()                      # removed by the main process
        tmp = tmp_path / "state" / "blobs" / "tmp"
        assert list(tmp.iterdir()) == []              # every worker closed its spares
    finally:
        for leftover in short.iterdir():
            leftover.unlink()
        short.rmdir()
