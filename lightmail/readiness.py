"""A service's one-time outcome (ready, or failed), told to any number of callers."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


class Readiness:
    """Until :meth:`settle` is called, :meth:`wait` gives Deferreds that wait; then
    each fires at once with that outcome.  Each caller gets a Deferred of its own, so
    that one caller's callbacks (an errback that handles the failure, say) never
    change what the next caller sees."""

    def __init__(self) -> None:
        self._outcome: Any = None          # None until settled: then True or a Failure
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._outcome is None:
            self._waiters.append(d)
        else:
            self._fire(d)
        return d

    def settle(self, outcome: Any) -> None:
        """``True`` (ready) or the Failure; the waiters are told now."""
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self._fire(d)

    def _fire(self, d: Deferred[None]) -> None:
        if self._outcome is True:
            d.callback(None)
        else:
            d.errback(self._outcome)
