"""Scaling over nodes: 1, then 2, then 3 LightMail nodes on one PostgreSQL database, one
Redis and one S3 service, all on this machine, and what a message costs each of them.

    .venv/bin/python bench/scaling.py [--quick] [--nodes 1,2,3] [--messages 900]
                                      [--clients 4] [--imap-sessions 3] [--json FILE]
    .venv/bin/python bench/scaling.py --smoke        (tests/test_bench_scaling.py)

Each node is a ``twistd lightmail`` as an administrator starts it (main process and
writer process, ``[server] workers = 0`` unless ``--workers``), ``[storage]
blob_backend = s3`` and ``[cluster] redis``, as docs/operations.rst "Several nodes"
sets them up.  The peers: a new database on the machine's PostgreSQL (dropped at the
end), a redis-server of the benchmark's own (so that its counts and CPU are the
nodes' alone) and one of the tests' S3 servers (tests/s3server.py), which counts the
requests it gets: moto (``--s3 moto``, the default: Python, 3-6 ms of CPU a request,
HEAD counted apart from GET) or SeaweedFS (``--s3 seaweedfs``: Go, a real S3 server;
it counts a HEAD as a GET).  A node joins before each run; the nodes of the earlier runs stay
up.  Each run has mailboxes of its own: 20 messages and one IMAP session each first,
not counted (the node verifies each password once, argon2id, then caches it).

Each run then has a window without load (``--idle`` seconds: what the nodes do
anyway) and two loads, spread evenly over the nodes:

* **SMTP**: ``--clients`` client processes per node (bench/lmtp.py's client speaking
  SMTP: EHLO, then MAIL/RCPT/DATA pipelined, 50 messages a connection) send
  ``--messages`` 4 KB messages per node, each client to a local mailbox of its own
  (filed at acceptance: one write per message, as for most inbound mail).  Reported:
  messages a second over all nodes, and each node's efficiency,
  throughput(N) / (N x throughput(1)).
* **IMAP**: as many client processes (bench/imap.py's mix) run ``--imap-sessions``
  whole sessions each on those mailboxes: LOGIN, SELECT, FETCH 1:* (FLAGS), SEARCH,
  APPEND, 5 x (FETCH of 20 headers, FETCH of a body, STORE \\Seen, SEARCH UNSEEN),
  STORE \\Deleted, EXPUNGE, LOGOUT - 28 commands, 8 of them writes.

The counters of bench/counters.py are read at each window's ends (a load's end after
``--settle`` seconds, for PostgreSQL's sake) and divided by the messages (IMAP: by
the sessions): PostgreSQL transactions and rows, Redis requests and commands, S3
requests, LightMail's group commits, and the CPU seconds of every process (less what
it uses idle).  These counts are the point of the benchmark: they do not depend on
the machine's other load, the rates do (printed as measured, and provisional on a
shared machine).  Then each service's operation is measured alone
(bench/unitcosts.py), and the ceilings that the counts and unit costs set are printed:
the model of docs/scaling.rst.  Last, a summary line per run.

``--quick``: a third of the messages and unit operations.  ``--smoke``: two nodes, a
few messages, one IMAP session a client, short settling (PostgreSQL's counts may fall
short): a check that the benchmark still runs and counts, in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT / "tests"), str(BENCH), str(ROOT)]

from conftest import PG_ADMIN_URL, empty_database  # noqa: E402
from counters import (  # noqa: E402
    S3_SERVER,
    SETTLE,
    Costs,
    PrivateRedis,
    Snapshot,
    Watch,
    difference,
    fetch,
    process_name,
)
from dovecot import group_members  # noqa: E402
from harness import ServerProcess, free_port, run_cli  # noqa: E402
from imap import mix_client  # noqa: E402
from lmtp import lmtp_client, run_clients  # noqa: E402
from unitcosts import (  # noqa: E402
    PG_RATE,
    REDIS_CPU,
    REDIS_CPU_MONITORED,
    postgres_costs,
    redis_costs,
    s3_costs,
)

from tests.s3server import S3Server, SeaweedFS  # noqa: E402

DOMAIN = "scaling.test"
PASSWORD = "scaling-bench"
SIZE = 4096
PER_CONNECTION = 50
IMAP_ROUNDS = 5
ADMIN = re.compile(r"admin listener on [^\s:]+:(?P<port>\d+)")
ROLES = {"twistd": "main", "lm-writer": "writer", "lm-worker": "worker"}


def libpq(url: str) -> str:
    """SQLAlchemy's URL (postgresql+psycopg://...) as psycopg's."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class Node:
    """One ``twistd lightmail`` of the cluster, with SMTP, IMAP and admin listeners."""

    def __init__(self, name: str, root: Path, database: str, redis: str,
                 s3: S3Server | SeaweedFS, workers: int) -> None:
        self.name = name
        state = root / name
        state.mkdir()
        self.config = state / "lightmail.conf"
        listener = ("endpoint = tcp:0:interface=127.0.0.1\n"
                    "max_connections = 2000\nmax_connections_per_ip = 2000\n")
        self.config.write_text(
            f"[server]\nstate_dir = {state}\nhostname = {name}.{DOMAIN}\n"
            f"node_id = {name}\nworkers = {workers}\nshutdown_timeout = 5s\n"
            f"[storage]\nurl = {database}\nblob_backend = s3\n"
            + s3.config(state, timeout="30s", retries=2)
            + f"[cluster]\nredis = {redis}\nprefix = scaling:\n"
            "[logging]\nlevel = info\n"
            "[directory]\nauth_over_plaintext = yes\n"
            "[admin]\nenabled = yes\nendpoint = tcp:0:interface=127.0.0.1\n"
            f"[listener:mx]\nprotocol = smtp\n{listener}"
            f"[listener:imap]\nprotocol = imap\n{listener}")
        self.proc = ServerProcess(self.config)
        try:
            self.ports = self.proc.ports(expected=2, timeout=120)
            self.admin = int(self.proc.wait_for(ADMIN.pattern)[0].group("port"))
        except AssertionError as exc:
            self.stop()
            raise SystemExit(f"node {name} did not start:\n{exc}") from None

    def processes(self) -> dict[str, list[int]]:
        """This node's processes by role (main, writer, worker)."""
        found: dict[str, list[int]] = {}
        for pid in group_members(self.proc.proc.pid):
            role = ROLES.get(process_name(pid), process_name(pid))
            found.setdefault(f"{self.name} {role}", []).append(pid)
        return found

    def metrics(self) -> str:
        return fetch(f"http://127.0.0.1:{self.admin}/metrics")

    def stop(self) -> None:
        self.proc.kill()


