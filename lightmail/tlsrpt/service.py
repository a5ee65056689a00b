"""The TLS-RPT service of the server's main process: writes the counted outcomes to
SQL every ``flush_interval`` (and at shutdown), and runs the report job every
``interval`` (once storage is ready; one run at a time)."""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from lightmail.tlsrpt.job import ReportJob, Sent
from lightmail.tlsrpt.store import SQLTLSReports


class TLSReportService(Service):
    name = "tlsrpt"
    log = Logger(namespace="lightmail.tlsrpt")

    def __init__(self, store: SQLTLSReports, job: ReportJob, interval: float,
                 flush_interval: float, ready: Optional[defer.Deferred[Any]] = None,
                 clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.store, self.job, self.clock = store, job, clock
        self.interval, self.flush_interval = interval, flush_interval
        self.ready = ready
        self.loops: list[task.LoopingCall] = []
        self.running_job: Optional[defer.Deferred[Any]] = None

    def startService(self) -> None:
        super().startService()
        ready = self.ready if self.ready is not None else defer.succeed(None)
        ready.addCallback(lambda _: self._start())
        ready.addErrback(lambda f: None)   # the storage service reports its failure

    def _start(self) -> None:
        if not self.running:
            return
        for interval, work, now in ((self.flush_interval, self.store.flush, False),
                                    (self.interval, self.run_job, True)):
            loop = task.LoopingCall(work)
            loop.clock = self.clock
            loop.start(interval, now=now).addErrback(self._failed)
            self.loops.append(loop)

    def run_job(self) -> defer.Deferred[Optional[Sent]]:
        """One run of the report job, unless one is running already."""
        if self.running_job is not None:
            return defer.succeed(None)
        d: defer.Deferred[Optional[Sent]] = defer.ensureDeferred(self.job.run())

        def done(result: Any) -> Any:
            self.running_job = None
            return result

        def failed(failure: Failure) -> None:
            self.log.failure("TLS-RPT: the report job failed", failure)
        d.addErrback(failed)
        d.addBoth(done)
        self.running_job = d
        return d

    def _failed(self, failure: Failure) -> None:
        self.log.failure("TLS-RPT: a periodic task stopped", failure)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        for loop in self.loops:
            if loop.running:
                loop.stop()
        self.loops = []
        return self.store.flush()
