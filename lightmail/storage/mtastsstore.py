"""The MTA-STS policy cache's SQL side (``schema.mta_sts_policies``): the policies
the outbound MTA fetched, so that a restart still honours a domain's ``enforce``
policy while its policy server is down (RFC 8461 §5)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from zope.interface import implementer

from lightmail.storage import schema as s
from lightmail.storage.database import Database
from lightmail.storage.interfaces import IMTASTSPolicyStore, MTASTSPolicyRecord

_t = s.mta_sts_policies


@implementer(IMTASTSPolicyStore)
class SQLMTASTSPolicyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def load(self, now: float) -> Deferred[list[MTASTSPolicyRecord]]:
        now_ms = int(now * 1000)

        def load_(conn: Connection) -> list[MTASTSPolicyRecord]:
            return [MTASTSPolicyRecord(row.domain, row.policy_id, row.mode,
                                       tuple(row.mx.split("\n")) if row.mx else (),
                                       row.max_age, row.fetched / 1000.0)
                    for row in conn.execute(sa.select(_t).where(
                        _t.c.fetched + _t.c.max_age * 1000 >= now_ms))]
        return self.db.read(load_)

    def save(self, record: MTASTSPolicyRecord) -> Deferred[None]:
        row = {"domain": record.domain, "policy_id": record.policy_id,
               "mode": record.mode, "mx": "\n".join(record.mx),
               "max_age": record.max_age, "fetched": int(record.fetched * 1000)}

        def save_(conn: Connection) -> None:
            # Delete and insert in one transaction: the same on every backend.  Two
            # nodes saving one domain at once: one of them fails (IntegrityError) and
            # the other's row, as good, stays.
            conn.execute(_t.delete().where(_t.c.domain == record.domain))
            conn.execute(_t.insert().values(**row))
        return self.db.write(save_)

    def forget(self, domain: str) -> Deferred[None]:
        def forget_(conn: Connection) -> None:
            conn.execute(_t.delete().where(_t.c.domain == domain))
        return self.db.write(forget_)
