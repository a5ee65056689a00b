"""Interfaces of the queue subsystem."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from lightmail.storage.interfaces import IStagedBlob, QueueItem

#: The status of a delivery given back before it started (IDeliveryAgent.stop_waiting).
UNSTARTED = "unstarted"


@dataclass(frozen=True)
class DeliveryResult:
    """What became of one recipient: delivered, deferred (try again) or bounced; or
    unstarted (given back untried at a drain: nothing to record)."""

    status: str
    detail: str = ""
    # True when the agent already recorded the outcome in the queue, in the same
    # transaction as the delivery itself (local delivery on SQL does).
    recorded: bool = False
    # For DSNs (RFC 3464): the MTA that answered, and its words ("smtp; 550 ...").
    remote_mta: str = ""
    diagnostic: str = ""

    @classmethod
    def delivered(cls, detail: str = "") -> DeliveryResult:
        return cls("delivered", detail)

    @classmethod
    def deferred(cls, detail: str) -> DeliveryResult:
        return cls("deferred", detail)

    @classmethod
    def bounced(cls, detail: str) -> DeliveryResult:
        return cls("bounced", detail)

    @classmethod
    def unstarted(cls) -> DeliveryResult:
        return cls(UNSTARTED, "given back before it started (a drain)")


class IQueueKick(Interface):
    """Tells the queue runner that there is work (a message was queued)."""

    def kick() -> None:
        """Look for due work soon (a notice; nothing waits for it)."""


class IDeliveryAgent(Interface):
    """Delivers queued recipients of one transport (local, smtp, lmtp)."""

    transport = Attribute("The transport name this agent serves.")

    def prepare(items: list[QueueItem]) -> Deferred[list[QueueItem]]:
        """Called with each claimed batch before its items are delivered one by one;
        fires with the same items, in order, possibly with ``content`` read ahead
        (one disk hop for the batch instead of one per message).  An agent with
        nothing to read ahead fires with ``items`` as they are."""

    def deliver(item: QueueItem) -> Deferred[DeliveryResult]:
        """Deliver one recipient.  Must be idempotent: after a crash the same item
        may be handed over again."""

    def deliver_held(item: QueueItem
                     ) -> Deferred[tuple[DeliveryResult, Callable[[], None]]]:
        """:meth:`deliver`, holding what the delivery used (the SMTP agent: its
        count against the destination's limits) until the queue runner calls the
        function given with the result, once the outcome is recorded.  An agent
        that holds nothing gives a function that does nothing."""

    def stop_waiting() -> None:
        """The queue runner stops (a drain): the deliveries that wait for their turn
        and have not started fire now with ``DeliveryResult.unstarted()``, their
        item untouched, and the runner hands their leases back; those started go
        on.  An agent whose deliveries start at once does nothing."""

    def close() -> None:
        """Let go of idle connections (at shutdown, once deliveries have finished)."""


class ISenderRewriter(Interface):
    """What the SMTP delivery agent sends as MAIL FROM for a queued recipient: the
    queue's sender, or another address standing for it (SRS, for mail an alias
    forwards: lightmail.policy.srs).  The queue keeps its own sender for notices."""

    def envelope_sender(item: QueueItem) -> Deferred[str]:
        """The reverse-path for ``item``'s delivery (decided once per attempt)."""


class IMailboxDelivery(Interface):
    """Files a message straight into local mailboxes, without the queue (LMTP, and
    SMTP's acceptance when every recipient is local)."""

    def deliver_each(deliveries: Sequence[tuple[str, str]], blob: IStagedBlob
                     ) -> list[Deferred[DeliveryResult]]:
        """File ``blob`` for each (address, new delivery id), each on its own; one
        result each, delivered meaning durable."""

    def deliver_at_acceptance(addresses: Sequence[str], blob: IStagedBlob,
                              queue_id: str) -> Deferred[list[DeliveryResult]]:
        """File ``blob`` for every address in one transaction, all or nothing; fails
        with NotFiled (nothing filed, the blob durable) when any cannot be filed."""