class Cluster:
    """The peers and the nodes started so far."""

    def __init__(self, root: Path, database: str, workers: int, s3: str,
                 stack: ExitStack) -> None:
        self.root = root
        self.database = database
        self.workers = workers
        self.s3: S3Server | SeaweedFS = (
            SeaweedFS(root / "seaweedfs", metrics=True) if s3 == "seaweedfs" else S3Server())
        stack.callback(self.s3.stop)
        self.redis = PrivateRedis(free_port())
        stack.callback(self.redis.stop)
        self.redis.watch_requests()
        self.nodes: list[Node] = []
        stack.callback(self.stop)
        import psycopg
        self.admin = psycopg.connect(libpq(PG_ADMIN_URL), autocommit=True)
        stack.callback(self.admin.close)
        self.watch = Watch(self.admin, database.rsplit("/", 1)[1], self.redis,
                           self.s3.requests, self.processes,
                           lambda: [node.metrics() for node in self.nodes])

    def add_node(self) -> Node:
        node = Node(f"n{len(self.nodes) + 1}", self.root, self.database, self.redis.url,
                    self.s3, self.workers)
        self.nodes.append(node)
        return node

    def processes(self) -> dict[str, list[int]]:
        found = {"redis-server": [self.redis.proc.pid], S3_SERVER: [self.s3.process.pid]}
        for node in self.nodes:
            found.update(node.processes())
        return found

    def add_users(self, addresses: list[str]) -> None:
        """Every user at once (``lightmail user import``: one process, one hash each)."""
        config = self.nodes[0].config
        run_cli(config, "domain", "add", DOMAIN)
        table = self.root / "users.csv"
        table.write_text("address,password\n" + "".join(
            f"{address},{PASSWORD}\n" for address in addresses))
        table.chmod(0o600)
        run_cli(config, "user", "import", str(table))

    def messages_of(self, addresses: list[str]) -> int:
        """Messages filed for these users, read from the database."""
        import psycopg
        with psycopg.connect(libpq(self.database)) as conn:
            row = conn.execute(
                "select count(*) from messages m join mailboxes b on b.id = m.mailbox_id "
                "join users u on u.id = b.user_id join domains d on d.id = u.domain_id "
                "where u.localpart || '@' || d.name = any(%s)", (addresses,)).fetchone()
        return int(row[0])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []


