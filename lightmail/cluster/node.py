"""This node in a cluster: its Redis connection for the shared state, its name there,
the change channel it listens on, and the leases it renews.

A lease is a key (a POP3 maildrop lock) or a member of a sorted set (an IMAP session
mark) that expires ``[cluster] lease`` after its last renewal; the node renews its own
every third of that, so a node that dies frees them by itself, and no other node
needs to know it is gone.  What renewal finds taken by someone else is logged.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from lightmail.cluster.redis import LazyRedis, SharedBackend, Subscription
from lightmail.cluster.redislink import redis_link
from lightmail.config import ClusterConfig

# KEYS: the leases; ARGV[1] the lease (ms), then for each key its kind ('z': a member of
# a sorted set scored by its expiry, 'l': a lock holding a token) and member or token.
# A mark or lock that expired meanwhile is put back (its session is alive); a lock
# someone else took is reported.
RENEW_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local lost = {}
for i, key in ipairs(KEYS) do
  local kind, value = ARGV[2 * i], ARGV[2 * i + 1]
  if kind == 'z' then
    redis.call('ZADD', key, now + lease, value)
    redis.call('PEXPIRE', key, lease)
  else
    local holder = redis.call('GET', key)
    if holder == value or not holder then
      redis.call('SET', key, value, 'PX', lease)
    else
      table.insert(lost, key)
    end
  end
end
return lost
"""

# The same keys and ARGV, without ARGV[1]'s use: this node's leases let go (a stop).
RELEASE_SCRIPT = """
for i, key in ipairs(KEYS) do
  local kind, value = ARGV[2 * i], ARGV[2 * i + 1]
  if kind == 'z' then
    redis.call('ZREM', key, value)
  elseif redis.call('GET', key) == value then
    redis.call('DEL', key)
  end
end
return 0
"""

# A batch of leases per script (a script blocks Redis while it runs).
RENEW_BATCH = 500

MARK, LOCK = "z", "l"


