"""Greylisting (lightmail/policy/greylist): the rules on the SQL store (SQLite,
PostgreSQL, MariaDB) and on the Redis at 127.0.0.1:6379 (database 9, emptied by the
tests) with a clock the tests move; Redis down (no greylisting, or the SQL store;
said once); the exemptions; and the greylist check on a running LightMail: a first
attempt refused with 451 4.7.1, the retry after the delay accepted and delivered,
auto-allowed networks, trusted clients, SPF-pass domains, two servers sharing Redis.
The memory of passes in front of the stores (memory.py): the rules still hold
through it, it spares the store the known clients' attempts but not the refresh of
last_seen, nor an expiry, and it stays within its size."""

from __future__ import annotations

import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from conftest import REDIS
from dnsserver import DNSServer
from inprocess import in_thread, start
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from lightmail.cluster.redis import RedisLink
from lightmail.config import parse_config
from lightmail.policy.greylist import (
    FallingBackGreylist,
    Greylist,
    IGreylistStore,
    RedisGreylist,
    RememberedPasses,
    Rules,
    SQLGreylist,
    Triplet,
    Verdict,
)
from lightmail.policy.greylist.check import GreylistCheck, spf_passed_for
from lightmail.policy.greylist.store import REFRESH, normalise_sender
from lightmail.policy.inbound.findings import Findings
from lightmail.policy.limits import LazyRedis
from lightmail.storage import schema
from lightmail.wiring import make_greylist_store
from tests.conftest import StorageStack

T0 = 1_800_000_000.0
RULES = Rules(delay=300, unconfirmed_expiry=86400, confirmed_expiry=35 * 86400,
              auto_allow=2)


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def test_senders_are_normalised_as_postgrey_does() -> None:
    assert normalise_sender("Bounce-1234-Bob=Example.Test@List.Example") == \
        "bounce-#-bob=example.test@list.example"
    assert normalise_sender("ann+news@sender.test") == "ann@sender.test"
    assert normalise_sender("+only@sender.test") == "+only@sender.test"


def test_spf_pass_domains_cover_their_subdomains() -> None:
    def spf(result: str, domain: str) -> Any:
        return SimpleNamespace(mail_from=SimpleNamespace(result=result, domain=domain))
    assert spf_passed_for(spf("pass", "big.test"), ("big.test",))
    assert spf_passed_for(spf("pass", "Bounce.Big.Test."), ("big.test",))
    assert not spf_passed_for(spf("pass", "notbig.test"), ("big.test",))
    assert not spf_passed_for(spf("softfail", "big.test"), ("big.test",))
    assert not spf_passed_for(None, ("big.test",))
    assert not spf_passed_for(spf("pass", "big.test"), ())


async def the_rules_hold(store: IGreylistStore) -> None:
    """One scenario, on any store."""
    first = Triplet("192.0.2.0/24", "ann@sender.test", "bob@example.test")

    async def at(offset: float, triplet: Triplet = first) -> tuple[float, str]:
        verdict = await store.attempt(triplet, T0 + offset, RULES)
        return round(verdict.wait, 3), verdict.why
    assert await at(0) == (300, "new")
    assert await at(100) == (200, "early")              # the wait does not start over
    assert await at(299.5) == (0.5, "early")
    assert await at(300) == (0, "retried")
    assert await at(301) == (0, "known")
    # Known for 35 days after it was last seen (written again at most once an hour).
    assert await at(30 * 86400) == (0, "known")
    assert await at(64 * 86400) == (0, "known")
    assert await at(99.1 * 86400) == (300, "new")        # 35 days unseen: new again
    # A refused triplet that is not retried within a day starts anew.
    other = Triplet("192.0.2.0/24", "carl@sender.test", "bob@example.test")
    assert await at(0, other) == (300, "new")
    assert await at(86401, other) == (300, "new")
    assert await at(86401 + 300, other) == (0, "retried")
    # Two retries passed from 198.51.100.0/24 (auto_allow = 2): then it skips.
    for n in range(2):
        one = Triplet("198.51.100.0/24", f"s{n}@sender.test", "bob@example.test")
        assert await at(0, one) == (300, "new")
        assert await at(400, one) == (0, "retried")
    fresh = Triplet("198.51.100.0/24", "new@sender.test", "bob@example.test")
    assert await at(500, fresh) == (0, "auto-allowed")
    assert await at(500 + 36 * 86400, fresh) == (300, "new")   # the network expired too
    # Other networks are not: it is per network.
    assert await at(500, Triplet("203.0.113.0/24", "new@sender.test",
                                 "bob@example.test")) == (300, "new")


