"""Worker and writer processes forked from the main process as it starts
(lightmail/workers/prefork.py): what the main process imports before the fork installs
no reactor and starts no thread, a forked child gets its descriptors at the numbers
asked for and its whole standard input, the fork is declined where it cannot be made,
and a real server's workers and writer are forked, share the main process's memory,
serve, are replaced by new interpreters when they die, and end with the server, used
or not."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from dovecot import group_members
from harness import ServerProcess, run_cli, started_as, stored_messages
from twisted.internet import reactor  # noqa: F401  (installed: no fork in this process)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from lightmail.config import parse_config
from lightmail.processes import ChildProcess, ExecStarter, IProcessStarter
from lightmail.workers.prefork import prefork

ROOT = Path(__file__).resolve().parent.parent

LISTENERS = "".join(
    f"[listener:{name}]\nprotocol = {protocol}\nendpoint = tcp:0:interface=127.0.0.1\n"
    for name, protocol in (("mx", "smtp"), ("submission", "submission"),
                           ("lmtp", "lmtp"), ("imap", "imap"), ("pop3", "pop3")))


def run_python(code: str) -> str:
    """Run ``code`` in a new interpreter (this one has a reactor and threads)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- before the fork ------------------------------------------------------------------

def test_what_is_loaded_before_the_fork_installs_no_reactor_and_starts_no_thread(
        write_config: Any) -> None:
    """The twistd plugin's checks (service.validate) and the preload must leave the
    main process fit to fork; and what no process of this config uses stays out."""
    config = write_config("[server]\nstate_dir = state\nworkers = 2\n" + LISTENERS)
    found = json.loads(run_python(f"""
        import json, os, sys
        from lightmail.config import load_config
        from lightmail.service import validate
        from lightmail.workers.prefork import _preload
        config = load_config({str(config)!r}, validators=validate)
        _preload(config)
        print(json.dumps({{
            "reactor": "twisted.internet.reactor" in sys.modules,
            "threads": len(os.listdir("/proc/self/task")),
            "loaded": [name for name in ("lightmail.smtp.session", "lightmail.imap.session",
                                         "lightmail.pop3.session", "lightmail.lmtp.session",
                                         "numpy", "twisted.internet.epollreactor")
                       if name in sys.modules],
            "unused": [name for name in ("ldap3", "alembic", "mako", "passlib")
                       if name in sys.modules]}}))
        """))
    assert found == {"reactor": False, "threads": 1, "unused": [],
                     "loaded": ["lightmail.smtp.session", "lightmail.imap.session",
                                "lightmail.pop3.session", "lightmail.lmtp.session",
                                "numpy", "twisted.internet.epollreactor"]}


def test_a_forked_child_gets_its_descriptors_where_asked_and_its_whole_input() -> None:
    """The descriptors arrive at whatever numbers are free, some of them the numbers
    others are to take; standard input is larger than a pipe holds.  Meanwhile the
    child waited through the signals a process group gets (Ctrl-C, logrotate's
    SIGUSR1, a terminal's SIGHUP), which are for the main process."""
    out = json.loads(run_python("""
        import json, os, signal, socket, time
        from lightmail.workers.prefork import _wait_and_run
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            ours.close()
            _wait_and_run(theirs, "tests.helpers.fork_probe")
        theirs.close()
        time.sleep(0.5)
        for number in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            os.kill(pid, number)
        pipes = [os.pipe() for _ in range(3)]
        targets = [4, 3, 9]
        stdin = os.urandom(300000)
        header = json.dumps({"args": [str(t) for t in targets], "fds": targets}).encode()
        socket.send_fds(ours, [header + b"\\n" + stdin], [w for _, w in pipes])
        ours.close()
        for _, w in pipes:
            os.close(w)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"got": [os.read(r, 200).decode() for r, _ in pipes],
                          "status": os.waitstatus_to_exitcode(status),
                          "size": len(stdin),
                          "sha": __import__("hashlib").sha256(stdin).hexdigest()}))
        """))
    assert out["status"] == 3                       # fork_probe's main returned it
    assert out["got"] == [f"{fd} {out['size']} {out['sha']}" for fd in (4, 3, 9)]


def test_a_child_never_used_ends_when_the_main_process_lets_it_go() -> None:
    out = run_python("""
        import os, socket
        from lightmail.workers.prefork import _wait_and_run
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            ours.close()
            _wait_and_run(theirs, "tests.helpers.fork_probe")
        theirs.close()
        ours.close()
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """)
    assert out.strip() == "0"


