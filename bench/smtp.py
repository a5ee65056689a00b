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
*delivered* (until the last message is filed in the mailbox), and their ratios; the
CPU time a message costs the server's processes (user and system, from /proc: a
figure the machine's other load moves far less than the rates); then LightMail's
resident memory per idle connection.  A run that loses a message fails.

Each load is run ``--repeat`` times per server, the two servers taking turns and the
one that goes first alternating, and each server's median rate is reported: on a
shared machine one run of a second or two swings by a third either way (the disk's
fsync latency most of all), and a ratio of two such single runs says little.

``--policy`` measures the inbound policy chain instead of Postfix: two LightMails,
one whose MX listener runs the mail-authentication checks (``checks = spf, dkim,
arc, dmarc``, and the Authentication-Results field they write) and one with
``checks = none``, take turns on the same load.  Both ask a test DNS server
(tests/dnsserver.py) that publishes the sender's SPF record, DKIM key and DMARC
policy; smtp-source sends one message, DKIM-signed (RSA 2048) by the sender's key,
as a file (``-F``), so every check does its whole work; DNS answers are cached (TTL
one hour), as on a busy MX.  The ratio is checked / none; the last message stored
by the checked server must say spf=pass, dkim=pass and dmarc=pass.

``--abuse`` is the same comparison with the abuse checks instead (``checks =
access, limits, dnsbl, greylist``): a few entries on the allow- and blocklists that
the client does not match; every rate limit of ``[limits]`` at 1000000/1h, so that
each message spends its tokens but none is refused; DNSBL and RHSBL zones that the
test DNS server answers with NXDOMAIN (cached); greylisting with the client's
network allowed by the warm-up, so that each message is looked up and passes.

``--scanners`` puts content scanners on both servers of the Postfix comparison,
ClamAV's clamd and rspamd, started privately (tests/scanpeers.py): LightMail with
``checks = antivirus, spam`` (clamd's INSTREAM, rspamd's HTTP), Postfix with the
same two as milters (clamav-milter from Debian, and rspamd's proxy worker in milter
mode, scanning in its own process as Debian configures it).  Both send the message
of ``--policy``; the last message each server stored must carry both scanners'
header fields.
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
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path[:0] = [str(TESTS), str(ROOT)]

from dnsserver import DNSServer  # noqa: E402
from dovecot import group_members  # noqa: E402
from harness import ServerProcess, run_cli  # noqa: E402
from postfix import PostfixInstance  # noqa: E402

from tests.scanpeers import Clamd, Rspamd  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
RCPT = "rcpt@bench.test"
SENDER_DOMAIN = "client.test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LightMail:
    """``extra``: more configuration (sections); ``setup``: ``lightmail`` commands
    run before the start."""

    def __init__(self, base: Path, workers: int = 0, checks: str = "none",
                 dns_servers: str = "", name: str = "LightMail", extra: str = "",
                 setup: Sequence[tuple[str, ...]] = ()) -> None:
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
            "max_connections = 2000\nmax_connections_per_ip = 2000\n" + extra)
        run_cli(config, "domain", "add", "bench.test")
        run_cli(config, "user", "add", RCPT, "--no-password")
        for command in setup:
            run_cli(config, *command)
        self.server = ServerProcess(config)
        self.port = self.server.ports(expected=1)["mx"]

    def delivered(self) -> int:
        db = sqlite3.connect(f"file:{self.state / 'lightmail.db'}?mode=ro", uri=True)
        try:
            return int(db.execute("select count(*) from messages").fetchone()[0])
        finally:
            db.close()

    def last_header(self) -> bytes:
        """The header block of the message stored last."""
        db = sqlite3.connect(f"file:{self.state / 'lightmail.db'}?mode=ro", uri=True)
        try:
            blob_id = db.execute("select blob_id from messages order by id desc limit 1"
                                 ).fetchone()[0]
        finally:
            db.close()
        blob = next(self.state.glob(f"blobs/**/{blob_id}"))
        return blob.read_bytes().split(b"\r\n\r\n", 1)[0]

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    pgid = pid

    def stop(self) -> None:
        self.server.kill()


