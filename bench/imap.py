"""IMAP benchmark: LightMail against Dovecot, same machine, same run.

    .venv/bin/python bench/imap.py [--clients 1,10,50] [--seconds 10] [--messages 100]
                                   [--size 4096] [--rounds 5] [--idlers 10] [--repeat 3]
                                   [--big 20000] [--idle 1000]
                                   [--dovecot-scheme PLAIN] [--auth-cache 10m]
                                   [--only lightmail|dovecot] [--json results.jsonl]

Three parts, each run against LightMail (``twistd lightmail``, SQLite store,
``[listener:imap] protocol = imap``, ``auth_over_plaintext = yes``) and a private
Dovecot (``tests/dovecot.py``, Maildir, default settings but for the connection
limits: one login process per connection, one ``imap`` process per session).

**Mix** (``--clients``, ``--seconds``): each client process runs whole sessions back
to back, as a mail client that syncs and reads does, on a mailbox of its own (user N
of ``--clients``, ``--messages`` messages of ``--size`` bytes delivered over LMTP to
both servers): LOGIN, SELECT INBOX, UID FETCH 1:* (FLAGS), UID SEARCH SUBJECT (a
header search), APPEND of a message (LITERAL+), then ``--rounds`` times: UID FETCH of
the 20 newest messages' UID, FLAGS, INTERNALDATE, RFC822.SIZE and
BODY.PEEK[HEADER.FIELDS (...)], UID FETCH of one message's BODY.PEEK[], UID STORE
+FLAGS or -FLAGS (\\Seen) on one message, UID SEARCH UNSEEN; then UID STORE +FLAGS
(\\Deleted) and UID EXPUNGE of the appended message (so the mailbox keeps its size),
LOGOUT.  Every command is one operation; reported: operations and sessions per
second, the mean time of each command, and the ratio LightMail/Dovecot of
operations per second.  Each client count runs ``--repeat`` times per server, the
servers taking turns (the first alternating), and the run with the median rate
stands for each: one 10-second run of either server moves by a fifth from one run to
the next on this machine.  Meanwhile ``--idlers`` sessions of another user sit in IDLE
on their INBOX, and one more session APPENDs to it 10 times a second: reported is
the median (and 90th percentile) time from an APPEND being sent to the ``* N
EXISTS`` reaching each idling session, and how many never arrived.  Logins: LightMail
keeps argon2id hashes and its auth cache (``--auth-cache``, default 10 minutes)
spares it the verification after a user's first login; Dovecot keeps ``{PLAIN}``
passwords by default (``--dovecot-scheme``), because Dovecot 2.3 never caches
lookups in the harness's passwd-file passdb, and with ARGON2ID it would verify a
hash (about 0.1 s of CPU) at every login.  ``--dovecot-scheme ARGON2ID
--auth-cache 0`` makes both verify argon2id every time.  One untimed session per
user warms both up.

**Big mailbox** (``--big N``, default 20,000, 0 to skip; ``make bench-imap`` runs the
issue's 100,000): a mailbox of N messages (90 % \\Seen, some \\Flagged or
\\Answered), written straight into the store before the server starts: for
LightMail through its own storage code (blob files, then ``append_now`` in a few
large transactions, no fsync), for Dovecot as Maildir files (``S=``/``W=`` sizes in
their names, as Dovecot's own deliveries have), indexed by one untimed SELECT.  On a
fresh session: SELECT INBOX, FETCH 1:* (FLAGS), UID SEARCH UNSEEN and UID SEARCH
SUBJECT, each ``--big-repeat`` times (2); reported are the first and the best time,
the time to the first byte of the FETCH response against its total (a server that
streams answers its first line at once), the longest NOOP round trip of another
session while these run (a server that blocks on the big mailbox stalls it), and the
server's memory growth for that one session.

**Idle connections** (``--idle N``, 0 to skip): N sessions spread over the mix users,
logged in, then each SELECTs INBOX and IDLEs; the server's memory growth per
connection at both stages.  LightMail: the VmRSS of the twistd process, restarted
first (memory the earlier parts freed would be reused and hide the sessions' cost).
Dovecot: the sum of VmRSS over all its processes (one ``imap`` process per session;
``imap-login`` processes exit after the login), which counts the shared pages
(libraries, the binary) once per process, and the sum of Pss
(``/proc/PID/smaps_rollup``), which shares them out; both per connection.

Each row is printed as a table line, and as a JSON line at the end (and into
``--json FILE``), with the clients' CPU seconds: the clients are Python processes
sharing the machine with the servers.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import os
import random
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dovecot import DOVEADM, DovecotInstance, group_members
from lmtp import (
    DOMAIN,
    Dovecot,
    LightMail,
    Server,
    add_ratio,
    lmtp_client,
    make_message,
    parse_levels,
    print_json_lines,
    run_clients,
    wait_delivered,
)

from lightmail.config import parse_duration

PASSWORD = "bench-password"
IDLE_USER = f"idle@{DOMAIN}"
BIG_USER = f"big@{DOMAIN}"
APPENDS_PER_S = 10          # into the mailbox the --idlers sessions watch
GRACE = 2.0                 # seconds the idling sessions wait for the last EXISTS
HEADER_FIELDS = ("BODY.PEEK[HEADER.FIELDS (DATE FROM TO CC SUBJECT MESSAGE-ID "
                 "CONTENT-TYPE)]")
LIMIT = 10000               # per-user sessions, both servers (the idle part needs many)


def user(index: int) -> str:
    return f"imap{index}@{DOMAIN}"


# --- an IMAP client on a plain socket --------------------------------------------------

class IMAPError(RuntimeError):
    pass


class IMAP:
    """A minimal IMAP client: one command at a time, literals read and counted."""

    def __init__(self, port: int, timeout: float = 300) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.pos = 0
        self.tags = 0
        self.octets = 0                 # literal octets received
        self.first_at = 0.0             # when the last command's first response came
        greeting = self.line()
        if not greeting.startswith(b"* OK"):
            raise IMAPError(f"greeting: {greeting!r}")
        self.literal_plus = b"LITERAL+" in greeting

    # reading: an index into the buffer rather than slicing it for every line, which
    # would copy the rest of a 256 KB read once per line of a 100,000-line FETCH
    def _more(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("connection closed by the server")
        self.buf = self.buf[self.pos:] + data
        self.pos = 0

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = self.buf[self.pos:end]
                self.pos = end + 2
                return line
            self._more()

    def exact(self, count: int) -> bytes:
        while len(self.buf) - self.pos < count:
            self._more()
        data = self.buf[self.pos:self.pos + count]
        self.pos += count
        return data

    def response(self) -> bytes:
        """One response, its literals' contents replaced by their sizes."""
        line = self.line()
        while line.endswith(b"}"):
            start = line.rfind(b"{")
            size = line[start + 1:-1].rstrip(b"+")
            if start < 0 or not size.isdigit():
                break
            self.exact(int(size))
            self.octets += int(size)
            line = line + b"<" + size + b">" + self.line()
        return line

    # commands
    def send(self, text: str | bytes, literal: bytes | None = None) -> bytes:
        self.tags += 1
        tag = b"a%d" % self.tags
        data = tag + b" " + (text.encode() if isinstance(text, str) else text)
        if literal is None:
            self.sock.sendall(data + b"\r\n")
        elif self.literal_plus:
            self.sock.sendall(data + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        else:
            self.sock.sendall(data + b" {%d}\r\n" % len(literal))
            while True:
                line = self.response()
                if line.startswith(b"+"):
                    break
                if line.startswith(tag + b" "):
                    raise IMAPError(f"{data[:60]!r}: {line!r}")
            self.sock.sendall(literal + b"\r\n")
        return tag

    def until(self, tag: bytes, what: str | bytes = "") -> tuple[list[bytes], bytes]:
        """The untagged responses up to the tagged one, and that; fails on NO/BAD."""
        untagged: list[bytes] = []
        self.first_at = 0.0
        prefix = tag + b" "
        while True:
            line = self.response()
            if not self.first_at:
                self.first_at = time.monotonic()
            if line.startswith(prefix):
                if line[len(prefix):len(prefix) + 2] != b"OK":
                    raise IMAPError(f"{str(what)[:80]}: {line[:300]!r}")
                return untagged, line
            untagged.append(line)

    def command(self, text: str | bytes,
                literal: bytes | None = None) -> tuple[list[bytes], bytes]:
        return self.until(self.send(text, literal), text)

    def login(self, address: str, password: str) -> None:
        self.command(f'LOGIN "{address}" "{password}"')

    def logout(self) -> None:
        try:
            self.command("LOGOUT")
        except (ConnectionError, OSError):
            pass        # a server may close before the tagged OK reaches us
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


EXISTS = re.compile(rb"^\* (\d+) EXISTS")
UID_RE = re.compile(rb"UID (\d+)")
FLAGS_RE = re.compile(rb"FLAGS \(([^)]*)\)")
APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]")


