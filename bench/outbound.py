"""Outbound benchmark: draining a queue to a relay host, LightMail against Postfix.

    .venv/bin/python bench/outbound.py [--messages 2000] [--size 4096] [--concurrency 20]
                                       [--only lightmail|postfix] [--json results.jsonl]

The scenario is a relay host coming back after an outage.  Both servers send all
their outbound mail to one relay host, Postfix's ``smtp-sink`` on a loopback port
(LightMail: ``[outbound] relay_host = [127.0.0.1]:PORT``; Postfix: ``relayhost =
[127.0.0.1]:PORT``), with the same number of connections to it at most
(``--concurrency``: LightMail's ``destination_concurrency``, Postfix's
``default_destination_concurrency_limit``; 20, both defaults) and no TLS (smtp-sink
offers none).  For each server in turn:

1. with the sink down, ``smtp-source`` submits N messages of ``--size`` bytes, one
   remote recipient each (to Postfix directly, relaying for its ``mynetworks``; to
   LightMail's MX through an alias to a remote address, LightMail's MX relaying for
   nobody); each server tries, finds the relay refusing connections, and defers them;
2. smtp-sink starts on the relay port, and the queue is flushed: ``postqueue -f``
   (qmgr wakes at once), ``lightmail queue requeue --all`` (due now, and the command
   wakes the running server's queue runner through its FIFO, ``queue.wake``);
3. the sink's running counter (``smtp-sink -c``) is read as messages arrive, until
   all N have; then the server's queue must be empty and the sink must hold exactly N.

Reported per server: messages per second from the first message's arrival at the
sink to the last's, ``(N - 1) / (t_last - t_first)``, which leaves out how each
queue manager is woken; that wake-up (flush command to first arrival) is reported
as ``start_s`` (for LightMail mostly the start-up of the ``lightmail`` command, a
Python process, against ``postqueue``'s few milliseconds), and the whole
flush-to-last rate as ``flush_per_s``.  Both servers
keep their durability defaults (LightMail: SQLite ``synchronous=FULL``, the outcome of
every recipient committed; Postfix: queue files fsynced, removed when delivered) and
log every delivery.  Each row is printed as a table line, and as a JSON line at the end
(and into ``--json FILE``).  Needs Postfix (``scripts/test-peers.sh`` installs it) and
root (Postfix's daemons switch users).
"""

from __future__ import annotations

import argparse
import os
import pty
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lmtp import LightMail, free_port, lightmail_cli, print_json_lines
from postfix import POSTFIX, PostfixInstance  # in tests/, on sys.path since lmtp

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTQUEUE = str(Path(POSTFIX).parent / "postqueue")
SENDER = "sender@client.test"
REMOTE = "sink@remote.test"            # where every message goes (the relay takes all)
ALIAS = "out@bench.test"               # LightMail's MX: an alias to REMOTE
POLL = 0.02
COUNTER = re.compile(rb"mesg=(\d+)")


class Sink:
    """``smtp-sink -c`` on a loopback port; a thread reads its running counter
    ("sess=S quit=Q mesg=M", each ended by CR) and notes when each count arrived.
    Its output goes to a pseudo-terminal, which smtp-sink writes to at once."""

    def __init__(self, port: int, backlog: int = 1024) -> None:
        command = [SMTP_SINK, "-c", "-h", "sink.bench.test"]
        if os.geteuid() == 0:
            command += ["-u", "postfix"]      # smtp-sink refuses to run as root
        self.fd, terminal = pty.openpty()
        self.proc = subprocess.Popen(command + [f"127.0.0.1:{port}", str(backlog)],
                                     stdin=subprocess.DEVNULL, stdout=terminal,
                                     stderr=terminal)
        os.close(terminal)
        self.count = 0
        self.first: float | None = None     # monotonic time of the first message
        self.last: float | None = None      # ... and of the latest
        self.text = b""
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"smtp-sink did not start: {self.text!r}") from None
                time.sleep(0.05)

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:              # EIO: the sink has exited
                break
            if not data:
                break
            now = time.monotonic()
            buffer += data
            *lines, buffer = re.split(rb"[\r\n]", buffer)
            counts = [int(m.group(1)) for m in map(COUNTER.search, lines) if m]
            with self._cond:
                self.text = (self.text + data)[-2000:]
                if counts and max(counts) > self.count:
                    self.count = max(counts)
                    self.first = self.first or now
                    self.last = now
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait(self, count: int, timeout: float, relay: Relay) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < count:
                relay.check()
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise SystemExit(f"{relay.name}: the sink got {self.count} of {count} "
                                     f"messages; it said: {self.text[-300:]!r}")
                self._cond.wait(min(left, 0.5))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        os.close(self.fd)


