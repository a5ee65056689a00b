"""Liveness and readiness: what ``/healthz`` and ``/readyz`` answer.

Alive: the process answers HTTP at all.  Ready: the database answers a trivial read
within ``[admin] readiness_timeout``, the queue runner runs, every configured listener
listens, (with ``[server] workers``) every worker process is up, and (with ``[cluster]
redis``) Redis answers and the node listens on the change channel.  A load balancer
or an orchestrator sends traffic only to a ready server, and restarts one that is not
alive.  A node that drains (SIGTERM, ``lightmail node drain``) is not ready, whatever
its checks: it says ``"draining": true`` from the start of the drain, ``[cluster]
drain_notice`` before it closes its listeners.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from twisted.application.service import IService
from twisted.internet import defer

from lightmail.cluster.membership import Membership
from lightmail.listeners import ListenerService
from lightmail.wiring import Services


@dataclass
class Verdict:
    """The checks, each ``ok`` or what is wrong; a draining node is never ready."""

    checks: dict[str, str] = field(default_factory=dict)
    draining: bool = False

    @property
    def ready(self) -> bool:
        return not self.draining and all(value == "ok" for value in self.checks.values())


def _select_one(conn: Any) -> Any:
    return conn.execute(sa.text("SELECT 1")).scalar()


class Readiness:
    """Runs the checks of ``/readyz`` for the main process's parts."""

    def __init__(self, services: Services, queue_runner: IService,
                 listeners: Sequence[ListenerService], workers: Any = None,
                 membership: Membership | None = None) -> None:
        self.services = services
        self.queue_runner = queue_runner
        self.listeners = listeners
        #: The WorkerPool, with [server] workers (ready once all workers said so).
        self.workers = workers
        #: This node's row: a node that drains is not ready.
        self.membership = membership

    @defer.inlineCallbacks
    def check(self) -> Any:
        from twisted.internet import reactor
        verdict = Verdict(draining=self.membership is not None
                          and self.membership.draining)
        timeout = self.services.config.admin.readiness_timeout
        try:
            d = self.services.storage.db.read(_select_one)
            d.addTimeout(timeout, reactor)
            yield d
            verdict.checks["storage"] = "ok"
        except defer.TimeoutError:
            verdict.checks["storage"] = f"no answer within {timeout:g}s"
        except Exception as exc:
            verdict.checks["storage"] = f"failed: {exc.__class__.__name__}"
        verdict.checks["queue"] = "ok" if self.queue_runner.running else "not running"
        for listener in self.listeners:
            verdict.checks[f"listener:{listener.listener.name}"] = (
                "ok" if listener.port is not None else "not listening")
        if self.workers is not None:
            running, count = len(self.workers.processes), self.workers.count
            verdict.checks["workers"] = ("ok" if self.workers.ready.called
                                         and running == count
                                         else f"{running} of {count} running")
        if self.services.cluster is not None:
            verdict.checks["redis"] = yield self.services.cluster.check()
        self.services.metrics.set_ready(verdict.ready)
        return verdict