def user(nodes: int, node: int, client: int) -> str:
    return f"r{nodes}n{node}c{client}@{DOMAIN}"


def run_users(nodes: int, clients: int) -> list[list[str]]:
    """The users of the run with ``nodes`` nodes: a list per node, one per client."""
    return [[user(nodes, node, client) for client in range(clients)]
            for node in range(1, nodes + 1)]


# --- the loads -------------------------------------------------------------------------

def prepare(cluster: Cluster, users: list[list[str]], imap: bool) -> None:
    """Before a run, not counted: 20 messages in each of its mailboxes and one IMAP
    session on each, so that the counted sessions find mail from the start and their
    node has verified the password already (argon2id, 0.1 s of CPU; then the node's
    auth cache answers) and run its code once."""
    clients = []
    for node, addresses in zip(cluster.nodes, users, strict=True):
        clients += [(node.ports["mx"], address, SIZE, PER_CONNECTION, 20, 0,
                     f"{address}.fill.", "EHLO") for address in addresses]
    run_clients(lmtp_client, clients, timeout=600)
    if imap:
        # Another seed than the counted sessions': they should not find the bodies
        # this one fetched in the node's read cache.
        run_clients(mix_client, [
            (node.ports["imap"], address, PASSWORD, 0, 1, IMAP_ROUNDS, 20, SIZE, 1000 + seed)
            for node, addresses in zip(cluster.nodes, users, strict=True)
            for seed, address in enumerate(addresses)], timeout=600)


def smtp_load(cluster: Cluster, users: list[list[str]], per_node: int,
              before: Snapshot, settle: float, idle: Costs) -> tuple[dict, Snapshot]:
    """The SMTP load, counted from ``before``; its results and the snapshot at its end.
    ``idle``: the processes' CPU without load, taken out of theirs."""
    clients = []
    for node, addresses in zip(cluster.nodes, users, strict=True):
        share = per_node // len(addresses)
        for address in addresses:
            clients.append((node.ports["mx"], address, SIZE, PER_CONNECTION, share, 0,
                            f"{address}.", "EHLO"))
    everyone = [address for addresses in users for address in addresses]
    filed = cluster.messages_of(everyone)
    outs, _, wall = run_clients(lmtp_client, clients, timeout=900)
    after = cluster.watch.snapshot(settle)
    sent = sum(out["sent"] for out in outs)
    accepted = sum(out["accepted"] for out in outs)
    failures = [failure for out in outs for failure in out["failures"]]
    if failures or accepted != sent:
        raise SystemExit(f"{sent - accepted} of {sent} messages refused: {failures[:3]}")
    landed = cluster.messages_of(everyone) - filed
    if landed != accepted:
        raise SystemExit(f"{accepted} messages accepted, {landed} filed")
    costs = difference(before, after).less_idle_cpu(idle)
    costs.cpu["clients"] = sum(out["cpu"] for out in outs)
    return {"messages": accepted, "seconds": round(wall, 3),
            "per_s": round(accepted / wall, 1), "costs": costs}, after


