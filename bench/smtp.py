"""SMTP receiving benchmark: LightMail against Postfix, same machine, same run.

    .venv/bin/python bench/smtp.py [--quick] [--sessions 1,10,50] [--sizes 4096,102400]
                                   [--messages N] [--repeat 3] [--idle 1000]
                                   [--json results.json]

Postfix's ``smtp-source`` sends N messages to one local recipient of each server, with
1, 10 and 50 concurrent sessions, 4 KB and 100 KB messages.  LightMail runs as
``twistd lightmail`` with the embedded SQLite store; Postfix as a private instance with
virtual Maildir delivery.  Both keep their durability defaults (LightMail fsyncs blob
and commit; Postfix fsyncs queue file and Maildir file).

Reported per server: messages per second *accepted* (smtp-source's wall time) and
*delivered* (until the last message is filed in the mailbox), and their ratios; then
LightMail's resident memory per idle connection.  A run that loses a message fails.

Each load is run ``--repeat`` times per server, the two servers taking turns and the
one that goes first alternating, and each server's median rate is reported: on a
shared machine one run of a second or two swings by a third either way (the disk's
fsync latency most of all), and a ratio of two such single runs says little.

``--policy`` measures the inbound policy chain instead of Postfix: two LightMails,
one whose MX listener runs every inbound check (``checks = default``: SPF, DKIM, and
the others as they land) and one with ``checks = none``, take turns on the same load.
Both ask a test DNS server (tests/dnsserver.py) that publishes the sender's SPF
record and DKIM key (and DMARC policy); smtp-source sends one message, DKIM-signed
(RSA 2048) by the sender's key, as a file (``-F``), so every check does its whole
work; DNS answers are cached, as on a busy MX.  The ratio is policy / none.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from dnsserver import DNSServer  # noqa: E402
from dovecot import group_members  # noqa: E402
from harness import ServerProcess, run_cli  # noqa: E402
from postfix import PostfixInstance  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
RCPT = "rcpt@bench.test"
SENDER_DOMAIN = "client.test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LightMail:
    name = "LightMail"

    def __init__(self, base: Path, workers: int = 0, checks: str = "none",
                 dns_servers: str = "", name: str = "LightMail") -> None:
        self.name = name
        base.mkdir(parents=True, exist_ok=True)
        self.state = base / "state"
        config = base / "lightmail.conf"
        config.write_text(
            f"[server]\nstate_dir = {self.state}\nhostname = lightmail.bench.test\n"
            f"workers = {workers}\n"
            "[logging]\nlevel = info\n"
            f"[outbound]\ndns_servers = {dns_servers}\n"
            "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
            f"checks = {checks}\n"
            "max_connections = 2000\nmax_connections_per_ip = 2000\n")
        run_cli(config, "domain", "add", "bench.test")
        run_cli(config, "user", "add", RCPT, "--no-password")
        self.server = ServerProcess(config)
        self.port = self.server.ports(expected=1)["mx"]

    def delivered(self) -> int:
        db = sqlite3.connect(f"file:{self.state / 'lightmail.db'}?mode=ro", uri=True)
        try:
            return int(db.execute("select count(*) from messages").fetchone()[0])
        finally:
            db.close()

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def stop(self) -> None:
        self.server.kill()


class Postfix:
    name = "Postfix"

    def __init__(self, base: Path) -> None:
        nobody = pwd.getpwnam("nobody")
        self.maildirs = Path(tempfile.mkdtemp(prefix="lightmail-bench-maildirs-"))
        os.chmod(self.maildirs, 0o755)
        os.chown(self.maildirs, nobody.pw_uid, nobody.pw_gid)
        self.port = free_port()
        self.instance = PostfixInstance(None, self.port, main={
            "myhostname": "postfix.bench.test",
            "virtual_mailbox_domains": "bench.test",
            "virtual_mailbox_base": str(self.maildirs),
            "virtual_mailbox_maps": "static:rcpt/",        # trailing slash: Maildir
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "virtual_transport": "virtual",
        })
        self.instance.start()

    def delivered(self) -> int:
        box = self.maildirs / "rcpt"
        return sum(len(os.listdir(box / sub)) for sub in ("new", "cur")
                   if (box / sub).is_dir())

    def stop(self) -> None:
        self.instance.stop()
        subprocess.run(["rm", "-rf", str(self.maildirs)], check=False)


def run_load(server: LightMail | Postfix, sessions: int, size: int, count: int,
             message: Path | None = None) -> dict:
    """``message``: a file smtp-source sends as it is (-F), instead of ``size``
    octets of its own."""
    start_count = server.delivered()
    started = time.monotonic()
    content = ["-F", str(message), "-M", SENDER_DOMAIN] if message else ["-l", str(size)]
    subprocess.run([SMTP_SOURCE, "-s", str(sessions), "-m", str(count), *content,
                    "-f", "sender@client.test", "-t", RCPT, f"127.0.0.1:{server.port}"],
                   check=True, timeout=600, stdout=subprocess.DEVNULL)
    accepted = time.monotonic() - started
    deadline = started + 600
    while server.delivered() - start_count < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name}: only {server.delivered() - start_count} of "
                             f"{count} messages were delivered")
        time.sleep(0.02)
    delivered = time.monotonic() - started
    got = server.delivered() - start_count
    if got != count:
        raise SystemExit(f"{server.name}: {got} messages delivered for {count} sent")
    return {"accepted_per_s": count / accepted, "delivered_per_s": count / delivered}


def median_rates(runs: list[dict]) -> dict:
    """Each rate's median over the runs, and the runs themselves."""
    out: dict = {key: statistics.median(run[key] for run in runs)
                 for key in ("accepted_per_s", "delivered_per_s")}
    out["runs"] = runs
    return out


