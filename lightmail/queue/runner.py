"""The queue runner: leases due recipients and hands them to delivery agents.

Leases make the runner safe to crash (a dead owner's lease runs out and another takes
the work) and, later, to run on several nodes against one database.  Temporary failures
back off exponentially with jitter, as Postfix does (5 minutes, doubling, at most 4
hours between tries); after ``max_lifetime`` a deferred recipient bounces.  With
``delay_warning_time``, a recipient still deferred that long after its message arrived
gets its sender one delay notice (``Notifier.delayed``), as Postfix's
delay_warning_time does.

Due work is claimed in batches (a finished delivery claims again only when there is
room for ``claim_batch`` more), after an enqueue, every ``poll_interval`` seconds,
and when ``lightmail queue`` writes to the FIFO ``state_dir/queue.wake``
(``lightmail.queue.wake``).  An outcome is committed before the recipient is
forgotten; the SMTP agent's connection is counted against its destination until
then (``deliver_held``).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from lightmail.logs import BoundLogger, new_id
from lightmail.metrics.interfaces import IMetrics
from lightmail.metrics.registry import Metrics
from lightmail.queue.interfaces import UNSTARTED, DeliveryResult, IDeliveryAgent, IQueueKick
from lightmail.queue.wake import WakeFIFO
from lightmail.storage.interfaces import IQueueStore, QueueItem
from lightmail.storage.queuestore import queue_id_time
from lightmail.telemetry import NO_TELEMETRY, Telemetry


def next_attempt_ms(attempts: int, min_backoff: float, max_backoff: float,
                    now: float | None = None) -> int:
    """When to try again after ``attempts`` failed tries (ms since the epoch)."""
    delay = min(max_backoff, min_backoff * (2 ** max(0, attempts - 1)))
    delay *= random.uniform(0.9, 1.1)   # jitter: retries of a burst do not line up
    return int(((now if now is not None else time.time()) + delay) * 1000)


@implementer(IQueueKick)
class QueueRunner(Service):
    name = "queue"
    log = Logger()

    def __init__(self, queue: IQueueStore, ready: defer.Deferred[Any] | None = None,
                 concurrency: int = 20, poll_interval: float = 5.0,
                 lease_seconds: float = 600.0, min_backoff: float = 300.0,
                 max_backoff: float = 14400.0, max_lifetime: float = 5 * 86400.0,
                 clock: Any = None, owner: str | None = None,
                 delay_warning_time: float = 0.0, wake_path: Path | None = None,
                 metrics: IMetrics | None = None,
                 telemetry: Telemetry = NO_TELEMETRY) -> None:
        self.queue = queue
        self.telemetry = telemetry
        self.metrics: IMetrics = metrics if metrics is not None else Metrics()
        self.ready = ready
        self.agents: dict[str, IDeliveryAgent] = {}
        # The lease owner: stable across restarts of one node (see _start_polling).
        self.owner = owner or f"node-{new_id(10)}"
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_lifetime = max_lifetime
        self.delay_warning_time = delay_warning_time     # 0: no delay notices
        self.clock = clock
        self._in_flight: set[defer.Deferred[Any]] = set()
        self._claiming = False
        self._again = 0          # > 0: look again, with room for that many
        self._drained = False    # the last claim got all that was due
        self._poll: task.LoopingCall | None = None
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._polling = False    # started: its leases were taken back
        # The FIFO through which ``lightmail queue`` wakes the runner (queue/wake.py).
        self.wake_path = wake_path
        self._wake: WakeFIFO | None = None
        # Told of every final outcome (DSNs, lightmail.outbound.notices).
        self.notifier: Any = None

    def add_agent(self, agent: IDeliveryAgent) -> None:
        self.agents[agent.transport] = agent

    def startService(self) -> None:
        super().startService()
        ready = self.ready if self.ready is not None else defer.succeed(None)
        ready.addCallback(lambda _: self._start_polling())
        ready.addErrback(lambda f: None)   # the storage service reports its failure

    @defer.inlineCallbacks
    def _start_polling(self) -> Any:
        if not self.running:
            return
        self._polling = True
        released = yield self.queue.release_leases(self.owner)
        if released:
            self.log.info("took back {count} deliveries interrupted by a crash",
                          count=released)
        if self.wake_path is not None:
            self._wake = WakeFIFO(self.wake_path, self.kick)
            if not self._wake.start():
                self._wake = None
        self._poll = task.LoopingCall(self.kick)
        if self.clock is not None:
            self._poll.clock = self.clock
        self._poll.start(self.poll_interval, now=True)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """The drain: no more claims; deliveries that wait for their turn come back
        unstarted, those started finish (a half-done one would be redone, which is
        safe but slower); then the agents' idle sessions are hung up and every lease
        still held (the unstarted, a claim that came in meanwhile) is handed back,
        due now, for the other nodes (or this one's next run)."""
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._wake is not None:
            self._wake.stop()
            self._wake = None
        for agent in self.agents.values():
            agent.stop_waiting()
        yield self.idle()
        for agent in self.agents.values():
            agent.close()
        if not self._polling:
            return              # never started: it holds nothing
        try:
            handed = yield self.queue.release_leases(self.owner)
        except Exception:
            self.log.failure("could not hand back the deliveries not started; they "
                             "are taken again when their lease runs out")
            return
        if handed:
            self.log.info("handed back {count} deliveries not started", count=handed)

    def kick(self) -> None:
        """Look for due work now (called after an enqueue, by the poll timer, and when
        ``lightmail queue`` wakes the runner up)."""
        self._drained = False
        self._kick(1)

    def _kick(self, min_room: int) -> None:
        """Claim due work if there is room for at least ``min_room`` more deliveries.
        A finished delivery asks for a whole batch's room (``claim_batch``): claims
        then take many recipients at once instead of one each time one finishes."""
        if not self.running or not self.agents:
            return
        if self._claiming:
            self._again = min(self._again or min_room, min_room)
            return
        room = self.concurrency - len(self._in_flight)
        if room < max(1, min_room):
            # Each delivery that finishes looks again; so does the next poll.
            self._again = min(self._again or min_room, min_room)
            return
        self._claiming = True
        self._again = 0
        d = self.queue.claim(self.owner, list(self.agents), room, self.lease_seconds)
        d.addCallback(self._prepare)
        d.addCallback(self._dispatch, room)
        d.addErrback(lambda f: self.log.failure("claiming queued mail failed", f))
        d.addBoth(self._claimed)

    @property
    def claim_batch(self) -> int:
        return max(1, min(50, self.concurrency // 4))

    def _claimed(self, _: Any) -> None:
        self._claiming = False
        if self._again:
            self._kick(self._again)
        if not self._in_flight and not self._claiming:
            self._notify_idle()

    @defer.inlineCallbacks
    def _prepare(self, items: list[QueueItem]) -> Any:
        """Let each agent read ahead for its part of a whole batch (``prepare``)."""
        items = list(items)
        for transport, agent in self.agents.items():
            mine = [index for index, item in enumerate(items)
                    if item.recipient.transport == transport]
            if not mine:
                continue
            try:
                prepared = yield agent.prepare([items[index] for index in mine])
            except Exception:
                self.log.failure("preparing deliveries failed; they go ahead unprepared")
                continue
            for index, item in zip(mine, prepared, strict=True):
                items[index] = item
        return items

    def _dispatch(self, items: list[QueueItem], asked: int) -> None:
        if not self.running:
            return      # stopping: their leases are handed back (stopService)
        if len(items) >= asked:
            # There may be more: look again when there is room for a batch.
            self._again = min(self._again or self.claim_batch, self.claim_batch)
        else:
            # All that is due now: until kick() (an enqueue, the poll, a wake-up),
            # finished deliveries need not look again.
            self._drained = True
        for item in items:
            d = self._deliver(item)
            self._in_flight.add(d)
            d.addBoth(self._finished, d)

    def _finished(self, _: Any, d: defer.Deferred[Any]) -> None:
        self._in_flight.discard(d)
        if not self._drained:
            self._kick(self.claim_batch if self._in_flight else 1)
        if not self._in_flight and not self._claiming:
            self._notify_idle()

    @defer.inlineCallbacks
    def _deliver(self, item: QueueItem) -> Any:
        log = BoundLogger(namespace="lightmail.queue", msg_id=item.queue_id)
        agent = self.agents[item.recipient.transport]
        release = None
        started = time.perf_counter()
        span = self.telemetry.delivery(item.queue_id, item.recipient.transport,
                                       item.recipient.address, item.attempts + 1)
        try:
            # The agent holds what the delivery used (the SMTP agent: its place in
            # the destination's limits) until the outcome is recorded.
            result, release = yield agent.deliver_held(item)
        except Exception as exc:
            log.failure("delivery to {rcpt} failed unexpectedly", rcpt=item.recipient.address)
            result = DeliveryResult.deferred(f"4.3.0 internal error: {exc.__class__.__name__}")
        if result.status == UNSTARTED:
            # Given back by the agent (a drain): no attempt, the lease is handed back.
            if release is not None:
                release()
            span.end(UNSTARTED)
            return
        attempt = time.perf_counter() - started
        try:
            final = yield self._record(item, result, agent.transport, log)
        except Exception:
            log.failure("recording the delivery of {rcpt} failed; it will be retried",
                        rcpt=item.recipient.address)
            span.end("failed")
            return
        finally:
            if release is not None:
                release()
        span.end(final)
        received = queue_id_time(item.queue_id)
        queued = (time.time() - received if final != "deferred" and received > 0
                  else None)
        self.metrics.delivery(agent.transport, final, attempt, queued)
        yield self._tell(item, result, final, log)

    @defer.inlineCallbacks
    def return_to_sender(self, queue_id: str, reason: str) -> Any:
        """An administrator's bounce: every waiting recipient of ``queue_id`` fails
        now with ``reason`` (an enhanced status code and text), and the sender gets
        the notice a bounce gets.  Fires with how many recipients that was."""
        log = BoundLogger(namespace="lightmail.queue", msg_id=queue_id)
        items = yield self.queue.claim_message(self.owner, queue_id, self.lease_seconds)
        for item in items:
            result = DeliveryResult.bounced(reason)
            final = yield self._record(item, result, item.recipient.transport, log)
            self.metrics.delivery(item.recipient.transport, final, 0.0, None)
            yield self._tell(item, result, final, log)
        return len(items)

    @defer.inlineCallbacks
    def _tell(self, item: QueueItem, result: DeliveryResult, final: str,
              log: BoundLogger) -> Any:
        """The sender's notice of a final outcome, or of a delay, when one is due."""
        if final == "dead":
            return                  # nobody to tell: kept in the queue
        if self.notifier is not None and (result.status in ("delivered", "bounced")
                                          or self._expired(item)):
            if result.status == "deferred":
                result = DeliveryResult("bounced", result.detail, remote_mta=result.remote_mta,
                                        diagnostic=result.diagnostic)
            try:
                yield defer.ensureDeferred(self.notifier.outcome(item, result))
            except Exception:
                log.failure("could not send the delivery notice for {rcpt}",
                            rcpt=item.recipient.address)
        elif (self.notifier is not None and result.status == "deferred"
              and self._delay_warning_due(item)):
            try:
                yield defer.ensureDeferred(self.notifier.delayed(
                    item, result, queue_id_time(item.queue_id) + self.max_lifetime))
            except Exception:
                log.failure("could not send the delay notice for {rcpt}",
                            rcpt=item.recipient.address)

    @defer.inlineCallbacks
    def _record(self, item: QueueItem, result: DeliveryResult, transport: str,
                log: BoundLogger) -> Any:
        """Record the outcome (durably, before forgetting the item) and log it;
        the status recorded (delivered, deferred, bounced, dead)."""
        if result.recorded:
            log.info("to=<{rcpt}> transport={transport} status={status} {detail}",
                     rcpt=item.recipient.address, transport=transport,
                     status=result.status, detail=result.detail)
            return result.status
        if result.status == "delivered":
            yield self.queue.delivered(item, self.owner)
            log.info("to=<{rcpt}> transport={transport} status=delivered {detail}",
                     rcpt=item.recipient.address, transport=transport,
                     detail=result.detail)
            return "delivered"
        if ((result.status == "bounced" or self._expired(item))
              and self.notifier is not None and self.notifier.nobody_to_tell(item)):
            # A double bounce with no postmaster, or postmaster's notice bouncing:
            # kept as dead rather than dropped (Postfix keeps such mail too).
            yield self.queue.dead(item, self.owner, result.detail)
            log.warn("to=<{rcpt}> transport={transport} status=dead {detail} (kept in "
                     "the queue: nobody to tell)", rcpt=item.recipient.address,
                     transport=transport, detail=result.detail)
            return "dead"
        if result.status == "bounced" or self._expired(item):
            yield self.queue.bounced(item, self.owner, result.detail)
            log.warn("to=<{rcpt}> transport={transport} status=bounced {detail}",
                     rcpt=item.recipient.address, transport=transport,
                     detail=result.detail)
            return "bounced"
        when = next_attempt_ms(item.attempts + 1, self.min_backoff, self.max_backoff)
        yield self.queue.deferred(item, self.owner, result.detail, when)
        log.info("to=<{rcpt}> transport={transport} status=deferred {detail}",
                 rcpt=item.recipient.address, transport=transport,
                 detail=result.detail)
        return "deferred"

    def _expired(self, item: QueueItem) -> bool:
        received = queue_id_time(item.queue_id)
        return received > 0 and time.time() - received > self.max_lifetime

    def _delay_warning_due(self, item: QueueItem) -> bool:
        """Whether the sender should now hear that ``item`` (just deferred) is late:
        warnings are on, none was sent for it, and its message arrived at least
        ``delay_warning_time`` ago.  (The notifier checks NOTIFY and the sender.)"""
        if self.delay_warning_time <= 0 or item.delay_warned:
            return False
        received = queue_id_time(item.queue_id)
        return received > 0 and time.time() - received >= self.delay_warning_time

    def idle(self) -> defer.Deferred[None]:
        """Fires when no claim or delivery is in progress (for tests and drains)."""
        if not self._in_flight and not self._claiming:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _notify_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