class Postfix:
    """``main``: more main.cf settings (milters)."""

    def __init__(self, base: Path, main: dict[str, str] | None = None,
                 name: str = "Postfix") -> None:
        self.name = name
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
            **(main or {}),
        })
        self.instance.start()

    def _files(self) -> list[Path]:
        box = self.maildirs / "rcpt"
        return [path for sub in ("new", "cur") if (box / sub).is_dir()
                for path in (box / sub).iterdir()]

    def delivered(self) -> int:
        return len(self._files())

    @property
    def pgid(self) -> int:
        """Postfix's master makes a process group of its own (setsid)."""
        return int((self.instance.base / "spool" / "pid" / "master.pid").read_text())

    def last_header(self) -> bytes:
        newest = max(self._files(), key=lambda path: path.stat().st_mtime_ns)
        return newest.read_bytes().replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]

    def stop(self) -> None:
        self.instance.stop()
        subprocess.run(["rm", "-rf", str(self.maildirs)], check=False)


Server = LightMail | Postfix


def run_load(server: Server, sessions: int, size: int, count: int,
             message: Path | None = None) -> dict:
    """``message``: a file smtp-source sends as it is (-F), instead of ``size``
    octets of its own."""
    start_count = server.delivered()
    cpu_before = cpu_seconds(server.pgid)
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
    return {"accepted_per_s": count / accepted, "delivered_per_s": count / delivered,
            "cpu_ms": 1000 * (cpu_seconds(server.pgid) - cpu_before) / count}


def cpu_seconds(pgid: int) -> float:
    """User and system CPU time of a server's process group, its reaped children's
    included: what a message costs the server, whatever else loads the machine
    (the scanners' time is their own)."""
    total = 0
    for pid in group_members(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                        # gone since it was listed
        total += sum(int(field) for field in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def median_rates(runs: list[dict]) -> dict:
    """Each rate's median over the runs, and the runs themselves."""
    out: dict = {key: statistics.median(run[key] for run in runs)
                 for key in ("accepted_per_s", "delivered_per_s", "cpu_ms")}
    out["runs"] = runs
    return out


def compare(first: Server, second: Server, args: argparse.Namespace,
            sessions: list[int], sizes: list[int],
            message_of: Callable[[int], Path | None] = lambda size: None) -> list[dict]:
    """Every load (size x sessions) run ``--repeat`` times per server, the two taking
    turns and the one that goes first alternating, after a few messages each to warm
    up; a row of medians per load, printed as it comes, with the ratio first /
    second."""
    results = []
    for server in (first, second):       # not measured: the first messages' imports
        run_load(server, 1, sizes[0], 20, message_of(sizes[0]))
    print_header(first.name, second.name)
    for size in sizes:
        message = message_of(size)
        for count_sessions in sessions:
            count = args.messages or (500 if size <= 8192 else 400)
            if args.quick:
                count = max(count_sessions, count // 10)
            row: dict = {"sessions": count_sessions, "size": size, "messages": count}
            runs: dict[str, list[dict]] = {first.name: [], second.name: []}
            for turn in range(max(1, args.repeat)):
                order = (first, second) if turn % 2 == 0 else (second, first)
                for server in order:
                    runs[server.name].append(
                        run_load(server, count_sessions, size, count, message))
            for name, measured in runs.items():
                row[name] = median_rates(measured)
            results.append(row)
            print_row(row, first.name, second.name)
    return results


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
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--policy", action="store_true",
                      help="LightMail with SPF, DKIM, ARC and DMARC against LightMail "
                      "with no check, instead of against Postfix")
    mode.add_argument("--abuse", action="store_true",
                      help="LightMail with the access lists and rate limits against "
                      "LightMail with no check")
    mode.add_argument("--scanners", action="store_true",
                      help="LightMail with ClamAV and rspamd against Postfix with the "
                      "same scanners as milters")
    args = parser.parse_args()
    sessions = [int(x) for x in args.sessions.split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.policy or args.abuse:
        return checks_main(args, sessions, sizes)
    if args.scanners:
        return scanners_main(args, sessions, sizes)
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-"))
    lightmail = postfix = None
    try:
        lightmail = LightMail(base / "lightmail", args.workers)
        postfix = Postfix(base / "postfix")
        results = compare(lightmail, postfix, args, sessions, sizes)
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


def message_files(base: Path, pem: bytes) -> Callable[[int], Path]:
    """The signed message of each size, as a file for smtp-source -F."""
    def message_of(size: int) -> Path:
        path = base / f"message-{size}.eml"
        path.write_bytes(signed_message(pem, size))
        return path
    return message_of


# What the checked LightMail of --policy and --abuse runs, and what its last stored
# message must show (a benchmark of checks that did not run would measure nothing).
AUTHENTICATION = ("spf, dkim, arc, dmarc", "", (),
                  (b"spf=pass", b"dkim=pass", b"dmarc=pass"))
ABUSE_LIMIT = "1000000/1h"
ABUSE = ("access, limits, dnsbl, greylist",
         "[limits]\n" + "".join(
             f"{name} = {ABUSE_LIMIT}\n" for name in (
                 "client_connections", "client_messages", "network_messages",
                 "client_recipients", "sender_domain_messages",
                 "recipient_domain_recipients"))
         # Zones the test DNS server does not have: NXDOMAIN, cached for its TTL.
         + "[dnsbl]\nzones = zen.dnsbl.test=127.0.0.[2..11]*3, bl.dnsbl.test*2\n"
           "rhsbl_zones = dbl.dnsbl.test=127.0.1.[2..99]*3\nthreshold = 3\n"
         # No delay, and the client's network allowed after one retry: the warm-up's
         # second message allows it, and every measured message is a known client's
         # (an auto-allowed lookup in SQL), as most of a busy MX's mail is.
           "[greylist]\ndelay = 0s\nauto_allow = 1\n",
         (("access", "add", "block", "client", "192.0.2.0/24"),
          ("access", "add", "block", "client", "2001:db8::/32"),
          ("access", "add", "allow", "client", "198.51.100.7"),
          ("access", "add", "block", "sender", "spammer.example"),
          ("access", "add", "allow", "sender", ".partner.example"),
          ("access", "add", "block", "recipient", "nobody@bench.test")),
         ())


def checks_main(args: argparse.Namespace, sessions: list[int], sizes: list[int]) -> int:
    """--policy and --abuse: LightMail with those checks against none, same run."""
    checks, extra, setup, needed = AUTHENTICATION if args.policy else ABUSE
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-policy-"))
    zone, pem = sender_zone()
    dns = DNSServer(zone, ttl=3600).start()
    servers: list[LightMail] = []
    try:
        resolver = f"127.0.0.1:{dns.port}"
        servers = [LightMail(base / "checked", args.workers, checks, resolver,
                             name="checked", extra=extra, setup=setup),
                   LightMail(base / "none", args.workers, "none", resolver, name="none")]
        print(f"checked server: checks = {checks}")
        results = compare(servers[0], servers[1], args, sessions, sizes,
                          message_files(base, pem))
        check_header(servers[0], needed)
        print(f"questions to the DNS server: {len(dns.queries)} (answers cached)")
    finally:
        for server in servers:
            server.stop()
        dns.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"checks": checks, "runs": results},
                                              indent=2))
    return 0