def rss_kb(pgid: int) -> int:
    """VmRSS of LightMail's process group: the main process and its workers."""
    return sum(_rss_kb(pid) for pid in group_members(pgid))


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def idle_memory(server: LightMail, connections: int) -> float:
    """KB of LightMail's RSS per idle SMTP connection (greeting read, then silence)."""
    warm = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    for sock in warm:
        sock.recv(200)
        sock.close()
    time.sleep(1)
    before = rss_kb(server.pid)
    socks = [socket.create_connection(("127.0.0.1", server.port))
             for _ in range(connections)]
    for sock in socks:
        sock.recv(200)
    time.sleep(1)
    after = rss_kb(server.pid)
    for sock in socks:
        sock.close()
    return (after - before) / connections


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,10,50")
    parser.add_argument("--sizes", default="4096,102400")
    parser.add_argument("--messages", type=int, default=0,
                        help="messages per run (default: 500 for 4 KB, 400 for 100 KB)")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each load per server, taking turns; the median "
                        "counts (default: 3)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages")
    parser.add_argument("--workers", type=int, default=0,
                        help="LightMail's [server] workers (default 0: one process; "
                        "docs/benchmarks.rst has runs with 2, one per core)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--policy", action="store_true",
                        help="LightMail with every inbound check against LightMail "
                        "with none, instead of against Postfix")
    args = parser.parse_args()
    sessions = [int(x) for x in args.sessions.split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.policy:
        return policy_main(args, sessions, sizes)
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-"))
    results: list[dict] = []
    lightmail = postfix = None
    try:
        lightmail = LightMail(base / "lightmail", args.workers)
        postfix = Postfix(base / "postfix")
        for size in sizes:
            for count_sessions in sessions:
                count = args.messages or (500 if size <= 8192 else 400)
                if args.quick:
                    count = max(count_sessions, count // 10)
                row = {"sessions": count_sessions, "size": size, "messages": count}
                runs: dict[str, list[dict]] = {lightmail.name: [], postfix.name: []}
                for turn in range(max(1, args.repeat)):
                    order = (lightmail, postfix) if turn % 2 == 0 else (postfix, lightmail)
                    for server in order:
                        runs[server.name].append(
                            run_load(server, count_sessions, size, count))
                for name, measured in runs.items():
                    row[name] = median_rates(measured)
                results.append(row)
                print_row(row)
        idle = idle_memory(lightmail, args.idle) if args.idle else None
    finally:
        for server in (lightmail, postfix):
            if server is not None:
                server.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    if idle is not None:
        print(f"LightMail RSS per idle SMTP connection ({args.idle} connections): "
              f"{idle:.1f} KB")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "idle_kb": idle}, indent=2))
    return 0


def sender_zone() -> tuple[dict, bytes]:
    """The sender's DNS (SPF for its HELO name and domain, a DKIM key, a DMARC
    policy) and the PEM of the key."""
    from lightmail.policy.dkim import dns_record, generate_key, signing_key
    pem, private = generate_key("rsa", 2048)
    key = signing_key(SENDER_DOMAIN, "bench", private)
    return {
        f"{SENDER_DOMAIN}.": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"], "A": ["127.0.0.1"]},
        f"bench._domainkey.{SENDER_DOMAIN}.": {"TXT": [dns_record(key)]},
        f"_dmarc.{SENDER_DOMAIN}.": {"TXT": ["v=DMARC1; p=reject"]},
    }, pem