@pytest_twisted.ensureDeferred
async def test_the_rules_on_sql(stack: StorageStack) -> None:
    # No cleaning during the scenario: its clock goes back and forth.
    await the_rules_hold(SQLGreylist(stack.db, clean_every=float("inf")))

    def count(conn: Any) -> tuple[int, int]:
        return (conn.execute(sa.select(sa.func.count()).select_from(
                    schema.greylist_triplets)).scalar(),
                conn.execute(sa.select(sa.func.count()).select_from(
                    schema.greylist_networks)).scalar())
    assert await stack.db.read(count) == (6, 2)        # 192.0.2.0/24 passed twice too
    # The cleaning (at most once an hour, after an attempt) removes what expired.
    lone = Triplet("192.0.2.0/24", "late@sender.test", "bob@example.test")
    await SQLGreylist(stack.db).attempt(lone, T0 + 200 * 86400, RULES)
    for _ in range(100):
        if await stack.db.read(count) == (1, 0):
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert await stack.db.read(count) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_the_rules_on_redis(redis: LazyRedis) -> None:
    await the_rules_hold(RedisGreylist(redis))
    ttl = subprocess.run(["redis-cli", "-n", "9", "--scan", "--pattern",
                          "lightmail:greylist:*"], capture_output=True, text=True)
    keys = ttl.stdout.split()
    assert keys and all(int(subprocess.run(
        ["redis-cli", "-n", "9", "ttl", key], capture_output=True, text=True).stdout) > 0
        for key in keys)                                    # every key expires


@pytest_twisted.ensureDeferred
async def test_the_rules_hold_through_the_memory(sqlite_stack: StorageStack,
                                                 redis: LazyRedis) -> None:
    await the_rules_hold(RememberedPasses(SQLGreylist(sqlite_stack.db,
                                                      clean_every=float("inf"))))
    await the_rules_hold(RememberedPasses(RedisGreylist(redis)))


@implementer(IGreylistStore)
class Counting:
    """A store that counts the attempts that reach it, and hands them on."""

    def __init__(self, store: IGreylistStore) -> None:
        self.store = store
        self.asked: list[tuple[Triplet, float]] = []

    def attempt(self, triplet: Triplet, now: float, rules: Rules) -> Any:
        self.asked.append((triplet, now))
        return self.store.attempt(triplet, now, rules)


def last_seen(stack: StorageStack, table: sa.Table) -> Any:
    return stack.db.read(lambda conn: conn.execute(
        sa.select(table.c.last_seen)).scalar_one())


@pytest_twisted.ensureDeferred
async def test_the_memory_spares_the_store_until_it_would_refresh(
        sqlite_stack: StorageStack) -> None:
    counting = Counting(SQLGreylist(sqlite_stack.db, clean_every=float("inf")))
    memory = RememberedPasses(counting)
    rules = Rules(delay=300, unconfirmed_expiry=86400, confirmed_expiry=35 * 86400,
                  auto_allow=0)
    triplet = Triplet("192.0.2.0/24", "ann@sender.test", "bob@example.test")

    async def at(offset: float) -> str:
        return (await memory.attempt(triplet, T0 + offset, rules)).why
    assert [await at(0), await at(100), await at(300)] == ["new", "early", "retried"]
    assert len(counting.asked) == 3                    # refusals are never remembered
    assert [await at(301), await at(300 + REFRESH)] == ["known", "known"]
    assert len(counting.asked) == 3                    # from memory: no store asked
    table = schema.greylist_triplets
    assert await last_seen(sqlite_stack, table) == int((T0 + 300) * 1000)
    # Past REFRESH the store is asked again, and writes last_seen anew...
    assert await at(301 + REFRESH) == "known"
    assert counting.asked[-1] == (triplet, T0 + 301 + REFRESH)
    assert await last_seen(sqlite_stack, table) == int((T0 + 301 + REFRESH) * 1000)
    assert await at(302 + REFRESH) == "known"
    assert len(counting.asked) == 4                    # ...and it is remembered again
    # 35 days unseen: the store is asked, and greylists anew.
    assert await at(302 + REFRESH + 36 * 86400) == "new"
    assert len(counting.asked) == 5
    assert await at(303 + REFRESH + 36 * 86400) == "early"
    assert len(counting.asked) == 6


