"""The login guard's failure counts in Redis (``[cluster] redis``), so that a guesser
who spreads its tries over the processes and nodes of a cluster meets one count.

Each key (a client network, an account) is a sorted set of its failures' times under
``PREFIX auth:fail:``, trimmed to the window by the script that counts it and
expiring a window after the last failure; Redis's clock is the one used.  While
Redis does not answer, each process counts alone (as a node alone does), and the
log says so once.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from lightmail.cluster.redis import LazyRedis, SharedBackend
from lightmail.directory.logins import IFailureCounts, LocalFailureCounts

# KEYS[1] the key's failures; ARGV window (ms), a new failure's name (empty: count
# only), the most kept.  The count within the window, after the new one.
COUNT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
if ARGV[2] == '' then
  return redis.call('ZCOUNT', KEYS[1], now - window, '+inf')
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -1 - tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], window)
return redis.call('ZCARD', KEYS[1])
"""

CLEAR_SCRIPT = "return redis.call('DEL', KEYS[1])"


@implementer(IFailureCounts)
class SharedFailureCounts:
    """Failures in Redis within ``window`` seconds, at most ``per_key`` a key; this
    process's ``fallback`` counts while Redis is away."""

    def __init__(self, redis: LazyRedis, prefix: str, window: float,
                 fallback: LocalFailureCounts, timeout: float = 0.5,
                 per_key: int = 1000, clock: Any = None) -> None:
        self.redis = redis
        self.prefix = prefix + "auth:fail:"
        self.window_ms = str(int(window * 1000))
        self.fallback = fallback
        self.per_key = str(per_key)
        self.backend = SharedBackend("login failure counts", "each process counts its own",
                                     timeout, clock)

    def count(self, key: str) -> Deferred[int]:
        question = self.redis.eval(COUNT_SCRIPT, [self.prefix + key],
                                   [self.window_ms, "", self.per_key])
        return self.backend.ask(question, lambda: self.fallback.count_now(key)) \
            .addCallback(int)

    def add(self, key: str) -> Deferred[int]:
        question = self.redis.eval(COUNT_SCRIPT, [self.prefix + key],
                                   [self.window_ms, secrets.token_hex(8), self.per_key])
        return self.backend.ask(question, lambda: self.fallback.add_now(key)) \
            .addCallback(int)

    def clear(self, key: str) -> None:
        self.fallback.clear(key)
        self.backend.ask(self.redis.eval(CLEAR_SCRIPT, [self.prefix + key], []),
                         lambda: None)