def signed_message(pem: bytes, size: int) -> bytes:
    """A message of about ``size`` octets from the sender, signed with its key;
    LF line ends (smtp-source -F sends each line with CRLF)."""
    import dkim
    line = b"The quick brown fox jumps over the lazy dog, again and again. " * 1 + b"\r\n"
    head = (f"From: Sender <sender@{SENDER_DOMAIN}>\r\nTo: {RCPT}\r\n"
            "Subject: policy benchmark\r\nDate: Mon, 07 Dec 2026 12:00:00 +0000\r\n"
            f"Message-ID: <bench@{SENDER_DOMAIN}>\r\n\r\n").encode()
    body = line * max(1, (size - len(head)) // len(line))
    message = head + body
    signature = dkim.sign(message, b"bench", SENDER_DOMAIN.encode(), pem,
                          include_headers=[b"from", b"to", b"subject", b"date",
                                           b"message-id"])
    return (signature + message).replace(b"\r\n", b"\n")


def policy_main(args: argparse.Namespace, sessions: list[int], sizes: list[int]) -> int:
    """--policy: every inbound check against none, same run (see the docstring)."""
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-policy-"))
    zone, pem = sender_zone()
    dns = DNSServer(zone, ttl=3600).start()
    servers: list[LightMail] = []
    results: list[dict] = []
    try:
        servers = [LightMail(base / "none", args.workers, "none",
                             f"127.0.0.1:{dns.port}", name="none"),
                   LightMail(base / "policy", args.workers, "default",
                             f"127.0.0.1:{dns.port}", name="policy")]
        print(f"{'sessions':>8} {'size':>7} | {'no checks acc/s':>15} {'dlv/s':>7} | "
              f"{'all checks acc/s':>16} {'dlv/s':>7} | {'ratio acc':>9} {'ratio dlv':>9}")
        for size in sizes:
            message = base / f"message-{size}.eml"
            message.write_bytes(signed_message(pem, size))
            for count_sessions in sessions:
                count = args.messages or (500 if size <= 8192 else 400)
                if args.quick:
                    count = max(count_sessions, count // 10)
                runs: dict[str, list[dict]] = {server.name: [] for server in servers}
                for turn in range(max(1, args.repeat)):
                    order = servers if turn % 2 == 0 else servers[::-1]
                    for server in order:
                        runs[server.name].append(
                            run_load(server, count_sessions, size, count, message))
                none, full = median_rates(runs["none"]), median_rates(runs["policy"])
                row = {"sessions": count_sessions, "size": size, "messages": count,
                       "none": none, "policy": full}
                results.append(row)
                print(f"{count_sessions:>8} {size // 1024:>6}K | "
                      f"{none['accepted_per_s']:>15.0f} {none['delivered_per_s']:>7.0f} | "
                      f"{full['accepted_per_s']:>16.0f} {full['delivered_per_s']:>7.0f} | "
                      f"{full['accepted_per_s'] / none['accepted_per_s']:>8.2f}x "
                      f"{full['delivered_per_s'] / none['delivered_per_s']:>8.2f}x",
                      flush=True)
        check_results_written(servers[1])
    finally:
        for server in servers:
            server.stop()
        dns.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"policy_runs": results}, indent=2))
    return 0


def check_results_written(server: LightMail) -> None:
    """The checked server wrote what the checks found: a benchmark of checks that
    did not run would measure nothing."""
    db = sqlite3.connect(f"file:{server.state / 'lightmail.db'}?mode=ro", uri=True)
    try:
        blob_id = db.execute("select blob_id from messages order by id desc limit 1"
                             ).fetchone()[0]
    finally:
        db.close()
    blob = next(server.state.glob(f"blobs/**/{blob_id}"))
    head = blob.read_bytes().split(b"\r\n\r\n", 1)[0]
    for needed in (b"spf=pass", b"dkim=pass"):
        if needed not in head:
            raise SystemExit(f"the checked server's message lacks {needed.decode()}: "
                             f"{head.decode(errors='replace')[:600]}")


HEADER = (f"{'sessions':>8} {'size':>7} | {'LightMail acc/s':>15} {'dlv/s':>7} | "
          f"{'Postfix acc/s':>13} {'dlv/s':>7} | {'ratio acc':>9} {'ratio dlv':>9}")


def print_row(row: dict) -> None:
    if not getattr(print_row, "started", False):
        print(HEADER)
        print("-" * len(HEADER))
        print_row.started = True  # type: ignore[attr-defined]
    lm, pf = row["LightMail"], row["Postfix"]
    print(f"{row['sessions']:>8} {row['size'] // 1024:>6}K | "
          f"{lm['accepted_per_s']:>15.0f} {lm['delivered_per_s']:>7.0f} | "
          f"{pf['accepted_per_s']:>13.0f} {pf['delivered_per_s']:>7.0f} | "
          f"{lm['accepted_per_s'] / pf['accepted_per_s']:>8.2f}x "
          f"{lm['delivered_per_s'] / pf['delivered_per_s']:>8.2f}x", flush=True)
    if len(lm.get("runs", ())) > 1:
        spread = "; ".join(
            f"{name} " + " ".join(f"{run['accepted_per_s']:.0f}" for run in row[name]["runs"])
            for name in ("LightMail", "Postfix"))
        print(f"{'':>17}   (accepted/s of each run: {spread})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
