"""This node's row in the database's nodes table: its heartbeat, the hunt for dead
nodes, and the marks of its drain.

At start-up (once the schema is current, before the queue runner takes its leases
back and before the listeners listen) the node makes the row of its ``[server]
node_id`` its own; while another process holds the id and beats, it refuses to start
(two processes with one id would take each other's queue leases).  Then, every
``[cluster] heartbeat``, one transaction (lightmail.storage.nodestore): the beat, and
the nodes whose heartbeat is older than ``dead_after`` marked dead, their queue
leases handed back and this node's runner kicked, so that the live nodes deliver
that mail at once rather than when its lease (600 s) runs out.  A drain asked through
the database (``lightmail node drain``) is noticed at the next beat.

A drain (SIGTERM, or a drain asked for) marks the row ``draining`` first, and
``/readyz`` answers 503 with ``"draining": true`` from then on; the node keeps
beating while its sessions and deliveries finish (lightmail.service), and marks the
row ``stopped`` last.  Main process only; SQL on the storage thread pool.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from lightmail import __version__
from lightmail.config import ClusterConfig
from lightmail.readiness import Readiness
from lightmail.storage.interfaces import Beat, INodeStore, NodeRecord, NodeRun


class NodeIdInUse(Exception):
    """Another live process holds this node's id; the message says which."""


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (signal 0 asks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                      # someone else's: alive
    return True


def in_use(node_id: str, holder: NodeRecord, now: int, dead_after: float) -> str:
    age = max(0.0, (now - holder.heartbeat) / 1000)
    return (f"node id {node_id!r} is in use: process {holder.pid} on {holder.host} "
            f"beat {age:.1f}s ago ({holder.state}), and two processes with one node id "
            "would take each other's queue leases.  Give this one another [server] "
            f"node_id, or stop that one (it counts as dead {dead_after:g}s after its "
            "last heartbeat)")


class Membership(Service):
    """A service of the main process, started after storage and stopped after
    everything but storage (it beats through the drain)."""

    name = "membership"
    log = Logger(namespace="lightmail.cluster")

    def __init__(self, store: INodeStore, config: ClusterConfig, node_id: str,
                 storage_ready: Callable[[], Deferred[None]], clock: Any = None,
                 host: str | None = None, pid: int | None = None,
                 alive: Callable[[int], bool] = pid_alive) -> None:
        if clock is None:
            from twisted.internet import reactor
            clock = reactor
        self.clock = clock
        self.store = store
        self.heartbeat = config.heartbeat
        self.dead_after = config.node_dead_after
        self.run = NodeRun(node_id, host or socket.gethostname(),
                           pid if pid is not None else os.getpid(), self._now(),
                           __version__)
        self.storage_ready = storage_ready
        self.alive = alive
        #: Set once the drain began: /readyz answers 503 with "draining": true.
        self.draining = False
        #: The queue runner's kick: leases handed back are due now (set by wiring).
        self.kick: Callable[[], None] = lambda: None
        #: Called when the database asks this node to stop (a drain requested, or
        #: its id taken by another process): the server drains as on SIGTERM.
        self.on_stop_request: Callable[[str], None] = lambda why: None
        self._registered = False
        self._readiness = Readiness()
        self._loop: task.LoopingCall | None = None
        self._failing = False
        self._stop_asked = False

    @property
    def registered(self) -> bool:
        """The node's row is this process's (it may have served)."""
        return self._registered

    def _now(self) -> int:
        return int(self.clock.seconds() * 1000)

    @property
    def dead_after_ms(self) -> int:
        return int(self.dead_after * 1000)

    @property
    def ready(self) -> Deferred[None]:
        """A new Deferred for each caller, fired once the node's row is its own (or
        failed: NodeIdInUse, or storage's failure)."""
        return self._readiness.wait()

    # -- the service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = self.storage_ready()
        d.addCallback(lambda _: self.register())
        d.addCallbacks(lambda _: self._readiness.settle(True), self._readiness.settle)

    @defer.inlineCallbacks
    def register(self) -> Any:
        """Make the row this run's, or fail with NodeIdInUse; then beat."""
        now = self._now()
        holder = yield self.store.register(self.run, now, self.dead_after_ms, self.alive)
        if holder is not None:
            raise NodeIdInUse(in_use(self.run.node_id, holder, now, self.dead_after))
        self._registered = True
        self.log.info("node {node} (pid {pid} on {host}) in the nodes table: a heartbeat "
                      "every {beat:g}s, dead after {dead:g}s without one",
                      node=self.run.node_id, pid=self.run.pid, host=self.run.host,
                      beat=self.heartbeat, dead=self.dead_after)
        if self.running:
            self._loop = task.LoopingCall(self.beat)
            self._loop.clock = self.clock
            self._loop.start(self.heartbeat, now=False)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self._registered:
            return
        try:
            yield self._within(self.store.set_state(self.run, "stopped", self._now()))
        except Exception as exc:
            self.log.warn("could not mark node {node} stopped ({error}); the others take "
                          "it for dead {dead:g}s after its last heartbeat",
                          node=self.run.node_id, error=_said(exc), dead=self.dead_after)
        else:
            self.log.info("node {node} stopped", node=self.run.node_id)

    def _within(self, d: Deferred[Any]) -> Deferred[Any]:
        """A deadline for the database's answer: a drain does not hang on it."""
        return d.addTimeout(max(self.heartbeat, 5.0), self.clock)

    # -- beats ---------------------------------------------------------------------

    def beat(self) -> Deferred[Beat | None]:
        """One beat (every heartbeat; tests call it): never fails, so that the loop
        goes on."""
        d = self.store.beat(self.run, self._now(), self.dead_after_ms, self.draining)
        return d.addCallbacks(self._beaten, self._not_beaten)

    def _beaten(self, beat: Beat) -> Beat:
        if self._failing:
            self._failing = False
            self.log.info("heartbeat written again")
        handed = 0
        for node_id, leases in beat.taken_over:
            self.log.info("node {dead} is dead (no heartbeat for {after:g}s): {count} "
                          "queue leases handed back", dead=node_id, after=self.dead_after,
                          count=leases)
            handed += leases
        if handed:
            self.kick()
        if beat.outcome == "drain":
            self._ask_stop("a drain was requested through the database")
        elif beat.outcome == "revived":
            self.log.error("this node was taken for dead (no heartbeat for {after:g}s): "
                           "its queue leases were handed to the others, and a delivery "
                           "it had in progress may be made twice.  Beating again",
                           after=self.dead_after)
        elif beat.outcome == "taken" and beat.holder is not None:
            self.log.critical("process {pid} on {host} runs as node {node} now; this "
                              "process stops", pid=beat.holder.pid,
                              host=beat.holder.host, node=self.run.node_id)
            self._ask_stop(f"node id {self.run.node_id} taken by another process")
        return beat

    def _not_beaten(self, failure: Failure) -> None:
        if not self._failing:
            self._failing = True
            self.log.warn("could not write this node's heartbeat ({error}); the other "
                          "nodes take it for dead {dead:g}s after the last one",
                          error=_said(failure.value),
                          dead=self.dead_after)

    def _ask_stop(self, why: str) -> None:
        if not self._stop_asked and not self.draining:
            self._stop_asked = True
            self.on_stop_request(why)

    # -- the drain -----------------------------------------------------------------

    @defer.inlineCallbacks
    def drain(self) -> Any:
        """The drain begins: /readyz says so at once, the row once written."""
        self.draining = True
        if not self._registered:
            return
        try:
            yield self._within(self.store.set_state(self.run, "draining", self._now()))
        except Exception as exc:
            self.log.warn("could not mark node {node} draining: {error}",
                          node=self.run.node_id, error=_said(exc))


def _said(exc: BaseException | None) -> str:
    if isinstance(exc, defer.TimeoutError):
        return "the database did not answer in time"
    return str(exc) or type(exc).__name__
