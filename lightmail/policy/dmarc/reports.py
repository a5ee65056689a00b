"""DMARC aggregate reports (RFC 7489 §7.2): each message's result kept in SQL as it is
judged, and every ``[dmarc] report_interval`` (a day) a gzip'ed XML report per policy
domain, mailed to the ``mailto:`` addresses of its record's ``rua`` through
LightMail's own queue (signed by DKIM like any mail LightMail writes itself, when the
From: domain of ``report_from`` has a key).

:class:`DMARCReports` is the :class:`IDMARCReports` of a process (wired once, in every
process: the policy chain records in the worker processes too); the runs happen in
the main process only (:class:`ReportService`'s timer), or at once with ``lightmail
dmarc send-reports``.  A run:

1. claims the rows that have arrived (lightmail/policy/dmarc/store.py: two nodes on
   one database never send the same message twice);
2. for each policy domain, groups its rows, builds the report (xmlreport.py), and
   for each of the record's first :data:`MAX_DESTINATIONS` ``mailto:`` URIs: checks
   an external destination (§7.1, destinations.py), honours the URI's ``!size``
   (a report larger than it is not sent there; a §7.2.2 error report is, instead),
   and queues the message; other URI schemes are not supported (logged);
3. deletes the domain's rows.  A report that could not be sent to some destination
   is not tried again: the next run reports the next period.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.config import Config
from lightmail.directory.interfaces import IDirectory
from lightmail.dns import IResolver
from lightmail.policy.dmarc.check import DMARCResult
from lightmail.policy.dmarc.destinations import check_destination
from lightmail.policy.dmarc.interfaces import IDMARCReports
from lightmail.policy.dmarc.orgdomain import PublicSuffixes
from lightmail.policy.dmarc.record import parse_uris
from lightmail.policy.dmarc.reportmail import error_report_message, report_message
from lightmail.policy.dmarc.store import DomainRows, ResultStore
from lightmail.policy.dmarc.xmlreport import (
    AggregateReport,
    gzipped,
    report_filename,
    report_xml,
)
from lightmail.storage.database import Database
from lightmail.storage.interfaces import (
    DurableBlob,
    Envelope,
    IBlobStore,
    IWritePort,
    QueueRecipient,
)

log = Logger(namespace="lightmail.dmarc")

#: Destinations served per report: a record may list any number of URIs, and each
#: costs a DNS lookup and a message.
MAX_DESTINATIONS = 10


@dataclass(frozen=True)
class ReportSettings:
    """What ``[dmarc]`` says of reports, with the server's name filled in."""

    enabled: bool = False
    org_name: str = ""
    sender: str = ""                # report_from
    receiver: str = ""              # this server's name: Submitter, the file name
    interval: float = 86400.0

    @classmethod
    def from_config(cls, config: Config) -> ReportSettings:
        dmarc, host = config.dmarc, config.hostname.lower()
        return cls(dmarc.reports, dmarc.report_org_name or host,
                   dmarc.report_from or f"postmaster@{host}", host, dmarc.report_interval)


@dataclass
class SentReport:
    """One policy domain's report in a run."""

    policy_domain: str
    report_id: str
    messages: int
    size: int                                           # the gzip'ed XML, octets
    queued: list[tuple[str, str]] = field(default_factory=list)    # (address, queue id)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (URI, why)


@dataclass
class ReportRun:
    reports: list[SentReport] = field(default_factory=list)


