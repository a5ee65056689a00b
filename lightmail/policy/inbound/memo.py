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
from functools import partial
from typing import Any, Generic, Optional, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred

T = TypeVar("T")


class SessionMemo(Generic[T]):
    """One value per session object (sessions are compared by identity: they are
    mutable dataclasses, hence not hashable)."""

    def __init__(self) -> None:
        # By the session's id: the value, and a weak reference to the session whose
        # callback drops the entry when the session goes away (an id is reused only
        # after that).  A weak reference costs a quarter of a weakref.finalize (whose
        # registry outlives the entry), and dies with the entry that holds it.
        self._values: dict[int, tuple[weakref.ref[Any], T]] = {}

    def get(self, session: Any) -> Optional[T]:
        kept = self._values.get(id(session))
        return kept[1] if kept is not None else None

    def set(self, session: Any, value: T) -> T:
        key = id(session)
        kept = self._values.get(key)
        gone = kept[0] if kept is not None else weakref.ref(session,
                                                            partial(self._drop, key))
        self._values[key] = (gone, value)
        return value

    def _drop(self, key: int, _gone: Any) -> None:
        self._values.pop(key, None)

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
