"""Where greylisting remembers triplets: the interface, the SQL store, and the store
that falls back while Redis is away (the Redis store is in redisstore.py).

Every store decides the same way, in one transaction (SQL) or one script (Redis),
from the times the caller gives (so that tests can move the clock):

1. a client network that passed ``auto_allow`` retries, seen within
   ``confirmed_expiry``, passes (``auto-allowed``);
2. a triplet that passed, seen within ``confirmed_expiry``, passes (``known``);
3. a triplet not seen, or that passed too long ago, or first seen more than
   ``unconfirmed_expiry`` ago without a retry, starts anew: greylisted for
   ``delay`` (``new``);
4. a retry before ``delay`` is greylisted for the rest of it (``early``), which
   does not start the delay again (Postgrey does not either);
5. a retry after it passes (``retried``), and counts for its network.

``last_seen`` of a triplet or a network that passes is written again at most once
an hour: a busy sender does not cost a write a message.  A pass says until when the
store would give it again without writing anything (``Verdict.fresh_until``), so
that memory.py may answer the attempts until then without asking.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

from lightmail.policy.limits.buckets import SharedBackend
from lightmail.storage import schema as s
from lightmail.storage.database import Database

log = Logger(namespace="lightmail.greylist")

#: How stale a passing entry's last_seen may get before it is written again.
REFRESH = 3600.0
#: How often the SQL store deletes expired entries.
CLEANUP_EVERY = 3600.0


@dataclass(frozen=True)
class Rules:
    """[greylist]'s times, in seconds, and the auto-allow count (0: never)."""

    delay: float = 300.0
    unconfirmed_expiry: float = 86400.0
    confirmed_expiry: float = 35 * 86400.0
    auto_allow: int = 5


@dataclass(frozen=True)
class Triplet:
    network: str        # the client's /24 or /64
    sender: str         # normalised (see normalise_sender); "" for the null sender
    recipient: str

    @property
    def key(self) -> str:
        text = f"{self.network}\0{self.sender}\0{self.recipient}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Verdict:
    #: 0.0: the attempt passes; else the seconds until a retry would.
    wait: float
    #: new, early, retried, known, auto-allowed (see the module's docstring), or
    #: "store down" (the fallback let it pass).
    why: str
    #: A pass from the store: until when (seconds since the epoch) it would answer
    #: the same without a write (see fresh_until); 0.0 for a refusal, or a pass that
    #: is not the store's ("store down"), which nothing may remember.
    fresh_until: float = 0.0


def fresh_until(last_seen_ms: float, rules: Rules) -> float:
    """Until when an entry (a triplet that passed, an allowed network) last written
    at ``last_seen_ms`` passes without a write: its ``last_seen`` goes stale after
    REFRESH, and the entry expires after ``confirmed_expiry``."""
    return last_seen_ms / 1000 + min(REFRESH, rules.confirmed_expiry)


def normalise_sender(sender: str) -> str:
    """The sender as a triplet holds it (as Postgrey does): lower case, without a
    ``+extension``, and with runs of digits in its local part made ``#``, so that a
    list's VERP address (``bounce-1234-bob=example.test@list.example``) is one
    sender, not a new one with each message."""
    local, at, domain = sender.lower().rpartition("@")
    if not at:
        return sender.lower()
    local = local.split("+", 1)[0] or local
    return re.sub(r"\d+", "#", local) + "@" + domain


class IGreylistStore(Interface):
    def attempt(triplet: Triplet, now: float, rules: Rules) -> Deferred[Verdict]:
        """Record an attempt of ``triplet`` at ``now`` (seconds since the epoch) and
        say whether it passes.  Fails when the store does not answer."""


@implementer(IGreylistStore)
class SQLGreylist:
    """Triplets in the database (every process and node shares them); expired
    entries are deleted every ``clean_every`` seconds (of the caller's clock), after
    an attempt."""

    def __init__(self, db: Database, clean_every: float = CLEANUP_EVERY) -> None:
        self.db = db
        self.clean_every = clean_every
        self._cleaned_at = float("-inf")

    def attempt(self, triplet: Triplet, now: float, rules: Rules) -> Deferred[Verdict]:
        # Most attempts are by known networks or triplets whose rows need no change:
        # a read answers them, without a write transaction.
        known = self.db.read(_known, triplet, int(now * 1000), rules)

        def decide(verdict: Optional[Verdict]) -> Any:
            return verdict if verdict is not None else self._write(triplet, now, rules)
        return known.addCallback(decide)

    def _write(self, triplet: Triplet, now: float, rules: Rules) -> Deferred[Verdict]:
        # A lost greylist entry costs a client one more retry: no need to wait for
        # the disk (write_unsynced).
        d = self.db.write_unsynced(_attempt, triplet, int(now * 1000), rules)

        def again(failure: Any) -> Deferred[Verdict]:
            # Another process added the same new triplet or network first: its row
            # is there now.
            failure.trap(sa.exc.IntegrityError)
            return self.db.write_unsynced(_attempt, triplet, int(now * 1000), rules)
        d.addErrback(again)
        if now - self._cleaned_at >= self.clean_every:
            self._cleaned_at = now
            cleaned = self.db.write_unsynced(_clean, int(now * 1000), rules)
            cleaned.addErrback(lambda failure: log.failure(
                "deleting expired greylist entries failed", failure))
        return d