def imap_load(cluster: Cluster, users: list[list[str]], sessions: int,
              before: Snapshot, settle: float, idle: Costs) -> tuple[dict, Snapshot]:
    """The IMAP load (``sessions`` a client), counted from ``before``."""
    clients = [(node.ports["imap"], address, PASSWORD, 0, sessions, IMAP_ROUNDS, 20, SIZE,
                seed)
               for node, addresses in zip(cluster.nodes, users, strict=True)
               for seed, address in enumerate(addresses)]
    outs, _, wall = run_clients(mix_client, clients, timeout=900)
    after = cluster.watch.snapshot(settle)
    done = sum(out["sessions"] for out in outs)
    commands = sum(sum(out["ops"].values()) for out in outs)
    costs = difference(before, after).less_idle_cpu(idle)
    costs.cpu["clients"] = sum(out["cpu"] for out in outs)
    return {"sessions": done, "commands": commands, "seconds": round(wall, 3),
            "commands_per_s": round(commands / wall, 1), "costs": costs}, after


def warm_up(cluster: Cluster, node: Node) -> None:
    """A few messages through a node that just started (imports, connections)."""
    run_clients(lmtp_client, [(node.ports["mx"], f"warmup@{DOMAIN}", SIZE, 10, 20, 0,
                               f"warmup.{node.name}.", "EHLO")], timeout=600)