@pytest_twisted.ensureDeferred
async def test_the_memory_keeps_allowed_networks_and_stays_bounded(
        sqlite_stack: StorageStack) -> None:
    counting = Counting(SQLGreylist(sqlite_stack.db, clean_every=float("inf")))
    memory = RememberedPasses(counting, size=3)
    rules = Rules(delay=300, unconfirmed_expiry=86400, confirmed_expiry=35 * 86400,
                  auto_allow=1)
    first = Triplet("198.51.100.0/24", "ann@sender.test", "bob@example.test")
    assert (await memory.attempt(first, T0, rules)).why == "new"
    assert (await memory.attempt(first, T0 + 300, rules)).why == "retried"
    asked = len(counting.asked)
    for n in range(3):                  # the network is allowed: no store asked
        other = Triplet("198.51.100.0/24", f"s{n}@sender.test", "bob@example.test")
        assert (await memory.attempt(other, T0 + 400, rules)).why == "auto-allowed"
    assert len(counting.asked) == asked + 1
    # The network's last_seen is the retry's: the store refreshes it past REFRESH.
    later = T0 + 301 + REFRESH
    assert (await memory.attempt(first, later, rules)).why == "auto-allowed"
    assert counting.asked[-1] == (first, later)
    assert await last_seen(sqlite_stack, schema.greylist_networks) == int(later * 1000)
    # More passes than the memory holds: the least recently used go first.
    def one(n: int) -> Triplet:
        return Triplet(f"203.0.{n}.0/24", "ann@sender.test", "bob@example.test")
    for n in range(5):
        assert (await memory.attempt(one(n), T0, rules)).why == "new"
        assert (await memory.attempt(one(n), T0 + 300, rules)).why == "retried"
        assert len(memory) <= 3
    assert len(memory) == 3
    asked = len(counting.asked)
    assert (await memory.attempt(one(4), T0 + 400, rules)).why == "known"
    assert len(counting.asked) == asked                # the latest is remembered
    assert (await memory.attempt(one(0), T0 + 400, rules)).why == "auto-allowed"
    assert len(counting.asked) == asked + 1            # the first was forgotten


@pytest_twisted.ensureDeferred
async def test_the_memory_forgets_when_the_rules_change(sqlite_stack: StorageStack) -> None:
    counting = Counting(SQLGreylist(sqlite_stack.db, clean_every=float("inf")))
    memory = RememberedPasses(counting)
    allowing = Rules(delay=0, auto_allow=1)
    one = Triplet("198.51.100.0/24", "ann@sender.test", "bob@example.test")
    two = Triplet("198.51.100.0/24", "carl@sender.test", "bob@example.test")
    assert [(await memory.attempt(t, T0 + n, allowing)).why
            for n, t in enumerate((one, one, two))] == ["new", "retried", "auto-allowed"]
    # A reload turns auto-allowing off: the network's pass is no longer remembered.
    strict = Rules(delay=0, auto_allow=0)
    assert (await memory.attempt(two, T0 + 5, strict)).why == "new"


@pytest_twisted.ensureDeferred
async def test_the_memory_does_not_keep_the_fallbacks_pass() -> None:
    @implementer(IGreylistStore)
    class Down:
        def __init__(self) -> None:
            self.asked = 0

        def attempt(self, triplet: Triplet, now: float, rules: Rules) -> Any:
            self.asked += 1
            return defer.succeed(Verdict(0.0, "store down"))
    down = Down()
    memory = RememberedPasses(down)
    triplet = Triplet("192.0.2.0/24", "ann@sender.test", "bob@example.test")
    for _ in range(3):
        assert (await memory.attempt(triplet, T0, RULES)).why == "store down"
    assert down.asked == 3 and len(memory) == 0


@pytest_twisted.ensureDeferred
async def test_concurrent_first_attempts_on_sql(stack: StorageStack) -> None:
    store = SQLGreylist(stack.db)
    triplet = Triplet("192.0.2.0/24", "ann@sender.test", "bob@example.test")
    verdicts = await defer.gatherResults([store.attempt(triplet, T0, RULES)
                                          for _ in range(6)])
    assert {v.wait for v in verdicts} == {300}


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                                          # nobody listens there
    return int(port)


