"""Idle footprint: LightMail's demo set-up beside Postfix and Dovecot, same machine, same run.

    .venv/bin/python bench/memory.py [--smtp 500] [--imap 200] [--messages 20]
                                     [--only lightmail,postfix,dovecot] [--json FILE]

Issue 22, point 2.  Each server runs alone in turn and is measured once its memory
stops moving:

**LightMail**: ``etc/lightmail.conf`` (the demo: main process, two workers, the writer
process) copied to a temporary directory with every TCP port set to 0, more
connections allowed per listener, client address and user (the defaults stop at 20)
and password logins allowed without TLS (``auth_over_plaintext``, as Dovecot's
harness has no TLS); ``lightmail demo-setup``; ``twistd --pidfile= -n lightmail``.
Printed: the proportional memory (``Pss`` of ``/proc/PID/smaps_rollup``) of each
process and their total before the first connection; then, per connection, the
growth of that total with ``--smtp`` idle SMTP connections on the MX listener
(greeting read, then silence) and with ``--imap`` IMAP sessions logged in with INBOX
selected (``--messages`` messages in it, delivered over LMTP); and each process again
after those connections closed and one message went through SMTP ("after use": what
a lazy import put off is paid by then).

**Postfix** (``tests/postfix.py``): its processes' Pss once idle (master, qmgr,
pickup...), then per idle SMTP connection (one ``smtpd`` process each; at most 90,
as Postfix runs 100 ``smtpd`` at most by default).

**Dovecot** (``tests/dovecot.py``, connection limits raised): its processes' Pss once
idle, then per IMAP session logged in with INBOX selected (one ``imap`` process
each), the same messages in INBOX.

Pss shares a page out among the processes that map it, so a server's processes add
up to what the server holds.  Other processes of this machine mapping the same files
(Python's shared library, say) lower the figures a little.  Needs Postfix, Dovecot
(``scripts/test-peers.sh``) and root (Postfix's daemons switch users).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import smtplib
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path[:0] = [str(TESTS), str(ROOT)]

from dovecot import DovecotInstance, group_members  # noqa: E402
from harness import ServerProcess, free_port, run_cli  # noqa: E402
from postfix import PostfixInstance  # noqa: E402

DEMO_USER, DEMO_PASSWORD = "demo@example.test", "demo-password"     # demo-setup's
DOVECOT_USER, DOVECOT_PASSWORD = "idle@dovecot.test", "idle-password"
POSTFIX_MAX = 90           # under Postfix's default_process_limit (100 smtpd)
LIMIT = 10000              # connections per listener, address and user


# --- measuring -------------------------------------------------------------------------

def pss_kb(pid: int, field: str = "Pss") -> int:
    """``Pss`` (or ``Pss_Anon``, ``Pss_File``) of ``/proc/PID/smaps_rollup``, in KB."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass        # gone meanwhile
    return 0


def split_pss(pids: dict[str, int]) -> dict[str, dict[str, int]]:
    """Each process's Pss in KB, and its anonymous and file-backed parts: the files'
    pages (Python's library, the extension modules) are shared out with every process
    of the machine that maps them, this run's others included, so that part moves
    with what else runs; the anonymous part is the server's own."""
    return {label: {"pss": pss_kb(pid), "anon": pss_kb(pid, "Pss_Anon"),
                    "file": pss_kb(pid, "Pss_File")} for label, pid in pids.items()}


def settle(measure: Callable[[], dict[str, int]], rounds: int = 40) -> dict[str, int]:
    """The figures once they stopped moving (by less than 64 KB in all between two
    readings half a second apart): a process still starting, or a login process
    still exiting, is not measured midway."""
    last = measure()
    for _ in range(rounds):
        time.sleep(0.5)
        now = measure()
        if (now.keys() == last.keys()
                and abs(sum(now.values()) - sum(last.values())) < 64):
            return now
        last = now
    return last


def group_pss(pgid: int) -> Callable[[], dict[str, int]]:
    """Pss of every live process of a process group, by pid."""
    return lambda: {str(pid): pss_kb(pid) for pid in group_members(pgid)}


