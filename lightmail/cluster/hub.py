"""The IMAP hub of a node of a cluster: what the node's sessions share with the other
nodes' through Redis.

* Changes: each change committed on this node (by any of its processes) is published
  on the change channel in a compact form (who, which mailbox, what kind, its MODSEQ;
  never the messages), and each change another node published is passed to this
  node's sessions as a change without content, so that they read the mailbox from
  the store (PostgreSQL is the truth; Redis only says where to look).  Each time
  the subscription is in place again, every selected mailbox of the node is read
  again (a change published while it was away is not lost: it is in the store), and
  the changes this node could not publish meanwhile are published.
* \\Recent (RFC 3501 §2.3.2): the first UID still recent of each mailbox is a key,
  updated by the same script that publishes the change, so that a session that
  hears of a change anywhere finds the mark moved already.
* Sessions per user (``[imap] max_connections_per_user``): a sorted set per user of
  the sessions' marks, each expiring ``[cluster] lease`` after its node last renewed
  it.

While Redis does not answer, each node counts its own sessions and keeps its own
\\Recent marks (as a node alone does), its sessions hear of its own changes only, and
the log says so once.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.cluster.node import MARK, Node
from lightmail.cluster.redis import SharedBackend
from lightmail.imap.hub import MailboxHub
from lightmail.storage.interfaces import ANY_MAILBOX, MISSED, MailboxChange

log = Logger(namespace="lightmail.cluster")

# How long a mailbox's \Recent mark is kept after its last change or claim: one
# untouched longer is forgotten (as a restart forgets it on a node alone).
RECENT_TTL = 30 * 86400

# At most this many changes are kept while they cannot be published; past it, every
# node reads every selected mailbox again when Redis is back.
UNSENT_MAX = 10_000

# KEYS[1] the mailbox's \Recent mark; ARGV channel, payload, kind, first UID appended,
# the mark's TTL (s).  The mark moves and the change is published in one step.
PUBLISH_SCRIPT = """
local kind, first, ttl = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
if kind == 'created' then
  redis.call('SET', KEYS[1], 1, 'EX', ttl)
elseif kind == 'deleted' then
  redis.call('DEL', KEYS[1])
elseif kind == 'appended' and first > 0 then
  if not redis.call('SET', KEYS[1], first, 'NX', 'EX', ttl) then
    redis.call('EXPIRE', KEYS[1], ttl)
  end
