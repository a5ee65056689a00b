"""LightMail's metric families, and the per-protocol meters bound in advance.

Names and labels are documented in docs/operations.rst ("Metrics and health"); the
Grafana dashboard and the alert rules in etc/ query them, and a test checks that every
name they use is exposed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from lightmail import __version__
from lightmail.metrics.federation import Federation, MergedCollector, encode, families
from lightmail.metrics.interfaces import IMetrics, IProtocolMeters

#: Seconds: from a millisecond (an SQL read from cache) to a minute.
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
         10.0, 30.0, 60.0)
#: Seconds a message waits in the queue: a second to five days.
_QUEUED = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 5 * 86400.0)
_GROUPS = (1, 2, 4, 8, 16, 32, 64, 128, 200)

#: Families only the main process keeps (or whose value is its own, as the version):
#: another process's would be added to them, so its snapshot leaves them out.
_MAIN_PROCESS_ONLY = frozenset((
    "lightmail_build_info", "lightmail_ready", "lightmail_queue_recipients",
    "lightmail_queue_oldest_seconds", "lightmail_worker_restarts",
    "lightmail_writer_restarts", "lightmail_memory_used_bytes",
    "lightmail_memory_ceiling_bytes", "lightmail_memory_refusing"))

#: How long an exposition waits for one sampler (another process, say).
SAMPLE_TIMEOUT = 5.0


@implementer(IProtocolMeters)
class ProtocolMeters:
    """One protocol's children, bound when made: recording is a lookup and an add."""

    def __init__(self, metrics: Metrics, name: str, commands: tuple[str, ...]) -> None:
        self._open = metrics.connections_open.labels(name)
        self._total = metrics.connections.labels(name)
        self._sessions_open = metrics.sessions_open.labels(name)
        self._sessions = metrics.sessions.labels(name)
        self._commands = {verb: metrics.commands.labels(name, verb) for verb in commands}
        self._other = metrics.commands.labels(name, "other")
        self._family = metrics
        self._name = name
        # Made on first use: the replies and mechanisms are a small fixed set of
        # LightMail's own, but not listed anywhere to bind in advance.
        self._auth: dict[tuple[str, bool], Any] = {}
        self._messages: dict[tuple[int, str], Any] = {}
        self._refused: dict[tuple[str, int, str], Any] = {}
        self._tls: dict[str, Any] = {}
        self._refused_connections: dict[str, Any] = {}

    def connection_opened(self) -> None:
        self._open.inc()
        self._total.inc()

    def connection_closed(self) -> None:
        self._open.dec()

    def session_opened(self) -> None:
        self._sessions_open.inc()
        self._sessions.inc()

    def session_closed(self) -> None:
        self._sessions_open.dec()

    def command(self, verb: str) -> None:
        (self._commands.get(verb) or self._other).inc()

    def auth(self, mechanism: str, ok: bool) -> None:
        child = self._auth.get((mechanism, ok))
        if child is None:
            child = self._auth[(mechanism, ok)] = self._family.auth.labels(
                self._name, mechanism, "success" if ok else "failure")
        child.inc()

    def message(self, code: int, status: str) -> None:
        child = self._messages.get((code, status))
        if child is None:
            result = "accepted" if code < 400 else "deferred" if code < 500 else "rejected"
            child = self._messages[(code, status)] = self._family.messages.labels(
                self._name, result, f"{code} {status}".strip())
        child.inc()

    def refused(self, stage: str, code: int, status: str) -> None:
        child = self._refused.get((stage, code, status))
        if child is None:
            child = self._refused[(stage, code, status)] = self._family.refusals.labels(
                self._name, stage, f"{code} {status}".strip())
        child.inc()

    def tls(self, version: str) -> None:
        child = self._tls.get(version)
        if child is None:
            child = self._tls[version] = self._family.tls.labels(self._name, version)
        child.inc()

    def connection_refused(self, reason: str) -> None:
        child = self._refused_connections.get(reason)
        if child is None:
            child = self._refused_connections[reason] = \
                self._family.connections_refused.labels(self._name, reason)
        child.inc()