@implementer(IProcessStarter)
class Recording:
    def start(self, protocol: ProcessProtocol, module: str, args: list[str],
              fds: dict[int, int], stdin: bytes) -> ChildProcess:
        raise AssertionError("not to be called here")


def test_no_fork_where_it_cannot_be_made(write_config: Any) -> None:
    """This (test) process has a reactor installed: the starter falls back, and the
    log says why; with prefork = no too; with nothing to start, silently."""
    said: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "lightmail.workers.prefork":
            said.append(str(event.get("why")))
    globalLogPublisher.addObserver(observe)
    try:
        fallback = Recording()
        path = write_config("[server]\nworkers = 2\n")
        config = parse_config(path.read_text(), str(path))
        assert prefork(config, fallback) is fallback
        assert said == ["a reactor is installed already"]
        config = parse_config(path.read_text() + "prefork = no\n", str(path))
        assert prefork(config, fallback) is fallback
        assert said[-1] == "[server] prefork = no"
        quiet = parse_config("[storage]\nwriter_process = no\n", "<embedded>")
        assert prefork(quiet, fallback) is fallback and len(said) == 2
        assert isinstance(prefork(quiet), ExecStarter)
    finally:
        globalLogPublisher.removeObserver(observe)


# -- a real server --------------------------------------------------------------------

def _memory(pid: int) -> dict[str, int]:
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return {line.split()[0].rstrip(":"): int(line.split()[1]) for line in rollup}


def _parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("PPid:")[1].split()[0])


def test_the_workers_and_writer_are_forked_share_memory_serve_and_stop(
        write_config: Any, tmp_path: Path) -> None:
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.prefork.test\nworkers = 2\n"
        "[logging]\nlevel = info\n" + LISTENERS)
    run_cli(config, "domain", "add", "prefork.test")
    run_cli(config, "user", "add", "bob@prefork.test", "--no-password")
    server = ServerProcess(config)
    try:
        ports = server.ports(expected=5)
        main = server.proc.pid
        workers = [int(m.group(1)) for m in
                   server.wait_for(r"worker \d+ started \(pid (\d+)\)", count=2)]
        (writer,) = [int(m.group(1)) for m in
                     server.wait_for(r"writer process started \(pid (\d+)\)")]
        assert [started_as(pid) for pid in [*workers, writer]] == \
            [("forked", "worker"), ("forked", "worker"), ("forked", "writer")]
        assert {_parent(pid) for pid in [*workers, writer]} == {main}
        # What they imported before the fork they share with the main process (and
        # each other) for as long as none of them writes to it.
        for pid in [*workers, writer]:
            assert _memory(pid)["Shared_Dirty"] > 20 * 1024, _memory(pid)
        # Their descriptors are in place: the listeners accept, the control and
        # writer links carry the message, and it is filed.
        with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=10) as smtp:
            assert smtp.sendmail("a@client.test", ["bob@prefork.test"],
                                 b"Subject: forked\r\n\r\nhello\r\n") == {}
        assert [(user, box) for user, box, _ in stored_messages(tmp_path / "state")] == \
            [("bob", "INBOX")]
        assert server.terminate(timeout=60) in (0, -signal.SIGTERM)
        assert "LightMail stopped" in server.output
        assert "ended before it was used" not in server.output
        assert group_members(main) == []
    finally:
        server.kill()


def test_children_never_used_end_with_a_server_that_cannot_start(
        write_config: Any) -> None:
    """The mx port is taken: the main process stops before it uses its forked
    children, which end with it, and nothing is left of the process group."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.prefork.test\nworkers = 2\n"
        f"[listener:mx]\nprotocol = smtp\nendpoint = tcp:{port}:interface=127.0.0.1\n")
    server = ServerProcess(config)
    try:
        assert server.proc.wait(60) == 1
        deadline = time.monotonic() + 10
        while group_members(server.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert group_members(server.proc.pid) == []
    finally:
        server.kill()
        taken.close()


def test_prefork_no_starts_new_interpreters(write_config: Any) -> None:
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.prefork.test\nworkers = 1\n"
        "prefork = no\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n")
    server = ServerProcess(config)
    try:
        server.ports(expected=1)
        (worker,) = [int(m.group(1)) for m in
                     server.wait_for(r"worker \d+ started \(pid (\d+)\)")]
        (writer,) = [int(m.group(1)) for m in
                     server.wait_for(r"writer process started \(pid (\d+)\)")]
        assert started_as(worker) == ("exec", "worker")
        assert started_as(writer) == ("exec", "writer")
        assert "start as new interpreters: [server] prefork = no" in server.output
        assert server.terminate(timeout=60) in (0, -signal.SIGTERM)
    finally:
        server.kill()