def scanners_main(args: argparse.Namespace, sessions: list[int], sizes: list[int]) -> int:
    """--scanners: LightMail with ClamAV and rspamd against Postfix with them as
    milters, same run."""
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-scanners-"))
    os.chmod(base, 0o755)      # Postfix's smtpd (user postfix) reaches the milters here
    _, pem = sender_zone()
    clamd = Clamd(base / "clamd", stream_max="25M")
    rspamd = RspamdWithMilter(base / "rspamd")
    clamav_milter = ClamavMilter(base / "clamav-milter", clamd.socket)
    servers: list[Server] = []
    try:
        clamd.start()
        rspamd.start()
        clamav_milter.start()
        servers.append(LightMail(
            base / "lightmail", args.workers, "antivirus, spam", name="LightMail",
            extra=f"[antivirus]\nsocket = {clamd.address}\n"
                  f"[spam]\nurl = {rspamd.url}\ncontroller_url = {rspamd.controller_url}\n"
                  "learn = no\n"))
        servers.append(Postfix(base / "postfix", main={
            "smtpd_milters": f"unix:{rspamd.milter_socket}, unix:{clamav_milter.socket}",
            "milter_protocol": "6", "milter_default_action": "tempfail"}))
        results = compare(servers[0], servers[1], args, sessions, sizes,
                          message_files(base, pem))
        check_header(servers[0], (b"X-Virus-Status: Clean", b"X-Spam-Status:"))
        check_header(servers[1], (b"X-Virus-Status: Clean", b"X-Spamd-Result:"))
    finally:
        for server in servers:
            server.stop()
        for peer in (clamav_milter, rspamd, clamd):
            peer.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"scanner_runs": results}, indent=2))
    return 0


