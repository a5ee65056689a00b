"""One session's command rate (``[limits] imap_commands``, ``pop3_commands``): a
session over it is slowed, not refused, and one that keeps far over it is closed.

The rate is kept by GCRA (the generic cell rate algorithm, a token bucket told as the
time each command is due): ``N/DURATION`` lets N commands through at once, then one
each DURATION/N.  :meth:`CommandRate.delay` charges a command and says how long it
waits; the session stops reading its connection meanwhile, so a client that pipelines
gets its answers at the rate, and one that waits for each answer simply sees slower
answers.  Nothing here does I/O or keeps a timer: the session does the waiting.

Far over: the same reckoning at ``command_overrun`` times the rate (and burst), on
the session's own time, that is its time minus the waits it was made to do.  A client
that waits for each answer and asks at once for the next, or one that pipelines, has
wanted much more than it got; once that is ``command_overrun`` times the rate for
longer than the burst covers, :meth:`CommandRate.far_over` says so and the session
closes.  A client a little over the rate is only ever slowed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

from lightmail.policy.limits.check import period_words


class CommandRate:
    """GCRA for ``count`` commands per ``period`` seconds, and its far-over twin.
    ``limit``: the option's name, for the log."""

    def __init__(self, limit: str, count: int, period: float, overrun: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.count, self.period = limit, count, period
        self.interval = period / count
        self.tolerance = (count - 1) * self.interval
        self.overrun = overrun
        self.clock = clock
        self.due = 0.0              # when the next command is due at the rate
        self.wanted_due = 0.0       # the same at overrun times it, on the session's time
        self.waited = 0.0           # seconds the session was made to wait in all
        self.slowed = 0             # commands that had to wait

    def delay(self) -> float:
        """Charge one command: the seconds it waits (0.0: it runs now)."""
        now = self.clock()
        due = max(self.due, now)
        wait = max(0.0, due - self.tolerance - now)
        self.due = due + self.interval
        own = now - self.waited                 # the session's time, waits left out
        self.wanted_due = max(self.wanted_due, own) + self.interval / self.overrun
        if wait > 0:
            self.waited += wait
            self.slowed += 1
        return wait

    def far_over(self) -> bool:
        """The session has wanted ``overrun`` times the rate for longer than a burst
        of ``overrun`` times N covers (GCRA at the overrun rate, whose burst of
        overrun times N commands spans one period: N intervals)."""
        own = self.clock() - self.waited
        return self.wanted_due - own > self.tolerance + self.interval

    def sentence(self) -> str:
        """What a session closed for it is told."""
        return (f"Too many commands: at most {self.count} per "
                f"{period_words(self.period)} in one session")

    def tell(self, log: Any, peer: str, closing: bool) -> None:
        """The session's one event (``event=rate_limited``): when it is first slowed,
        and when it is closed."""
        if closing:
            log.warn("rate limit {limit} far exceeded by {peer} after {slowed} commands "
                     "were slowed: closing the session", event="rate_limited",
                     limit=self.limit, subject=peer, peer=peer, slowed=self.slowed,
                     action="closed")
        elif self.slowed == 1:
            log.info("rate limit {limit} reached by {peer}: commands slowed to {count} "
                     "per {period}", event="rate_limited", limit=self.limit, subject=peer,
                     peer=peer, count=self.count, period=period_words(self.period),
                     action="slowed")


def command_rate(limit: str, rate: Optional[tuple[int, float]], overrun: int
                 ) -> Optional[CommandRate]:
    """The CommandRate of a new session (None: ``rate`` is no limit)."""
    if rate is None:
        return None
    return CommandRate(limit, rate[0], rate[1], overrun)