def exists_of(lines: list[bytes]) -> int:
    found = [int(m.group(1)) for m in map(EXISTS.match, lines) if m]
    if not found:
        raise IMAPError("no EXISTS in the SELECT response")
    return found[-1]


# --- the mix -------------------------------------------------------------------------

def mix_client(port: int, address: str, password: str, seconds: float, count: int,
               rounds: int, messages: int, size: int, seed: int) -> dict:
    """Whole sessions for ``seconds``, or ``count`` of them (see the module docstring)."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    ops: Counter[str] = Counter()
    spent: defaultdict[str, float] = defaultdict(float)
    sessions = 0
    local = address.partition("@")[0]

    def op(imap: IMAP, name: str, text: str,
           literal: bytes | None = None) -> tuple[list[bytes], bytes]:
        started = time.monotonic()
        result = imap.command(text, literal)
        spent[name] += time.monotonic() - started
        ops[name] += 1
        return result

    while (sessions < count) if count else (time.monotonic() < deadline):
        started = time.monotonic()
        imap = IMAP(port)
        spent["connect"] += time.monotonic() - started
        op(imap, "LOGIN", f'LOGIN "{address}" "{password}"')
        op(imap, "SELECT", "SELECT INBOX")
        lines, _ = op(imap, "FETCH 1:* (FLAGS)", "UID FETCH 1:* (FLAGS)")
        flags: dict[int, bytes] = {}
        for line in lines:
            uid, found = UID_RE.search(line), FLAGS_RE.search(line)
            if uid and found:
                flags[int(uid.group(1))] = found.group(1)
        uids = sorted(flags)
        if len(uids) < 20:
            raise IMAPError(f"{address}: {len(uids)} messages, expected {messages}")
        op(imap, "SEARCH SUBJECT",
           f'UID SEARCH SUBJECT "message fill.{local}.{rng.randrange(messages)}"')
        message = make_message(size, f"append.{local}.{seed}.{sessions}", address)
        _, tagged = op(imap, "APPEND", "APPEND INBOX (\\Seen)", message)
        appended = APPENDUID.search(tagged)
        if appended is None:
            raise IMAPError(f"APPEND: no APPENDUID in {tagged!r}")
        for _ in range(rounds):
            op(imap, "FETCH headers",
               f"UID FETCH {uids[-20]}:{uids[-1]} (UID FLAGS INTERNALDATE RFC822.SIZE "
               f"{HEADER_FIELDS})")
            op(imap, "FETCH body",
               f"UID FETCH {rng.choice(uids)} (UID RFC822.SIZE FLAGS BODY.PEEK[])")
            target = rng.choice(uids)
            sign = "-" if b"\\Seen" in flags[target] else "+"
            lines, _ = op(imap, "STORE", f"UID STORE {target} {sign}FLAGS (\\Seen)")
            for line in lines:
                uid, found = UID_RE.search(line), FLAGS_RE.search(line)
                if uid and found:
                    flags[int(uid.group(1))] = found.group(1)
            op(imap, "SEARCH UNSEEN", "UID SEARCH UNSEEN")
        op(imap, "STORE", f"UID STORE {appended.group(1).decode()} +FLAGS.SILENT (\\Deleted)")
        op(imap, "EXPUNGE", f"UID EXPUNGE {appended.group(1).decode()}")
        started = time.monotonic()
        imap.logout()
        spent["LOGOUT"] += time.monotonic() - started
        ops["LOGOUT"] += 1
        sessions += 1
    return {"role": "client", "ops": dict(ops), "spent": dict(spent), "sessions": sessions}


def idle_appender(port: int, address: str, password: str, seconds: float,
                  size: int) -> dict:
    """APPEND to ``address``'s INBOX every 1/APPENDS_PER_S s: the idlers' news."""
    imap = IMAP(port)
    imap.login(address, password)
    start = time.monotonic()
    sent: list[tuple[int, float]] = []
    number = 0
    while time.monotonic() - start < seconds:
        message = make_message(size, f"news.{os.getpid()}.{number}", address)
        when = time.monotonic()
        _, tagged = imap.command("APPEND INBOX", message)
        appended = APPENDUID.search(tagged)
        if appended is None:
            raise IMAPError(f"APPEND: no APPENDUID in {tagged!r}")
        sent.append((int(appended.group(1)), when))
        number += 1
        pause = start + number / APPENDS_PER_S - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    imap.logout()
    return {"role": "appender", "appended": sent}


def idle_watchers(port: int, address: str, password: str, count: int,
                  seconds: float) -> dict:
    """``count`` sessions IDLE on ``address``'s INBOX; when each saw which EXISTS,
    and at the end the mailbox's UIDs (a message's number is its rank among them)."""
    watchers = []
    for _ in range(count):
        imap = IMAP(port)
        imap.login(address, password)
        lines, _ = imap.command("SELECT INBOX")
        known = exists_of(lines)
        tag = imap.send("IDLE")
        while True:
            line = imap.response()
            if line.startswith(b"+"):
                break
            found = EXISTS.match(line)
            if found:
                known = int(found.group(1))
        imap.sock.setblocking(False)
        watchers.append(SimpleNamespace(imap=imap, tag=tag, known=known,
                                        idle_at=time.monotonic(), events=[], rest=b""))
    deadline = time.monotonic() + seconds + GRACE
    with selectors.DefaultSelector() as selector:
        for watcher in watchers:
            selector.register(watcher.imap.sock, selectors.EVENT_READ, watcher)
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                watcher = key.data
                try:
                    data = watcher.imap.sock.recv(65536)
                except BlockingIOError:
                    continue
                when = time.monotonic()
                if not data:
                    raise ConnectionError("an idling session was closed by the server")
                lines = (watcher.rest + data).split(b"\r\n")
                watcher.rest = lines.pop()
                for line in lines:
                    found = EXISTS.match(line)
                    if found:
                        watcher.events.append((int(found.group(1)), when))
    uids: list[int] = []
    for watcher in watchers:
        imap = watcher.imap
        imap.sock.setblocking(True)
        imap.buf, imap.pos = watcher.rest, 0
        imap.sock.sendall(b"DONE\r\n")
        imap.until(watcher.tag, "IDLE")
        if not uids:
            lines, _ = imap.command("UID SEARCH ALL")
            uids = sorted(int(word) for line in lines if line.startswith(b"* SEARCH")
                          for word in line.split()[2:])
        imap.logout()
    return {"role": "watchers", "uids": uids, "watchers": [
        {"known": w.known, "idle_at": w.idle_at, "events": w.events} for w in watchers]}


def mix_worker(role: str, *args: Any) -> dict:
    return {"client": mix_client, "appender": idle_appender,
            "watchers": idle_watchers}[role](*args)


def idle_latencies(appended: list[tuple[int, float]], uids: list[int],
                   watchers: list[dict]) -> tuple[list[float], int]:
    """Seconds from each APPEND being sent to each idling session's EXISTS that
    counted it, and how many EXISTS never came.  Nothing is expunged from that
    mailbox, so the message with UID u is there once a session has heard of at least
    (u's rank among the mailbox's UIDs) messages.  Counted: APPENDs sent after the
    session began to IDLE, of messages it did not know of then."""
    latencies: list[float] = []
    missed = 0
    for watcher in watchers:
        events = watcher["events"]
        for uid, when in appended:
            number = bisect.bisect_left(uids, uid) + 1
            if when < watcher["idle_at"] or number <= watcher["known"]:
                continue
            seen = next((t for count, t in events if count >= number), None)
            if seen is None:
                missed += 1
            else:
                latencies.append(seen - when)
    return latencies, missed


def run_mix(server: Server, clients: int, args: argparse.Namespace, run: int) -> dict:
    port = server.ports["imap"]
    entries: list[tuple] = [
        ("client", port, user(index), PASSWORD, args.seconds, 0, args.rounds,
         args.messages, args.size, run * 1000 + index) for index in range(clients)]
    if args.idlers:
        entries += [("appender", port, IDLE_USER, PASSWORD, args.seconds, args.size),
                    ("watchers", port, IDLE_USER, PASSWORD, args.idlers, args.seconds)]
    outs, start, _ = run_clients(mix_worker, entries, timeout=args.seconds + 600)
    mine = [out for out in outs if out["role"] == "client"]
    elapsed = max(out["end"] for out in mine) - start
    ops: Counter[str] = Counter()
    spent: Counter[str] = Counter()
    for out in mine:
        ops.update(out["ops"])
        spent.update(out["spent"])
    total = sum(ops.values())
    row = {"ops": total, "seconds": round(elapsed, 3), "ops_per_s": total / elapsed,
           "sessions_per_s": sum(out["sessions"] for out in mine) / elapsed,
           "ms_per_command": {name: round(1000 * spent[name] / ops[name], 3)
                              for name in sorted(ops)},
           "client_cpu_s": round(sum(out["cpu"] for out in outs), 3)}
    if args.idlers:
        appended = next(out["appended"] for out in outs if out["role"] == "appender")
        watching = next(out for out in outs if out["role"] == "watchers")
        latencies, missed = idle_latencies(appended, watching["uids"], watching["watchers"])
        row["idle_exists"] = len(latencies)
        row["idle_missed"] = missed
        if latencies:
            latencies.sort()
            row["idle_median_ms"] = round(1000 * statistics.median(latencies), 1)
            row["idle_p90_ms"] = round(1000 * latencies[int(0.9 * (len(latencies) - 1))], 1)
    return row


MIX_HEADER = (f"{'clients':>7} | {'LightMail ops/s':>15} {'sess/s':>6} {'idle ms':>7} | "
              f"{'Dovecot ops/s':>13} {'sess/s':>6} {'idle ms':>7} | {'ratio':>6}")


def print_mix_row(row: dict) -> None:
    def side(result: dict | None, width: int) -> str:
        if result is None:
            return f"{'-':>{width}} {'-':>6} {'-':>7}"
        idle = result.get("idle_median_ms")
        idle_text = f"{idle:.0f}" if idle is not None else "-"
        if result.get("idle_missed"):
            idle_text += "!"
        return (f"{result['ops_per_s']:>{width}.0f} {result['sessions_per_s']:>6.1f} "
                f"{idle_text:>7}")
    ratio = f"{row['ratio']:>5.2f}x" if "ratio" in row else f"{'-':>6}"
    print(f"{row['clients']:>7} | {side(row.get('LightMail'), 15)} | "
          f"{side(row.get('Dovecot'), 13)} | {ratio}", flush=True)
    spread = "; ".join(f"{name} " + " ".join(map(str, row[name]["runs"]))
                       for name in ("LightMail", "Dovecot")
                       if len(row.get(name, {}).get("runs", ())) > 1)
    if spread:
        print(f"{'':>7}   (ops/s of each run, lowest first: {spread})", flush=True)


def print_command_times(rows: list[dict]) -> None:
    """Mean milliseconds per command, per server and number of clients."""
    names = sorted({name for row in rows for server in ("LightMail", "Dovecot")
                    if server in row for name in row[server]["ms_per_command"]})
    columns = [(row["clients"], server) for row in rows
               for server in ("LightMail", "Dovecot") if server in row]
    head = f"{'ms per command':<18}" + "".join(
        f" {('LM' if server == 'LightMail' else 'DC') + f'@{clients}':>8}"
        for clients, server in columns)
    print(head)
    for name in names:
        cells = []
        for row in rows:
            for server in ("LightMail", "Dovecot"):
                if server in row:
                    value = row[server]["ms_per_command"].get(name)
                    cells.append(f" {value:>8.2f}" if value is not None else f" {'-':>8}")
        print(f"{name:<18}" + "".join(cells))


# --- filling the mailboxes -----------------------------------------------------------

def add_lightmail_users(server: LightMail, addresses: list[str]) -> None:
    """The first user through the admin command (an argon2id hash of PASSWORD); the
    others as copies of its row (same hash, so the same password): one hash instead
    of one per user, each costing a process and a second."""
    server.add_user(addresses[0], PASSWORD)
    import sqlalchemy as sa

    from lightmail.config import load_config
    from lightmail.storage import schema as s
    from lightmail.storage.database import Database, now_ms
    db = Database(load_config(server.config).database, threads=1)
    first = addresses[0].partition("@")[0]

    def copy(conn: Any) -> None:
        row = conn.execute(sa.select(s.users).where(s.users.c.localpart == first)).one()
        for address in addresses[1:]:
            conn.execute(s.users.insert().values(
                domain_id=row.domain_id, localpart=address.partition("@")[0],
                password_hash=row.password_hash, quota_bytes=row.quota_bytes,
                enabled=True, created=now_ms()))
    try:
        db.write_now(copy)
    finally:
        db.stop()


def add_dovecot_users(server: Dovecot, addresses: list[str]) -> None:
    """As add_user, but hashing the password once for all of them."""
    instance = server.instance
    if server.scheme.upper() == "PLAIN":
        stored = f"{{PLAIN}}{PASSWORD}"
    else:
        stored = subprocess.run(
            [DOVEADM, "-c", str(instance.config), "pw", "-s", server.scheme, "-p", PASSWORD],
            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    with instance.passwd.open("a") as out:
        for address in addresses:
            local, _, domain = address.partition("@")
            instance.users[address] = PASSWORD
            out.write(f"{address}:{stored}:::{instance.mail_dir / domain / local}::\n")


def fill_over_lmtp(server: Server, addresses: list[str], messages: int, size: int) -> None:
    """``messages`` messages for each address, one LMTP connection per address at once."""
    port = server.ports["lmtp"]
    run_clients(lmtp_client, [(port, address, size, 50, messages, 0,
                               f"fill.{address.partition('@')[0]}")
                              for address in addresses], timeout=600)
    for address in addresses:
        wait_delivered(server, address, messages)


def big_messages(count: int, size: int, address: str,
                 seed: int = 1) -> Any:
    """(number, content, flags as letters, internal date in s) of the big mailbox:
    90 % seen, 3 % flagged, 5 % answered, dated over the last year, oldest first."""
    rng = random.Random(seed)
    now = int(time.time())
    for number in range(count):
        letters = ""
        if rng.random() < 0.03:
            letters += "F"
        if rng.random() < 0.05:
            letters += "R"
        if rng.random() < 0.9:
            letters += "S"
        date = now - 365 * 86400 + (365 * 86400 * number) // max(1, count)
        yield number, make_message(size, f"big.{number}", address), letters, date


LETTER_FLAGS = {"F": "\\Flagged", "R": "\\Answered", "S": "\\Seen"}


def fill_lightmail_big(server: LightMail, address: str, count: int, size: int) -> float:
    """Put ``count`` messages in ``address``'s INBOX with LightMail's storage code,
    before the server runs: blob files (no fsync: this is a fixture), then the write
    port's SQL (``SQLWrites.append_now``), 10,000 messages a transaction.
    Returns the seconds it took."""
    import sqlalchemy as sa
    from twisted.python.threadpool import ThreadPool

    from lightmail.config import load_config
    from lightmail.storage import schema as s
    from lightmail.storage.blobs import FilesystemBlobStore
    from lightmail.storage.database import Database
    from lightmail.storage.interfaces import BlobRef
    from lightmail.storage.queuestore import SQLQueueStore
    from lightmail.storage.sqlstore import create_mailbox_now
    from lightmail.storage.sqlwrites import SQLWrites
    try:    # the header block a delivery's blob writer keeps with the blob row
        from lightmail.storage.blobs import header_block
    except ImportError:     # a LightMail from before the header cache
        header_block = None

    started = time.monotonic()
    config = load_config(server.config)
    db = Database(config.database, threads=1)
    blobs = FilesystemBlobStore(config.blob_dir, ThreadPool(0, 1))   # never started
    writes = SQLWrites(blobs, SQLQueueStore(db, blobs))
    local, _, domain = address.partition("@")
    try:
        user_id = db.read_now(lambda conn: conn.execute(
            sa.select(s.users.c.id).join(s.domains, s.domains.c.id == s.users.c.domain_id)
            .where((s.users.c.localpart == local) & (s.domains.c.name == domain))
        ).scalar_one())
        box = db.write_now(create_mailbox_now, user_id, "INBOX")
        made: set[str] = set()
        batch: list[tuple[BlobRef, list[str], int]] = []

        def append_batch(conn: Any) -> None:
            for ref, flags, date in batch:
                writes.append_now(conn, box.id, ref, flags, date)

        for number, data, letters, date in big_messages(count, size, address):
            blob_id = hashlib.sha256(data).hexdigest()
            path = blobs.path(blob_id)
            if str(path.parent) not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(str(path.parent))
            path.write_bytes(data)
            ref = (BlobRef(blob_id, len(data)) if header_block is None else
                   BlobRef(blob_id, len(data), header_block(data)))
            batch.append((ref, [LETTER_FLAGS[c] for c in letters], date * 1000))
            if len(batch) == 10000 or number == count - 1:
                db.write_now(append_batch)
                batch = []
    finally:
        db.stop()
    return time.monotonic() - started


def fill_dovecot_big(server: Dovecot, address: str, count: int, size: int) -> float:
    """Put ``count`` messages in ``address``'s Maildir as Dovecot would have stored
    them (LF line ends, ``,S=size,W=size with CRLF`` and flags in the name, the
    internal date as mtime).  Returns the seconds it took."""
    started = time.monotonic()
    instance = server.instance
    maildir = instance.maildir(address)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    cur = maildir / "cur"
    for number, data, letters, date in big_messages(count, size, address):
        stored = data.replace(b"\r\n", b"\n")
        path = cur / (f"{date}.M{number}P{os.getpid()}.bench,S={len(stored)},"
                      f"W={len(data)}:2,{''.join(sorted(letters))}")
        path.write_bytes(stored)
        os.utime(path, (date, date))
        if os.getuid() == 0:
            os.chown(path, instance.uid, instance.gid)
    if os.getuid() == 0:
        home = instance.mail_dir / address.partition("@")[2]
        for directory in [home, home / address.partition("@")[0], maildir,
                          *(maildir / sub for sub in ("cur", "new", "tmp"))]:
            os.chown(directory, instance.uid, instance.gid)
    return time.monotonic() - started


# --- the big mailbox -----------------------------------------------------------------

def big_client(port: int, address: str, password: str, repeat: int, probe_address: str,
               memory: Callable[[], dict]) -> dict:
    """Time SELECT, FETCH 1:* (FLAGS) and two UID SEARCHes on a fresh session, while
    another session's NOOPs measure how long the server leaves it waiting."""
    probe = IMAP(port)
    probe.login(probe_address, password)
    probes: list[tuple[float, float]] = []       # (sent, round trip)
    stop = threading.Event()

    def probing() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            probe.command("NOOP")
            probes.append((sent, time.monotonic() - sent))
            time.sleep(0.01)

    imap = IMAP(port, timeout=1800)
    imap.login(address, password)
    before = memory()
    thread = threading.Thread(target=probing, daemon=True)
    thread.start()
    out: dict[str, Any] = {}            # command -> its figures
    windows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    try:
        for _ in range(repeat):
            for name, command in (("SELECT", "SELECT INBOX"),
                                  ("FETCH 1:* (FLAGS)", "FETCH 1:* (FLAGS)"),
                                  ("UID SEARCH UNSEEN", "UID SEARCH UNSEEN"),
                                  ("UID SEARCH SUBJECT", 'UID SEARCH SUBJECT "big.4242"')):
                started = time.monotonic()
                lines, _ = imap.command(command)
                ended = time.monotonic()
                windows[name].append((started, ended))
                entry = out.setdefault(name, {"s": []})
                entry["s"].append(round(ended - started, 4))
                if name == "SELECT":
                    entry["exists"] = exists_of(lines)
                elif name.startswith("FETCH"):
                    entry.setdefault("first_byte_s", []).append(
                        round(imap.first_at - started, 4))
                    entry["responses"] = sum(1 for line in lines if b" FETCH " in line)
                else:
                    entry["found"] = sum(len(line.split()) - 2 for line in lines
                                         if line.startswith(b"* SEARCH"))
        after = memory()
    finally:
        stop.set()
        thread.join(30)
        imap.logout()
        probe.logout()
    for name, entry in out.items():
        stalls = [rtt for sent, rtt in probes
                  if any(start <= sent + rtt and sent <= end for start, end in windows[name])]
        entry["noop_max_ms"] = round(1000 * max(stalls), 1) if stalls else None
    return {"commands": out, "memory_kb": {key: after[key] - before[key] for key in before}}


