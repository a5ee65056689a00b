"""MTA-STS (RFC 8461): a domain's published promise that its MX hosts speak TLS with
valid certificates, which turns opportunistic STARTTLS into required, verified TLS.

The TXT record ``_mta-sts.DOMAIN`` (``v=STSv1; id=...``) says a policy exists; the
policy itself comes over HTTPS (certificate verified) from
``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` and is cached for its
``max_age``, refetched when the TXT record's id changes.  In ``enforce`` mode mail
goes only to MX hosts the policy names, over TLS with a certificate valid for the MX
name; otherwise it waits (4.7.5).  ``testing`` mode only logs what would have failed.

The policies fetched are kept in SQL too (``IMTASTSPolicyStore``), read back the
first time a policy is asked for after a start: a restart keeps honouring a cached
``enforce`` policy until it expires, even while the policy server is down (§5).
A policy that cannot be fetched or read is counted for TLS-RPT (``reports``,
RFC 8460 §4.3.2.3).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import Logger

from lightmail.dns import DNSError, IResolver
from lightmail.storage.interfaces import IMTASTSPolicyStore, MTASTSPolicyRecord
from lightmail.tlsrpt.interfaces import STS, ITLSReports, NoTLSReports, ReportPolicy, TLSResult

MAX_POLICY = 64 * 1024
MAX_AGE_LIMIT = 31557600       # RFC 8461 §3.2: at most one year


class PolicyError(Exception):
    """The policy could not be fetched or read."""


@dataclass(frozen=True)
class Policy:
    id: str
    mode: str                  # enforce, testing, none
    mx: tuple[str, ...]
    max_age: int
    fetched: float

    def expired(self, now: float) -> bool:
        return now > self.fetched + self.max_age

    def allows(self, host: str) -> bool:
        """RFC 8461 §4.1: an exact name, or ``*.example.com`` for one more label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            pattern = pattern.lower().rstrip(".")
            if pattern.startswith("*."):
                head, _, rest = host.partition(".")
                if head and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def parse_policy(text: str, policy_id: str, now: float) -> Policy:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("not an STSv1 policy")
    mode = (fields.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {mode!r}")
    try:
        max_age = min(int((fields.get("max_age") or [""])[0]), MAX_AGE_LIMIT)
    except ValueError:
        raise PolicyError("bad or missing max_age") from None
    mx = tuple(fields.get("mx", []))
    if mode != "none" and not mx:
        raise PolicyError("no mx lines")
    return Policy(policy_id, mode, mx, max_age, now)


def policy_id(records: list[str]) -> Optional[str]:
    """The id of the one ``v=STSv1`` TXT record, or None (RFC 8461 §3.1: 1 to 32
    letters and digits)."""
    found = [r for r in records if r.replace(" ", "").startswith("v=STSv1;")]
    if len(found) != 1:
        return None
    for part in found[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key == "id" and value:
            return value if len(value) <= 32 and value.isascii() and value.isalnum() else None
    return None


Fetch = Callable[[str], Any]      # url -> Deferred/awaitable of the body (bytes)


class MTASTS:
    log = Logger(namespace="lightmail.outbound")

    def __init__(self, resolver: IResolver, fetch: Fetch,
                 clock: Callable[[], float] = time.time,
                 store: Optional[IMTASTSPolicyStore] = None,
                 reports: Optional[ITLSReports] = None) -> None:
        self.resolver, self.fetch, self.clock = resolver, fetch, clock
        self.reports: ITLSReports = reports or NoTLSReports()   # TLS-RPT's counts
        self.cache: dict[str, Policy] = {}
        self.store = store
        self.loaded = store is None         # the stored policies are in the cache
        self.loading: Optional[defer.Deferred[None]] = None

    async def _load(self) -> None:
        """The stored policies into the cache, once: callers meanwhile wait for the
        first one's read; one that failed is tried again by the next caller."""
        if self.loaded:
            return
        if self.loading is None:
            self.loading = defer.ensureDeferred(self._read_store())
            if self.loading.called:
                self.loading = None
                return
        await self.loading

    async def _read_store(self) -> None:
        assert self.store is not None
        try:
            records = await self.store.load(self.clock())
        except Exception as exc:
            self.log.warn("MTA-STS: stored policies not read: {error}",
                          error=str(exc) or exc.__class__.__name__)
            return
        finally:
            self.loading = None
        for record in records:
            self.cache.setdefault(record.domain, Policy(
                record.policy_id, record.mode, record.mx, record.max_age, record.fetched))
        self.loaded = True
        if records:
            self.log.info("MTA-STS: {count} stored policies read", count=len(records))

    async def _remember(self, domain: str, policy: Optional[Policy]) -> None:
        """Write the cache's change through to the store; a failure costs only the
        copy that would survive a restart."""
        if self.store is None:
            return
        try:
            if policy is None:
                await self.store.forget(domain)
            else:
                await self.store.save(MTASTSPolicyRecord(
                    domain, policy.id, policy.mode, policy.mx, policy.max_age,
                    policy.fetched))
        except Exception as exc:
            self.log.warn("MTA-STS policy of {domain} not stored: {error}", domain=domain,
                          error=str(exc) or exc.__class__.__name__)

    async def policy(self, domain: str) -> Optional[Policy]:
        """The domain's policy in force, or None (no policy, or none could be had)."""
        await self._load()
        domain = domain.lower()
        now = self.clock()
        cached = self.cache.get(domain)
        if cached is not None and cached.expired(now):
            del self.cache[domain]
            await self._remember(domain, None)
            cached = None
        try:
            new_id = policy_id(await self.resolver.txt(f"_mta-sts.{domain}"))
        except DNSError:
            return cached                  # §5.1: keep using what we have
        if new_id is None or (cached is not None and cached.id == new_id):
            return cached
        fetched = False
        try:
            body = await self.fetch(f"https://mta-sts.{domain}/.well-known/mta-sts.txt")
            fetched = True
            if len(body) > MAX_POLICY:
                raise PolicyError("policy too large")
            policy = parse_policy(body.decode("utf-8"), new_id, now)
        except Exception as exc:
            error = str(exc) or exc.__class__.__name__
            self.log.warn("MTA-STS policy of {domain} not usable: {error}", domain=domain,
                          error=error)
            self.reports.record(TLSResult(domain, ReportPolicy(STS),
                                          _failure_type(exc, fetched), reason=error[:255]))
            return cached
        self.cache[domain] = policy
        self.log.info("MTA-STS policy of {domain}: mode={mode} mx={mx}", domain=domain,
                      mode=policy.mode, mx=",".join(policy.mx))
        await self._remember(domain, policy)
        return policy


def _failure_type(exc: Exception, fetched: bool) -> str:
    """RFC 8460 §4.3.2.3: what became of a policy that could not be had."""
    if fetched:
        return "sts-policy-invalid"
    from OpenSSL import SSL
    from twisted.web.client import ResponseNeverReceived
    if isinstance(exc, SSL.Error) or (isinstance(exc, ResponseNeverReceived) and any(
            reason.check(SSL.Error) for reason in exc.reasons)):
        return "sts-webpki-invalid"
    return "sts-policy-fetch-error"


def https_fetcher(reactor: Any, resolver: IResolver, ca_file: str = "",
                  timeout: float = 60.0, port: int = 443) -> Fetch:
    """GET over HTTPS with the certificate verified (system roots, or ``ca_file``),
    the host looked up through ``resolver`` (as MX hosts are), no redirects
    (RFC 8461 §3.3), a size limit and a timeout."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
    from twisted.web.client import Agent, readBody
    from twisted.web.http_headers import Headers

    trust = None
    if ca_file:
        with open(ca_file, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())

    class Endpoint:
        def __init__(self, host: str) -> None:
            self.host = host

        def connect(self, factory: Any) -> Any:
            async def connect() -> Any:
                addresses = await resolver.addresses(self.host)
                if not addresses:
                    raise PolicyError(f"{self.host} has no address")
                ip = addresses[0]
                tcp_class = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
                tcp = tcp_class(reactor, ip, port, timeout=timeout)
                tls = wrapClientTLS(ssl.optionsForClientTLS(self.host, trustRoot=trust), tcp)
                return await tls.connect(factory)
            from twisted.internet.defer import ensureDeferred
            return ensureDeferred(connect())

    class Endpoints:
        def endpointForURI(self, uri: Any) -> Endpoint:
            return Endpoint(uri.host.decode("idna"))

    agent = Agent.usingEndpointFactory(reactor, Endpoints())

    async def fetch(url: str) -> bytes:
        response = await agent.request(b"GET", url.encode(),
                                       Headers({b"User-Agent": [b"LightMail"]}))
        if response.code != 200:
            raise PolicyError(f"HTTP {response.code}")
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        if not content_type.lower().startswith(b"text/plain"):
            raise PolicyError(f"content type {content_type.decode(errors='replace')!r}")
        length = response.length
        if isinstance(length, int) and length > MAX_POLICY:
            raise PolicyError("policy too large")
        body: bytes = await readBody(response).addTimeout(timeout, reactor)
        return body
    return fetch
