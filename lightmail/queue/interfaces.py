"""Interfaces of the queue subsystem."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from lightmail.storage.interfaces import BlobRef, QueueItem


@dataclass(frozen=True)
class DeliveryResult:
    """What became of one recipient: delivered, deferred (try again) or bounced."""

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


class IDeliveryAgent(Interface):
    """Delivers queued recipients of one transport (local, smtp, lmtp)."""

    transport = Attribute("The transport name this agent serves.")

    def deliver(item: QueueItem) -> Deferred[DeliveryResult]:
        """Deliver one recipient.  Must be idempotent: after a crash the same item
        may be handed over again."""

    # Optional: ``prepare(items) -> Deferred[list[QueueItem]]``, called with each
    # claimed batch before its items are handed to ``deliver`` one by one; fires with
    # the same items, in order, possibly with ``content`` read ahead (one disk hop
    # for the batch instead of one per message).  Not declared here, so that agents
    # without it still provide the interface.


class IMailboxDelivery(Interface):
    """Files a message straight into local mailboxes, without the queue (LMTP)."""

    def deliver_to_mailbox(address: str, blob: BlobRef, delivery_id: str,
                           fresh: bool = False,
                           before: Any = None) -> Deferred[DeliveryResult]:
        """Deliver ``blob`` to the local mailbox(es) ``address`` leads to.

        Durable when the Deferred fires with a delivered result.  The same
        ``delivery_id`` files a message once into a mailbox, however often it is asked.
        ``fresh``: ``delivery_id`` is new (no earlier append can carry it);
        ``before``: makes the blob durable first, in the transaction's worker hop
        (``LocalDeliveryAgent.can_file_after``); when it fails, nothing is filed.
        """
