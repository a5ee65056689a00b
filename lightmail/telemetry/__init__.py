"""Traces of sessions and messages (OpenTelemetry), off unless ``[telemetry]
otlp_endpoint`` is set.

What a protocol or the queue sees is this module's small interface: a
:class:`Telemetry` gives a :class:`SessionTrace` per connection (its span: protocol,
listener, client, user once logged in, outcome), a session gives a
:class:`MessageTrace` per accepted message (queue id, size, recipients), and the
queue runner one per delivery attempt, a child of its message's span.  These classes
are also the "off" implementation: they do nothing, and OpenTelemetry is not
imported.  ``otel.py`` is the real one, chosen once, by :func:`make_telemetry` (from
lightmail/wiring.py).
"""

from __future__ import annotations

from lightmail.config import TelemetryConfig


class MessageTrace:
    """The span of one message's acceptance, or of one delivery attempt."""

    def end(self, outcome: str) -> None:
        """Done: ``outcome`` is accepted/refused, or delivered/deferred/bounced/dead."""


NO_MESSAGE = MessageTrace()


class SessionTrace:
    """The span of one protocol session."""

    def logged_in(self, user: str) -> None:
        """The session logged in as ``user``."""

    def message(self, queue_id: str, size: int, recipients: int) -> MessageTrace:
        """A message of this session is being accepted."""
        return NO_MESSAGE

    def end(self, outcome: str) -> None:
        """The connection is closed."""


NO_SESSION = SessionTrace()


class Telemetry:
    """Where traces come from; this one makes none."""

    def session(self, protocol: str, listener: str, peer: str, conn_id: str
                ) -> SessionTrace:
        return NO_SESSION

    def delivery(self, queue_id: str, transport: str, recipient: str, attempt: int
                 ) -> MessageTrace:
        return NO_MESSAGE


NO_TELEMETRY = Telemetry()


def make_telemetry(config: TelemetryConfig, serves_sessions: bool = True) -> Telemetry:
    """OpenTelemetry when an endpoint is configured (and the process has sessions or
    a queue to trace); else :data:`NO_TELEMETRY`, without importing it."""
    if not config.otlp_endpoint or not serves_sessions:
        return NO_TELEMETRY
    from lightmail.telemetry.otel import OTelTelemetry
    return OTelTelemetry(config)
