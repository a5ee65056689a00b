"""The results kept for DMARC aggregate reports, in SQL (``schema.dmarc_results``).

One row per message, written as it is judged (``add``, an unsynced write: a result
lost to a power cut is a count one short in a report, not lost mail).  A report run
``claim``s the rows that have arrived, reads each policy domain's rows back
grouped (``rows_of``: the messages with the same source, identifiers and results
make one report row, with their count), and ``forget``s them once its reports are
queued.  The grouping is done here in Python, on the SQL thread: MariaDB groups a
TEXT column by its first ``max_sort_length`` bytes only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from lightmail.storage import schema as s
from lightmail.storage.database import Database

#: A claim older than this (milliseconds) belongs to a run that died: taken again.
STALE_CLAIM_MS = 3600 * 1000


@dataclass(frozen=True)
class GroupedRow:
    """Messages with the same results: one <record> of a report."""

    source_ip: str
    count: int
    disposition: str
    dkim: str
    spf: str
    reasons: tuple[tuple[str, str], ...]
    envelope_to: str
    envelope_from: str
    header_from: str
    dkim_results: tuple[tuple[str, str, str], ...]      # (domain, selector, result)
    spf_domain: str
    spf_scope: str
    spf_result: str


@dataclass(frozen=True)
class DomainRows:
    """What a run has of one policy domain."""

    policy_domain: str
    rows: tuple[GroupedRow, ...]
    messages: int
    first_arrived: int                  # milliseconds since the epoch
    last_arrived: int
    #: The policy published and its report URIs, as the latest message saw them.
    published: Mapping[str, Any]


class ResultStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, row: dict[str, Any]) -> Deferred[None]:
        """Keep one message's row (the columns of ``schema.dmarc_results``)."""
        def add_(conn: Connection) -> None:
            conn.execute(s.dmarc_results.insert().values(**row))
        return self.db.write_unsynced(add_)

    def claim(self, report_id: str, now_ms: int) -> Deferred[list[str]]:
        """Claim for the run ``report_id`` every row that arrived before ``now_ms``
        and no live run has; fires with the policy domains claimed."""
        t = s.dmarc_results

        def claim_(conn: Connection) -> list[str]:
            conn.execute(t.update().where(
                t.c.arrived <= now_ms,
                sa.or_(t.c.report_id.is_(None), t.c.claimed < now_ms - STALE_CLAIM_MS),
            ).values(report_id=report_id, claimed=now_ms))
            return sorted(row[0] for row in conn.execute(
                sa.select(t.c.policy_domain).where(t.c.report_id == report_id).distinct()))
        return self.db.write(claim_)

    def rows_of(self, report_id: str, policy_domain: str) -> Deferred[DomainRows]:
        t = s.dmarc_results
        keys = (t.c.source_ip, t.c.disposition, t.c.dkim, t.c.spf, t.c.reasons,
                t.c.envelope_to, t.c.envelope_from, t.c.header_from, t.c.dkim_results,
                t.c.spf_domain, t.c.spf_scope, t.c.spf_result)

        def read(conn: Connection) -> DomainRows:
            counts: dict[tuple[Any, ...], int] = {}
            first = last = None
            published = "{}"
            result = conn.execute(
                sa.select(*keys, t.c.arrived, t.c.published)
                .where(t.c.report_id == report_id, t.c.policy_domain == policy_domain)
                .order_by(t.c.id))
            for row in result:
                key = tuple(row[:len(keys)])
                counts[key] = counts.get(key, 0) + 1
                arrived = row.arrived
                first = arrived if first is None else min(first, arrived)
                if last is None or arrived >= last:
                    last, published = arrived, row.published
            rows = tuple(_grouped(key, count) for key, count in counts.items())
            return DomainRows(policy_domain, rows, sum(counts.values()), first or 0,
                              last or 0, json.loads(published))
        return self.db.read(read)

    def forget(self, report_id: str, policy_domain: str) -> Deferred[int]:
        """Delete the rows of a policy domain that the run has reported."""
        t = s.dmarc_results

        def forget_(conn: Connection) -> int:
            return int(conn.execute(t.delete().where(
                t.c.report_id == report_id, t.c.policy_domain == policy_domain)).rowcount)
        return self.db.write(forget_)

    def count(self) -> Deferred[int]:
        """How many rows wait for a report."""
        def count_(conn: Connection) -> int:
            return int(conn.execute(
                sa.select(sa.func.count()).select_from(s.dmarc_results)).scalar() or 0)
        return self.db.read(count_)


def _grouped(key: tuple[Any, ...], count: int) -> GroupedRow:
    (source_ip, disposition, dkim, spf, reasons, envelope_to, envelope_from,
     header_from, dkim_results, spf_domain, spf_scope, spf_result) = key
    return GroupedRow(
        source_ip=source_ip, count=count, disposition=disposition, dkim=dkim, spf=spf,
        reasons=tuple((str(kind), str(comment)) for kind, comment in json.loads(reasons)),
        envelope_to=envelope_to, envelope_from=envelope_from, header_from=header_from,
        dkim_results=tuple((str(d), str(sel), str(res))
                           for d, sel, res in json.loads(dkim_results)),
        spf_domain=spf_domain, spf_scope=spf_scope, spf_result=spf_result)
