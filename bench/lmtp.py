"""LMTP delivery benchmark: LightMail against Dovecot, same machine, same run.

    .venv/bin/python bench/lmtp.py [--connections 1,10] [--size 4096] [--per-connection 50]
                                   [--seconds 10 | --count N] [--only lightmail|dovecot]
                                   [--json results.jsonl]

Client processes (one per connection, plain sockets, in the manner of an MTA's LMTP
client: LHLO once, then MAIL/RCPT/DATA pipelined when the server offers PIPELINING)
deliver 4 KB messages, each to one recipient and each with its own Message-ID, several
per connection (``--per-connection``) before QUIT and a new connection.  Each run has
a recipient of its own, so each starts with an empty mailbox.  LightMail runs as
``twistd lightmail`` (SQLite store, ``[listener:lmtp] protocol = lmtp``); Dovecot as a
private instance (``tests/dovecot.py``) with Maildir storage.  Both keep their
durability defaults (LightMail fsyncs blob and commit; Dovecot's ``mail_fsync =
optimized`` fsyncs each saved message).

Reported per server and number of connections: deliveries per second, counted from the
messages that landed in the mailbox (SQL rows for LightMail, Maildir files for
Dovecot) until the last one did, and the ratio LightMail/Dovecot; also the rate of 250
replies.  A run where a message is refused or does not land fails.  Each row is printed
as a table line, and as a JSON line at the end (and into ``--json FILE``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from dovecot import DovecotInstance  # noqa: E402
from harness import ServerProcess, free_port  # noqa: E402

DOMAIN = "bench.test"
SENDER = "sender@client.test"
POLL = 0.02


# --- the servers ---------------------------------------------------------------------

def lightmail_cli(config: Path, *args: str, stdin: str | None = None) -> str:
    """Run the ``lightmail`` admin command; stop the benchmark with its error if it fails."""
    result = subprocess.run([sys.executable, "-m", "lightmail.admin.cli", "--config",
                             str(config), *args], input=stdin, capture_output=True,
                            text=True, timeout=120)
    if result.returncode:
        raise SystemExit(f"lightmail {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


class LightMail:
    """``twistd lightmail`` with the SQLite store; ``listeners`` maps a listener name
    to its protocol and extra lines (each gets a free loopback port)."""

    name = "LightMail"

    def __init__(self, base: Path, listeners: dict[str, str], extra_config: str = "",
                 workers: int = 0) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.state = base / "state"
        self.config = base / "lightmail.conf"
        self.ports = {name: free_port() for name in listeners}
        sections = "".join(
            f"[listener:{name}]\n{body.strip()}\n"
            f"endpoint = tcp:{self.ports[name]}:interface=127.0.0.1\n"
            "max_connections = 2000\nmax_connections_per_ip = 2000\n"
            for name, body in listeners.items())
        self.config.write_text(
            f"[server]\nstate_dir = {self.state}\nhostname = lightmail.bench.test\n"
            f"workers = {workers}\n"
            f"[logging]\nlevel = info\n{extra_config}{sections}")
        lightmail_cli(self.config, "domain", "add", DOMAIN)
        self.server: ServerProcess | None = None

    def add_user(self, address: str, password: str | None = None) -> None:
        if password is None:
            lightmail_cli(self.config, "user", "add", address, "--no-password")
        else:
            lightmail_cli(self.config, "user", "add", address, "--password-stdin",
                          stdin=password + "\n")

    def start(self) -> None:
        self.server = ServerProcess(self.config)
        try:
            found = self.server.ports(expected=len(self.ports), timeout=60)
        except AssertionError as exc:
            self.stop()
            raise SystemExit(f"LightMail did not start its listeners "
                             f"{sorted(self.ports)}:\n{exc}") from None
        assert found == self.ports, (found, self.ports)

    def delivered(self, address: str) -> int:
        """Messages filed in any mailbox of the user at ``address``."""
        db = sqlite3.connect(f"file:{self.state / 'lightmail.db'}?mode=ro", uri=True)
        try:
            return int(db.execute(
                "select count(*) from messages m join mailboxes b on b.id = m.mailbox_id "
                "join users u on u.id = b.user_id where u.localpart = ?",
                (address.partition("@")[0].lower(),)).fetchone()[0])
        finally:
            db.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server = None


class Dovecot:
    """A private Dovecot (tests/dovecot.py): LMTP, POP3 and IMAP, Maildir storage."""

    name = "Dovecot"

    def __init__(self, scheme: str = "PLAIN", settings: dict[str, str] | None = None) -> None:
        self.instance = DovecotInstance(settings=settings)
        self.scheme = scheme
        self.ports = {"lmtp": self.instance.lmtp_port, "pop3": self.instance.pop3_port,
                      "imap": self.instance.imap_port}

    def add_user(self, address: str, password: str | None = None) -> None:
        self.instance.add_user(address, password or "no-login-" + os.urandom(8).hex(),
                               self.scheme)

    def start(self) -> None:
        self.instance.start()

    def delivered(self, address: str) -> int:
        return self.instance.count(address)

    def stop(self) -> None:
        self.instance.stop()


Server = LightMail | Dovecot


def wait_delivered(server: Server, address: str, count: int, timeout: float = 600) -> float:
    """Wait until ``address`` holds ``count`` messages; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while True:
        got = server.delivered(address)
        if got >= count:
            if got > count:
                raise SystemExit(f"{server.name}: {got} messages for {address}, "
                                 f"expected {count}")
            return time.monotonic()
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name}: only {got} of {count} messages reached "
                             f"{address}")
        time.sleep(POLL)