end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"""

# KEYS[1] the mark; ARGV uidnext, claim (1) or peek (0), TTL.  The first recent UID.
RECENT_SCRIPT = """
local uidnext, ttl = tonumber(ARGV[1]), tonumber(ARGV[3])
local first = tonumber(redis.call('GET', KEYS[1]) or uidnext)
local mark = first
if ARGV[2] == '1' then mark = math.max(first, uidnext) end
redis.call('SET', KEYS[1], mark, 'EX', ttl)
return first
"""

# KEYS[1] the user's sessions; ARGV limit, this session's mark, lease (ms).  1 if it
# is counted, 0 if the user has ``limit`` sessions already.
LOGIN_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

LOGOUT_SCRIPT = "return redis.call('ZREM', KEYS[1], ARGV[1])"

_LOCAL = object()       # an answer given by this node alone (Redis did not answer)


class ClusterHub(MailboxHub):
    # Other nodes' changes come after their commit: NOOP and CHECK read the store.
    announced_late = True

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node
        node.listen(self.heard, self.subscribed)
        self.marks: dict[int, list[str]] = {}       # user -> this node's marks in Redis
        self.local_sessions: Counter[int] = Counter()   # counted here, Redis away
        self.unsent: dict[int, bytes] = {}           # mailbox -> its last unsent change
        self.unsent_overflow = False
        timeout = node.timeout
        self.changes = SharedBackend("mailbox changes", "other nodes' sessions see this "
                                     "node's changes when they read the mailbox again",
                                     timeout, node.clock)
        self.sessions = SharedBackend("IMAP sessions per user", "each node counts its "
                                      "own", timeout, node.clock)
        self.recent = SharedBackend("\\Recent", "each node keeps its own", timeout,
                                    node.clock)

    # -- changes -------------------------------------------------------------------

    def mailbox_changed(self, change: MailboxChange) -> None:
        """A change committed on this node: published first, then told to this
        process's sessions (whose \\Recent claims follow it on the one connection)."""
        payload = self._encode(change)
        first = min(change.uids) if change.kind == "appended" and change.uids else 0
        self._publish(change.mailbox_id, payload, change.kind, first)
        super().mailbox_changed(change)

    def _encode(self, change: MailboxChange) -> bytes:
        return json.dumps({"o": self.node.instance, "u": change.user_id,
                           "m": change.mailbox_id, "k": change.kind, "s": change.modseq},
                          separators=(",", ":")).encode()

    def _publish(self, mailbox_id: int, payload: bytes, kind: str, first: int) -> None:
        question = self.node.ask(
            PUBLISH_SCRIPT, [self.node.key(f"recent:{mailbox_id}")],
            [self.node.channel, payload.decode(), kind, str(first), str(RECENT_TTL)])
        d = self.changes.ask(question, lambda: _LOCAL)

        def published(answer: Any) -> None:
            if answer is _LOCAL:
                self._keep_unsent(mailbox_id, payload)
            elif self.unsent or self.unsent_overflow:
                self._publish_unsent()
        d.addCallback(published)

    def _keep_unsent(self, mailbox_id: int, payload: bytes) -> None:
        if mailbox_id in self.unsent or len(self.unsent) < UNSENT_MAX:
            self.unsent[mailbox_id] = payload
        else:
            self.unsent_overflow = True

    def _publish_unsent(self) -> None:
        """Publish again what could not be (one change a mailbox says enough: whoever
        hears it reads the mailbox); too many to keep: every mailbox is read again."""
        unsent, self.unsent = self.unsent, {}
        if self.unsent_overflow:
            self.unsent_overflow = False
            unsent = {ANY_MAILBOX: self._encode(MailboxChange(0, ANY_MAILBOX, MISSED))}
        for mailbox_id, payload in unsent.items():
            self._publish(mailbox_id, payload, MISSED, 0)

    def heard(self, payload: bytes) -> None:
        """A message on the change channel: another node's change, told to this node's
        sessions (and its workers') as one without content."""
        try:
            data = json.loads(payload)
            origin = str(data["o"])
            change = MailboxChange(int(data["u"]), int(data["m"]), str(data["k"]),
                                   modseq=int(data["s"]))
        except (ValueError, KeyError, TypeError):
            log.warn("not a mailbox change on {channel}: {payload!r}",
                     channel=self.node.channel, payload=payload[:200])
            return
        if origin == self.node.instance:
            return                              # this node's own, told already
        self._tell_node(change)

    def subscribed(self) -> None:
        """The subscription is in place (again): changes published while it was not
        are read from the store, by every selected mailbox's session."""
        self._tell_node(MailboxChange(0, ANY_MAILBOX, MISSED))
        if self.unsent or self.unsent_overflow:
            self._publish_unsent()

    def _tell_node(self, change: MailboxChange) -> None:
        super().mailbox_changed(change)
        for relay in self.relays:
            relay.mailbox_changed(change)

    # -- \Recent -------------------------------------------------------------------

    def peek_recent(self, mailbox_id: int, uidnext: int) -> Deferred[int]:
        return self._recent(mailbox_id, uidnext, False)

    def claim_recent(self, mailbox_id: int, uidnext: int) -> Deferred[int]:
        return self._recent(mailbox_id, uidnext, True)

    def _recent(self, mailbox_id: int, uidnext: int, claim: bool) -> Deferred[int]:
        question = self.node.ask(RECENT_SCRIPT, [self.node.key(f"recent:{mailbox_id}")],
                                 [str(uidnext), "1" if claim else "0", str(RECENT_TTL)])

        def alone() -> int:
            return (self.claim_recent_now(mailbox_id, uidnext) if claim
                    else self.peek_recent_now(mailbox_id, uidnext))
        return self.recent.ask(question, alone).addCallback(int)

    # -- sessions per user ---------------------------------------------------------

    def _sessions_key(self, user_id: int) -> str:
        return self.node.key(f"imap:sessions:{user_id}")

    def login(self, user_id: int, limit: int) -> Deferred[bool]:
        key, mark = self._sessions_key(user_id), self.node.token()
        question = self.node.ask(LOGIN_SCRIPT, [key],
                                 [str(limit), mark, str(self.node.lease_ms)])

        def counted(answer: Any) -> bool:
            if answer is _LOCAL:
                if not self.login_now(user_id, limit):
                    return False
                self.local_sessions[user_id] += 1
                return True
            if not int(answer):
                return False
            self.marks.setdefault(user_id, []).append(mark)
            self.node.hold(MARK, key, mark)
            return True
        return self.sessions.ask(question, lambda: _LOCAL).addCallback(counted)

    def logout(self, user_id: int) -> None:
        if self.local_sessions[user_id] > 0:
            self.local_sessions[user_id] -= 1
            if not self.local_sessions[user_id]:
                del self.local_sessions[user_id]
            self.logout_now(user_id)
            return
        marks: Optional[list[str]] = self.marks.get(user_id)
        if not marks:
            return
        mark = marks.pop()
        if not marks:
            del self.marks[user_id]
        key = self._sessions_key(user_id)
        self.node.drop(key, mark)
        # Not answered: a mark left behind expires with its lease.
        self.sessions.ask(self.node.ask(LOGOUT_SCRIPT, [key], [mark]), lambda: None)
