"""Rate limits (token buckets) for the inbound chain and the sessions: per client
address and network, per authenticated user, per sender and recipient domain.

``buckets.py`` holds the buckets (in this process, or shared in Redis);
``check.py`` is the inbound chain's ``limits`` check that spends them.
"""

from lightmail.policy.limits.buckets import (
    FallingBackBuckets,
    IRateLimiter,
    LazyRedis,
    LocalBuckets,
    RedisBuckets,
)

__all__ = ["FallingBackBuckets", "IRateLimiter", "LazyRedis", "LocalBuckets",
           "RedisBuckets"]
