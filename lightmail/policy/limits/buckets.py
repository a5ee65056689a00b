"""Token buckets behind one interface: in this process, or in Redis so that several
processes and nodes share them.

A bucket holds up to ``burst`` tokens and gains ``rate`` a second; taking ``cost``
tokens succeeds when it holds that many.  :meth:`IRateLimiter.take` answers 0.0
when they were taken, else the seconds until they would be there (the bucket is
left as it was: a refused client does not dig itself deeper).  :meth:`IRateLimiter.peek`
answers the same question without taking anything (a client refused at connect for its
failed commands does not spend a token by asking again).

* :class:`LocalBuckets`: a dict in this process, bounded (the least recently used
  buckets go first; a forgotten bucket is a full one, which errs on the side of the
  client).
* :class:`RedisBuckets`: one Redis hash a bucket, updated by a Lua script so that
  concurrent takers never both spend the last token; keys expire once the bucket
  would be full again.  Redis's clock (``TIME``) is the one used, so nodes with
  skewed clocks agree.
* :class:`FallingBackBuckets`: Redis, and while it does not answer (within
  ``timeout``), the configured fallback (local buckets, or no limit); the switch is
  logged once each way, not per message.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

# The Redis connection and the fallback's log are shared with the other users of Redis.
from lightmail.cluster.redis import LazyRedis, SharedBackend

__all__ = ["FallingBackBuckets", "IRateLimiter", "LazyRedis", "LocalBuckets",
           "RedisBuckets", "SharedBackend"]

log = Logger(namespace="lightmail.limits")


class IRateLimiter(Interface):
    def take(key: str, rate: float, burst: float, cost: float = 1.0) -> Deferred[float]:
        """Take ``cost`` tokens from the bucket ``key`` (``rate`` tokens a second, at
        most ``burst``): 0.0 when taken, else the seconds to wait.  Never fails."""

    def peek(key: str, rate: float, burst: float, cost: float = 1.0) -> Deferred[float]:
        """What :meth:`take` would answer, taking nothing.  Never fails."""


@implementer(IRateLimiter)
class LocalBuckets:
    """Buckets in this process's memory, at most ``max_buckets`` of them."""

    def __init__(self, max_buckets: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_buckets = max_buckets
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, rate: float, burst: float, cost: float = 1.0
             ) -> Deferred[float]:
        return defer.succeed(self.take_now(key, rate, burst, cost))

    def take_now(self, key: str, rate: float, burst: float, cost: float = 1.0) -> float:
        now = self.clock()
        tokens, then = self._buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        wait = 0.0
        if tokens >= cost:
            tokens -= cost
        else:
            wait = (cost - tokens) / rate if rate > 0 else float("inf")
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return wait

    def peek(self, key: str, rate: float, burst: float, cost: float = 1.0
             ) -> Deferred[float]:
        return defer.succeed(self.peek_now(key, rate, burst, cost))

    def peek_now(self, key: str, rate: float, burst: float, cost: float = 1.0) -> float:
        state = self._buckets.get(key)
        if state is None:
            return 0.0              # a bucket never used (or forgotten) is full
        tokens, then = state
        tokens = min(burst, tokens + (self.clock() - then) * rate)
        if tokens >= cost:
            return 0.0
        return (cost - tokens) / rate if rate > 0 else float("inf")


# KEYS[1] the bucket; ARGV rate, burst, cost.  Returns the wait in microseconds as an
# integer (Lua numbers become Redis integers).
TAKE_SCRIPT = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil then tokens, at = burst, t end
tokens = math.min(burst, tokens + (t - at) * rate)
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
elseif rate > 0 then
  wait = (cost - tokens) / rate
else
  wait = 86400
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(t))
local full = 60
if rate > 0 then full = math.ceil((burst - tokens) / rate) + 1 end
redis.call('EXPIRE', KEYS[1], full)
return math.floor(wait * 1000000)
"""

# The same reckoning, read-only (a bucket that is not there is full).
PEEK_SCRIPT = """
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil then return 0 end
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
tokens = math.min(burst, tokens + (t - at) * rate)
if tokens >= cost then return 0 end
if rate > 0 then return math.floor((cost - tokens) / rate * 1000000) end
return 86400000000
"""


@implementer(IRateLimiter)
class RedisBuckets:
    """Buckets in Redis (txredisapi), under ``prefix``."""

    def __init__(self, redis: Any, prefix: str = "lightmail:limit:") -> None:
        self.redis = redis
        self.prefix = prefix

    def take(self, key: str, rate: float, burst: float, cost: float = 1.0
             ) -> Deferred[float]:
        return self._run(TAKE_SCRIPT, key, rate, burst, cost)

    def peek(self, key: str, rate: float, burst: float, cost: float = 1.0
             ) -> Deferred[float]:
        return self._run(PEEK_SCRIPT, key, rate, burst, cost)

    def _run(self, script: str, key: str, rate: float, burst: float, cost: float
             ) -> Deferred[float]:
        d: Deferred[Any] = self.redis.eval(script, keys=[self.prefix + key],
                                           args=[repr(rate), repr(burst), repr(cost)])
        return d.addCallback(lambda micros: int(micros) / 1_000_000)


@implementer(IRateLimiter)
class FallingBackBuckets:
    """``primary`` (Redis), or ``fallback`` (None: no limit) while it fails or takes
    longer than ``timeout`` seconds."""

    def __init__(self, primary: IRateLimiter, fallback: Optional[IRateLimiter],
                 timeout: float = 0.5, clock: Any = None) -> None:
        self.primary = primary
        self.fallback = fallback
        self.backend = SharedBackend(
            "rate limits", "limits of this process alone" if fallback else "no limits",
            timeout, clock)

    def take(self, key: str, rate: float, burst: float, cost: float = 1.0
             ) -> Deferred[float]:
        return self._ask("take", key, rate, burst, cost)

    def peek(self, key: str, rate: float, burst: float, cost: float = 1.0
             ) -> Deferred[float]:
        return self._ask("peek", key, rate, burst, cost)

    def _ask(self, what: str, key: str, rate: float, burst: float, cost: float
             ) -> Deferred[float]:
        primary = self.primary.take if what == "take" else self.primary.peek

        def fallback() -> Any:
            if self.fallback is None:
                return 0.0
            ask = self.fallback.take if what == "take" else self.fallback.peek
            return ask(key, rate, burst, cost)
        return self.backend.ask(primary(key, rate, burst, cost), fallback)
