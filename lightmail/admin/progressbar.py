"""A progress line for the long ``lightmail`` commands, on standard error, and only
when that is a terminal: piped or captured output (scripts, ``--json``, logs) never
gets the carriage returns."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 30
_REDRAW = 0.1           # seconds between redraws: a fast loop costs no terminal writes


class Progress:
    """``label: done/total [=====>    ] 41% 120/s``; ``total`` None: a count only."""

    def __init__(self, label: str, total: int | None = None,
                 stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.shown = self.stream.isatty()
        self.label = label
        self.total = total
        self.done = 0
        self._start = time.monotonic()
        self._drawn = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.shown and now - self._drawn >= _REDRAW:
            self._drawn = now
            self._draw(now)

    def clear(self) -> None:
        """Take the line away (before other output); the next advance draws it again."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = 0.0

    def close(self) -> None:
        """The final state, and the line ended."""
        if self.shown:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self._start, 1e-6)
        if self.total:
            share = min(self.done / self.total, 1.0)
            filled = int(share * _WIDTH)
            bar = "=" * filled + (">" if filled < _WIDTH else "") + " " * (_WIDTH - filled - 1)
            text = (f"{self.label}: {self.done}/{self.total} [{bar[:_WIDTH]}] "
                    f"{share:4.0%} {rate:,.0f}/s")
        else:
            text = f"{self.label}: {self.done} {rate:,.0f}/s"
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
