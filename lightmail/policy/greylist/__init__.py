"""Greylisting: the first attempt of a (client network, sender, recipient) triplet
is deferred, a retry after a delay passes (as Postgrey and milter-greylist do).

``store.py`` holds the rules, the interface of the stores and the SQL store (and the
fallback while Redis is away); ``redisstore.py`` the Redis store; ``memory.py`` the
process's memory of the passes, in front of either; ``check.py`` the inbound
chain's ``greylist`` check.
"""

from lightmail.policy.greylist.memory import RememberedPasses
from lightmail.policy.greylist.redisstore import RedisGreylist
from lightmail.policy.greylist.store import (
    FallingBackGreylist,
    Greylist,
    IGreylistStore,
    Rules,
    SQLGreylist,
    Triplet,
    Verdict,
)

__all__ = ["FallingBackGreylist", "Greylist", "IGreylistStore", "RedisGreylist",
           "RememberedPasses", "Rules", "SQLGreylist", "Triplet", "Verdict"]
