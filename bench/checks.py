"""The inbound checks' own cost, in one process: CPU time a message of a chain's
connect, MAIL, RCPT and end-of-session steps, without SMTP, sockets or the store.

    PYTHONPATH=. .venv/bin/python bench/checks.py [--messages 5000] [--profile]
                                                  [--checks "access, limits, dnsbl, greylist"]

The chain, the checks and their configuration are ``bench/smtp.py --abuse``'s (the
same access entries, limits, DNSBL zones answered NXDOMAIN by the test DNS server and
cached, greylisting with the client's network allowed by the warm-up), built as
``lightmail.wiring`` builds them, on an SQLite store in a temporary directory.  Each
message is one session from 127.0.0.1 (as smtp-source sends them): connect, MAIL
FROM, one RCPT TO, session end.  Printed: CPU µs a message (all the process's
threads: a check that hops to the thread pool pays for it here), for the checks
given and for ``checks = none``, so the difference is the checks' own.  ``--profile``
adds cProfile's table of the checked run.  Results in docs/benchmarks.rst.
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
from smtp import ABUSE, sender_zone  # noqa: E402
from twisted.internet import defer, reactor  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from lightmail.config import parse_config  # noqa: E402
from lightmail.dns import Resolver  # noqa: E402
from lightmail.policy.access import AccessLists  # noqa: E402
from lightmail.policy.greylist import Greylist  # noqa: E402
from lightmail.policy.inbound.chain import InboundPolicy, build_checks  # noqa: E402
from lightmail.smtp.policy import Session, Transaction  # noqa: E402
from lightmail.wiring import make_greylist_store, make_limiter  # noqa: E402
from tests.conftest import StorageStack  # noqa: E402


@defer.inlineCallbacks
def one_session(chain: InboundPolicy, number: int) -> Any:
    session = Session(conn_id=f"c{number}", peer="127.0.0.1", submission=False)
    refused = yield chain.connect(session)
    session.helo = "client.test"
    tx = Transaction(mail_from="sender@client.test")
    refused = refused or (yield chain.mail(session, tx))
    refused = refused or (yield chain.rcpt(session, tx, "rcpt@bench.test"))
    chain.session_ended(session)
    if refused is not None:
        raise SystemExit(f"refused: {refused}")     # a benchmark of refusals measures nothing


@defer.inlineCallbacks
def measure(chain: InboundPolicy, messages: int, profile: bool) -> Any:
    """CPU µs a message (after 20 not measured), and the profile when asked."""
    for number in range(20):
        yield one_session(chain, number)
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    for number in range(messages):
        yield one_session(chain, number)
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
        for names in (args.checks, "none"):
            checks = build_checks([name.strip() for name in names.split(",")], services)
            chain = InboundPolicy(checks, stack.blobs, lambda: "bench.test")
            cost, profiler = yield measure(chain, args.messages,
                                           args.profile and names != "none")
            print(f"checks = {names}: {cost:.1f} µs of CPU a message")
            if profiler:
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    finally:
        stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--checks", default="access, limits, dnsbl, greylist")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lightmail-bench-checks-"))
    zone, _ = sender_zone()
    dns = DNSServer(zone, ttl=3600).start()
    failed: list[Failure] = []

    def done(result: Any) -> None:
        if isinstance(result, Failure):
            failed.append(result)
        reactor.stop()
    reactor.callWhenRunning(lambda: run(args, base, dns).addBoth(done))
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
