"""Delivery status notifications: a DSN (RFC 3464) goes back to the sender when a
recipient bounces, or is delivered and the sender asked (NOTIFY=SUCCESS, RFC 3461).

Never to the null sender (a DSN is sent from ``<>``, so DSNs cannot loop); the DSN
is queued like any message, to the local mailbox or out over SMTP.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger

from lightmail.outbound.dsn import RecipientStatus, build_dsn, is_bounce_loop, should_notify
from lightmail.queue.interfaces import DeliveryResult
from lightmail.storage.interfaces import Envelope, QueueItem, QueueRecipient
from lightmail.storage.queuestore import queue_id_time


class Notifier:
    log = Logger(namespace="lightmail.queue")

    def __init__(self, services: Any) -> None:
        self.services = services

    async def outcome(self, item: QueueItem, result: DeliveryResult) -> None:
        """Called by the queue runner once a recipient is final."""
        if result.status == "bounced":
            action = "failed"
        elif result.status == "delivered":
            action = "relayed" if item.recipient.transport == "smtp" else "delivered"
        else:
            return
        if is_bounce_loop(item.mail_from) or not should_notify(item.recipient.notify,
                                                                action):
            return
        status, _, text = result.detail.partition(" ")
        if not status[:1].isdigit():
            status, text = ("5.0.0" if action == "failed" else "2.0.0"), result.detail
        services = self.services
        original = await services.blobs.read(item.blob.id)
        dsn = build_dsn(
            reporting_mta=services.config.hostname, original_sender=item.mail_from,
            queue_id=item.queue_id, arrival=queue_id_time(item.queue_id) or time.time(),
            recipients=[RecipientStatus(
                address=item.recipient.address, action=action, status=status,
                diagnostic=result.diagnostic or f"X-LightMail; {text}",
                orcpt=item.recipient.orcpt, remote_mta=result.remote_mta or None,
                last_attempt=time.time())],
            original=original, ret=item.envelope.ret, envid=item.envelope.envid,
            smtputf8=item.envelope.smtputf8)
        blob = await services.blobs.put(dsn)
        resolution = await services.directory.resolve(item.mail_from)
        transport = "local" if resolution.is_local_domain else "smtp"
        queue_id = await services.queue.enqueue(Envelope(
            mail_from="", recipients=[QueueRecipient(item.mail_from, transport)],
            source="local", smtputf8=item.envelope.smtputf8), blob)
        self.log.info("sent a {action} notice for <{rcpt}> to <{sender}> as {dsn_id}",
                      action=action, rcpt=item.recipient.address, sender=item.mail_from,
                      dsn_id=queue_id, msg_id=item.queue_id)
        services.queue_runner.kick()