def submit(port: int, count: int, size: int, rcpt: str) -> None:
    """``smtp-source``: ``count`` messages of ``size`` bytes to ``rcpt``, 10 sessions."""
    subprocess.run([SMTP_SOURCE, "-s", "10", "-m", str(count), "-l", str(size),
                    "-f", SENDER, "-t", rcpt, f"127.0.0.1:{port}"],
                   check=True, timeout=1200, stdout=subprocess.DEVNULL)


def wait_for(relay: Relay, predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        relay.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {timeout:g} s: {what}")
        time.sleep(POLL)


class LightMailRelay:
    """``twistd lightmail`` (SQLite store) relaying everything to the sink."""

    name = "LightMail"

    def __init__(self, base: Path, sink_port: int, concurrency: int) -> None:
        self.server = LightMail(base, {"mx": "protocol = smtp"}, extra_config=(
            f"[outbound]\nrelay_host = [127.0.0.1]:{sink_port}\ntls = none\n"
            f"destination_concurrency = {concurrency}\nconcurrency = {max(100, concurrency)}\n"
            "connect_timeout = 5s\n"))
        lightmail_cli(self.server.config, "alias", "add", ALIAS, REMOTE)
        self.server.start()
        self.port = self.server.ports["mx"]
        self.rcpt = ALIAS

    def _count(self, where: str) -> int:
        db = sqlite3.connect(f"file:{self.server.state / 'lightmail.db'}?mode=ro", uri=True,
                             timeout=30)
        try:
            return int(db.execute(f"select count(*) from queue_recipients {where}")
                       .fetchone()[0])
        finally:
            db.close()

    def deferred(self) -> int:
        """Recipients waiting after a failed attempt."""
        return self._count("where state = 'deferred' and attempts > 0")

    def queued(self) -> int:
        return self._count("")

    def flush(self) -> None:
        lightmail_cli(self.server.config, "queue", "requeue", "--all")

    def check(self) -> None:
        server = self.server.server
        if server is not None and server.proc.poll() is not None:
            raise SystemExit(f"LightMail exited ({server.proc.returncode}):\n"
                             + "\n".join(server.output.splitlines()[-30:]))

    def stop(self) -> None:
        self.server.stop()


class PostfixRelay:
    """A private Postfix (tests/postfix.py) relaying everything to the sink."""

    name = "Postfix"

    def __init__(self, sink_port: int, concurrency: int) -> None:
        self.port = free_port()
        self.instance = PostfixInstance(None, self.port, main={
            "myhostname": "postfix.bench.test",
            "relayhost": f"[127.0.0.1]:{sink_port}",
            "default_destination_concurrency_limit": str(concurrency),
            "smtp_connect_timeout": "5s",
        })
        self.instance.start()
        self.rcpt = REMOTE

    def deferred(self) -> int:
        return sum(1 for path in (self.instance.base / "spool" / "deferred").rglob("*")
                   if path.is_file())

    def queued(self) -> int:
        return self.instance.queued()

    def flush(self) -> None:
        subprocess.run([POSTQUEUE, "-c", str(self.instance.etc), "-f"], check=True,
                       timeout=60)

    def check(self) -> None:
        proc = self.instance.proc
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"Postfix exited ({proc.returncode}):\n"
                             + "\n".join(self.instance.logtext().splitlines()[-30:]))

    def stop(self) -> None:
        self.instance.stop()