@implementer(IProtocolMeters)
class Uncounted:
    """Meters that record nothing: for a factory made outside a server (a test's)."""

    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def session_opened(self) -> None: ...
    def session_closed(self) -> None: ...
    def command(self, verb: str) -> None: ...
    def auth(self, mechanism: str, ok: bool) -> None: ...
    def message(self, code: int, status: str) -> None: ...
    def refused(self, stage: str, code: int, status: str) -> None: ...
    def tls(self, version: str) -> None: ...
    def connection_refused(self, reason: str) -> None: ...


UNCOUNTED = Uncounted()


@implementer(IMetrics)
class Metrics:
    """One process's registry and metric families (see the module docstring)."""

    log = Logger()

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.federation = Federation()
        self._samplers: list[Callable[[], Deferred[Any]]] = []
        self._protocols: dict[str, ProtocolMeters] = {}
        reg = self.registry
        by_protocol = ["protocol"]
        self.connections_open = Gauge(
            "lightmail_connections_open", "Connections open now.", by_protocol,
            registry=reg)
        self.connections = Counter(
            "lightmail_connections", "Connections admitted.", by_protocol, registry=reg)
        self.connections_refused = Counter(
            "lightmail_connections_refused",
            "Connections refused before their session began, by reason (connections, "
            "memory, client_errors, shutting_down, proxy_header).",
            ["protocol", "reason"], registry=reg)
        self.sessions_open = Gauge(
            "lightmail_sessions_open", "Logged-in sessions open now.", by_protocol,
            registry=reg)
        self.sessions = Counter(
            "lightmail_sessions", "Connections that logged in.", by_protocol,
            registry=reg)
        self.commands = Counter(
            "lightmail_commands", "Commands received (unknown ones as other).",
            ["protocol", "command"], registry=reg)
        self.auth = Counter(
            "lightmail_auth", "Authentication attempts by mechanism and result.",
            ["protocol", "mechanism", "result"], registry=reg)
        self.messages = Counter(
            "lightmail_messages",
            "Final replies to messages (LMTP: per recipient) by result and reply.",
            ["protocol", "result", "reply"], registry=reg)
        self.refusals = Counter(
            "lightmail_refusals",
            "Senders (MAIL) and recipients (RCPT) refused before the content, by reply.",
            ["protocol", "stage", "reply"], registry=reg)
        self.tls = Counter(
            "lightmail_tls_handshakes", "TLS handshakes by protocol version.",
            ["protocol", "version"], registry=reg)
        self.queue = Gauge(
            "lightmail_queue_recipients", "Queued recipients by state.", ["state"],
            registry=reg)
        self.queue_oldest = Gauge(
            "lightmail_queue_oldest_seconds",
            "Age of the oldest queued message by its recipients' state.", ["state"],
            registry=reg)
        self.deliveries = Counter(
            "lightmail_deliveries", "Delivery attempts by transport and outcome.",
            ["transport", "status"], registry=reg)
        self.attempt_seconds = Histogram(
            "lightmail_delivery_attempt_seconds",
            "Duration of one delivery attempt.", ["transport"], buckets=_FAST,
            registry=reg)
        self.queued_seconds = Histogram(
            "lightmail_delivery_seconds",
            "From reception to the final outcome (delivered, bounced).",
            ["transport", "status"], buckets=_QUEUED, registry=reg)
        self.sql_seconds = Histogram(
            "lightmail_sql_seconds",
            "SQL calls through the thread pool, queueing included.", ["kind"],
            buckets=_FAST, registry=reg)
        self.dns_seconds = Histogram(
            "lightmail_dns_seconds", "DNS lookups (outbound MTA, policy checks).", ["rdtype"],
            buckets=_FAST, registry=reg)
        self.group_sizes = Histogram(
            "lightmail_group_commit_size", "Requests committed together in one group.",
            buckets=_GROUPS, registry=reg)
        self.worker_restarts = Counter(
            "lightmail_worker_restarts", "Worker processes started again after they "
            "ended.", registry=reg)
        self.writer_restarts = Counter(
            "lightmail_writer_restarts", "Writer processes started again after they "
            "ended.", registry=reg)
        self.memory_used = Gauge(
            "lightmail_memory_used_bytes",
            "Proportional size (Pss) of the server's processes (main, workers, writer).",
            registry=reg)
        self.memory_ceiling = Gauge(
            "lightmail_memory_ceiling_bytes",
            "[server] memory_limit in bytes (0: none).", registry=reg)
        self.memory_refusing = Gauge(
            "lightmail_memory_refusing",
            "1 while new connections are refused for memory.", registry=reg)
        self.ready = Gauge(
            "lightmail_ready", "1 when the last readiness check passed (see /readyz).",
            registry=reg)
        Gauge("lightmail_build_info", "LightMail's version.", ["version"],
              registry=reg).labels(__version__).set(1)
        self._group_observe = self.group_sizes.observe

    # -- recording -------------------------------------------------------------------

    def protocol(self, name: str, commands: tuple[str, ...] = ()) -> ProtocolMeters:
        # Every listener of a protocol shares its children (and its command list).
        meters = self._protocols.get(name)
        if meters is None:
            meters = self._protocols[name] = ProtocolMeters(self, name, commands)
        return meters

    def sql_timer(self, kind: str) -> Callable[[float], None]:
        return self.sql_seconds.labels(kind).observe

    def dns_timer(self, rdtype: str) -> Callable[[float], None]:
        return self.dns_seconds.labels(rdtype).observe

    def group_committed(self, size: int) -> None:
        self._group_observe(size)

    def delivery(self, transport: str, status: str, attempt_seconds: float,
                 queued_seconds: float | None) -> None:
        self.deliveries.labels(transport, status).inc()
        self.attempt_seconds.labels(transport).observe(attempt_seconds)
        if queued_seconds is not None:
            self.queued_seconds.labels(transport, status).observe(queued_seconds)

    def queue_census(self, rows: list[tuple[str, int, float]]) -> None:
        self.queue.clear()
        self.queue_oldest.clear()
        for state, count, oldest in rows:
            self.queue.labels(state).set(count)
            self.queue_oldest.labels(state).set(oldest)

    def worker_restarted(self) -> None:
        self.worker_restarts.inc()

    def writer_restarted(self) -> None:
        self.writer_restarts.inc()

    def memory(self, used: int, ceiling: int, refusing: bool) -> None:
        self.memory_used.set(used)
        self.memory_ceiling.set(ceiling)
        self.memory_refusing.set(1 if refusing else 0)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    # -- exposition ------------------------------------------------------------------

    def add_sampler(self, sample: Callable[[], Deferred[Any]]) -> None:
        self._samplers.append(sample)

    def update_source(self, source: str, snapshot: bytes) -> None:
        self.federation.update(source, snapshot)

    def retire_source(self, source: str) -> None:
        self.federation.retire(source)

    def snapshot(self) -> bytes:
        return encode([family for family in families(self.registry.collect())
                       if family[0] not in _MAIN_PROCESS_ONLY])

    @defer.inlineCallbacks
    def exposition(self) -> Any:
        from twisted.internet import reactor
        waits = []
        for sample in self._samplers:
            d = defer.maybeDeferred(sample)
            d.addTimeout(SAMPLE_TIMEOUT, reactor)
            d.addErrback(self._sampler_failed)
            waits.append(d)
        yield defer.gatherResults(waits)
        merged = list(self.federation.merged(families(self.registry.collect())))
        return generate_latest(MergedCollector(merged))  # type: ignore[arg-type]

    def _sampler_failed(self, failure: Any) -> None:
        # The other families are still worth a scrape: say what is missing.
        self.log.warn("metrics: a sampler failed: {error}",
                      error=failure.getErrorMessage())
