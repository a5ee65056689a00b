"""POP3 benchmark: LightMail against Dovecot, same machine, same run.

    .venv/bin/python bench/pop3.py [--clients 1,10] [--messages 50] [--size 4096]
                                   [--seconds 10 | --count N] [--dovecot-scheme ARGON2ID]
                                   [--auth-cache 10m]
                                   [--only lightmail|dovecot] [--json results.jsonl]

Each client process runs whole POP3 sessions back to back, as a mail client that leaves
mail on the server does: connect, USER/PASS, STAT, UIDL, RETR of every message, QUIT
(no DELE).  Client N logs in as its own user, whose maildrop holds 50 messages of 4 KB
(``--messages``, ``--size``): filled over SMTP for LightMail (``twistd lightmail``,
SQLite store, ``[listener:pop3] protocol = pop3``, ``auth_over_plaintext = yes``) and
over LMTP for Dovecot (a private instance from ``tests/dovecot.py``, Maildir storage,
default settings: one login process per connection).  One untimed session per user on
each server comes first, so that neither is measured building its indexes.

Reported per server and number of clients: complete sessions per second (and messages
retrieved per second) and the ratio LightMail/Dovecot.  A session that does not see
every message, or any -ERR, fails the run.  Each row is printed as a table line, and
as a JSON line at the end (and into ``--json FILE``).
"""

from __future__ import annotations

import argparse
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lmtp import (
    SENDER,
    Dovecot,
    LightMail,
    Server,
    add_ratio,
    connect,
    make_message,
    parse_levels,
    print_json_lines,
    run_clients,
    split,
    wait_delivered,
)

from lightmail.config import parse_duration

PASSWORD = "bench-password"


def user(index: int) -> str:
    return f"pop{index}@bench.test"


def fill(server: Server, users: list[str], messages: int, size: int) -> None:
    """Give every user ``messages`` messages: over SMTP (LightMail) or LMTP (Dovecot)."""
    if isinstance(server, LightMail):
        client: smtplib.SMTP = smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=120)
    else:
        client = smtplib.LMTP("127.0.0.1", server.ports["lmtp"], timeout=120)
    with client:
        for address in users:
            for number in range(messages):
                client.sendmail(SENDER, [address],
                                make_message(size, f"fill.{address}.{number}", address))
    for address in users:
        wait_delivered(server, address, messages)


def pop3_ok(reader: Any, what: str) -> bytes:
    line = reader.line()
    if not line.startswith(b"+OK"):
        raise RuntimeError(f"{what}: {line!r}")
    return line


def pop3_client(port: int, address: str, password: str, messages: int, count: int,
                seconds: float) -> dict:
    """Run ``count`` sessions (or sessions for ``seconds`` when count is 0)."""
    deadline = time.monotonic() + seconds
    sessions = retrieved = octets = 0
    while (sessions < count) if count else (time.monotonic() < deadline):
        sock, reader = connect(port)
        with sock:
            pop3_ok(reader, "greeting")
            sock.sendall(f"USER {address}\r\n".encode())
            pop3_ok(reader, "USER")
            sock.sendall(f"PASS {password}\r\n".encode())
            pop3_ok(reader, "PASS")
            sock.sendall(b"STAT\r\n")
            stat = pop3_ok(reader, "STAT").split()
            if int(stat[1]) != messages:
                raise RuntimeError(f"STAT: {int(stat[1])} messages, expected {messages}")
            sock.sendall(b"UIDL\r\n")
            pop3_ok(reader, "UIDL")
            listed = reader.until(b"\r\n.\r\n").count(b"\r\n") - 1
            if listed != messages:
                raise RuntimeError(f"UIDL listed {listed} messages, expected {messages}")
            for number in range(1, messages + 1):
                sock.sendall(f"RETR {number}\r\n".encode())
                pop3_ok(reader, f"RETR {number}")
                octets += len(reader.until(b"\r\n.\r\n"))
                retrieved += 1
            sock.sendall(b"QUIT\r\n")
            pop3_ok(reader, "QUIT")
        sessions += 1
    return {"sessions": sessions, "retrieved": retrieved, "octets": octets}