@pytest_twisted.ensureDeferred
async def test_redis_down_accepts_or_uses_sql_and_says_so_once(
        sqlite_stack: StorageStack, events: list[dict[str, Any]]) -> None:
    port = closed_port()
    triplet = Triplet("192.0.2.0/24", "ann@sender.test", "bob@example.test")
    accepting = FallingBackGreylist(RedisGreylist(LazyRedis(RedisLink(f"127.0.0.1:{port}"))), None,
                                    timeout=0.3)
    try:
        verdicts = [await accepting.attempt(triplet, T0, RULES) for _ in range(3)]
    finally:
        await accepting.primary.redis.disconnect()        # type: ignore[attr-defined]
    assert verdicts == [Verdict(0.0, "store down")] * 3
    said = [e for e in events if "does not answer" in str(e.get("log_format", ""))]
    assert len(said) == 1 and said[0]["meanwhile"] == "no greylisting"
    to_sql = FallingBackGreylist(RedisGreylist(LazyRedis(RedisLink(f"127.0.0.1:{port}"))),
                                 SQLGreylist(sqlite_stack.db), timeout=0.3)
    try:
        assert (await to_sql.attempt(triplet, T0, RULES)).why == "new"
        assert (await to_sql.attempt(triplet, T0 + 400, RULES)).why == "retried"
    finally:
        await to_sql.primary.redis.disconnect()           # type: ignore[attr-defined]


def test_the_store_is_chosen_from_the_config(sqlite_stack: StorageStack) -> None:
    sql = make_greylist_store(parse_config(""), sqlite_stack.db)
    assert isinstance(sql, RememberedPasses) and isinstance(sql.store, SQLGreylist)
    chosen = make_greylist_store(parse_config(
        f"[greylist]\nstore = redis\nredis = {REDIS}\nredis_down = sql\n"), sqlite_stack.db)
    assert isinstance(chosen, RememberedPasses)
    assert isinstance(chosen.store, FallingBackGreylist)
    assert isinstance(chosen.store.fallback, SQLGreylist)


