"""The seams through which LightMail's parts record metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class IProtocolMeters(Interface):
    """What one protocol's sessions record (``smtp``, ``submission``, ``lmtp``,
    ``imap``, ``pop3``); its label children are bound when it is made."""

    def connection_opened() -> None:
        """A connection was admitted."""

    def connection_closed() -> None:
        """An admitted connection ended."""

    def session_opened() -> None:
        """A connection logged in (a session)."""

    def session_closed() -> None:
        """A logged-in connection ended."""

    def command(verb: str) -> None:
        """A command was received; an unknown one counts as ``other``."""

    def auth(mechanism: str, ok: bool) -> None:
        """An authentication attempt ended (``mechanism``: a SASL name in lower case,
        or ``password`` for IMAP LOGIN and POP3 USER/PASS)."""

    def message(code: int, status: str) -> None:
        """The final reply to a message (LMTP: to one of its recipients)."""

    def refused(stage: str, code: int, status: str) -> None:
        """A sender (``stage`` mail) or a recipient (rcpt) was refused before the
        content, with that reply."""

    def tls(version: str) -> None:
        """A TLS handshake ended with ``version`` (``TLSv1.3``...)."""

    def connection_refused(reason: str) -> None:
        """A connection was refused before its session began: ``reason`` is
        connections (the listener's connection limits), memory (the memory ceiling),
        client_errors (the address's failed commands), shutting_down or proxy_header
        (a PROXY header missing, malformed, late, or from an address not in
        proxy_from)."""


class IMetrics(Interface):
    """A process's metrics: recording, and the exposition of ``/metrics``."""

    registry = Attribute("This process's prometheus_client CollectorRegistry.")

    def protocol(name: str, commands: tuple[str, ...] = ()) -> IProtocolMeters:
        """The meters of protocol ``name``, ``commands`` being its known command
        verbs (upper case): the label values ``command`` may take besides other."""

    def sql_timer(kind: str) -> Callable[[float], None]:
        """Observes the seconds of one SQL call of ``kind`` (read, write)."""

    def dns_timer(rdtype: str) -> Callable[[float], None]:
        """Observes the seconds of one DNS lookup of ``rdtype`` (MX, A, TXT)."""

    def group_committed(size: int) -> None:
        """A group commit of ``size`` requests."""

    def delivery(transport: str, status: str, attempt_seconds: float,
                 queued_seconds: float | None) -> None:
        """A delivery attempt ended with ``status`` (delivered, deferred, bounced,
        dead); ``queued_seconds``: for a final status, the time since reception."""

    def queue_census(rows: list[tuple[str, int, float]]) -> None:
        """The queue's recipients now: (state, count, age of the oldest in seconds)."""

    def worker_restarted() -> None:
        """A worker process ended and is started again."""

    def writer_restarted() -> None:
        """The writer process ended and is started again."""

    def memory(used: int, ceiling: int, refusing: bool) -> None:
        """The server's memory now (bytes; ceiling 0: none) and whether new
        connections are refused for it (lightmail/resources.py)."""

    def set_ready(ready: bool) -> None:
        """The outcome of the last readiness check."""

    def add_sampler(sample: Callable[[], Deferred[Any]]) -> None:
        """Call ``sample`` before each exposition (to refresh what is measured by
        asking: the queue's sizes, the other processes' counts)."""

    def update_source(source: str, snapshot: bytes) -> None:
        """The latest :meth:`snapshot` of another process of this server (a worker,
        the writer), summed into each exposition."""

    def retire_source(source: str) -> None:
        """That process ended: its counters stay in the totals, its gauges go."""

    def snapshot() -> bytes:
        """This process's samples, encoded for another process (federation)."""

    def exposition() -> Deferred[bytes]:
        """Run the samplers, then the text exposition of everything gathered."""
