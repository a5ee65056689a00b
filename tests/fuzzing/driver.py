"""Hypothesis on one side, the reactor on the other.

Hypothesis runs in a thread of its own; each input crosses to the reactor thread with
``blockingCallFromThread`` (``play.play`` runs there, storage answers from its thread
pools) and the thread judges the result (``oracle.judge``).  ``tests/test_fuzz.py``
and ``run.py`` both use :func:`fuzz`.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import queue
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from twisted.internet import defer, reactor, threads
from twisted.python.failure import Failure

from fuzzing import world
from fuzzing.grammar import vary
from fuzzing.imap_inputs import imap_input
from fuzzing.oracle import judge
from fuzzing.play import HANG_SECONDS, Failures, Input, Meter, Played, play
from fuzzing.pop3_inputs import pop3_input
from fuzzing.smtp_inputs import lmtp_input, smtp_input

STRATEGIES: dict[str, Callable[[], st.SearchStrategy[Input]]] = {
    "smtp": smtp_input, "lmtp": lmtp_input, "pop3": pop3_input, "imap": imap_input,
}


STUCK_SECONDS = 3 * HANG_SECONDS


class Defect(AssertionError):
    pass


class Harness:
    """A started World and the instruments, used from a thread other than the
    reactor's."""

    def __init__(self, tmp: Path) -> None:
        self.world = threads.blockingCallFromThread(reactor, world.build, tmp)
        self.meter, self.failures = Meter(), Failures()
        reactor.callFromThread(self.meter.install)  # type: ignore[attr-defined]
        reactor.callFromThread(self.failures.install)  # type: ignore[attr-defined]
        self.inputs = 0

    def play(self, given: Input) -> Played:
        """``play.play`` in the reactor thread; a reactor that does not answer within
        STUCK_SECONDS is stuck in a loop (the session's own hangs end at HANG_SECONDS):
        say which input did it, with every thread's stack, and end the process, since
        nothing can stop a loop in the reactor thread."""
        self.inputs += 1
        answer: queue.Queue[Any] = queue.Queue()

        def start() -> None:
            d = defer.ensureDeferred(play(self.world, given, self.meter, self.failures))
            d.addBoth(answer.put)
        reactor.callFromThread(start)  # type: ignore[attr-defined]
        try:
            result = answer.get(timeout=STUCK_SECONDS)
        except queue.Empty:
            print(f"STUCK: the reactor has not answered for {STUCK_SECONDS}s on\n"
                  f"{given!r}", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(all_threads=True)
            os._exit(3)
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def check(self, given: Input) -> None:
        """Play ``given``; raise :class:`Defect` saying what went wrong, if anything.

        Only a slow iteration that is slow again when the same input is played a second
        time counts: a garbage collection of the whole heap, or the first run of a code
        path (imports, regex compilation, caches), can take longer once."""
        played = self.play(given)
        problems = judge(played)
        if problems and all(p.startswith("reactor held") for p in problems):
            gc.collect()
            problems = judge(self.play(given))
        if problems:
            raise Defect(f"{given!r}\n" + "\n".join(problems)
                         + f"\n--- output ---\n{played.output[-3000:]!r}")

    def warm_up(self) -> None:
        """One input per protocol before anything is timed: the first run of each
        code path imports and compiles (see HOLD_LIMIT in oracle.py)."""
        for listener, data in WARM_UP:
            self.play(Input(listener, data))
        gc.collect()
        gc.freeze()     # what exists now is never collected again: shorter GC pauses

    def stop(self) -> None:
        reactor.callFromThread(self.meter.uninstall)  # type: ignore[attr-defined]
        reactor.callFromThread(self.failures.uninstall)  # type: ignore[attr-defined]
        threads.blockingCallFromThread(reactor, self.world.stop)


WARM_UP = [
    ("imap", b"a LOGIN bob@example.test bob-secret\r\nb SELECT INBOX\r\n"
             b"c FETCH 1:* (BODYSTRUCTURE ENVELOPE BODY[])\r\nd SEARCH TEXT x\r\n"
             b"e SORT (SUBJECT) UTF-8 ALL\r\nf THREAD REFERENCES UTF-8 ALL\r\n"
             b"g APPEND INBOX {5+}\r\nhello\r\nh COMPRESS DEFLATE\r\n"),
    ("pop3", b"USER bob@example.test\r\nPASS bob-secret\r\nLIST\r\nRETR 1\r\nQUIT\r\n"),
    ("smtp", b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.test>\r\n"
             b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nBDAT 3 LAST\r\nabc"),
    ("lmtp", b"LHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.test>\r\n"
             b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"),
    ("submission", b"EHLO x\r\nAUTH PLAIN AGJvYkBleGFtcGxlLnRlc3QAYm9iLXNlY3JldA==\r\n"),
]


def fuzz(harness: Harness, protocol: str, examples: int, database: Path | None = None,
         seed: int | None = None, on_input: Callable[[], None] | None = None,
         variants: int = 1) -> None:
    """Run ``examples`` generated inputs of ``protocol``, each played as generated and
    as ``variants - 1`` cheap variants (``grammar.vary``); raise the first defect
    (shrunk to a small input by hypothesis, and kept in ``database`` if given)."""
    config = settings(
        max_examples=examples, deadline=None, derandomize=False,
        database=DirectoryBasedExampleDatabase(str(database)) if database else None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        report_multiple_bugs=False)

    @config
    @given(STRATEGIES[protocol](), st.integers(0, 2**64 - 1))
    def one(given_input: Input, variant_seed: int) -> None:
        rng = random.Random(variant_seed)
        for number in range(variants):
            if on_input is not None:
                on_input()
            harness.check(given_input if number == 0 else vary(given_input, rng))

    if seed is not None:
        from hypothesis import seed as fixed_seed
        one = fixed_seed(seed)(one)
    one()


def reproduce(harness: Harness, given: Input) -> list[str]:
    """The problems one input shows (for regression tests of found defects)."""
    return judge(harness.play(given))