@implementer(IDMARCReports)
class DMARCReports:
    def __init__(self, db: Database, blobs: IBlobStore, write_port: IWritePort,
                 directory: IDirectory, resolver: IResolver, suffixes: PublicSuffixes,
                 settings: ReportSettings, kick: Callable[[], None],
                 clock: Optional[IReactorTime] = None) -> None:
        self.store = ResultStore(db)
        self.blobs = blobs
        self.write_port = write_port
        self.directory = directory
        self.resolver = resolver
        self.suffixes = suffixes
        self.settings = settings
        #: Called after a run queued reports: the queue runner looks for work.
        self.kick = kick
        self.clock = clock
        self._running = defer.DeferredLock()

    def use(self, settings: ReportSettings, suffixes: Optional[PublicSuffixes] = None) -> None:
        """Take a new configuration (a reload)."""
        self.settings = settings
        if suffixes is not None:
            self.suffixes = suffixes

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    # -- recording ------------------------------------------------------------------

    def record(self, result: DMARCResult, source_ip: str, envelope_from: str,
               envelope_to: str = "") -> Deferred[None]:
        record = result.record
        if (not self.settings.enabled or record is None or not record.rua
                or result.result not in ("pass", "fail")):
            return defer.succeed(None)
        sender_domain = envelope_from.rpartition("@")[2].lower()
        spf_domain, spf_result = result.spf
        published = {
            "adkim": record.adkim, "aspf": record.aspf, "p": record.p,
            "sp": record.sp or record.p, "pct": record.pct, "fo": record.fo,
            "rua": ",".join(str(uri) for uri in record.rua)}
        row = {
            "arrived": int(self._now() * 1000), "policy_domain": result.policy_domain,
            "source_ip": source_ip[:64], "header_from": result.header_from,
            "envelope_from": sender_domain[:255],
            "envelope_to": envelope_to.rpartition("@")[2].lower()[:255],
            "disposition": result.disposition, "dkim": result.evaluated_dkim,
            "spf": result.evaluated_spf,
            "reasons": json.dumps([[r.type, r.comment] for r in result.reasons]),
            "dkim_results": json.dumps([[d.domain, d.selector, d.result]
                                        for d in result.dkim]),
            "spf_domain": spf_domain[:255], "spf_scope": "mfrom" if sender_domain else "helo",
            "spf_result": spf_result, "published": json.dumps(published)}
        d = self.store.add(row)

        def failed(failure: Any) -> None:
            log.failure("DMARC: could not keep the result for {domain}'s report", failure,
                        domain=result.policy_domain)
        return d.addErrback(failed)

    # -- reporting ------------------------------------------------------------------

    def send_reports(self) -> Deferred[ReportRun]:
        return self._running.run(lambda: Deferred.fromCoroutine(self._send()))

    async def _send(self) -> ReportRun:
        now = self._now()
        run_id = secrets.token_hex(16)
        run = ReportRun()
        for domain in await self.store.claim(run_id, int(now * 1000)):
            rows = await self.store.rows_of(run_id, domain)
            try:
                if rows.rows:
                    run.reports.append(await self._report(rows, now))
            except Exception:
                # Kept (claimed): an hour later a run takes them again.
                log.failure("DMARC: the report for {domain} failed", domain=domain)
                continue
            await self.store.forget(run_id, domain)
        if any(report.queued for report in run.reports):
            self.kick()
        return run

    async def _report(self, rows: DomainRows, now: float) -> SentReport:
        settings = self.settings
        unique = secrets.token_hex(8)
        begin, end = rows.first_arrived // 1000, int(now)
        report_id = f"{unique}.{end}@{settings.receiver}"
        document = report_xml(AggregateReport(
            org_name=settings.org_name, email=settings.sender, report_id=report_id,
            begin=begin, end=end, policy_domain=rows.policy_domain,
            published=rows.published, rows=rows.rows))
        data = gzipped(document, end)
        filename = report_filename(settings.receiver, rows.policy_domain, begin, end,
                                   unique)
        sent = SentReport(rows.policy_domain, report_id, rows.messages, len(data))
        for uri in parse_uris(str(rows.published.get("rua", "")))[:MAX_DESTINATIONS]:
            address = uri.mailto
            if address is None:
                sent.skipped.append((uri.uri, "only mailto: URIs are supported"))
                continue
            verdict = await check_destination(self.resolver, self.suffixes,
                                              rows.policy_domain,
                                              address.rpartition("@")[2])
            if not verdict.allowed:
                sent.skipped.append((uri.uri, verdict.reason))
                continue
            message = report_message(
                sender=settings.sender, to=address, receiver=settings.receiver,
                policy_domain=rows.policy_domain, report_id=report_id, begin=begin,
                end=end, filename=filename, report=data, now=now)
            if uri.max_size is not None and len(message) > uri.max_size:
                # §7.2.2: the report is not sent there; an error report is.
                sent.skipped.append((str(uri), f"the report is {len(message)} octets, "
                                     f"over the limit of {uri.max_size}"))
                message = error_report_message(
                    sender=settings.sender, to=address, receiver=settings.receiver,
                    policy_domain=rows.policy_domain, report_id=report_id,
                    size=len(message), uri=uri.uri, now=now)
            sent.queued.append((address, await self._enqueue(address, message)))
        log.info("DMARC: report {report_id} for {domain} ({messages} messages, {size} "
                 "octets): queued for {queued}; not sent to {skipped}",
                 report_id=report_id, domain=rows.policy_domain, messages=rows.messages,
                 size=len(data), queued=", ".join(a for a, _ in sent.queued) or "nobody",
                 skipped="; ".join(f"{u} ({why})" for u, why in sent.skipped) or "none")
        return sent

    async def _enqueue(self, address: str, message: bytes) -> str:
        blob = await self.blobs.put(message)
        resolution = await self.directory.resolve(address)
        transport = "local" if resolution.is_local_domain else "smtp"
        envelope = Envelope(mail_from=self.settings.sender,
                            recipients=[QueueRecipient(address, transport)],
                            source="local")
        return await self.write_port.enqueue(envelope, DurableBlob(blob))


class ReportService(Service):
    """Runs :meth:`DMARCReports.send_reports` every ``report_interval``, at the
    multiples of it since the epoch (daily: at midnight UTC), while ``[dmarc]
    reports`` is on.  In the main process only."""

    name = "dmarc-reports"

    def __init__(self, reports: DMARCReports, ready: Deferred[None],
                 clock: Optional[IReactorTime] = None) -> None:
        if clock is None:
            from twisted.internet import reactor
            clock = reactor  # type: ignore[assignment]
        assert clock is not None
        self.reports = reports
        self.ready = ready
        self.clock = clock
        self._call: Optional[IDelayedCall] = None
        self._run: Optional[Deferred[Any]] = None

    def startService(self) -> None:
        super().startService()
        self.ready.addCallbacks(lambda _: self._schedule(), lambda failure: None)

    def _schedule(self) -> None:
        if not self.running:
            return
        interval = self.reports.settings.interval
        delay = interval - (self.clock.seconds() % interval)
        self._call = self.clock.callLater(max(delay, 1.0), self._tick)

    def _tick(self) -> None:
        self._call = None
        if not self.reports.settings.enabled:
            self._schedule()
            return
        run = self._run = self.reports.send_reports()

        def done(outcome: Any) -> None:
            self._run = None
            if isinstance(outcome, Failure):
                log.failure("DMARC: the report run failed", outcome)
            self._schedule()
        run.addBoth(done)

    def stopService(self) -> Optional[Deferred[Any]]:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._run is not None:
            # A run in progress finishes (its rows are claimed): wait for it.
            waiting: Deferred[Any] = Deferred()
            self._run.addBoth(lambda outcome: waiting.callback(None))
            return waiting
        return None
