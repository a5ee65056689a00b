"""What a check keeps about a session from one step to the next.

A transaction's :class:`~lightmail.policy.inbound.findings.Findings` live from MAIL
FROM to the end of its content; the connect step's only for that step.  A check that
starts something at connect and decides later (a DNS lookup started before the
greeting, looked at by RCPT TO, as Postfix's smtpd_delay_reject does) keeps it in a
:class:`SessionMemo`, and lets go of it at the chain's ``session_ended`` step.  The
memo also forgets a session when the session object goes away: a connect step still
running when its client vanished (session_ended came first), or an embedder's
handler that never says a session ended, does not leave an entry behind for good.
:class:`Shared` is what such a check keeps: the result of a lookup that several
steps may wait for.
"""

from __future__ import annotations

import weakref
from typing import Any, Generic, Optional, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred

T = TypeVar("T")


class SessionMemo(Generic[T]):
    """One value per session object (sessions are compared by identity: they are
    mutable dataclasses, hence not hashable)."""

    def __init__(self) -> None:
        self._values: dict[int, T] = {}

    def get(self, session: Any) -> Optional[T]:
        return self._values.get(id(session))

    def set(self, session: Any, value: T) -> T:
        key = id(session)
        if key not in self._values:
            # The entry goes with the session; an id is reused only after that.
            weakref.finalize(session, self._values.pop, key, None)
        self._values[key] = value
        return value

    def forget(self, session: Any) -> None:
        self._values.pop(id(session), None)

    def __len__(self) -> int:
        return len(self._values)


class Shared(Generic[T]):
    """The result of a Deferred that never fails (a lookup), which any number of
    steps may wait for (a Deferred hands its result down one chain only)."""

    def __init__(self, d: Deferred[T]) -> None:
        self.done = False
        self.result: Any = None
        self._waiting: list[Deferred[T]] = []
        d.addCallback(self._fire)

    def _fire(self, result: T) -> None:
        self.done, self.result = True, result
        waiting, self._waiting = self._waiting, []
        for one in waiting:
            one.callback(result)

    def wait(self) -> Deferred[T]:
        if self.done:
            return defer.succeed(self.result)
        d: Deferred[T] = Deferred()
        self._waiting.append(d)
        return d
