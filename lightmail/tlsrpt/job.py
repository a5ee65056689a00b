"""The report job: for every complete UTC day with counted outcomes, and every policy
domain of that day, look up the domain's ``_smtp._tls`` record and send it the day's
report, by mail through LightMail's own queue (``mailto:``) and by HTTPS POST
(``https:``, certificate verified, RFC 8460 §5.4).

A day is reported once it is over and a grace period has passed (so that every
node's last counts of the day are in); its rows are removed as the report is made.
A domain without a TLS-RPT record gets nothing and its rows go; one whose record
cannot be looked up (a DNS failure) is tried again at the next run, up to
``give_up_after`` after the day ended.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger

from lightmail.directory.interfaces import IDirectory
from lightmail.dns import DNSError, IResolver
from lightmail.storage.interfaces import (
    DurableBlob,
    Envelope,
    IBlobStore,
    IWritePort,
    QueueRecipient,
)
from lightmail.tlsrpt.report import (
    MEDIA_TYPE,
    RECORD_PREFIX,
    Reporter,
    build_report,
    compressed,
    day_range,
    mailto_address,
    new_report_id,
    report_addresses,
    report_mail,
)
from lightmail.tlsrpt.store import SQLTLSReports, day_of

#: Sends one report by mail: (recipient address, the whole message) -> its queue id.
SendMail = Callable[[str, bytes], Awaitable[str]]
#: POSTs one report: (https URL, gzipped JSON).
Post = Callable[[str, bytes], Awaitable[None]]


@dataclass
class Sent:
    """What one run did, for the command's output and the tests."""

    reports: list[tuple[str, str, str]] = field(default_factory=list)  # day, domain, to
    failures: list[tuple[str, str, str, str]] = field(default_factory=list)  # ..., why
    skipped: list[tuple[str, str, str]] = field(default_factory=list)   # ..., why


class ReportJob:
    log = Logger(namespace="lightmail.tlsrpt")

    def __init__(self, store: SQLTLSReports, resolver: IResolver, reporter: Reporter,
                 send_mail: SendMail, post: Post, grace: float = 600.0,
                 give_up_after: float = 3 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.resolver, self.reporter = store, resolver, reporter
        self.send_mail, self.post = send_mail, post
        self.grace, self.give_up_after, self.clock = grace, give_up_after, clock

    async def run(self) -> Sent:
        now = self.clock()
        sent = Sent()
        for day, domain in await self.store.days(before=day_of(now - self.grace)):
            await self._report(day, domain, now, sent)
        return sent

    async def _report(self, day: str, domain: str, now: float, sent: Sent) -> None:
        try:
            addresses = report_addresses(await self.resolver.txt(RECORD_PREFIX + domain))
        except DNSError as exc:
            ended = day_range(day)[1].timestamp()
            if now - ended < self.give_up_after:
                sent.skipped.append((day, domain, f"TLS-RPT record lookup: {exc}"))
                return              # the next run tries again
            addresses = None
            self.log.warn("TLS-RPT: no report for {domain} of {day}: its record could "
                          "not be looked up ({error})", domain=domain, day=day,
                          error=str(exc))
        rows = await self.store.take(day, domain)
        if not rows or not addresses:
            if rows:
                sent.skipped.append((day, domain, "no TLS-RPT record"))
            return
        report = build_report(rows, day, domain, self.reporter,
                              new_report_id(day, domain, self.reporter))
        data = compressed(report)
        for uri in addresses:
            try:
                await self._send(uri, report, data, domain)
            except Exception as exc:
                why = str(exc) or exc.__class__.__name__
                sent.failures.append((day, domain, uri, why))
                self.log.warn("TLS-RPT: report of {day} for {domain} not sent to {uri}: "
                              "{error}", day=day, domain=domain, uri=uri, error=why)
                continue
            sent.reports.append((day, domain, uri))
            self.log.info("TLS-RPT: report of {day} for {domain} sent to {uri}",
                          day=day, domain=domain, uri=uri)

    async def _send(self, uri: str, report: dict[str, Any], data: bytes,
                    domain: str) -> None:
        if uri.lower().startswith("https:"):
            await self.post(uri, data)
            return
        address = mailto_address(uri)
        if address is None:
            raise ValueError(f"not a mail address: {uri!r}")
        mail = report_mail(report, data, domain, address, self.reporter,
                           datetime.fromtimestamp(self.clock(), UTC))
        await self.send_mail(address, mail)


def queue_mailer(directory: IDirectory, blobs: IBlobStore, write_port: IWritePort,
                 sender: str, kick: Callable[[], None]) -> SendMail:
    """Mail from ``sender`` through LightMail's queue, as delivery notices go
    (outbound/notices.py): the blob stored, the envelope queued (source ``local``:
    DKIM-signed when ``[dkim]`` has a key for the From: domain), the queue nudged."""

    async def send(to: str, mail: bytes) -> str:
        resolution = await directory.resolve(to)
        transport = "local" if resolution.is_local_domain else "smtp"
        blob = await blobs.put(mail)
        queue_id: str = await write_port.enqueue(
            Envelope(mail_from=sender, recipients=[QueueRecipient(to, transport)],
                     source="local"), DurableBlob(blob))
        kick()
        return queue_id
    return send


def https_poster(reactor: Any, resolver: IResolver, ca_file: str = "",
                 timeout: float = 60.0) -> Post:
    """POST a report (RFC 8460 §5.4) with the server's certificate verified (system
    roots, or ``ca_file``), the host looked up through ``resolver``; 2xx is done."""
    from twisted.internet import ssl
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
    from twisted.web.client import Agent, FileBodyProducer, readBody
    from twisted.web.http_headers import Headers

    trust = None
    if ca_file:
        with open(ca_file, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())

    class Endpoint:
        def __init__(self, host: str, port: int) -> None:
            self.host, self.port = host, port

        def connect(self, factory: Any) -> Any:
            async def connect() -> Any:
                addresses = await resolver.addresses(self.host)
                if not addresses:
                    raise DNSError(f"{self.host} has no address")
                ip = addresses[0]
                tcp_class = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
                tcp = tcp_class(reactor, ip, self.port, timeout=timeout)
                tls = wrapClientTLS(ssl.optionsForClientTLS(self.host, trustRoot=trust),
                                    tcp)
                return await tls.connect(factory)
            return ensureDeferred(connect())

    class Endpoints:
        def endpointForURI(self, uri: Any) -> Endpoint:
            return Endpoint(uri.host.decode("idna"), uri.port)

    agent = Agent.usingEndpointFactory(reactor, Endpoints())

    async def post(url: str, data: bytes) -> None:
        import io
        response = await agent.request(
            b"POST", url.encode(),
            Headers({b"Content-Type": [MEDIA_TYPE.encode()],
                     b"User-Agent": [b"LightMail"]}),
            FileBodyProducer(io.BytesIO(data))).addTimeout(timeout, reactor)
        await readBody(response).addTimeout(timeout, reactor)
        if not 200 <= response.code < 300:
            raise RuntimeError(f"HTTP {response.code}")
    return post