def _known(conn: Connection, triplet: Triplet, now: int, rules: Rules
           ) -> Optional[Verdict]:
    """The verdict of an attempt that changes no row (an allowed network or a known
    triplet seen lately, a retry still too early), or None: _attempt decides."""
    t, n = s.greylist_triplets, s.greylist_networks
    confirmed, refresh = rules.confirmed_expiry * 1000, REFRESH * 1000
    if rules.auto_allow:
        net = conn.execute(sa.select(n.c.passes, n.c.last_seen).where(
            n.c.network == triplet.network)).first()
        if net is not None and net.passes >= rules.auto_allow and \
                now - net.last_seen <= min(confirmed, refresh):
            return Verdict(0.0, "auto-allowed", fresh_until(net.last_seen, rules))
    row = conn.execute(sa.select(t.c.first_seen, t.c.last_seen, t.c.passed).where(
        t.c.key == triplet.key)).first()
    if row is None:
        return None
    if row.passed and now - row.last_seen <= min(confirmed, refresh):
        return Verdict(0.0, "known", fresh_until(row.last_seen, rules))
    elapsed = (now - row.first_seen) / 1000
    if not row.passed and elapsed <= rules.unconfirmed_expiry and elapsed < rules.delay:
        return Verdict(rules.delay - elapsed, "early")
    return None


def _attempt(conn: Connection, triplet: Triplet, now: int, rules: Rules) -> Verdict:
    t, n = s.greylist_triplets, s.greylist_networks
    confirmed, refresh = rules.confirmed_expiry * 1000, REFRESH * 1000
    if rules.auto_allow:
        net = conn.execute(sa.select(n.c.passes, n.c.last_seen).where(
            n.c.network == triplet.network)).first()
        if net is not None and net.passes >= rules.auto_allow and \
                now - net.last_seen <= confirmed:
            seen = net.last_seen
            if now - seen > refresh:
                conn.execute(n.update().where(n.c.network == triplet.network).values(
                    last_seen=now))
                seen = now
            return Verdict(0.0, "auto-allowed", fresh_until(seen, rules))
    key = triplet.key
    row = conn.execute(sa.select(t.c.first_seen, t.c.last_seen, t.c.passed).where(
        t.c.key == key)).first()
    if row is not None and row.passed and now - row.last_seen <= confirmed:
        seen = row.last_seen
        if now - seen > refresh:
            conn.execute(t.update().where(t.c.key == key).values(last_seen=now))
            seen = now
        return Verdict(0.0, "known", fresh_until(seen, rules))
    if row is None:
        conn.execute(t.insert().values(key=key, network=triplet.network,
                                       sender=triplet.sender[:320],
                                       recipient=triplet.recipient[:320],
                                       first_seen=now, last_seen=now, passed=False))
        return Verdict(rules.delay, "new")
    elapsed = (now - row.first_seen) / 1000
    if row.passed or elapsed > rules.unconfirmed_expiry:
        conn.execute(t.update().where(t.c.key == key).values(
            first_seen=now, last_seen=now, passed=False))
        return Verdict(rules.delay, "new")
    if elapsed < rules.delay:
        return Verdict(rules.delay - elapsed, "early")
    conn.execute(t.update().where(t.c.key == key).values(last_seen=now, passed=True))
    if rules.auto_allow:
        counted = conn.execute(n.update().where(n.c.network == triplet.network).values(
            passes=n.c.passes + 1, last_seen=now))
        if not counted.rowcount:
            conn.execute(n.insert().values(network=triplet.network, passes=1,
                                           last_seen=now))
    return Verdict(0.0, "retried", fresh_until(now, rules))


def _clean(conn: Connection, now: int, rules: Rules) -> None:
    t, n = s.greylist_triplets, s.greylist_networks
    confirmed = int(rules.confirmed_expiry * 1000)
    unconfirmed = int(rules.unconfirmed_expiry * 1000)
    # Unconfirmed triplets are never written after their first attempt: their
    # last_seen is when they were first seen (or started anew).
    conn.execute(t.delete().where(
        (t.c.last_seen < now - confirmed)
        | ((t.c.passed == sa.false()) & (t.c.last_seen < now - unconfirmed))))
    conn.execute(n.delete().where(n.c.last_seen < now - confirmed))


@implementer(IGreylistStore)
class FallingBackGreylist:
    """``primary`` (Redis), or ``fallback`` (None: let every attempt pass) while it
    fails or takes longer than ``timeout`` seconds; the switch is logged once each
    way, not per message."""

    def __init__(self, primary: IGreylistStore, fallback: Optional[IGreylistStore],
                 timeout: float = 0.5, clock: Any = None) -> None:
        self.primary = primary
        self.fallback = fallback
        self.backend = SharedBackend(
            "greylisting", "the SQL store" if fallback else "no greylisting", timeout,
            clock)

    def attempt(self, triplet: Triplet, now: float, rules: Rules) -> Deferred[Verdict]:
        def fallback() -> Any:
            if self.fallback is None:
                return Verdict(0.0, "store down")
            return self.fallback.attempt(triplet, now, rules)
        return self.backend.ask(self.primary.attempt(triplet, now, rules), fallback)


class Greylist:
    """The store and the clock the ``greylist`` check uses (``clock`` gives seconds
    since the epoch; tests move it)."""

    def __init__(self, store: IGreylistStore, clock: Any = time.time) -> None:
        self.store = store
        self.clock = clock

    def attempt(self, triplet: Triplet, rules: Rules) -> Deferred[Verdict]:
        return defer.maybeDeferred(self.store.attempt, triplet, self.clock(), rules)
