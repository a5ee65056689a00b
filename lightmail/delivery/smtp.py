"""The SMTP delivery agent: queued recipients in other domains go to their MX.

For each recipient: route the domain (relay host or MX records, ``outbound/routing``),
then try each host and each of its addresses in order until one gives an answer about
the recipient.  A host that cannot be reached, refuses the session or fails it with
4xx is skipped for the next one (RFC 5321 §5.1); the first real answer decides:
2xx delivered, 4xx deferred (the runner retries with backoff), 5xx bounced.

Sessions are reused: after a transaction the connection waits a few seconds
(``session_idle``) for the next message to the same host and address, which then
starts with RSET instead of a new TCP connection, greeting, EHLO and TLS handshake,
as Postfix's connection cache does.  At most ``destination_concurrency`` deliveries
go to one domain at once.

TLS (outbound/tlspolicy.py's ``HostTLS``, one per host): STARTTLS whenever offered;
DANE (RFC 7672) and MTA-STS (RFC 8461) make it required and authenticated for the
hosts they cover, the transport's ``tls = encrypt`` required; a REQUIRETLS message
(RFC 8689) asks for authenticated TLS to a server that offers REQUIRETLS, or a
bounce, and ``TLS-Required: No`` sets the others aside (outbound/requiretls.py).
Each negotiation's outcome is counted for TLS-RPT (RFC 8460, lightmail/tlsrpt/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.delivery.headers import IOutboundHeaders
from lightmail.outbound.client import (
    ClientSession,
    Credentials,
    OutboundMessage,
    OutboundRecipient,
    Reply,
    SessionFailed,
    SMTPClientProtocol,
    Timeouts,
)
from lightmail.outbound.dane import DANE, FAILED, MATCH, HostDANE
from lightmail.outbound.requiretls import (
    HEADER_PEEK,
    Refusal,
    bounce_detail,
    session_refusal,
    tls_optional,
    unvouched,
)
from lightmail.outbound.routing import Destination, Router, RoutingError
from lightmail.outbound.tlspolicy import (
    HostTLS,
    Judgement,
    failed_negotiation,
    host_tls,
    judge,
    reusable,
)
from lightmail.queue.interfaces import DeliveryResult, IDeliveryAgent, ISenderRewriter
from lightmail.storage.interfaces import BlobMissing, IBlobStore, QueueItem
from lightmail.tlsrpt.interfaces import ITLSReports, NoTLSReports, TLSResult

# (address, port, host name, LMTP?, SMTP AUTH user): an authenticated session serves
# only deliveries with the same credentials.
SessionKey = tuple[str, int, str, bool, str]


@dataclass(frozen=True)
class Transport:
    """How mail for some domains leaves: a router (MX or relay host), a STARTTLS
    policy, SMTP or LMTP, SMTP AUTH credentials for a relay, and whether DANE applies
    (``[transport:DOMAIN]`` sections; ``[outbound]``)."""

    router: Router
    tls: str = "may"
    lmtp: bool = False
    credentials: Optional[Credentials] = None
    dane: bool = False

    @property
    def uses_dane(self) -> bool:
        return self.dane and self.tls != "none" and not self.lmtp


class SessionCache:
    """Idle sessions, by destination, each closed after ``idle`` seconds unused."""

    def __init__(self, clock: Any, idle: float = 5.0, max_transactions: int = 100) -> None:
        self.clock, self.idle, self.max_transactions = clock, idle, max_transactions
        self.sessions: dict[SessionKey, list[tuple[ClientSession, Any]]] = {}

    def take(self, key: SessionKey) -> Optional[ClientSession]:
        waiting = self.sessions.get(key)
        while waiting:
            session, timer = waiting.pop()
            if timer.active():
                timer.cancel()
            if session.usable:
                return session
        return None

    def put(self, key: SessionKey, session: ClientSession) -> None:
        if (self.idle <= 0 or not session.usable
                or session.transactions >= self.max_transactions):
            session.close()
            return
        waiting = self.sessions.setdefault(key, [])
        timer = self.clock.callLater(self.idle, self._expire, key, session)
        waiting.append((session, timer))

    def _expire(self, key: SessionKey, session: ClientSession) -> None:
        waiting = self.sessions.get(key, [])
        self.sessions[key] = [(s, t) for s, t in waiting if s is not session]
        session.close()

    def close_all(self) -> None:
        for waiting in self.sessions.values():
            for session, timer in waiting:
                if timer.active():
                    timer.cancel()
                session.close()
        self.sessions.clear()


class _DomainLimit:
    """A destination domain's deliveries: ``sending``, those on the wire (at most
    ``destination_concurrency``), and ``open``, those whose outcome is not recorded
    yet (twice as many)."""

    def __init__(self, concurrency: int) -> None:
        self.sending = defer.DeferredSemaphore(concurrency)
        self.open = defer.DeferredSemaphore(2 * concurrency)

    @property
    def idle(self) -> bool:
        return not self.open.waiting and self.open.tokens == self.open.limit


@implementer(IDeliveryAgent)
class SMTPDeliveryAgent:
    transport = "smtp"
    log = Logger(namespace="lightmail.outbound")

    def __init__(self, router: Router, blobs: IBlobStore, helo: str, tls_policy: str = "may",
                 timeouts: Optional[Timeouts] = None, connect_timeout: float = 30.0,
                 reactor: Any = None, signer: Optional[IOutboundHeaders] = None,
                 destination_concurrency: int = 20, session_idle: float = 5.0,
                 lmtp: bool = False, mta_sts: Any = None, ca_file: str = "",
                 credentials: Optional[Credentials] = None, dane: Optional[DANE] = None,
                 tls_reports: Optional[ITLSReports] = None,
                 sender_rewriter: Optional[ISenderRewriter] = None) -> None:
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
        self.lmtp = lmtp                   # speak LMTP (RFC 2033) to the destination
        # Adds header fields on the way out (DKIM-Signature, lightmail.policy.dkim;
        # ARC sets, lightmail.policy.arc.seal): lightmail.delivery.headers.
        self.signer = signer
        # The MAIL FROM of forwarded mail (SRS, lightmail.policy.srs); None: the
        # queue's sender as it is.
        self.sender_rewriter = sender_rewriter
        self.destination_concurrency = destination_concurrency
        self.limits: dict[str, _DomainLimit] = {}
        # Deliveries waiting for their turn in their domain's limits (stop_waiting),
        # with their state.
        self._waiting: dict[defer.Deferred[Any], dict[str, bool]] = {}
        self.sessions = SessionCache(reactor, session_idle)
        self.mta_sts = mta_sts             # lightmail.outbound.mtasts.MTASTS, for MX routes
        self.dane = dane                   # TLSA lookups, for transports with dane
        # Where TLS outcomes are counted (TLS-RPT), for MX routes.
        self.tls_reports: ITLSReports = tls_reports or NoTLSReports()
        self.ca_file = ca_file
        # Per-domain overrides: "example.com" for the domain, ".example.com" for its
        # subdomains (as Postfix's transport maps).
        self.transports: dict[str, Transport] = {}
        self.default = Transport(router, tls_policy, lmtp, credentials, dane is not None)

    def reconfigure(self, default: Transport, transports: dict[str, Transport], helo: str,
                    timeouts: Timeouts, connect_timeout: float,
                    destination_concurrency: int) -> None:
        """New routes and settings (a reload) for the deliveries that start from now
        on; a domain with deliveries in progress keeps its concurrency limit until
        they are done.  Idle sessions are hung up: they were made with the old ones."""
        self.default, self.transports = default, transports
        self.helo, self.timeouts = helo, timeouts
        self.connect_timeout = connect_timeout
        self.destination_concurrency = destination_concurrency
        self.sessions.close_all()

    def transport_for(self, domain: str) -> Transport:
        if not self.transports:
            return self.default
        domain = domain.lower()
        if domain in self.transports:
            return self.transports[domain]
        labels = domain.split(".")
        for index in range(1, len(labels)):
            parent = "." + ".".join(labels[index:])
            if parent in self.transports:
                return self.transports[parent]
        return self.default

    def stop_waiting(self) -> None:
        """A drain: the deliveries still waiting for a place in their domain's limits
        are given back unstarted (their wait is cancelled)."""
        for d, state in list(self._waiting.items()):
            state["given_back"] = True
            d.cancel()
        self._waiting.clear()

    def close(self) -> None:
        """Hang up idle sessions (at shutdown)."""
        self.sessions.close_all()

    # Messages up to this size are read ahead, a claimed batch's in one disk hop,
    # and sent in one write; larger ones are streamed in chunks.
    preload_limit = 64 * 1024

    def prepare(self, items: list[QueueItem]) -> defer.Deferred[list[QueueItem]]:
        """Read the content of the batch's small messages in one go (``content``)."""
        small = list(dict.fromkeys(
            item.blob.id for item in items
            if item.content is None and item.blob.size <= self.preload_limit))
        if not small:
            return defer.succeed(items)

        def attach(read: list[bytes | BlobMissing]) -> list[QueueItem]:
            # A missing blob is left to the delivery itself, which reports it.
            contents = {blob_id: data for blob_id, data in zip(small, read, strict=True)
                        if isinstance(data, bytes)}
            return [replace(item, content=contents[item.blob.id])
                    if item.content is None and item.blob.id in contents else item
                    for item in items]
        return self.blobs.read_many(small).addCallback(attach)

    def deliver(self, item: QueueItem) -> defer.Deferred[DeliveryResult]:
        return self.deliver_held(item).addCallback(_released)

    def deliver_held(self, item: QueueItem) -> defer.Deferred[
            tuple[DeliveryResult, Callable[[], None]]]:
        """Deliver, and count the delivery against its domain's limits until the
        caller calls the release function given with the result, once it has
        recorded the outcome (the queue runner does).  At most
        ``destination_concurrency`` deliveries to a domain are on the wire at once,
        and at most as many more have had their answer and wait for their outcome to
        be committed (a connection carries the next message while the last one's is
        committed, not a third): so a crash sends at most twice
        ``destination_concurrency`` messages of a domain again."""
        domain = item.recipient.address.rpartition("@")[2].lower()
        limit = self.limits.get(domain)
        if limit is None:
            limit = self.limits[domain] = _DomainLimit(self.destination_concurrency)
        held: list[tuple[SessionKey, ClientSession]] = []
        state = {"open": False, "sending": False, "given_back": False}

        def sent() -> None:
            """The transaction is over: the session may carry another message."""
            if state["sending"]:
                state["sending"] = False
                for key, session in held:  # first, for the next delivery to take
                    self.sessions.put(key, session)
                limit.sending.release()

        def release() -> None:
            sent()
            if state["open"]:
                state["open"] = False
                limit.open.release()
                if limit.idle:
                    self.limits.pop(domain, None)

        def opened(_: Any) -> defer.Deferred[Any]:
            state["open"] = True
            return limit.sending.acquire()

        def sending(_: Any) -> defer.Deferred[DeliveryResult]:
            self._waiting.pop(d, None)      # started: no longer given back
            state["sending"] = True
            return defer.ensureDeferred(self._deliver(item, held))

        def done(result: DeliveryResult) -> tuple[DeliveryResult, Callable[[], None]]:
            sent()
            return result, release

        def failed(failure: Failure) -> Any:
            self._waiting.pop(d, None)
            release()
            if state["given_back"] and failure.check(defer.CancelledError):
                return DeliveryResult.unstarted(), _nothing
            return failure
        d = limit.open.acquire()
        self._waiting[d] = state
        d.addCallback(opened)
        d.addCallback(sending)
        return d.addCallbacks(done, failed)

    async def _deliver(self, item: QueueItem,
                       held: list[tuple[SessionKey, ClientSession]]) -> DeliveryResult:
        address = item.recipient.address
        domain = address.rpartition("@")[2]
        transport = self.transport_for(domain)
        try:
            destinations = await transport.router.route(domain)
        except RoutingError as exc:
            detail = f"{exc.status} {exc.text}"
            return (DeliveryResult.bounced(detail) if exc.permanent
                    else DeliveryResult.deferred(detail))
        envelope = item.envelope
        # RFC 8689 §4.2.1 binds messages with a sender (a notice goes as any other);
        # LMTP is final delivery (§4.4), not relay.
        requiretls = envelope.requiretls and bool(item.mail_from) and not transport.lmtp
        mail_from = item.mail_from
        if self.sender_rewriter is not None:
            # Decided once per delivery, for every host tried; the queue (and so the
            # delivery notices) keeps the original sender.
            mail_from = await self.sender_rewriter.envelope_sender(item)
        message = OutboundMessage(
            mail_from=mail_from,
            recipients=(OutboundRecipient(address, item.recipient.orcpt,
                                          item.recipient.notify),),
            blob=item.blob, envid=envelope.envid, ret=envelope.ret, body=envelope.body,
            smtputf8=envelope.smtputf8, requiretls=requiretls, content=item.content)
        mx_route = transport.router.relay is None
        # Where DANE applies, the resolver's AD bit is trusted: for the TLSA records
        # of hosts whose names come from a validated MX answer or the configuration
        # (RFC 7672 §2.2), and for REQUIRETLS, which takes such an MX answer as
        # vouching for its hosts (RFC 8689 §4.2.1).
        mx_secure = False
        dane: dict[str, HostDANE] = {}
        if self.dane is not None and transport.uses_dane:
            name, _, mx_lookup = transport.router.relay or (domain, 0, True)
            mx_secure = not mx_lookup or await self.dane.mx_authenticated(name)
            if mx_secure:
                dane = await self.dane.hosts([(d.host, d.port) for d in destinations])
        policy = None
        if self.mta_sts is not None and mx_route:
            policy = await self.mta_sts.policy(domain)
            if policy is not None and policy.mode == "none":
                policy = None
        enforced = policy is not None and policy.mode == "enforce"
        # Whether anything would hold the message back that TLS-Required: No sets aside.
        demanding = (enforced or transport.tls == "encrypt"
                     or any(h.tls_required or h.state == FAILED for h in dane.values()))
        relaxed = False
        if requiretls:
            # The host's name must come from the configuration, a DNSSEC-validated
            # MX answer or an enforced MTA-STS policy (§4.2.1).
            if mx_route and not mx_secure:
                destinations = ([d for d in destinations if policy.allows(d.host)]
                                if policy is not None and enforced else [])
                if not destinations:
                    refusal = unvouched(domain)
                    self.log.info("{rcpt}: {refusal}", rcpt=address, refusal=str(refusal))
                    return DeliveryResult.bounced(str(refusal))
        elif demanding and await self._tls_optional(item):
            # TLS-Required: No (§4.2.2): every MX, TLS when offered, unchecked.
            relaxed = True
        reported = mx_route and transport.tls != "none" and not transport.lmtp
        if policy is not None and not relaxed:
            # A host with DANE is held to its TLSA records, not to the policy.
            allowed = [d for d in destinations if policy.allows(d.host)
                       or dane.get(d.host, HostDANE(d.host)).state == MATCH]
            refused = [d for d in destinations if d not in allowed]
            for d in refused:
                self._report(host_tls(domain, HostDANE(d.host), policy, reported), d,
                             "", Judgement("validation-failure",
                                           "MX host not in the MTA-STS policy"))
            if enforced:
                if not allowed:
                    return DeliveryResult.deferred(
                        f"4.7.5 MTA-STS policy of {domain} names none of its MX hosts")
                destinations = allowed
            elif refused:
                self.log.warn("MTA-STS (testing) of {domain}: MX {hosts} not in the "
                              "policy", domain=domain,
                              hosts=",".join(d.host for d in refused))
        prefix = b""
        if self.signer is not None:
            prefix = await self.signer.header_for(item)
        last = "4.4.1 no host could be reached"
        refusals: list[Refusal] = []
        tried = 0
        for destination in destinations:
            tls = host_tls(domain, dane.get(destination.host, HostDANE(destination.host)),
                           policy, reported, transport.tls, requiretls, relaxed)
            if tls.dane.state == FAILED:
                # RFC 7672 §2.2: a signed zone that fails to answer: the host is unusable
                # for now (no lasting refusal: a REQUIRETLS message waits for it too).
                self._report(tls, destination, "", Judgement("dnssec-invalid",
                                                             tls.dane.detail))
                last = f"4.7.5 {destination.host}: DANE: {tls.dane.detail}"
                tried += 1
                continue
            for ip in destination.addresses:
                result = await self._try(transport, destination, ip, message, address,
                                         held, prefix, tls)
                tried += 1
                if isinstance(result, DeliveryResult):
                    return result
                if isinstance(result, Refusal):
                    refusals.append(result)
                    last = str(result)
                else:
                    last = result
        if tried and len(refusals) == tried:
            # Every host said or showed it cannot carry the message: bounce now
            # (§4.2.1), rather than wait for a host that is not there.
            return DeliveryResult.bounced(bounce_detail(refusals))
        return DeliveryResult.deferred(last)

    def _report(self, tls: HostTLS, destination: Destination, ip: str,
                judgement: Judgement, session: Optional[ClientSession] = None) -> None:
        """Count a TLS outcome for TLS-RPT (when the host's outcomes are reported)."""
        if tls.report is None:
            return
        self.tls_reports.record(TLSResult(
            tls.policy_domain.lower(), tls.report, judgement.result_type,
            session.local_address if session is not None else "", destination.host,
            ip, judgement.reason))

    async def _tls_optional(self, item: QueueItem) -> bool:
        """Whether the message has ``TLS-Required: No`` (RFC 8689 §3).  Read only when
        a policy would require TLS; the content when read ahead, else its start."""
        head = item.content
        if head is None:
            try:
                head = await self.blobs.read_range(item.blob.id, 0,
                                                   min(item.blob.size, HEADER_PEEK))
            except BlobMissing:
                return False         # the delivery itself reports it
        return tls_optional(head)

    async def _session(self, transport: Transport, key: SessionKey,
                       destination: Destination, ip: str, tls: HostTLS,
                       fresh: bool = False) -> ClientSession | str | Refusal:
        """A reused idle session (after RSET) or a new, negotiated one (``fresh``:
        always a new one); or why not (a Refusal: a host that cannot carry a
        REQUIRETLS message).  With PIPELINING, the RSET goes out with the
        next transaction's commands (:meth:`ClientSession.send`) instead of costing
        a round trip of its own."""
        while not fresh and (session := self.sessions.take(key)) is not None:
            if not reusable(session, tls):
                session.close()
                continue
            if session.proto.lost is not None:
                session.close()
                continue
            if "PIPELINING" in session.extensions:
                session.rset_pending = True
                return session
            if await session.reset():
                return session
            session.close()
            break
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
        session = ClientSession(proto, destination.host, self.helo, self.timeouts,
                                self.reactor, transport.lmtp, self.ca_file,
                                transport.credentials)
        try:
            await session.open(tls.starttls)
        except SessionFailed as exc:
            failed = failed_negotiation(session)
            if failed is not None:
                self._report(tls, destination, ip, failed, session)
            said = "said" if exc.remote else "failed"
            if exc.auth:
                self.log.warn("{where}: {reply}; check auth_user and auth_password_file",
                              where=where, reply=str(exc.reply))
                return f"{exc.reply.status} {where} {said}: {exc.reply}"
            if exc.no_tls and tls.requiretls:
                refusal = session_refusal(where, "", False, session.extensions)
                assert refusal is not None
                self.log.info("{where}: {refusal}", where=where, refusal=str(refusal))
                return refusal
            self.log.info("{where}: {reply}; trying the next host", where=where,
                          reply=str(exc.reply))
            return f"{exc.reply.status} {where} {said}: {exc.reply}"
        judgement = judge(session, tls)
        self._report(tls, destination, ip, judgement, session)
        if tls.requiretls:
            refusal = session_refusal(
                where, session.tls, session.verified and not judgement.refuse,
                session.extensions,
                f"DANE: {judgement.reason}" if judgement.refuse and tls.dane.records
                else "")
            if refusal is not None:
                session.close()
                self.log.info("{where}: {refusal}; trying the next host", where=where,
                              refusal=str(refusal))
                return refusal
        elif judgement.refuse and tls.dane.records:
            session.close()
            self.log.warn("{where}: DANE: {reason}", where=where, reason=judgement.reason)
            return f"4.7.5 {where}: DANE: {judgement.reason}"
        elif judgement.refuse:
            session.close()
            self.log.warn("{where}: MTA-STS needs a valid certificate, got {tls}",
                          where=where, tls=session.tls)
            return f"4.7.5 {where}: MTA-STS needs a valid certificate ({session.tls})"
        return session

    async def _try(self, transport: Transport, destination: Destination, ip: str,
                   message: OutboundMessage, address: str,
                   held: list[tuple[SessionKey, ClientSession]], prefix: bytes,
                   tls: HostTLS) -> DeliveryResult | str | Refusal:
        """A result, or the reason to try the next address (a Refusal: this host
        cannot carry a REQUIRETLS message).  A session that can carry more goes into
        ``held``: back to the cache when the delivery is over (:meth:`deliver_held`)."""
        where = f"{destination.host}[{ip}]:{destination.port}"
        key = (ip, destination.port, destination.host, transport.lmtp,
               transport.credentials.user if transport.credentials else "")
        for attempt in (1, 2):
            # The second attempt, after a reused session failed, on a new connection.
            session = await self._session(transport, key, destination, ip, tls,
                                          fresh=attempt == 2)
            if not isinstance(session, ClientSession):
                return session
            reused = session.transactions > 0
            try:
                outcome = await session.send(message, self.blobs, prefix)
            except SessionFailed as exc:
                if reused and not exc.remote and attempt == 1:
                    continue              # a cached connection went stale: a fresh one
                said = "said" if exc.remote else "failed"
                detail = f"{exc.reply.status} {where} {said}: {exc.reply}"
                if exc.next_host:
                    self.log.info("{where}: {reply}; trying the next host", where=where,
                                  reply=str(exc.reply))
                    return detail
                return _result(exc.reply, detail, destination.host if exc.remote else "")
            held.append((key, session))
            reply = outcome.results[address]
            used = f" ({outcome.tls})" if outcome.tls else ""
            if tls.relaxed and reply.code < 300:
                # RFC 8689 §4.2.2: what the policy would have held back, and how it went.
                self.log.info("TLS-Required: No: <{rcpt}> sent to {where} {how} although "
                              "{policy} asks for verified TLS", rcpt=address, where=where,
                              how=_how(outcome.tls, session.verified), policy=tls.relaxed)
            return _result(reply, f"{reply.status} {where}{used} said: {reply}",
                           destination.host)
        return f"4.4.2 {where}: no usable session"


def _how(tls: str, verified: bool) -> str:
    if not tls:
        return "in clear"
    return f"over TLS ({tls})" if verified else f"over TLS, certificate unverified ({tls})"


def _nothing() -> None:
    pass


def _released(outcome: tuple[DeliveryResult, Callable[[], None]]) -> DeliveryResult:
    result, release = outcome
    release()
    return result


def _result(reply: Reply, detail: str, remote_mta: str) -> DeliveryResult:
    status = ("delivered" if reply.code < 300 else "deferred" if reply.code < 500
              else "bounced")
    diagnostic = f"smtp; {reply}" if remote_mta else ""
    return DeliveryResult(status, detail, remote_mta=remote_mta, diagnostic=diagnostic)
