"""OpenTelemetry's side of lightmail.telemetry: spans exported over OTLP/HTTP.

Spans are made on the reactor thread, cheaply (attributes and times in memory); a
BatchSpanProcessor exports them from a thread of its own, so a slow or absent
collector never holds the reactor (a full queue drops spans, as the SDK does).

Traces:

* ``PROTOCOL session`` (kind SERVER), a trace of its own per connection: protocol,
  listener, client address, conn id, the user once logged in, the messages accepted
  and the outcome (``logged_in`` or ``closed``);
* ``message accepted``: a trace of its own per message, linked to its session's span
  (and noted there as an event), from the moment its content is complete to its
  commit: queue id, size, recipients, outcome;
* ``delivery TRANSPORT``: a child of that message's span for each delivery attempt
  (by the queue runner, possibly in another process or days later): transport,
  recipient domain, attempt number, outcome.

A message's trace and span ids are derived from its queue id (SHA-256), which is how
a delivery attempt finds its parent without anything stored in the queue; sampling
(``sample_ratio``) decides on the trace id, so a message and its deliveries are
sampled together.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from twisted.internet import defer

from lightmail import __version__
from lightmail.config import TelemetryConfig
from lightmail.telemetry import MessageTrace, SessionTrace, Telemetry

FAILED = {"refused", "bounced", "dead", "failed"}


def message_ids(queue_id: str) -> tuple[int, int]:
    """The trace id and span id of a message's span, from its queue id."""
    digest = hashlib.sha256(b"lightmail-message:" + queue_id.encode()).digest()
    return (int.from_bytes(digest[:16], "big") or 1,
            int.from_bytes(digest[16:24], "big") or 1)


class _Ids(RandomIdGenerator):
    """Random ids, except for a message's span (set just before it is started)."""

    def __init__(self) -> None:
        self.forced = threading.local()

    def generate_trace_id(self) -> int:
        forced = getattr(self.forced, "trace_id", 0)
        return forced or super().generate_trace_id()

    def generate_span_id(self) -> int:
        forced = getattr(self.forced, "span_id", 0)
        if forced:
            self.forced.span_id = 0
            return forced  # type: ignore[no-any-return]
        return super().generate_span_id()


class _Span(MessageTrace):
    def __init__(self, span: Any) -> None:
        self.span = span
        self.ended = False

    def end(self, outcome: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.span.set_attribute("lightmail.outcome", outcome)
        if outcome in FAILED:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
        self.span.end()


class _Session(SessionTrace):
    def __init__(self, owner: OTelTelemetry, span: Any, protocol: str) -> None:
        self.owner = owner
        self.span = span
        self.protocol = protocol
        self.messages = 0
        self.ended = False

    def logged_in(self, user: str) -> None:
        self.span.set_attribute("enduser.id", user)

    def message(self, queue_id: str, size: int, recipients: int) -> MessageTrace:
        self.messages += 1
        self.span.add_event("message", {"lightmail.queue_id": queue_id})
        return self.owner.message(self.span, self.protocol, queue_id, size, recipients)

    def end(self, outcome: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.span.set_attribute("lightmail.messages", self.messages)
        self.span.set_attribute("lightmail.outcome", outcome)
        self.span.end()


class OTelTelemetry(Telemetry):
    def __init__(self, config: TelemetryConfig) -> None:
        self.ids = _Ids()
        self.sampler = TraceIdRatioBased(config.sample_ratio)
        resource = Resource.create({"service.name": config.service_name,
                                    "service.version": __version__})
        self.provider = TracerProvider(resource=resource, id_generator=self.ids,
                                       sampler=ParentBased(self.sampler))
        self.provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=5)))
        self.tracer = self.provider.get_tracer("lightmail", __version__)
        from twisted.internet import reactor
        # Once the services have stopped (sessions ended): what is left is sent.
        reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
            "during", "shutdown", self.shutdown)

    def session(self, protocol: str, listener: str, peer: str, conn_id: str
                ) -> SessionTrace:
        span = self.tracer.start_span(
            f"{protocol} session", context=Context(), kind=trace.SpanKind.SERVER,
            attributes={"lightmail.protocol": protocol, "lightmail.listener": listener,
                        "client.address": peer, "lightmail.conn_id": conn_id})
        return _Session(self, span, protocol)

    def message(self, session: Any, protocol: str, queue_id: str, size: int,
                recipients: int) -> MessageTrace:
        self.ids.forced.trace_id, self.ids.forced.span_id = message_ids(queue_id)
        try:
            span = self.tracer.start_span(
                "message accepted", context=Context(), kind=trace.SpanKind.SERVER,
                links=[trace.Link(session.get_span_context())],
                attributes={"lightmail.queue_id": queue_id, "lightmail.protocol": protocol,
                            "lightmail.message.size": size,
                            "lightmail.message.recipients": recipients})
        finally:
            self.ids.forced.trace_id = self.ids.forced.span_id = 0
        return _Span(span)

    def delivery(self, queue_id: str, transport: str, recipient: str, attempt: int
                 ) -> MessageTrace:
        trace_id, span_id = message_ids(queue_id)
        sampled = (trace_id & self.sampler.TRACE_ID_LIMIT) < self.sampler.bound
        parent = trace.NonRecordingSpan(trace.SpanContext(
            trace_id, span_id, is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else 0)))
        span = self.tracer.start_span(
            f"delivery {transport}", context=trace.set_span_in_context(parent),
            kind=trace.SpanKind.CLIENT,
            attributes={"lightmail.queue_id": queue_id, "lightmail.transport": transport,
                        "lightmail.recipient.domain": recipient.rpartition("@")[2],
                        "lightmail.attempt": attempt})
        return _Span(span)

    def shutdown(self) -> defer.Deferred[None]:
        """Export what is left, in a thread (the export may wait on the network);
        the reactor's shutdown waits for it (the exporter's timeout bounds it)."""
        from twisted.internet import reactor
        done: defer.Deferred[None] = defer.Deferred()

        def run() -> None:
            try:
                self.provider.shutdown()
            finally:
                reactor.callFromThread(done.callback, None)  # type: ignore[attr-defined]
        threading.Thread(target=run, name="lightmail-telemetry-flush", daemon=True).start()
        return done