def run_big(server: Server, args: argparse.Namespace, memory: Callable[[], dict]) -> dict:
    outs, _, _ = run_clients(big_client, [(server.ports["imap"], BIG_USER, PASSWORD,
                                           args.big_repeat, user(0), memory)],
                             timeout=3600)
    out = outs[0]
    for entry in out["commands"].values():
        entry["first_s"] = entry["s"][0]
        entry["best_s"] = min(entry["s"])
    found = out["commands"]["SELECT"]["exists"]
    if found != args.big:
        raise SystemExit(f"{server.name}: SELECT found {found} messages in the big "
                         f"mailbox, expected {args.big}")
    return {**out["commands"], "memory_kb": out["memory_kb"],
            "noop_max_ms": max((entry["noop_max_ms"] or 0)
                               for entry in out["commands"].values()),
            "client_cpu_s": round(out["cpu"], 3)}


def print_big(row: dict) -> None:
    servers = [name for name in ("LightMail", "Dovecot") if name in row]
    print(f"{row['messages']} messages: first / best of {row['repeat']}, seconds" +
          "".join(f" | {name:>21}" for name in servers) +
          (" | LightMail speed" if len(servers) == 2 else ""))
    for name in ("SELECT", "FETCH 1:* (FLAGS)", "UID SEARCH UNSEEN", "UID SEARCH SUBJECT"):
        cells = "".join(f" | {row[s][name]['first_s']:>10.3f} {row[s][name]['best_s']:>10.3f}"
                        for s in servers)
        ratio = ""
        if len(servers) == 2 and row["LightMail"][name]["best_s"]:
            ratio = f" | {row['Dovecot'][name]['best_s'] / row['LightMail'][name]['best_s']:>6.2f}x"
        print(f"{name:<44}{cells}{ratio}")
    fetch = "FETCH 1:* (FLAGS)"
    cells = "".join(f" | {min(row[s][fetch]['first_byte_s']):>10.3f} "
                    f"{row[s][fetch]['best_s']:>10.3f}" for s in servers)
    print(f"{'FETCH 1:* (FLAGS): first byte / total (best)':<44}{cells}")
    cells = "".join(f" | {row[s]['noop_max_ms']:>21.0f}" for s in servers)
    print(f"{'another session NOOP, longest, ms':<44}{cells}")
    cells = "".join(f" | {row[s]['memory_kb'].get('rss_kb', 0) // 1024:>21}" for s in servers)
    print(f"{'server memory growth for the session, MB':<44}{cells}", flush=True)


