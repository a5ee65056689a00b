"""POP3 maildrop locks (RFC 1939 §8's exclusive access) held in Redis, so that they hold
across the nodes of a cluster.

A lock is a key holding its session's token, set only when absent (``SET NX PX``) and
expiring ``[cluster] lease`` after its node last renewed it (lightmail.cluster.node):
a node that dies frees its users' maildrops by itself.  It is let go of by
compare-and-delete, so a session never frees a lock that is no longer its own.
LOGIN-DELAY (RFC 2449) is a key that lives for the delay after each login.

While Redis does not answer nobody can tell whether a maildrop is free: a login is
refused with ``-ERR [SYS/TEMP]`` rather than risk two sessions on one maildrop.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from lightmail.cluster.node import LOCK, Node
from lightmail.cluster.redis import SharedBackend
from lightmail.pop3.maildrop import Locks, LockUnavailable, LoginTooSoon, MaildropLocked

# KEYS[1] the lock, KEYS[2] the last login's mark; ARGV token, lease (ms), login delay
# (ms, 0: none).
ACQUIRE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'locked' end
local delay = tonumber(ARGV[3])
if delay > 0 and redis.call('EXISTS', KEYS[2]) == 1 then return 'soon' end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if delay > 0 then redis.call('SET', KEYS[2], '1', 'PX', delay) end
return 'ok'
"""

RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ClusterLocks(Locks):
    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node
        self.tokens: dict[int, str] = {}        # user -> this node's token
        self.backend = SharedBackend("POP3 maildrop locks", "POP3 logins are refused",
                                     node.timeout, node.clock)

    def _keys(self, user_id: int) -> list[str]:
        return [self.node.key(f"pop3:lock:{user_id}"), self.node.key(f"pop3:login:{user_id}")]

    def acquire(self, user_id: int, login_delay: float) -> defer.Deferred[None]:
        keys, token = self._keys(user_id), self.node.token()
        question = self.node.ask(ACQUIRE_SCRIPT, keys,
                                 [token, str(self.node.lease_ms), str(int(login_delay * 1000))])

        def unavailable() -> Any:
            raise LockUnavailable()

        def answered(answer: Any) -> None:
            answer = answer.decode() if isinstance(answer, bytes) else str(answer)
            if answer == "locked":
                raise MaildropLocked()
            if answer == "soon":
                raise LoginTooSoon()
            self.tokens[user_id] = token
            self.node.hold(LOCK, keys[0], token)
        return self.backend.ask(question, unavailable).addCallback(answered)

    def release(self, user_id: int) -> defer.Deferred[None]:
        token = self.tokens.pop(user_id, None)
        if token is None:
            return defer.succeed(None)
        key = self._keys(user_id)[0]
        self.node.drop(key, token)
        d = self.node.ask(RELEASE_SCRIPT, [key], [token])
        d.addTimeout(self.node.timeout, self.node.clock)

        def failed(failure: Failure) -> None:
            # Not renewed any more: it expires with its lease.
            self.node.log.warn("could not free the POP3 lock {key} ({error}); it "
                               "expires by itself", key=key,
                               error=failure.getErrorMessage())
        return d.addCallbacks(lambda _: None, failed)