def one_run(cluster: Cluster, nodes: int, args: argparse.Namespace) -> dict:
    """The run with ``nodes`` nodes (started already): its windows one after the
    other, each snapshot the end of one and the start of the next."""
    users = run_users(nodes, args.clients)
    prepare(cluster, users, bool(args.imap_sessions))
    start = cluster.watch.snapshot(args.settle)
    time.sleep(args.idle)
    before = cluster.watch.snapshot(0)
    idle = difference(start, before)
    run: dict[str, Any] = {"nodes": nodes, "idle": idle.per(idle.seconds)}
    run["smtp"], before = smtp_load(cluster, users, args.messages, before, args.settle,
                                    idle)
    if args.imap_sessions:
        run["imap"], _ = imap_load(cluster, users, args.imap_sessions, before, args.settle,
                                   idle)
    if nodes > 1:
        run["hearing"] = hearing(cluster, users[0], args.messages // 3, idle)
    return run


def hearing(cluster: Cluster, users: list[str], count: int, idle: Costs) -> dict:
    """What another node's change costs a node that only hears of it: SMTP to the
    first node alone, and the CPU of the others' main processes a message.  Every node
    subscribes to the one change channel, so every change costs every node this."""
    first = cluster.nodes[0]
    clients = [(first.ports["mx"], address, SIZE, PER_CONNECTION, count // len(users), 0,
                f"{address}.heard.", "EHLO") for address in users]
    before = cluster.watch.snapshot(1.0)
    outs, _, _ = run_clients(lmtp_client, clients, timeout=900)
    costs = difference(before, cluster.watch.snapshot(1.0)).less_idle_cpu(idle)
    messages = sum(out["accepted"] for out in outs)
    per = costs.per(messages).cpu
    others = [per.get(f"{node.name} main", 0.0) for node in cluster.nodes[1:]]
    return {"messages": messages,
            "handling_main_ms": round(1000 * per.get(f"{first.name} main", 0.0), 3),
            "hearing_main_ms": round(1000 * sum(others) / len(others), 3),
            "redis_ms": round(1000 * per.get("redis-server", 0.0), 3)}


# --- reporting -------------------------------------------------------------------------

COUNTS = (  # (label, key in Costs.counts): printed per message
    ("PG transactions (commits)", "pg xact_commit"),
    ("PG rollbacks", "pg xact_rollback"),
    ("  of which group commits", "groups"),
    ("  writes per group", None),
    ("PG rows inserted", "pg tup_inserted"),
    ("PG rows updated", "pg tup_updated"),
    ("PG rows deleted", "pg tup_deleted"),
    ("Redis requests (round trips)", "redis requests"),
    ("Redis commands, scripts' own too", "redis commands, scripts' included"),
    ("S3 requests", "s3 requests"),
    ("WAL syncs (whole cluster)", "pg cluster wal_sync"),
    ("WAL bytes (whole cluster)", "pg cluster wal_bytes"),
    ("other databases' commits", "pg other databases' commits"),
)


def count_lines(costs: Costs) -> list[str]:
    counts = costs.counts
    lines = []
    for label, key in COUNTS:
        if key is None:
            groups = counts.get("groups", 0)
            value = counts.get("grouped", 0) / groups if groups else 0.0
        else:
            value = counts.get(key, 0.0)
        lines.append(f"    {label:<30} {value:>10.3f}")
    detail = sorted((key, value) for key, value in counts.items()
                    if key.startswith(("redis ", "s3 ", "sql "))
                    and key not in ("redis requests", "redis usec", "s3 requests",
                                    "redis commands, scripts' included"))
    lines += [f"      {key:<28} {value:>10.3f}" for key, value in detail]
    return lines


def cpu_lines(costs: Costs) -> list[str]:
    total = sum(costs.cpu.values())
    lines = [f"    {label:<30} {1000 * seconds:>8.3f} ms"
             for label, seconds in sorted(costs.cpu.items())]
    lines.append(f"    {'all of them':<30} {1000 * total:>8.3f} ms")
    return lines


def report_run(run: dict, first_rate: float | None) -> None:
    smtp, nodes = run["smtp"], run["nodes"]
    efficiency = round(smtp["per_s"] / (nodes * first_rate) if first_rate else 1.0, 3)
    run["smtp"]["efficiency"] = efficiency
    per = smtp["costs"].per(smtp["messages"])
    print(f"\n== {nodes} node{'s' if nodes > 1 else ''}: SMTP, {smtp['messages']} messages "
          f"of 4 KB in {smtp['seconds']:.2f} s: {smtp['per_s']:.0f} messages/s "
          f"(provisional), per-node efficiency {efficiency:.2f}")
    idle = run["idle"]
    print(f"  idle, a second: {idle.counts.get('pg xact_commit', 0):.1f} PG "
          f"transactions, {idle.counts.get('redis requests', 0):.1f} Redis requests, "
          f"{1000 * sum(idle.cpu.values()):.1f} ms of CPU")
    print("  per message (counted at each service):")
    print("\n".join(count_lines(per)))
    print("  CPU a message, by process (less what each uses idle):")
    print("\n".join(cpu_lines(per)))
    imap = run.get("imap")
    if imap:
        print(f"  IMAP: {imap['sessions']} sessions, {imap['commands']} commands in "
              f"{imap['seconds']:.2f} s: {imap['commands_per_s']:.0f} commands/s "
              "(provisional); per session (28 commands, 8 writes):")
        per_session = imap["costs"].per(imap["sessions"])
        print("\n".join(count_lines(per_session)))
        print("  CPU a session, by process (less what each uses idle):")
        print("\n".join(cpu_lines(per_session)))
    heard = run.get("hearing")
    if heard:
        print(f"  {heard['messages']} messages to n1 alone: its "
              f"main process {heard['handling_main_ms']:.3f} ms a message; each other "
              f"node's, which only hears of them, {heard['hearing_main_ms']:.3f} ms; "
              f"Redis {heard['redis_ms']:.3f} ms")


def role_cpu(costs: Costs, role: str) -> float:
    return sum(seconds for label, seconds in costs.cpu.items() if label.endswith(" " + role))


OUTSIDE = ("clients", S3_SERVER)    # stand-ins for the world outside


def ceilings(per: Costs, nodes: int, units: dict[str, float], cores: int) -> dict[str, float]:
    """How many of a load's units (messages, IMAP sessions) a second each resource
    allows, from the counts and CPU a unit and the costs of each operation alone: the
    model of docs/scaling.rst, with this machine's figures."""
    cpu = per.cpu
    out: dict[str, float] = {}

    def limit(name: str, cost: float) -> None:
        if cost > 0:
            out[name] = round(1 / cost, 1)

    limit(f"{cores} cores, every process here", sum(cpu.values()) / cores)
    limit(f"{cores} cores, LightMail + PostgreSQL + Redis",
          sum(seconds for label, seconds in cpu.items() if label not in OUTSIDE) / cores)
    limit(f"{nodes} main process(es), a core each", role_cpu(per, "main") / nodes)
    limit(f"{nodes} writer process(es), a core each", role_cpu(per, "writer") / nodes)
    limit("PostgreSQL backends, one core", cpu.get("postgres backends", 0.0))
    if units.get(PG_RATE):
        limit("PostgreSQL durable commits at the rate measured",
              per.counts.get("groups", 0.0) / units[PG_RATE])
    # The requests were counted through MONITOR, which Redis feeds every command
    # (those scripts call too): its share of Redis' CPU is taken out.
    monitor = 1e-6 * max(0.0, units.get(REDIS_CPU_MONITORED, 0.0) - units.get(REDIS_CPU, 0.0))
    redis = cpu.get("redis-server", 0.0) - monitor * per.counts.get(
        "redis commands, scripts' included", 0.0)
    limit("Redis, its one thread", max(0.0, redis))
    limit("the S3 server here (a stand-in, not S3)", cpu.get(S3_SERVER, 0.0))
    limit("S3 at 3,500 PUT/s (AWS, a prefix partition)", per.counts.get("s3 PUT", 0.0) / 3500)
    limit("S3 at 5,500 GET+HEAD/s (AWS, a prefix partition)",
          (per.counts.get("s3 GET", 0.0) + per.counts.get("s3 HEAD", 0.0)) / 5500)
    return out


def print_ceilings(runs: list[dict], units: dict[str, float], cores: int) -> None:
    for load, unit, count in (("smtp", "messages", "messages"), ("imap", "IMAP sessions",
                                                                   "sessions")):
        print(f"\n== {unit} a second each resource allows (counts x unit costs; "
              "docs/scaling.rst):")
        for run in runs:
            if load not in run:
                continue
            measured = run[load][count] / run[load]["seconds"]
            found = run[load]["ceilings"] = ceilings(
                run[load]["costs"].per(run[load][count]), run["nodes"], units, cores)
            print(f"  {run['nodes']} node(s), measured {measured:.0f} (provisional):")
            for name, value in sorted(found.items(), key=lambda item: item[1]):
                print(f"    {name:<50} {value:>10.0f}")


SUMMARY = (("PG commits", "pg xact_commit"), ("groups", "groups"),
           ("Redis req", "redis requests"), ("S3 req", "s3 requests"))


def print_summary(runs: list[dict]) -> None:
    """One line per run: the counts first (they hold on any machine), then the rates."""
    print("\n== summary: counts a message (SMTP) and a session (IMAP); rates provisional")
    head = "".join(f"{name:>11}" for name, _ in SUMMARY)
    print(f"{'nodes':>5} | SMTP{head} {'CPU ms':>8} {'msg/s':>7} {'eff.':>5} | "
          f"IMAP{head} {'cmd/s':>7}")
    for run in runs:
        cells = []
        for load, unit in (("smtp", "messages"), ("imap", "sessions")):
            if load not in run:
                continue
            per = run[load]["costs"].per(run[load][unit])
            cells.append("".join(f"{per.counts.get(key, 0.0):>11.2f}" for _, key in SUMMARY))
            if load == "smtp":
                cells[-1] += (f" {1000 * sum(per.cpu.values()):>8.1f} "
                              f"{run[load]['per_s']:>7.0f} {run[load]['efficiency']:>5.2f}")
            else:
                cells[-1] += f" {run[load]['commands_per_s']:>7.0f}"
        print(f"{run['nodes']:>5} |     " + " |     ".join(cells))


def jsonable(value: Any) -> Any:
    if isinstance(value, Costs):
        return {"counts": value.counts, "cpu_s": value.cpu}
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [jsonable(item) for item in value]
    return value


# --- main ------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,3", help="node counts, in order (1,2,3)")
    parser.add_argument("--messages", type=int, default=900,
                        help="SMTP messages a node per run (default 900)")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes a node, SMTP and IMAP (default 4)")
    parser.add_argument("--imap-sessions", type=int, default=3,
                        help="IMAP sessions a client per run; 0: no IMAP load")
    parser.add_argument("--unit-count", type=int, default=200,
                        help="operations of each kind measured alone (default 200)")
    parser.add_argument("--workers", type=int, default=0, help="[server] workers a node")
    parser.add_argument("--s3", choices=("moto", "seaweedfs"), default="moto",
                        help="the S3 server: moto (Python; counts HEAD apart from GET) or "
                        "SeaweedFS (Go, a real S3 server; counts a HEAD as a GET)")
    parser.add_argument("--idle", type=float, default=3.0,
                        help="seconds without load before each run: what the nodes do "
                        "anyway, printed (default 3)")
    parser.add_argument("--settle", type=float, default=SETTLE,
                        help="seconds the counters are left to settle at the end of a "
                        f"load (default {SETTLE}: PostgreSQL's, see bench/counters.py)")
    parser.add_argument("--quick", action="store_true",
                        help="a third of the messages and unit operations")
    parser.add_argument("--smoke", action="store_true",
                        help="two nodes, a few messages: does it still run and count")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.nodes, args.messages, args.clients = "1,2", 40, 2
        args.imap_sessions, args.unit_count, args.idle = 1, 20, 1.0
        args.settle = 1.5           # PostgreSQL's counts then fall short a little
    elif args.quick:
        args.messages, args.unit_count = args.messages // 3, args.unit_count // 3
    counts = [int(part) for part in args.nodes.split(",")]
    if counts != sorted(counts) or counts[0] < 1:
        parser.error("--nodes: increasing numbers from 1, like 1,2,3")
    cores = os.cpu_count() or 1
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f} at the start; "
          f"{args.clients} clients a node, {args.messages} messages a node per run; "
          f"S3 server: {args.s3}")
    results: dict[str, Any] = {"cores": cores, "args": vars(args), "runs": []}
    root = Path(tempfile.mkdtemp(prefix="lightmail-bench-scaling-"))
    try:
        with ExitStack() as stack:
            url = stack.enter_context(empty_database("postgresql", root))
            cluster = Cluster(root, url, args.workers, args.s3, stack)
            first_rate = None
            for nodes in counts:
                while len(cluster.nodes) < nodes:
                    node = cluster.add_node()
                    if len(cluster.nodes) == 1:        # it made the schema
                        cluster.add_users([f"warmup@{DOMAIN}"] + [
                            address for n in counts
                            for addresses in run_users(n, args.clients)
                            for address in addresses])
                    warm_up(cluster, node)
                run = one_run(cluster, nodes, args)
                report_run(run, first_rate)
                first_rate = first_rate or run["smtp"]["per_s"] / nodes
                results["runs"].append(run)
            cluster.stop()              # the unit costs on a machine the nodes left
            print("\n== each operation alone (median of one after another):")
            units: dict[str, float] = {}
            units.update(postgres_costs(libpq(url), args.unit_count))
            units.update(redis_costs(cluster.redis, args.unit_count * 5))
            units.update(s3_costs(cluster.s3, args.unit_count))
            for key, value in units.items():
                print(f"    {key:<45} {value:>10}")
            results["units"] = units
            print_ceilings(results["runs"], units, cores)
            print_summary(results["runs"])
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    text = json.dumps(jsonable(results), indent=1, sort_keys=True)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
