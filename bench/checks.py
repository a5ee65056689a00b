"""The inbound checks' own cost, in one process: CPU time a message of a chain's
connect, MAIL, RCPT and end-of-session steps, without SMTP, sockets or the store.

    PYTHONPATH=. .venv/bin/python bench/checks.py [--messages 5000] [--profile]
                                                  [--checks "access, limits, dnsbl, greylist"]
    PYTHONPATH=. .venv/bin/python bench/checks.py --policy [--messages 5000] [--profile]

The chain, the checks and their configuration are ``bench/smtp.py --abuse``'s (the
same access entries, limits, DNSBL zones answered NXDOMAIN by the test DNS server and
cached, greylisting with the client's network allowed by the warm-up), built as
``lightmail.wiring`` builds them, on an SQLite store in a temporary directory.  Each
message is one session from 127.0.0.1 (as smtp-source sends them): connect, MAIL
FROM, one RCPT TO, a 4 KB message through the content step, session end.  Printed:
CPU µs a message (all the process's threads: a check that hops to the thread pool
pays for it here), for the checks
given and for ``checks = none``, so the difference is the checks' own.  ``--profile``
adds cProfile's table of the checked run.  Results in docs/benchmarks.rst.

``--policy``: ``bench/smtp.py --policy``'s checks instead (``spf, dkim, arc, dmarc``,
the test DNS server publishing the sender's SPF record, DKIM key and DMARC policy),
wired as the server wires them (``lightmail.wiring``, the DMARC report rows
included), and each message also goes through the content step: its 4 KB message,
DKIM-signed by the sender, staged in the blob store as the SMTP session stages it,
then checked and rewritten with its Authentication-Results field.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from dnsserver import DNSServer  # noqa: E402
from smtp import ABUSE, AUTHENTICATION, sender_zone, signed_message  # noqa: E402
from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from lightmail.config import parse_config  # noqa: E402
from lightmail.dns import Resolver  # noqa: E402
from lightmail.policy.access import AccessLists  # noqa: E402
from lightmail.policy.greylist import Greylist  # noqa: E402
from lightmail.policy.inbound.chain import InboundPolicy, build_checks  # noqa: E402
from lightmail.smtp.policy import Session, Transaction  # noqa: E402
from lightmail.storage import migrate  # noqa: E402
from lightmail.wiring import Role, make_greylist_store, make_limiter, wire  # noqa: E402
from tests.conftest import StorageStack  # noqa: E402


@defer.inlineCallbacks
def one_session(chain: InboundPolicy, number: int, message: bytes = b"") -> Any:
    """One session; with ``message``, its content step too (staged, checked, the
    blob queued discarded)."""
    session = Session(conn_id=f"c{number}", peer="127.0.0.1", submission=False)
    refused = yield chain.connect(session)
    session.helo = "client.test"
    tx = Transaction(mail_from="sender@client.test")
    refused = refused or (yield chain.mail(session, tx))
    refused = refused or (yield chain.rcpt(session, tx, "rcpt@bench.test"))
    if message and refused is None:
        writer = chain.blobs.writer()
        writer.write(message)
        staged = yield writer.stage()
        tx.queue_id = f"q{number}"
        refused, blob = yield chain.content(session, tx, staged)
        blob.discard()
    chain.session_ended(session)
    if refused is not None:
        raise SystemExit(f"refused: {refused}")     # a benchmark of refusals measures nothing


# What --abuse's sessions send (smtp-source's own 4 KB message): through the content
# step too, where these checks add nothing but the chain still looks.
MESSAGE = (b"Received: from client.test (127.0.0.1) by bench.test with ESMTP id q1; "
           b"Mon, 07 Dec 2026 12:00:00 +0000\r\nFrom: <sender@client.test>\r\n"
           b"To: <rcpt@bench.test>\r\nSubject: test\r\n\r\n"
           + b"La de da de da 1.\r\n" * 220)


@defer.inlineCallbacks
def measure(chain: InboundPolicy, messages: int, profile: bool,
            message: bytes = b"") -> Any:
    """CPU µs a message (after 20 not measured), and the profile when asked."""
    for number in range(20):
        yield one_session(chain, number, message)
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    for number in range(messages):
        yield one_session(chain, number, message)
    if profiler:
        profiler.disable()
    return 1e6 * (time.process_time() - started) / messages, profiler


@defer.inlineCallbacks
def run(args: argparse.Namespace, base: Path, dns: DNSServer) -> Any:
    _, extra, setup, _ = ABUSE
    config = parse_config(f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n" + extra)
    stack = StorageStack(f"sqlite:///{base / 'lightmail.db'}", base)
    try:
        access = AccessLists(stack.db)
        for command in setup:                   # ("access", "add", list, kind, value)
            yield access.add(*command[2:5])
        services = SimpleNamespace(
            config=config, access=access, limiter=make_limiter(config),
            resolver=Resolver(config.outbound.dns_servers),
            greylist=Greylist(make_greylist_store(config, stack.db)))
        yield compare(args, args.checks, services, stack.blobs, MESSAGE)
    finally:
        stack.close()


@defer.inlineCallbacks
def compare(args: argparse.Namespace, checks: str, services: Any, blobs: Any,
            message: bytes) -> Any:
    """The chain of ``checks``, then none, each measured; printed as they come."""
    for names in (checks, "none"):
        chain = InboundPolicy(build_checks([name.strip() for name in names.split(",")],
                                           services), blobs, lambda: "bench.test")
        cost, profiler = yield measure(chain, args.messages,
                                       args.profile and names != "none", message)
        print(f"checks = {names}: {cost:.1f} µs of CPU a message")
        if profiler:
            pstats.Stats(profiler).sort_stats(args.sort).print_stats(50)


@defer.inlineCallbacks
def run_policy(args: argparse.Namespace, base: Path, dns: DNSServer, pem: bytes) -> Any:
    checks, extra, _, _ = AUTHENTICATION
    (base / "state").mkdir()
    config = parse_config(f"[server]\nstate_dir = {base / 'state'}\n"
                          f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n" + extra)
    services = wire(config, Role.COMMAND)
    storage = services.storage
    storage.db.start()
    storage.io_pool.start()
    try:
        yield deferToThread(migrate.upgrade, storage.db.engine)
        # As the SMTP session stages it: CRLF, our Received field on top.
        message = (b"Received: from client.test (127.0.0.1) by bench.test with ESMTP "
                   b"id q1; Mon, 07 Dec 2026 12:00:00 +0000\r\n"
                   + signed_message(pem, 4096).replace(b"\n", b"\r\n"))
        yield compare(args, checks, services, storage.blobs, message)
    finally:
        storage.io_pool.stop()
        storage.db.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--checks", default="access, limits, dnsbl, greylist")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="cumulative", choices=("cumulative", "tottime"),
                        help="the order of --profile's table")
    parser.add_argument("--policy", action="store_true",
                        help="the authentication checks and the content step")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-checks-"))
    zone, pem = sender_zone()
    dns = DNSServer(zone, ttl=3600).start()
    failed: list[Failure] = []

    def done(result: Any) -> None:
        if isinstance(result, Failure):
            failed.append(result)
        reactor.stop()
    work = (lambda: run_policy(args, base, dns, pem)) if args.policy else (
        lambda: run(args, base, dns))
    reactor.callWhenRunning(lambda: work().addBoth(done))
    try:
        reactor.run()
    finally:
        dns.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    for failure in failed:
        print(failure.getTraceback(), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