# --- idle connections ----------------------------------------------------------------

def proc_kb(pid: int, name: str, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass        # gone meanwhile
    return 0


def group_memory(pgid: int) -> Callable[[], dict]:
    """VmRSS over a server's processes (LightMail's main process and workers, or
    Dovecot's), which counts shared pages once per process, and Pss, which shares
    them out."""
    def measure() -> dict:
        pids = group_members(pgid)
        return {"rss_kb": sum(proc_kb(pid, "status", "VmRSS") for pid in pids),
                "pss_kb": sum(proc_kb(pid, "smaps_rollup", "Pss") for pid in pids),
                "processes": len(pids)}
    return measure


def lightmail_memory(server: LightMail) -> Callable[[], dict]:
    assert server.server is not None
    return group_memory(server.server.proc.pid)


def dovecot_memory(server: Dovecot) -> Callable[[], dict]:
    assert server.instance.proc is not None
    return group_memory(server.instance.proc.pid)


def settle(memory: Callable[[], dict]) -> dict:
    """Memory once it has stopped moving (a login process still exiting, say)."""
    last = memory()
    for _ in range(20):
        time.sleep(0.5)
        now = memory()
        if now == last:
            break
        last = now
    return last


def run_idle(server: Server, count: int, users: list[str],
             memory: Callable[[], dict]) -> dict:
    port = server.ports["imap"]
    for index in range(20):         # warm up: first connections, code paths, caches
        imap = IMAP(port)
        imap.login(users[index % len(users)], PASSWORD)
        imap.command("SELECT INBOX")
        imap.logout()
    before = settle(memory)
    conns = []
    try:
        for index in range(count):
            imap = IMAP(port)
            imap.login(users[index % len(users)], PASSWORD)
            conns.append(imap)
        logged_in = settle(memory)
        for imap in conns:
            imap.command("SELECT INBOX")
            imap.send("IDLE")
            while not imap.response().startswith(b"+"):
                pass
        idling = settle(memory)
    finally:
        for imap in conns:
            imap.close()
    row: dict[str, Any] = {"connections": count}
    for key in before:
        if key.endswith("_kb"):
            row[f"login_{key}_per_conn"] = round((logged_in[key] - before[key]) / count, 1)
            row[f"idle_{key}_per_conn"] = round((idling[key] - before[key]) / count, 1)
    if "processes" in before:
        row["processes_per_conn"] = round((idling["processes"] - before["processes"]) / count,
                                          2)
    return row


def print_idle(row: dict) -> None:
    print(f"Memory per idle IMAP connection, {row['connections']} connections "
          f"(KB, logged in / SELECTed INBOX of {row['mailbox']} messages and in IDLE):")
    if "LightMail" in row:
        lm = row["LightMail"]
        print("  LightMail (VmRSS, main process and any workers): "
              f"{lm['login_rss_kb_per_conn']:.1f} / "
              f"{lm['idle_rss_kb_per_conn']:.1f}")
    if "Dovecot" in row:
        dc = row["Dovecot"]
        print(f"  Dovecot (all processes, {dc['processes_per_conn']:.2f} more per "
              f"connection): VmRSS sum {dc['login_rss_kb_per_conn']:.1f} / "
              f"{dc['idle_rss_kb_per_conn']:.1f}; Pss sum {dc['login_pss_kb_per_conn']:.1f} "
              f"/ {dc['idle_pss_kb_per_conn']:.1f}", flush=True)


# --- the servers and the run ---------------------------------------------------------

class DovecotIMAP(Dovecot):
    """Dovecot with its limits raised for many sessions of one user and many
    processes (defaults: 10 per user and IP, 1024 imap processes, 1000 clients per
    service)."""

    def __init__(self, scheme: str, settings: dict[str, str], connections: int) -> None:
        self.instance = DovecotInstance(settings={
            **settings, "mail_max_userip_connections": str(LIMIT),
            "default_client_limit": str(max(1000, 2 * connections + 500))},
            services=f"service imap {{\n  process_limit = {connections + 500}\n}}\n")
        self.scheme = scheme
        self.ports = {"lmtp": self.instance.lmtp_port, "pop3": self.instance.pop3_port,
                      "imap": self.instance.imap_port}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=parse_levels, default=[1, 10, 50],
                        help="concurrent clients of the mix, comma-separated "
                        "(default: 1,10,50)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of each mix run (default: 10)")
    parser.add_argument("--messages", type=int, default=100,
                        help="messages in each mix user's INBOX (default: 100)")
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("--rounds", type=int, default=5,
                        help="reading rounds per mix session (default: 5)")
    parser.add_argument("--idlers", type=int, default=10,
                        help="sessions in IDLE during the mix (default: 10; 0: none)")
    parser.add_argument("--big", type=int, default=20000,
                        help="messages in the big mailbox (default: 20000, for a run of "
                        "about 4 minutes; the issue's figure is 100000; 0: skip)")
    parser.add_argument("--big-repeat", type=int, default=2,
                        help="times each big-mailbox command runs (default: 2)")
    parser.add_argument("--idle", type=int, default=1000,
                        help="idle connections for the memory figure (default: 1000; "
                        "0: skip)")
    parser.add_argument("--dovecot-scheme", default="PLAIN",
                        help="how Dovecot stores the passwords: PLAIN (default: no "
                        "hashing, as LightMail's auth cache spares it its argon2id after "
                        "the first login) or ARGON2ID (what LightMail stores; Dovecot "
                        "then verifies it at every login: see --auth-cache)")
    parser.add_argument("--auth-cache", default="10m",
                        help="LightMail's auth_cache_ttl and Dovecot's (default: 10m; 0 "
                        "turns both off); Dovecot 2.3 never caches its passwd-file passdb")
    parser.add_argument("--only", choices=["lightmail", "dovecot"],
                        help="run one server alone (no ratio)")
    parser.add_argument("--workers", type=int, default=0,
                        help="LightMail's [server] workers (default 0: one process; "
                        "docs/benchmarks.rst has runs with 2, one per core)")
    parser.add_argument("--lightmail-config", default="", metavar="TEXT",
                        help="more lines for LightMail's config, \\n between lines "
                        "(e.g. '[storage]\\nsql_threads = 2')")
    parser.add_argument("--repeat", type=int, default=3,
                        help="mix runs per server and client count, taking turns; the "
                        "median counts (default: 3)")
    parser.add_argument("--json", help="also write the JSON lines to this file")
    args = parser.parse_args()
    if args.messages < 20:
        parser.error("--messages must be at least 20")
    if args.idle > 1900:
        parser.error("--idle: at most 1900 (LightMail's listener takes 2000)")
    users = [user(index) for index in range(max(args.clients))]
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-imap-"))
    rows: list[dict] = []
    servers: list[Server] = []
    memories: dict[str, Callable[[], dict]] = {}
    filled: dict[str, float] = {}
    started = time.monotonic()
    try:
        if args.only != "dovecot":
            servers.append(LightMail(
                base / "lightmail",
                {"lmtp": "protocol = lmtp", "imap": "protocol = imap\ntls = none"},
                extra_config="[directory]\nauth_over_plaintext = yes\n"
                f"auth_cache_ttl = {args.auth_cache}\n"
                f"[imap]\nmax_connections_per_user = {LIMIT}\n"
                + args.lightmail_config.replace("\\n", "\n") + "\n",
                workers=args.workers))
        if args.only != "lightmail":
            seconds = parse_duration()(args.auth_cache, Path("."))
            cache = ({"auth_cache_size": "10M", "auth_cache_ttl": f"{int(seconds)} secs"}
                     if seconds else {})
            servers.append(DovecotIMAP(args.dovecot_scheme, cache,
                                       args.idle + max(args.clients) + args.idlers))
        everyone = users + [IDLE_USER] + ([BIG_USER] if args.big else [])
        for server in servers:
            if isinstance(server, LightMail):
                add_lightmail_users(server, everyone)
                if args.big:
                    filled[server.name] = fill_lightmail_big(server, BIG_USER, args.big,
                                                             args.size)
                server.start()
                memories[server.name] = lightmail_memory(server)
            else:
                assert isinstance(server, Dovecot)
                add_dovecot_users(server, everyone)
                if args.big:
                    filled[server.name] = fill_dovecot_big(server, BIG_USER, args.big,
                                                           args.size)
                server.start()
                memories[server.name] = dovecot_memory(server)
            fill_over_lmtp(server, users, args.messages, args.size)
            # Warm up, untimed: one session per user (and the idlers' mailbox made);
            # the big mailbox indexed by a first SELECT.
            run_clients(mix_worker, [("client", server.ports["imap"], address, PASSWORD,
                                      0, 1, 1, args.messages, args.size, index)
                                     for index, address in enumerate(users)], timeout=600)
            warm = IMAP(server.ports["imap"], timeout=1800)
            warm.login(IDLE_USER, PASSWORD)
            warm.command("SELECT INBOX")
            warm.logout()
            if args.big:
                warm = IMAP(server.ports["imap"], timeout=1800)
                warm.login(BIG_USER, PASSWORD)
                warm.command("SELECT INBOX")
                warm.logout()
        print(f"Set-up: {time.monotonic() - started:.0f} s" +
              "".join(f"; {name} big mailbox written in {value:.0f} s"
                      for name, value in filled.items()), flush=True)

        print(f"IMAP mix: sessions of LOGIN, SELECT, UID FETCH 1:* (FLAGS), UID SEARCH "
              f"SUBJECT, APPEND, {args.rounds} x (FETCH 20 headers, FETCH 1 body, STORE "
              f"\\Seen, UID SEARCH UNSEEN), STORE \\Deleted, UID EXPUNGE, LOGOUT on "
              f"{args.messages} messages of {args.size} bytes; {args.seconds:g} s per run; "
              f"{args.idlers} sessions in IDLE, {APPENDS_PER_S} APPENDs/s to their "
              f"mailbox ('idle ms': median APPEND-to-EXISTS); Dovecot passwords: "
              f"{args.dovecot_scheme}, LightMail: argon2id; auth caches: {args.auth_cache}")
        print(MIX_HEADER)
        print("-" * len(MIX_HEADER))
        mix_rows = []
        run = 0
        for clients in args.clients:
            row: dict[str, Any] = {"bench": "imap", "part": "mix", "clients": clients,
                                   "messages": args.messages, "size": args.size,
                                   "rounds": args.rounds, "idlers": args.idlers}
            # --repeat runs per server, taking turns, the one that goes first
            # alternating; the run with the median rate stands for the server.
            results: dict[str, list[dict]] = {server.name: [] for server in servers}
            for turn in range(max(1, args.repeat)):
                for server in (servers if turn % 2 == 0 else servers[::-1]):
                    run += 1
                    results[server.name].append(run_mix(server, clients, args, run))
            for name, runs in results.items():
                runs.sort(key=lambda result: result["ops_per_s"])
                row[name] = dict(runs[(len(runs) - 1) // 2],
                                 runs=[round(r["ops_per_s"]) for r in runs])
            add_ratio(row, "ops_per_s")
            rows.append(row)
            mix_rows.append(row)
            print_mix_row(row)
        print_command_times(mix_rows)

        if args.big:
            row = {"bench": "imap", "part": "big", "messages": args.big,
                   "repeat": args.big_repeat, "size": args.size}
            for server in servers:
                row[server.name] = run_big(server, args, memories[server.name])
            rows.append(row)
            print_big(row)

        if args.idle:
            row = {"bench": "imap", "part": "idle", "connections": args.idle,
                   "mailbox": args.messages}
            for server in servers:
                if isinstance(server, LightMail):
                    # A fresh process: memory the earlier parts freed would be reused
                    # by the new sessions and hide what they cost.
                    server.stop()
                    server.start()
                    memories[server.name] = lightmail_memory(server)
                row[server.name] = run_idle(server, args.idle, users, memories[server.name])
            rows.append(row)
            print_idle(row)
    finally:
        for server in servers:
            server.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    print(f"Total: {time.monotonic() - started:.0f} s")
    print_json_lines(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
