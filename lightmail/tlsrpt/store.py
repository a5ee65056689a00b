"""TLS outcomes in SQL (``schema.tlsrpt_results``): counted in memory as they come and
added to the day's rows every ``flush_interval`` (one write transaction for all of
them, not one per SMTP session), and read back, a day and a policy domain at a time,
by the report job.  A crash loses at most the counts of the last interval: the
report is a statistic, not a ledger."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.storage import schema as s
from lightmail.storage.database import Database
from lightmail.tlsrpt.interfaces import ITLSReports, ReportPolicy, TLSResult

#: At most this many distinct outcomes wait in memory for the next flush (a database
#: that stays down must not grow the process): more are dropped, and logged.
MAX_PENDING = 10_000


def day_of(timestamp: float) -> str:
    """The UTC day of a Unix time, as the rows name it: ``2026-12-10``."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Counted:
    """A row read back: one outcome and how often it happened that day."""

    result: TLSResult
    count: int


@implementer(ITLSReports)
class SQLTLSReports:
    log = Logger(namespace="lightmail.tlsrpt")

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db, self.clock = db, clock
        self.pending: Counter[tuple[str, TLSResult]] = Counter()
        self.dropped = 0

    def record(self, result: TLSResult) -> None:
        key = (day_of(self.clock()), result)
        if key not in self.pending and len(self.pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self.pending[key] += 1

    def flush(self) -> Deferred[None]:
        """Add what was recorded since the last flush to the rows."""
        counts, self.pending = self.pending, Counter()
        if self.dropped:
            self.log.warn("TLS-RPT: {count} outcomes not recorded (the database did not "
                          "take the counts in time)", count=self.dropped)
            self.dropped = 0
        if not counts:
            return succeed(None)

        def failed(failure: Failure) -> None:
            self.log.warn("TLS-RPT: counts not stored yet ({error}); trying again at the "
                          "next flush", error=failure.getErrorMessage())
            for key, count in counts.items():
                if key in self.pending or len(self.pending) < MAX_PENDING:
                    self.pending[key] += count
        return self.db.write(_add_counts, counts).addErrback(failed)

    def days(self, before: str) -> Deferred[list[tuple[str, str]]]:
        """The (day, policy domain) pairs with rows, of days before ``before``."""
        t = s.tlsrpt_results

        def days_(conn: Connection) -> list[tuple[str, str]]:
            query = (sa.select(t.c.day, t.c.policy_domain).distinct()
                     .where(t.c.day < before).order_by(t.c.day, t.c.policy_domain))
            return [(row.day, row.policy_domain) for row in conn.execute(query)]
        return self.db.read(days_)

    def take(self, day: str, domain: str) -> Deferred[list[Counted]]:
        """Remove and return the rows of ``day`` and ``domain``: for one report, which
        so goes out once even with several nodes running the job (the node whose
        delete removed them all has them; another gets ``[]``)."""
        t = s.tlsrpt_results
        where = sa.and_(t.c.day == day, t.c.policy_domain == domain)

        def take_(conn: Connection) -> list[Counted]:
            rows = list(conn.execute(sa.select(t).where(where)))
            removed = conn.execute(t.delete().where(
                t.c.id.in_([row.id for row in rows]))).rowcount if rows else 0
            if removed != len(rows):
                raise _TakenElsewhere()
            return [_counted(row) for row in rows]

        def elsewhere(failure: Failure) -> list[Counted]:
            failure.trap(_TakenElsewhere)
            return []
        return self.db.write(take_).addErrback(elsewhere)


class _TakenElsewhere(Exception):
    """Another node removed some of the rows meanwhile: this transaction rolls back."""


def _key(day: str, result: TLSResult) -> str:
    policy = result.policy
    fields = [day, result.policy_domain, policy.type, list(policy.strings),
              list(policy.mx_hosts), result.result_type, result.sending_ip,
              result.receiving_mx, result.receiving_ip, result.reason]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _add_counts(conn: Connection, counts: Counter[tuple[str, TLSResult]]) -> None:
    t = s.tlsrpt_results
    for (day, result), count in counts.items():
        key = _key(day, result)
        updated = conn.execute(t.update().where(t.c.result_key == key)
                               .values(count=t.c.count + count)).rowcount
        if updated:
            continue
        # Two nodes inserting the same new row at once: the second transaction fails
        # on the unique key and its counts wait for the next flush.
        conn.execute(t.insert().values(
            result_key=key, day=day, policy_domain=result.policy_domain[:255],
            policy_type=result.policy.type,
            policy_strings=json.dumps(list(result.policy.strings)),
            mx_hosts=json.dumps(list(result.policy.mx_hosts)),
            result_type=result.result_type, sending_ip=result.sending_ip[:64],
            receiving_mx=result.receiving_mx[:255], receiving_ip=result.receiving_ip[:64],
            reason=result.reason[:255], count=count))


def _counted(row: Any) -> Counted:
    policy = ReportPolicy(row.policy_type, tuple(json.loads(row.policy_strings)),
                          tuple(json.loads(row.mx_hosts)))
    return Counted(TLSResult(row.policy_domain, policy, row.result_type, row.sending_ip,
                             row.receiving_mx, row.receiving_ip, row.reason), row.count)
