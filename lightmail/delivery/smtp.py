"""The SMTP delivery agent: queued recipients in other domains go to their MX.

For each recipient: route the domain (relay host or MX records, ``outbound/routing``),
then try each host and each of its addresses in order until one gives an answer about
the recipient.  A host that cannot be reached, refuses the session or fails it with
4xx is skipped for the next one (RFC 5321 §5.1); the first real answer decides:
2xx delivered, 4xx deferred (the runner retries with backoff), 5xx bounced.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from lightmail.outbound.client import (
    OutboundMessage,
    OutboundRecipient,
    Reply,
    SessionFailed,
    SMTPClientProtocol,
    Timeouts,
    transact,
)
from lightmail.outbound.routing import Destination, Router, RoutingError
from lightmail.queue.interfaces import DeliveryResult, IDeliveryAgent
from lightmail.storage.interfaces import IBlobStore, QueueItem


@implementer(IDeliveryAgent)
class SMTPDeliveryAgent:
    transport = "smtp"
    log = Logger(namespace="lightmail.outbound")

    def __init__(self, router: Router, blobs: IBlobStore, helo: str, tls_policy: str = "may",
                 timeouts: Optional[Timeouts] = None, connect_timeout: float = 30.0,
                 reactor: Any = None, signer: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.router = router
        self.blobs = blobs
        self.helo = helo
        self.tls_policy = tls_policy
        self.timeouts = timeouts or Timeouts()
        self.connect_timeout = connect_timeout
        self.reactor = reactor
        # Adds header fields on the way out: ``async header_for(item) -> bytes``
        # (DKIM-Signature; lightmail.policy.dkim).
        self.signer = signer

    def deliver(self, item: QueueItem) -> defer.Deferred[DeliveryResult]:
        return defer.ensureDeferred(self._deliver(item))

    async def _deliver(self, item: QueueItem) -> DeliveryResult:
        address = item.recipient.address
        domain = address.rpartition("@")[2]
        try:
            destinations = await self.router.route(domain)
        except RoutingError as exc:
            detail = f"{exc.status} {exc.text}"
            return (DeliveryResult.bounced(detail) if exc.permanent
                    else DeliveryResult.deferred(detail))
        envelope = item.envelope
        message = OutboundMessage(
            mail_from=item.mail_from,
            recipients=(OutboundRecipient(address, item.recipient.orcpt,
                                          item.recipient.notify),),
            blob=item.blob, envid=envelope.envid, ret=envelope.ret, body=envelope.body,
            smtputf8=envelope.smtputf8)
        prefix = b""
        if self.signer is not None:
            prefix = await self.signer.header_for(item)
        last = "4.4.1 no host could be reached"
        for destination in destinations:
            for ip in destination.addresses:
                result = await self._try(destination, ip, message, address, prefix)
                if isinstance(result, DeliveryResult):
                    return result
                last = result
        return DeliveryResult.deferred(last)

    async def _try(self, destination: Destination, ip: str, message: OutboundMessage,
                   address: str, prefix: bytes = b"") -> DeliveryResult | str:
        """A result, or the reason to try the next address."""
        where = f"{destination.host}[{ip}]:{destination.port}"
        endpoint_class = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
        endpoint = endpoint_class(self.reactor, ip, destination.port,
                                  timeout=self.connect_timeout)
        try:
            proto: Any = await endpoint.connect(Factory.forProtocol(SMTPClientProtocol))
        except Exception as exc:
            self.log.info("connect to {where} failed: {error}", where=where,
                          error=exc.__class__.__name__)
            return f"4.4.1 connect to {where} failed: {exc.__class__.__name__}"
        try:
            outcome = await transact(proto, message, self.blobs, self.helo,
                                     destination.host, self.tls_policy, self.timeouts,
                                     self.reactor, prefix)
        except SessionFailed as exc:
            said = "said" if exc.remote else "failed"
            detail = f"{exc.reply.status} {where} {said}: {exc.reply}"
            if exc.next_host:
                self.log.info("{where}: {reply}; trying the next host", where=where,
                              reply=str(exc.reply))
                return detail
            return _result(exc.reply, detail, destination.host if exc.remote else "")
        finally:
            if proto.transport is not None and proto.lost is None:
                proto.transport.loseConnection()
        reply = outcome.results[address]
        tls = f" ({outcome.tls})" if outcome.tls else ""
        return _result(reply, f"{reply.status} {where}{tls} said: {reply}", destination.host)


def _result(reply: Reply, detail: str, remote_mta: str) -> DeliveryResult:
    status = ("delivered" if reply.code < 300 else "deferred" if reply.code < 500
              else "bounced")
    diagnostic = f"smtp; {reply}" if remote_mta else ""
    return DeliveryResult(status, detail, remote_mta=remote_mta, diagnostic=diagnostic)