# The milters listen on Unix sockets that Postfix's smtpd (user postfix) may use:
# over TCP, Postfix and clamav-milter wait out delayed ACKs (10 messages a second
# from one session instead of 300).

class RspamdWithMilter(Rspamd):
    """tests/scanpeers.py's rspamd with its proxy worker on as well, in milter mode,
    scanning itself as Debian's worker-proxy.inc has it; its X-Spamd-Result field
    added, as tests/test_milter.py asks for it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.milter_socket = root / "milter.sock"
        (root / "override.d" / "worker-proxy.inc").write_text(
            f'bind_socket = "{self.milter_socket} mode=0666";\nmilter = yes;\n'
            'timeout = 120s;\ncount = 1;\n'
            'upstream "local" {\n  default = yes;\n  self_scan = yes;\n}\n')
        (root / "local.d" / "milter_headers.conf").write_text(
            'use = ["x-spamd-result"];\nskip_local = false;\nskip_authenticated = false;\n')


class ClamavMilter:
    """Debian's clamav-milter in the foreground, asking the given clamd; it rejects
    what is infected, defers when clamd fails, and adds X-Virus-Status to every
    message (as LightMail's antivirus check does)."""

    def __init__(self, root: Path, clamd_socket: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.socket = root / "milter.sock"
        self.conf = root / "clamav-milter.conf"
        self.conf.write_text(
            f"MilterSocket unix:{self.socket}\nMilterSocketMode 666\n"
            f"ClamdSocket unix:{clamd_socket}\nForeground yes\n"
            f"User {pwd.getpwuid(os.getuid()).pw_name}\n"
            f"PidFile {root / 'clamav-milter.pid'}\nLogFile {root / 'clamav-milter.log'}\n"
            "OnClean Accept\nOnInfected Reject\nOnFail Defer\nAddHeader Replace\n"
            "MaxFileSize 25M\nReadTimeout 120\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.root / "out").open("wb") as out:
            self.proc = subprocess.Popen(["/usr/sbin/clamav-milter", "-c", str(self.conf)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("clamav-milter did not start: "
                                 + (self.root / "out").read_text(errors="replace"))
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def check_header(server: Server, needed: Sequence[bytes]) -> None:
    """The last message ``server`` stored shows what its checks found: a benchmark
    of checks that did not run would measure nothing."""
    head = server.last_header()
    for wanted in needed:
        if wanted not in head:
            raise SystemExit(f"{server.name}'s last message lacks {wanted.decode()}: "
                             f"{head.decode(errors='replace')[:1500]}")


def print_header(first: str, second: str) -> None:
    line = (f"{'sessions':>8} {'size':>7} | {first + ' acc/s':>15} {'dlv/s':>7} | "
            f"{second + ' acc/s':>15} {'dlv/s':>7} | {'ratio acc':>9} {'ratio dlv':>9}")
    print(line)
    print("-" * len(line), flush=True)


def print_row(row: dict, first: str, second: str) -> None:
    one, two = row[first], row[second]
    print(f"{row['sessions']:>8} {row['size'] // 1024:>6}K | "
          f"{one['accepted_per_s']:>15.0f} {one['delivered_per_s']:>7.0f} | "
          f"{two['accepted_per_s']:>15.0f} {two['delivered_per_s']:>7.0f} | "
          f"{one['accepted_per_s'] / two['accepted_per_s']:>8.2f}x "
          f"{one['delivered_per_s'] / two['delivered_per_s']:>8.2f}x", flush=True)
    if len(one.get("runs", ())) > 1:
        spread = "; ".join(
            f"{name} " + " ".join(f"{run['accepted_per_s']:.0f}" for run in row[name]["runs"])
            for name in (first, second))
        print(f"{'':>17}   (accepted/s of each run: {spread})", flush=True)
    print(f"{'':>17}   (CPU ms a message, median: {first} {one['cpu_ms']:.2f}, "
          f"{second} {two['cpu_ms']:.2f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
