"""The Redis store of greylisting: a hash per triplet and per client network, under
``lightmail:greylist:``, decided by one Lua script an attempt (atomic: two nodes
that see the same retry at once count it once).

The decision reads the times the caller gives, as the SQL store does (see
store.py); the keys' TTLs only make Redis forget what has expired (the
unconfirmed expiry for a new triplet, the confirmed expiry for one that passed
and for a network), so Redis needs no cleaning.  The connection is the limits'
kind (lightmail.policy.limits.LazyRedis: made at the first attempt).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from lightmail.policy.greylist.store import (
    REFRESH,
    IGreylistStore,
    Rules,
    Triplet,
    Verdict,
    fresh_until,
)

# KEYS[1] the triplet, KEYS[2] the network; ARGV now (ms), delay, unconfirmed and
# confirmed expiry (s), auto_allow, refresh (s).  Returns {wait in ms, why}, and for
# a pass the entry's last_seen (ms) as it stands after the attempt.
ATTEMPT_SCRIPT = """
local now = tonumber(ARGV[1])
local delay, unconfirmed, confirmed = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local auto, refresh = tonumber(ARGV[5]), tonumber(ARGV[6]) * 1000
local function keep(key, seconds)
  redis.call('EXPIRE', key, math.max(1, math.ceil(seconds)))
end
if auto > 0 then
  local net = redis.call('HMGET', KEYS[2], 'passes', 'seen')
  local passes, seen = tonumber(net[1]), tonumber(net[2])
  if passes and passes >= auto and now - seen <= confirmed * 1000 then
    if now - seen > refresh then
      redis.call('HSET', KEYS[2], 'seen', ARGV[1])
      keep(KEYS[2], confirmed)
      seen = now
    end
    return {0, 'auto-allowed', seen}
  end
end
local row = redis.call('HMGET', KEYS[1], 'first', 'seen', 'passed')
local first, seen, passed = tonumber(row[1]), tonumber(row[2]), row[3] == '1'
if first and passed and now - seen <= confirmed * 1000 then
  if now - seen > refresh then
    redis.call('HSET', KEYS[1], 'seen', ARGV[1])
    keep(KEYS[1], confirmed)
    seen = now
  end
  return {0, 'known', seen}
end
if first == nil or passed or (now - first) / 1000 > unconfirmed then
  redis.call('HSET', KEYS[1], 'first', ARGV[1], 'seen', ARGV[1], 'passed', '0')
  keep(KEYS[1], unconfirmed)
  return {math.floor(delay * 1000), 'new'}
end
local elapsed = (now - first) / 1000
if elapsed < delay then
  return {math.ceil((delay - elapsed) * 1000), 'early'}
end
redis.call('HSET', KEYS[1], 'seen', ARGV[1], 'passed', '1')
keep(KEYS[1], confirmed)
if auto > 0 then
  redis.call('HINCRBY', KEYS[2], 'passes', 1)
  redis.call('HSET', KEYS[2], 'seen', ARGV[1])
  keep(KEYS[2], confirmed)
end
return {0, 'retried', now}
"""


@implementer(IGreylistStore)
class RedisGreylist:
    """Triplets in Redis (txredisapi through LazyRedis), under ``prefix``."""

    def __init__(self, redis: Any, prefix: str = "lightmail:greylist:") -> None:
        self.redis = redis
        self.prefix = prefix

    def attempt(self, triplet: Triplet, now: float, rules: Rules) -> Deferred[Verdict]:
        d: Deferred[Any] = self.redis.eval(
            ATTEMPT_SCRIPT,
            keys=[f"{self.prefix}t:{triplet.key}", f"{self.prefix}n:{triplet.network}"],
            args=[str(int(now * 1000)), repr(rules.delay), repr(rules.unconfirmed_expiry),
                  repr(rules.confirmed_expiry), str(rules.auto_allow), repr(REFRESH)])

        def verdict(reply: Any) -> Verdict:
            wait, why, *seen = reply
            why = why.decode() if isinstance(why, bytes) else str(why)
            return Verdict(int(wait) / 1000, why,
                           fresh_until(int(seen[0]), rules) if seen else 0.0)
        return d.addCallback(verdict)