def run_pop3(server: Server, clients: int, args: argparse.Namespace) -> dict:
    port = server.ports["pop3"]
    counts = split(args.count, clients) if args.count else [0] * clients
    outs, _start, elapsed = run_clients(
        pop3_client, [(port, user(index), PASSWORD, args.messages, counts[index],
                       args.seconds) for index in range(clients)],
        timeout=args.seconds + 600)
    sessions = sum(out["sessions"] for out in outs)
    retrieved = sum(out["retrieved"] for out in outs)
    return {"sessions": sessions, "seconds": round(elapsed, 3),
            "sessions_per_s": sessions / elapsed, "messages_per_s": retrieved / elapsed,
            "octets": sum(out["octets"] for out in outs),
            "client_cpu_s": round(sum(out["cpu"] for out in outs), 3)}


HEADER = (f"{'clients':>7} | {'LightMail sess':>14} {'sess/s':>7} {'msg/s':>7} | "
          f"{'Dovecot sess':>12} {'sess/s':>7} {'msg/s':>7} | {'ratio':>7}")


def print_row(row: dict) -> None:
    lm, dc = row.get("LightMail"), row.get("Dovecot")
    left = (f"{lm['sessions']:>14} {lm['sessions_per_s']:>7.1f} {lm['messages_per_s']:>7.0f}"
            if lm else f"{'-':>14} {'-':>7} {'-':>7}")
    right = (f"{dc['sessions']:>12} {dc['sessions_per_s']:>7.1f} {dc['messages_per_s']:>7.0f}"
             if dc else f"{'-':>12} {'-':>7} {'-':>7}")
    ratio = f"{row['ratio']:>6.2f}x" if "ratio" in row else f"{'-':>7}"
    print(f"{row['clients']:>7} | {left} | {right} | {ratio}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=parse_levels, default=[1, 10],
                        help="concurrent clients, comma-separated (default: 1,10)")
    parser.add_argument("--messages", type=int, default=50,
                        help="messages in each maildrop (default: 50)")
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--seconds", type=float, default=10.0,
                       help="length of each run (default: 10)")
    limit.add_argument("--count", type=int, default=0,
                       help="sessions per run instead of a duration")
    parser.add_argument("--dovecot-scheme", default="ARGON2ID",
                        help="how Dovecot stores the passwords: ARGON2ID (default: what "
                        "LightMail stores) or PLAIN (no hashing at all)")
    parser.add_argument("--auth-cache", default="10m",
                        help="both servers remember verified passwords this long "
                        "(LightMail's default [directory] auth_cache_ttl; Dovecot's "
                        "auth_cache_ttl); 0 turns both caches off")
    parser.add_argument("--only", choices=["lightmail", "dovecot"],
                        help="run one server alone (no ratio)")
    parser.add_argument("--workers", type=int, default=0,
                        help="LightMail's [server] workers (default 0: one process; "
                        "docs/benchmarks.rst has runs with 2, one per core)")
    parser.add_argument("--json", help="also write the JSON lines to this file")
    args = parser.parse_args()
    users = [user(index) for index in range(max(args.clients))]
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-pop3-"))
    rows: list[dict] = []
    servers: list[Server] = []
    try:
        if args.only != "dovecot":
            servers.append(LightMail(
                base / "lightmail",
                {"mx": "protocol = smtp", "pop3": "protocol = pop3\ntls = none"},
                extra_config="[directory]\nauth_over_plaintext = yes\n"
                f"auth_cache_ttl = {args.auth_cache}\n", workers=args.workers))
        if args.only != "lightmail":
            seconds = parse_duration()(args.auth_cache, Path("."))
            cache = ({"auth_cache_size": "10M", "auth_cache_ttl": f"{int(seconds)} secs"}
                     if seconds else {})
            servers.append(Dovecot(args.dovecot_scheme, cache))
        for server in servers:
            for address in users:
                server.add_user(address, PASSWORD)
            server.start()
            fill(server, users, args.messages, args.size)
            # Warm up: one session per maildrop, not timed.
            run_clients(pop3_client, [(server.ports["pop3"], address, PASSWORD,
                                       args.messages, 1, 0) for address in users],
                        timeout=600)
        print(f"POP3 sessions (USER/PASS, STAT, UIDL, RETR x{args.messages}, QUIT), "
              f"{args.size}-byte messages, "
              + (f"{args.count} sessions per run" if args.count
                 else f"{args.seconds:g} s per run")
              + f"; Dovecot passwords: {args.dovecot_scheme}, LightMail: argon2id"
              + f"; auth caches: {args.auth_cache}")
        print(HEADER)
        print("-" * len(HEADER))
        for clients in args.clients:
            row: dict[str, Any] = {"bench": "pop3", "clients": clients,
                                   "messages": args.messages, "size": args.size}
            for server in servers:
                row[server.name] = run_pop3(server, clients, args)
            add_ratio(row, "sessions_per_s")
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