# --- clients ---------------------------------------------------------------------------

def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def read_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    data = b""
    while not done(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server after {data[-300:]!r}")
        data += chunk
    return data


def smtp_idle(port: int, count: int) -> list[socket.socket]:
    """``count`` SMTP connections, each greeted (a whole ``220`` line), then left idle."""
    conns = []
    for _ in range(count):
        sock = connect(port)
        greeting = read_until(sock, lambda data: data.endswith(b"\r\n")
                              and re.search(rb"(^|\n)\d{3} ", data) is not None)
        if not greeting.startswith(b"220"):
            raise AssertionError(f"SMTP greeting {greeting!r}")
        conns.append(sock)
    return conns


def imap_selected(port: int, count: int, user: str, password: str) -> list[socket.socket]:
    """``count`` IMAP sessions logged in as ``user``, INBOX selected, then left idle."""
    conns = []
    for _ in range(count):
        sock = connect(port)
        read_until(sock, lambda data: data.endswith(b"\r\n"))
        for tag, command in ((b"a", f'LOGIN "{user}" "{password}"'), (b"b", "SELECT INBOX")):
            sock.sendall(tag + b" " + command.encode() + b"\r\n")
            reply = read_until(sock, lambda data, tag=tag: re.search(
                rb"(^|\r\n)" + tag + rb" (OK|NO|BAD)[^\r\n]*\r\n$", data) is not None)
            if not re.search(rb"(^|\r\n)" + tag + rb" OK", reply):
                raise AssertionError(f"IMAP {command.split()[0]}: {reply[-300:]!r}")
        conns.append(sock)
    return conns


def per_connection(measure: Callable[[], dict[str, int]],
                   open_them: Callable[[int], list[socket.socket]], count: int,
                   rounds: int = 2) -> dict[str, Any]:
    """KB of Pss per connection: the growth of the processes' total with ``count``
    connections open, the first time ("first") and again once those closed ("again":
    what a connection costs a server that has served some, without what the first
    ones paid once: code run for the first time, pages a forked process copies as
    it writes to them).  With "by process": each process's growth per connection."""
    result: dict[str, Any] = {"connections": count}
    for name in ("first", "again")[:rounds]:
        before = settle(measure)
        conns = open_them(count)
        try:
            after = settle(measure)
        finally:
            for sock in conns:
                sock.close()
        growth = {key: after.get(key, 0) - before.get(key, 0)
                  for key in before.keys() | after.keys()}
        result[name] = round(sum(growth.values()) / count, 1)
        result[f"{name} by process"] = {key: round(kb / count, 1)
                                        for key, kb in sorted(growth.items())}
    return result


def describe(what: str, figures: dict[str, Any], serving: str = "") -> str:
    """One line: the figures of :func:`per_connection`, and those of the processes
    whose labels start with ``serving`` (the workers)."""
    parts = []
    for name in ("first", "again"):
        if name in figures:
            text = f"{name} {figures[name]:.1f} KB"
            if serving:
                own = sum(kb for key, kb in figures[f"{name} by process"].items()
                          if key.startswith(serving))
                text += f" (the {serving}s {own:.1f})"
            parts.append(text)
    return f"  per {what} ({figures['connections']}): " + ", ".join(parts)


def deliver(port: int, rcpt: str, count: int) -> None:
    """``count`` small messages to ``rcpt`` over LMTP."""
    with smtplib.LMTP("127.0.0.1", port) as lmtp:
        for index in range(count):
            lmtp.sendmail("sender@bench.test", [rcpt],
                          f"From: sender@bench.test\r\nTo: {rcpt}\r\n"
                          f"Subject: message {index}\r\n\r\n" + "body line\r\n" * 40)


# --- LightMail -------------------------------------------------------------------------

def demo_config(text: str, prefork: str = "") -> str:
    """The demo config, fit for this run: TCP ports 0, limits and logins as above;
    ``[server] prefork`` as given (the file's otherwise)."""
    text = re.sub(r"tcp:\d+:", "tcp:0:", text)
    if prefork:
        text = text.replace("[server]\n", f"[server]\nprefork = {prefork}\n", 1)
    text = text.replace("auth_over_plaintext = no", "auth_over_plaintext = yes")
    more = f"max_connections = {LIMIT}\nmax_connections_per_ip = {LIMIT}\n"
    text = re.sub(r"^(\[listener:[^\]]+\]\n)", lambda m: m.group(1) + more, text,
                  flags=re.MULTILINE)
    return text + f"\n[imap]\nmax_connections_per_user = {LIMIT}\n"


class LightMailDemo:
    PID = re.compile(r"(?P<what>worker \d+|writer process|fork server) started \(pid "
                     r"(?P<pid>\d+)\)")

    def __init__(self, config: Path, prefork: str = "") -> None:
        self.base = Path(tempfile.mkdtemp(prefix="lightmail-bench-memory-"))
        (self.base / "etc").mkdir()
        self.config = self.base / "etc" / "lightmail.conf"
        self.config.write_text(demo_config(config.read_text(), prefork))
        run_cli(self.config, "demo-setup")
        self.server = ServerProcess(self.config)
        self.ports = self.server.ports(expected=8)      # lmtp's Unix socket has none
        self.pgid = self.server.proc.pid

    def labels(self) -> dict[int, str]:
        found = {self.server.proc.pid: "main"}
        for match in map(self.PID.search, self.server.output.splitlines()):
            if match:
                found[int(match.group("pid"))] = match.group("what").replace(" process", "")
        return found

    def pids(self) -> dict[str, int]:
        labels = self.labels()
        return {labels.get(pid, f"pid {pid}"): pid for pid in group_members(self.pgid)}

    def measure(self) -> dict[str, int]:
        return {label: pss_kb(pid) for label, pid in self.pids().items()}

    def stop(self) -> None:
        self.server.terminate()
        shutil.rmtree(self.base, ignore_errors=True)


def run_lightmail(args: argparse.Namespace) -> dict[str, Any]:
    demo = LightMailDemo(Path(args.config), args.prefork)
    try:
        settle(demo.measure)
        processes = split_pss(demo.pids())
        row: dict[str, Any] = {"processes_kb": processes,
                               "total_kb": sum(p["pss"] for p in processes.values())}
        print_processes("LightMail, idle", processes)
        if args.smtp:
            row["smtp_idle"] = per_connection(
                demo.measure, lambda n: smtp_idle(demo.ports["mx"], n), args.smtp)
            print(describe("idle SMTP connection", row["smtp_idle"], "worker"))
        if args.imap:
            deliver(demo.ports["lmtp-tcp"], DEMO_USER, args.messages)
            row["imap_selected"] = per_connection(demo.measure, lambda n: imap_selected(
                demo.ports["imap"], n, DEMO_USER, DEMO_PASSWORD), args.imap)
            print(describe("IMAP session, INBOX selected", row["imap_selected"], "worker"))
        with smtplib.SMTP("127.0.0.1", demo.ports["mx"]) as smtp:
            smtp.sendmail("sender@bench.test", [DEMO_USER],
                          f"From: sender@bench.test\r\nTo: {DEMO_USER}\r\n"
                          "Subject: one\r\n\r\nbody\r\n")
        settle(demo.measure)
        used = split_pss(demo.pids())
        row["after_use_kb"] = used
        row["after_use_total_kb"] = sum(p["pss"] for p in used.values())
        print_processes("LightMail, after use (connections closed, one message taken)",
                        used)
        return row
    finally:
        demo.stop()


# --- the references --------------------------------------------------------------------

def run_postfix(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    postfix = PostfixInstance(None, port)
    postfix.start()
    try:
        pgid = int((postfix.base / "spool" / "pid" / "master.pid").read_text())
        measure = group_pss(pgid)
        idle = settle(measure)
        row = reference_row("Postfix", idle)
        if args.smtp:
            # Once: each connection gets an smtpd process, and the first round's
            # would stay (max_idle) to take the next round's connections.
            row["smtp_idle"] = per_connection(measure, lambda n: smtp_idle(port, n),
                                              min(args.smtp, POSTFIX_MAX), rounds=1)
            print(describe("idle SMTP connection, an smtpd process each",
                           row["smtp_idle"]))
        return row
    finally:
        postfix.stop()


def run_dovecot(args: argparse.Namespace) -> dict[str, Any]:
    dovecot = DovecotInstance(
        settings={"mail_max_userip_connections": str(LIMIT),
                  "default_client_limit": str(max(1000, 2 * args.imap + 500))},
        services=f"service imap {{\n  process_limit = {args.imap + 500}\n}}\n")
    dovecot.add_user(DOVECOT_USER, DOVECOT_PASSWORD)
    dovecot.start()
    try:
        assert dovecot.proc is not None
        measure = group_pss(dovecot.proc.pid)
        idle = settle(measure)
        row = reference_row("Dovecot", idle)
        if args.imap:
            deliver(dovecot.lmtp_port, DOVECOT_USER, args.messages)
            row["imap_selected"] = per_connection(measure, lambda n: imap_selected(
                dovecot.imap_port, n, DOVECOT_USER, DOVECOT_PASSWORD), args.imap)
            print(describe("IMAP session, INBOX selected, an imap process each",
                           row["imap_selected"]))
        return row
    finally:
        dovecot.stop()


def reference_row(name: str, idle: dict[str, int]) -> dict[str, Any]:
    processes = split_pss({pid: int(pid) for pid in idle})
    row: dict[str, Any] = {"total_kb": sum(p["pss"] for p in processes.values()),
                           "anon_kb": sum(p["anon"] for p in processes.values()),
                           "file_kb": sum(p["file"] for p in processes.values()),
                           "processes": len(processes)}
    print(f"{name}, idle: {len(processes)} processes, Pss {row['total_kb'] / 1024:.1f} MiB "
          f"(anonymous {row['anon_kb'] / 1024:.1f}, files {row['file_kb'] / 1024:.1f})")
    return row


def print_processes(title: str, processes: dict[str, dict[str, int]]) -> None:
    def mib(key: str, figures: dict[str, int]) -> str:
        return f"{figures[key] / 1024:6.1f}"
    total = {key: sum(p[key] for p in processes.values()) for key in ("pss", "anon", "file")}
    print(f"{title}: {len(processes)} processes, Pss {total['pss'] / 1024:.1f} MiB "
          f"(anonymous {total['anon'] / 1024:.1f}, files {total['file'] / 1024:.1f})")
    for label, figures in sorted(processes.items()):
        print(f"  {label:<12} {mib('pss', figures)} MiB  "
              f"({mib('anon', figures)} + {mib('file', figures)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "etc" / "lightmail.conf"),
                        help="the LightMail config to copy (default: the demo's)")
    parser.add_argument("--smtp", type=int, default=500, help="idle SMTP connections")
    parser.add_argument("--imap", type=int, default=200, help="IMAP sessions")
    parser.add_argument("--messages", type=int, default=20, help="in INBOX")
    parser.add_argument("--only", default="lightmail,postfix,dovecot")
    parser.add_argument("--prefork", choices=("yes", "no"),
                        help="LightMail's [server] prefork (default: the config's)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    runs = {"lightmail": run_lightmail, "postfix": run_postfix, "dovecot": run_dovecot}
    results: dict[str, Any] = {}
    for name in args.only.split(","):
        results[name] = runs[name](args)
    if {"lightmail", "postfix", "dovecot"} <= results.keys():
        lm, pf, dc = results["lightmail"], results["postfix"], results["dovecot"]
        print(f"idle Pss: LightMail {lm['total_kb'] / 1024:.1f} MiB, Postfix "
              f"{pf['total_kb'] / 1024:.1f} MiB, Dovecot {dc['total_kb'] / 1024:.1f} MiB")
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