# --- client processes ----------------------------------------------------------------

def _client_main(target: Callable[..., dict], args: tuple, barrier: Any, results: Any) -> None:
    try:
        barrier.wait()
        cpu = time.process_time()
        out = target(*args)
        out["end"] = time.monotonic()
        out["cpu"] = time.process_time() - cpu
    except BaseException:  # report everything: the parent must not wait forever
        out = {"error": traceback.format_exc()}
    results.put(out)


def run_clients(target: Callable[..., dict], per_client: list[tuple],
                timeout: float) -> tuple[list[dict], float, float]:
    """Run ``target(*args)`` in one process per entry of ``per_client``, released
    together; returns their results, the start time and the wall time until the last
    one finished.  Each result must be a dict; a client error stops the benchmark.
    Each result gets ``cpu``, the client's CPU seconds: the clients share the machine
    with the server, and a run where they use much of it measures them too."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(per_client) + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_client_main, args=(target, args, barrier, results),
                         daemon=True) for args in per_client]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=60)
        start = time.monotonic()
        outs = [results.get(timeout=timeout) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    errors = [out["error"] for out in outs if "error" in out]
    if errors:
        raise SystemExit("a client failed:\n" + errors[0])
    return outs, start, max(out["end"] for out in outs) - start


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as whole numbers go."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def make_message(size: int, ident: str, to: str) -> bytes:
    """A message of about ``size`` bytes: headers, then 72-character lines (no dots)."""
    head = (f"From: Bench Sender <{SENDER}>\r\nTo: <{to}>\r\n"
            f"Subject: benchmark message {ident}\r\nMessage-ID: <{ident}@client.test>\r\n"
            "Date: Mon, 2 Mar 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines


class Reader:
    """Buffered line reading from a socket (faster than makefile for short replies)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                return line
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("connection closed by the server")
            self.buf += data

    def until(self, terminator: bytes) -> bytes:
        """Everything up to and including ``terminator`` (a POP3 multi-line body)."""
        start = 0
        while True:
            end = self.buf.find(terminator, start)
            if end >= 0:
                end += len(terminator)
                data, self.buf = self.buf[:end], self.buf[end:]
                return data
            start = max(0, len(self.buf) - len(terminator))
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("connection closed by the server")
            self.buf += data

    def reply(self) -> tuple[int, list[bytes]]:
        """An SMTP/LMTP reply: its code and its lines."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return int(lines[-1][:3]), lines


def connect(port: int) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, Reader(sock)


def expect(reader: Reader, code: int, what: str) -> None:
    got, lines = reader.reply()
    if got != code:
        raise RuntimeError(f"{what}: expected {code}, got {b' / '.join(lines)!r}")


def lmtp_client(port: int, rcpt: str, size: int, per_connection: int, count: int,
                seconds: float, tag: str, hello: str = "LHLO") -> dict:
    """Deliver ``count`` messages (or for ``seconds`` when count is 0) to ``rcpt``.
    With ``hello`` EHLO it speaks SMTP instead (bench/scaling.py): with one
    recipient a message, the two differ only in that word."""
    deadline = time.monotonic() + seconds
    sent = accepted = 0
    failures: list[str] = []
    envelope = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()

    def more() -> bool:
        return sent < count if count else time.monotonic() < deadline

    while more():
        sock, reader = connect(port)
        with sock:
            expect(reader, 220, "greeting")
            sock.sendall(f"{hello} client.test\r\n".encode())
            code, lines = reader.reply()
            if code != 250:
                raise RuntimeError(f"{hello}: {lines!r}")
            pipelining = any(line[4:].upper().startswith(b"PIPELINING") for line in lines)
            for _ in range(per_connection):
                if not more():
                    break
                message = make_message(size, f"{tag}.{sent}", rcpt)
                if pipelining:
                    sock.sendall(envelope)
                    for step, want in (("MAIL", 250), ("RCPT", 250), ("DATA", 354)):
                        expect(reader, want, step)
                else:
                    for command, want in ((f"MAIL FROM:<{SENDER}>", 250),
                                          (f"RCPT TO:<{rcpt}>", 250), ("DATA", 354)):
                        sock.sendall(command.encode() + b"\r\n")
                        expect(reader, want, command)
                sock.sendall(message + b".\r\n")
                sent += 1
                code, lines = reader.reply()     # one reply per recipient: one here
                if code == 250:
                    accepted += 1
                else:
                    failures.append(b" / ".join(lines).decode(errors="replace"))
            sock.sendall(b"QUIT\r\n")
            expect(reader, 221, "QUIT")
    return {"sent": sent, "accepted": accepted, "failures": failures[:5]}


# --- the benchmark -------------------------------------------------------------------

def run_lmtp(server: Server, rcpt: str, connections: int, args: argparse.Namespace,
             run: int) -> dict:
    port = server.ports["lmtp"]
    counts = split(args.count, connections) if args.count else [0] * connections
    clients = [(port, rcpt, args.size, args.per_connection, counts[index], args.seconds,
                f"r{run}.c{index}.{server.name}") for index in range(connections)]
    outs, start, elapsed = run_clients(lmtp_client, clients,
                                       timeout=args.seconds + 600)
    accepted = sum(out["accepted"] for out in outs)
    sent = sum(out["sent"] for out in outs)
    failures = [failure for out in outs for failure in out["failures"]]
    if failures or accepted != sent:
        raise SystemExit(f"{server.name}: {sent - accepted} of {sent} messages refused: "
                         f"{failures}")
    landed = wait_delivered(server, rcpt, accepted) - start
    return {"messages": accepted, "seconds": round(landed, 3),
            "accepted_per_s": accepted / elapsed, "delivered_per_s": accepted / landed,
            "client_cpu_s": round(sum(out["cpu"] for out in outs), 3)}


HEADER = (f"{'conns':>5} | {'LightMail msgs':>14} {'250/s':>7} {'dlv/s':>7} | "
          f"{'Dovecot msgs':>12} {'250/s':>7} {'dlv/s':>7} | {'ratio dlv':>9}")


def add_ratio(row: dict, key: str) -> None:
    """The ratio LightMail/Dovecot of ``key``, when both servers ran."""
    if "LightMail" in row and "Dovecot" in row:
        row["ratio"] = row["LightMail"][key] / row["Dovecot"][key]


def print_row(row: dict) -> None:
    lm, dc = row.get("LightMail"), row.get("Dovecot")
    left = (f"{lm['messages']:>14} {lm['accepted_per_s']:>7.0f} {lm['delivered_per_s']:>7.0f}"
            if lm else f"{'-':>14} {'-':>7} {'-':>7}")
    right = (f"{dc['messages']:>12} {dc['accepted_per_s']:>7.0f} {dc['delivered_per_s']:>7.0f}"
             if dc else f"{'-':>12} {'-':>7} {'-':>7}")
    ratio = f"{row['ratio']:>8.2f}x" if "ratio" in row else f"{'-':>9}"
    print(f"{row['connections']:>5} | {left} | {right} | {ratio}", flush=True)


def print_json_lines(rows: Iterable[dict], path: str | None) -> None:
    lines = [json.dumps(row, sort_keys=True) for row in rows]
    print("\n".join(lines))
    if path:
        Path(path).write_text("".join(line + "\n" for line in lines))


def parse_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers like 1,10: {text!r}")
    return levels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=parse_levels, default=[1, 10],
                        help="concurrent connections, comma-separated (default: 1,10)")
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("--per-connection", type=int, default=50,
                        help="messages per connection before QUIT (default: 50)")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--seconds", type=float, default=10.0,
                       help="length of each run (default: 10)")
    limit.add_argument("--count", type=int, default=0,
                       help="messages per run instead of a duration")
    parser.add_argument("--only", choices=["lightmail", "dovecot"],
                        help="run one server alone (no ratio)")
    parser.add_argument("--workers", type=int, default=0,
                        help="LightMail's [server] workers (default 0: one process; "
                        "docs/benchmarks.rst has runs with 2, one per core)")
    parser.add_argument("--json", help="also write the JSON lines to this file")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-lmtp-"))
    rows: list[dict] = []
    servers: list[Server] = []
    try:
        if args.only != "dovecot":
            servers.append(LightMail(base / "lightmail", {"lmtp": "protocol = lmtp"},
                                     workers=args.workers))
        if args.only != "lightmail":
            servers.append(Dovecot())
        recipients = ["warmup@bench.test"] + [f"rcpt{index}@bench.test"
                                              for index in range(len(args.connections))]
        for server in servers:
            for rcpt in recipients:
                server.add_user(rcpt)
            server.start()
            # Warm up: first connections, processes and caches are not what we measure.
            run_clients(lmtp_client, [(server.ports["lmtp"], recipients[0], args.size,
                                       10, 20, 0, f"warmup.{server.name}")], timeout=600)
            wait_delivered(server, recipients[0], 20)
        print(f"LMTP deliveries, {args.size} bytes, {args.per_connection} per connection, "
              + (f"{args.count} messages per run" if args.count
                 else f"{args.seconds:g} s per run"))
        print(HEADER)
        print("-" * len(HEADER))
        for run, connections in enumerate(args.connections, start=1):
            row: dict[str, Any] = {"bench": "lmtp", "connections": connections,
                                   "size": args.size}
            for server in servers:
                row[server.name] = run_lmtp(server, recipients[run], connections, args, run)
            add_ratio(row, "delivered_per_s")
            rows.append(row)
            print_row(row)
    finally:
        for server in servers:
            server.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    print_json_lines(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