Relay = LightMailRelay | PostfixRelay


def run_once(relay: Relay, sink_port: int, messages: int, size: int) -> dict:
    """Queue ``messages`` with the sink down, bring it up, flush, time the drain."""
    if relay.queued():
        raise SystemExit(f"{relay.name}: the queue is not empty before the run")
    submit(relay.port, messages, size, relay.rcpt)
    wait_for(relay, lambda: relay.deferred() >= messages, 600,
             f"{relay.name}: {messages} messages deferred with the relay down")
    sink = Sink(sink_port)
    try:
        flushed = time.monotonic()
        relay.flush()
        sink.wait(messages, 600 + messages / 10, relay)
        assert sink.first is not None and sink.last is not None
        first, last = sink.first, sink.last
        wait_for(relay, lambda: relay.queued() == 0, 120, f"{relay.name}: the queue to empty")
        time.sleep(0.5)
        if sink.count != messages:
            raise SystemExit(f"{relay.name}: the sink got {sink.count} messages for "
                             f"{messages} queued")
    finally:
        sink.stop()
    drain = max(last - first, 1e-6)
    return {"messages": messages, "drain_s": round(drain, 3),
            "start_s": round(first - flushed, 3),
            "msgs_per_s": (messages - 1) / drain,
            "flush_per_s": messages / (last - flushed)}


HEADER = (f"{'msgs':>6} {'size':>6} | {'LightMail msg/s':>15} {'start s':>7} | "
          f"{'Postfix msg/s':>13} {'start s':>7} | {'ratio':>7}")


def print_row(row: dict) -> None:
    cells = []
    for name, width in (("LightMail", 15), ("Postfix", 13)):
        result = row.get(name)
        cells.append(f"{result['msgs_per_s']:>{width}.0f} {result['start_s']:>7.2f}"
                     if result else f"{'-':>{width}} {'-':>7}")
    ratio = f"{row['ratio']:>6.2f}x" if "ratio" in row else f"{'-':>7}"
    print(f"{row['messages']:>6} {row['size']:>6} | {cells[0]} | {cells[1]} | {ratio}",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000,
                        help="messages queued and relayed per run (default: 2000)")
    parser.add_argument("--size", type=int, default=4096,
                        help="message size in bytes (default: 4096)")
    parser.add_argument("--concurrency", type=int, default=20,
                        help="most connections to the relay at once (default: 20)")
    parser.add_argument("--only", choices=["lightmail", "postfix"],
                        help="run one server alone (no ratio)")
    parser.add_argument("--json", help="also write the JSON lines to this file")
    args = parser.parse_args()
    if args.messages < 2:
        parser.error("--messages must be at least 2")
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-outbound-"))
    sink_port = free_port()
    row: dict[str, Any] = {"bench": "outbound", "messages": args.messages,
                           "size": args.size, "concurrency": args.concurrency}
    relays: list[Relay] = []
    try:
        if args.only != "postfix":
            relays.append(LightMailRelay(base / "lightmail", sink_port, args.concurrency))
        if args.only != "lightmail":
            relays.append(PostfixRelay(sink_port, args.concurrency))
        print(f"Queue to smtp-sink: {args.messages} messages of {args.size} bytes, at most "
              f"{args.concurrency} connections")
        print(HEADER)
        print("-" * len(HEADER))
        for relay in relays:
            row[relay.name] = run_once(relay, sink_port, args.messages, args.size)
        if "LightMail" in row and "Postfix" in row:
            lm, pf = row["LightMail"], row["Postfix"]
            row["ratio"] = lm["msgs_per_s"] / pf["msgs_per_s"]
            row["ratio_flush"] = lm["flush_per_s"] / pf["flush_per_s"]
        print_row(row)
    finally:
        for relay in relays:
            relay.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    print_json_lines([row], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