class Node(Service):
    """``[cluster]``: Redis for the shared state (one connection: questions are
    answered in the order they were asked), the change channel, and this node's
    leases.  A service of the main process, started before the listeners and stopped
    after them."""

    name = "cluster"
    log = Logger(namespace="lightmail.cluster")

    def __init__(self, config: ClusterConfig, node_id: str, clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor
            clock = reactor
        self.clock = clock
        self.config = config
        self.redis = LazyRedis(redis_link(config, config.redis), poolsize=1, reactor=clock)
        self.prefix = config.prefix
        #: This run of this node: marks, lock tokens and the changes it publishes are
        #: its (a node started again is another instance; its old leases expire).
        self.instance = f"{node_id}/{os.getpid()}/{secrets.token_hex(4)}"
        self.timeout = config.redis_timeout
        self.lease_ms = int(config.lease * 1000)
        self.leases: dict[tuple[str, str], str] = {}    # (key, member or token) -> kind
        self.subscription: Subscription | None = None
        self._serial = 0
        self._renewals = SharedBackend(
            "cluster leases", f"this node's locks and session marks expire after "
            f"{config.lease:g}s", self.timeout, clock)
        self._loop: task.LoopingCall | None = None
        self._silence_said = False

    # -- names ---------------------------------------------------------------------

    def key(self, name: str) -> str:
        return self.prefix + name

    @property
    def channel(self) -> str:
        return self.prefix + "changes"

    def token(self) -> str:
        """A name no other lease of any node has."""
        self._serial += 1
        return f"{self.instance}/{self._serial}"

    # -- questions -----------------------------------------------------------------

    def ask(self, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        """Run a script; the answer, or a failure (give it a deadline: see
        SharedBackend)."""
        return self.redis.eval(script, keys, args)

    def listen(self, heard: Callable[[bytes], None], subscribed: Callable[[], None]) -> None:
        """Messages on the change channel go to ``heard``; ``subscribed`` is called
        each time the subscription is in place (again).  Once, before the start."""
        # Pinged as often as the leases are renewed; a silent link is dropped after
        # at least two seconds (a PING waits behind the messages on their way).
        self.subscription = Subscription(self.redis.link, self.channel, heard, subscribed,
                                         keepalive=self.config.lease / 3,
                                         timeout=max(2.0, 2 * self.timeout),
                                         clock=self.clock, watch=self.redis.watch)

    def hold(self, kind: str, key: str, value: str) -> None:
        """Renew this lease until :meth:`drop`."""
        self.leases[(key, value)] = kind

    def drop(self, key: str, value: str) -> None:
        self.leases.pop((key, value), None)

    # -- the service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.log.info("cluster: this node is {instance} on the Redis at {redis} (keys "
                      "{prefix}*)", instance=self.instance, redis=self.config.redis,
                      prefix=self.prefix)
        if self.subscription is not None:
            self.subscription.start()
        self._loop = task.LoopingCall(self.renew)
        self._loop.clock = self.clock
        self._loop.start(self.config.lease / 3, now=False).addErrback(
            lambda failure: self.log.failure("lease renewal stopped", failure))

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        # Whatever the sessions did not let go of (they are closed by now).
        for batch in self._batches():
            d = self.ask(RELEASE_SCRIPT, [key for key, _, _ in batch],
                         ["0", *[part for _, kind, value in batch for part in (kind, value)]])
            d.addTimeout(self.timeout, self.clock)
            try:
                yield d
            except Exception as exc:
                self.log.warn("could not let go of this node's leases ({error}); they "
                              "expire by themselves", error=str(exc) or type(exc).__name__)
                break
        self.leases.clear()
        if self.subscription is not None:
            yield self.subscription.stop()
        yield self.redis.disconnect()

    def _batches(self) -> list[list[tuple[str, str, str]]]:
        items = [(key, kind, value) for (key, value), kind in self.leases.items()]
        return [items[start:start + RENEW_BATCH] for start in range(0, len(items), RENEW_BATCH)]

    def renew(self) -> Deferred[Any]:
        """Renew every lease of this node (every third of the lease), after a PING:
        a connection that does not answer it is dropped, and the next question
        makes a new one.  (A question given up is cancelled, and with it
        txredisapi's own deadline, which would have dropped it.)"""
        ping = self.ask("return redis.call('PING')", [], [])
        ping.addTimeout(self.timeout, self.clock)
        ping.addCallbacks(self._answered, self._silent)
        asked = [ping]
        for batch in self._batches():
            d = self._renewals.ask(
                self.ask(RENEW_SCRIPT, [key for key, _, _ in batch],
                         [str(self.lease_ms),
                          *[part for _, kind, value in batch for part in (kind, value)]]),
                lambda: [])
            d.addCallback(self._lost)
            asked.append(d)
        return defer.gatherResults(asked, consumeErrors=True)

    def _answered(self, _: Any) -> None:
        self._silence_said = False

    def _silent(self, failure: Failure) -> None:
        if not self._silence_said:
            self._silence_said = True
            error = (f"no answer within {self.timeout:g}s"
                     if failure.check(defer.TimeoutError) else failure.getErrorMessage())
            self.log.warn("Redis: no answer to PING ({error}); connecting again until it "
                          "answers", error=error)
        self.redis.disconnect().addErrback(lambda _: None)

    def _lost(self, keys: Any) -> None:
        for key in keys or ():
            key = key.decode() if isinstance(key, bytes) else str(key)
            self.log.error("{key} was taken by another node while this node could not "
                           "renew it (Redis was away longer than the lease)", key=key)

    @defer.inlineCallbacks
    def check(self) -> Any:
        """For /readyz: "ok", or what is wrong with Redis."""
        d = self.ask("return redis.call('PING')", [], [])
        d.addTimeout(self.timeout, self.clock)
        try:
            yield d
        except defer.TimeoutError:
            # Why it does not answer, when a connection said it (a certificate not
            # trusted, a refused password, a refused connection).
            trouble = self.redis.trouble
            return f"no answer within {self.timeout:g}s" + (f" ({trouble})" if trouble
                                                            else "")
        except Exception as exc:
            return f"failed: {str(exc) or type(exc).__name__}"
        if self.subscription is not None and not self.subscription.listening:
            trouble = self.redis.trouble
            return "not subscribed to the change channel" + (f" ({trouble})" if trouble
                                                              else "")
        return "ok"