class Remembering:
    """A store that greylists everything, and remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[Triplet] = []

    def attempt(self, triplet: Triplet, now: float, rules: Rules) -> Any:
        self.asked.append(triplet)
        return defer.succeed(Verdict(rules.delay, "new"))


@pytest_twisted.ensureDeferred
async def test_exemptions_and_the_null_sender() -> None:
    store = Remembering()
    config = parse_config("[greylist]\nspf_pass_domains = big.test\n")
    check = GreylistCheck(Greylist(store, clock=lambda: T0), lambda: config.greylist)

    async def rcpt(sender: str = "ann@sender.test", account: Any = None,
                   allowlisted: bool = False, spf: Any = None) -> Any:
        session = SimpleNamespace(peer="192.0.2.7", account=account, conn_id="c1")
        findings = Findings(allowlisted=allowlisted, spf=spf)
        reply = await check.rcpt(session, SimpleNamespace(mail_from=sender),
                                 "Bob@Example.Test", findings)
        return reply and (reply.code, reply.status, reply.text)
    assert await rcpt() == (451, "4.7.1", "Greylisted: try again in 300 seconds")
    assert store.asked[-1] == Triplet("192.0.2.0/24", "ann@sender.test",
                                      "bob@example.test")
    assert await rcpt("") is not None
    assert store.asked[-1].sender == ""                # bounces: by client and recipient
    asked = len(store.asked)
    assert await rcpt(account=object()) is None
    assert await rcpt(allowlisted=True) is None
    passed = SimpleNamespace(mail_from=SimpleNamespace(result="pass", domain="big.test"))
    assert await rcpt("news@big.test", spf=passed) is None
    assert len(store.asked) == asked                   # none of them was looked up
    failed = SimpleNamespace(mail_from=SimpleNamespace(result="fail", domain="big.test"))
    assert await rcpt("news@big.test", spf=failed) is not None


# --- on a running LightMail -----------------------------------------------------------------

GREY = ("[listener:grey]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "checks = access spf greylist\n")


def send(port: int, sender: str = "ann@sender.test",
         rcpts: tuple[str, ...] = ("bob@example.test",)) -> Any:
    def go() -> Any:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            try:
                smtp.sendmail(sender, list(rcpts), b"Subject: grey\r\n\r\nhello\r\n")
                return 250, ""
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients[rcpts[0]]
                return code, text.decode()
    return in_thread(go)


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer({"big.test.": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]}}) as server:
        yield server


def grey_server(tmp_path: Path, dns: DNSServer, extra: str = "") -> Any:
    return start(tmp_path, extra=f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n"
                 "[spf]\ntime_limit = 5s\n" + GREY + extra)


@pytest_twisted.inlineCallbacks
def test_the_retry_after_the_delay_is_delivered(tmp_path: Path, dns: DNSServer,
                                                events: list[dict[str, Any]]) -> Any:
    server = yield grey_server(tmp_path, dns, "[greylist]\nauto_allow = 2\n")
    now = [T0]
    server.parts.greylist.clock = lambda: now[0]
    try:
        port = server.ports["grey"]
        assert (yield send(port)) == (451, "4.7.1 Greylisted: try again in 300 seconds")
        now[0] += 120
        assert (yield send(port)) == (451, "4.7.1 Greylisted: try again in 180 seconds")
        now[0] += 180
        assert (yield send(port)) == (250, "")
        yield server.delivered("bob@example.test", 1)
        assert (yield send(port)) == (250, "")            # known now
        # The default MX listener does not greylist.
        assert (yield send(server.ports["mx"], "carl@sender.test")) == (250, "")
        # A second retry that passes: 127.0.0.0/24 is auto-allowed from then on.
        assert (yield send(port, "dora@sender.test")) == (451, "4.7.1 Greylisted: try "
                                                          "again in 300 seconds")
        now[0] += 301
        assert (yield send(port, "dora@sender.test")) == (250, "")
        assert (yield send(port, "eve@sender.test")) == (250, "")
        greylisted = [e for e in events if e.get("event") == "greylisted"]
        assert [e["why"] for e in greylisted] == ["new", "early", "new"]
        assert greylisted[0]["network"] == "127.0.0.0/24"
        assert len([e for e in events if e.get("event") == "greylist_passed"]) == 2
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_trusted_clients_and_spf_pass_domains_are_not_greylisted(
        tmp_path: Path, dns: DNSServer) -> Any:
    server = yield grey_server(tmp_path, dns, "[greylist]\nspf_pass_domains = big.test\n")
    try:
        port = server.ports["grey"]
        assert (yield send(port, "news@big.test")) == (250, "")      # SPF passes
        assert (yield send(port))[0] == 451
        yield server.parts.access.add("trusted", "client", "127.0.0.0/8")
        assert (yield send(port)) == (250, "")
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_two_servers_share_redis(tmp_path: Path, dns: DNSServer, redis: LazyRedis) -> Any:
    extra = f"[greylist]\nstore = redis\nredis = {REDIS}\n"
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = yield grey_server(tmp_path / "one", dns, extra)
    second = yield grey_server(tmp_path / "two", dns, extra)
    now = [T0]
    first.parts.greylist.clock = second.parts.greylist.clock = lambda: now[0]
    try:
        assert (yield send(first.ports["grey"]))[0] == 451
        now[0] += 300
        assert (yield send(second.ports["grey"])) == (250, "")   # the retry elsewhere
    finally:
        yield first.stop()
        yield second.stop()


@pytest_twisted.inlineCallbacks
def test_redis_down_lets_mail_through(tmp_path: Path, dns: DNSServer) -> Any:
    server = yield grey_server(tmp_path, dns, "[greylist]\nstore = redis\n"
                               f"redis = 127.0.0.1:{closed_port()}\nredis_timeout = 0.3s\n")
    try:
        assert (yield send(server.ports["grey"])) == (250, "")
    finally:
        yield server.stop()


@pytest_twisted.ensureDeferred
async def test_a_store_that_fails_lets_mail_through_and_says_so_once(
        events: list[dict[str, Any]]) -> None:
    class Broken:
        def attempt(self, triplet: Triplet, now: float, rules: Rules) -> Any:
            return defer.fail(sa.exc.OperationalError("select", {}, Exception("gone")))
    config = parse_config("")
    check = GreylistCheck(Greylist(Broken()), lambda: config.greylist)
    session = SimpleNamespace(peer="192.0.2.7", account=None, conn_id="c1")
    for _ in range(3):
        assert await check.rcpt(session, SimpleNamespace(mail_from="a@b.test"),
                                "bob@example.test", Findings()) is None
    said = [e for e in events if "greylisting failed" in str(e.get("log_format"))]
    assert len(said) == 1
