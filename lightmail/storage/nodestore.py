"""The nodes table (INodeStore): the LightMail nodes that share this database, their
heartbeats, drain requests, and the hand-back of a dead node's queue leases.

A node's row is written by the run of it that holds its id (host and pid).  The run
beats with one UPDATE, which matches only while the row is its own, running or
draining, and no drain was asked of it: anything else (the row taken by another
process, taken for dead, a drain requested) is then read and answered.  The hunt for
dead nodes is one SELECT of the few rows, in the same transaction; a dead node is
marked dead and its leases handed back in one transaction, under a lock of its row
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL and MariaDB; SQLite has one writer at a
time), so only one node does it.  Times come from the caller (ms since the epoch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.storage import schema as s
from lightmail.storage.database import Database
from lightmail.storage.interfaces import Beat, INodeStore, NodeRecord, NodeRun

_n, _r = s.nodes, s.queue_recipients
LIVE = ("running", "draining")

# A beat, nearly always the whole of it.
_BEAT = _n.update().where(
    (_n.c.id == sa.bindparam("b_id")) & (_n.c.host == sa.bindparam("b_host"))
    & (_n.c.pid == sa.bindparam("b_pid")) & _n.c.state.in_(LIVE)
    & _n.c.drain_requested.is_(None)
).values(heartbeat=sa.bindparam("b_now"))
_DRAINING_BEAT = _n.update().where(
    (_n.c.id == sa.bindparam("b_id")) & (_n.c.host == sa.bindparam("b_host"))
    & (_n.c.pid == sa.bindparam("b_pid")) & _n.c.state.in_(LIVE)
).values(heartbeat=sa.bindparam("b_now"))
_ROW = sa.select(_n).where(_n.c.id == sa.bindparam("b_id"))
_STALE = (sa.select(_n.c.id, _n.c.heartbeat)
          .where(_n.c.state.in_(LIVE) & (_n.c.heartbeat < sa.bindparam("b_stale"))
                 & (_n.c.id != sa.bindparam("b_id")))
          .order_by(_n.c.id))
_LEASES = (sa.select(_r.c.lease_owner, sa.func.count())
           .where(_r.c.state == "active").group_by(_r.c.lease_owner))


@implementer(INodeStore)
class SQLNodeStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def register(self, run: NodeRun, now: int, dead_after_ms: int,
                 pid_alive: Callable[[int], bool]) -> Deferred[NodeRecord | None]:
        # Two runs starting at once with one id both insert: the second fails on the
        # primary key, and its second try finds the first's row.
        def again(failure: Failure) -> Deferred[NodeRecord | None]:
            failure.trap(sa.exc.IntegrityError)
            return self.db.write(self._register, run, now, dead_after_ms, pid_alive)
        return self.db.write(self._register, run, now, dead_after_ms,
                             pid_alive).addErrback(again)

    def _register(self, conn: Connection, run: NodeRun, now: int, dead_after_ms: int,
                  pid_alive: Callable[[int], bool]) -> NodeRecord | None:
        row = conn.execute(_locked(conn, _ROW), {"b_id": run.node_id}).first()
        if row is None:
            conn.execute(_n.insert().values(id=run.node_id, **_running(run, now)))
            return None
        holder = _record(row)
        alive = (holder.state in LIVE and holder.heartbeat >= now - dead_after_ms
                 and not holder.holds(run)
                 # A run of this host that is gone (kill -9, then a restart within
                 # dead_after) holds nothing.
                 and (holder.host != run.host or pid_alive(holder.pid)))
        if alive:
            return holder
        conn.execute(_n.update().where(_n.c.id == run.node_id).values(**_running(run, now)))
        return None

    def beat(self, run: NodeRun, now: int, dead_after_ms: int,
             draining: bool) -> Deferred[Beat]:
        return self.db.write(self._beat, run, now, dead_after_ms, draining)

    def _beat(self, conn: Connection, run: NodeRun, now: int, dead_after_ms: int,
              draining: bool) -> Beat:
        mine = {"b_id": run.node_id, "b_host": run.host, "b_pid": run.pid, "b_now": now}
        beaten = conn.execute(_DRAINING_BEAT if draining else _BEAT, mine).rowcount
        outcome, holder = "ok", None
        if not beaten:
            outcome, holder = self._why_not(conn, run, now, draining)
        return Beat(outcome, self._take_over(conn, run, now, dead_after_ms), holder)

    def _why_not(self, conn: Connection, run: NodeRun, now: int,
                 draining: bool) -> tuple[str, NodeRecord | None]:
        row = conn.execute(_ROW, {"b_id": run.node_id}).first()
        if row is None:                 # removed by hand: written again
            conn.execute(_n.insert().values(id=run.node_id, **_running(run, now)))
            return "ok", None
        found = _record(row)
        if not found.holds(run) and found.state in LIVE:
            return "taken", found
        if found.holds(run) and found.state in LIVE:
            conn.execute(_n.update().where(_n.c.id == run.node_id).values(heartbeat=now))
            return "drain", None        # drain_requested is set
        # Taken for dead (or its row marked stopped): running again, as its own.
        values = _running(run, now)
        values.update(started=found.started if found.holds(run) else run.started,
                      state="draining" if draining else "running",
                      drain_requested=found.drain_requested if found.holds(run) else None)
        conn.execute(_n.update().where(_n.c.id == run.node_id).values(**values))
        return "revived", None

    @staticmethod
    def _take_over(conn: Connection, run: NodeRun, now: int,
                   dead_after_ms: int) -> tuple[tuple[str, int], ...]:
        """Mark the live-looking nodes whose heartbeat is stale dead, and hand their
        queue leases back (due now, as ``release_leases`` does after a crash)."""
        stale = conn.execute(_locked(conn, _STALE, skip_locked=True),
                             {"b_stale": now - dead_after_ms, "b_id": run.node_id}).all()
        found = []
        for node_id, _ in stale:
            conn.execute(_n.update().where(_n.c.id == node_id).values(state="dead"))
            released = conn.execute(_r.update().where(
                (_r.c.lease_owner == node_id) & (_r.c.state == "active")).values(
                state="deferred", next_attempt=now, lease_owner=None,
                lease_until=None)).rowcount
            found.append((node_id, int(released)))
        return tuple(found)

    def set_state(self, run: NodeRun, state: str, now: int) -> Deferred[bool]:
        def set_(conn: Connection) -> bool:
            return bool(conn.execute(_n.update().where(
                (_n.c.id == run.node_id) & (_n.c.host == run.host)
                & (_n.c.pid == run.pid)).values(state=state, heartbeat=now)).rowcount)
        return self.db.write(set_)

    def nodes(self) -> Deferred[list[NodeRecord]]:
        def list_(conn: Connection) -> list[NodeRecord]:
            leases = {owner: int(count) for owner, count in conn.execute(_LEASES)}
            return [_record(row, leases.get(row.id, 0))
                    for row in conn.execute(sa.select(_n).order_by(_n.c.id))]
        return self.db.read(list_)

    def request_drain(self, node_id: str, now: int) -> Deferred[NodeRecord | None]:
        def request(conn: Connection) -> NodeRecord | None:
            row = conn.execute(_locked(conn, _ROW), {"b_id": node_id}).first()
            if row is None:
                return None
            found = _record(row)
            if found.state in LIVE and found.drain_requested is None:
                conn.execute(_n.update().where(_n.c.id == node_id).values(
                    drain_requested=now))
                found = dataclasses.replace(found, drain_requested=now)
            return found
        return self.db.write(request)


def _locked(conn: Connection, select: sa.Select, skip_locked: bool = False) -> sa.Select:
    if conn.dialect.name == "sqlite":
        return select                   # one writer at a time anyway
    return select.with_for_update(skip_locked=skip_locked)


def _running(run: NodeRun, now: int) -> dict[str, object]:
    return {"host": run.host, "pid": run.pid, "started": run.started, "heartbeat": now,
            "state": "running", "version": run.version, "drain_requested": None}


def _record(row: sa.Row, leases: int = 0) -> NodeRecord:
    return NodeRecord(row.id, row.host, row.pid, row.started, row.heartbeat, row.state,
                      row.version, row.drain_requested, leases)
