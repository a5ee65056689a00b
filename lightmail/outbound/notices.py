"""Delivery status notifications: a DSN (RFC 3464) goes back to the sender when a
recipient bounces, or is delivered and the sender asked (NOTIFY=SUCCESS, RFC 3461),
or, with ``[outbound] delay_warning_time``, is still waiting that long after the
message arrived (Action: delayed; once per recipient; NOTIFY=DELAY or no NOTIFY).

Never to the null sender (a DSN is sent from ``<>``, so DSNs cannot loop); the DSN
is queued like any message, to the local mailbox or out over SMTP.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger

from lightmail.outbound.dsn import RecipientStatus, build_dsn, is_bounce_loop, should_notify
from lightmail.queue.interfaces import DeliveryResult
from lightmail.storage.interfaces import DurableBlob, Envelope, QueueItem, QueueRecipient
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
        status, text = _status(result.detail, "5" if action == "failed" else "2")
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
        queue_id = await services.write_port.enqueue(await self._notice_envelope(item),
                                                    DurableBlob(blob))
        self.log.info("sent a {action} notice for <{rcpt}> to <{sender}> as {dsn_id}",
                      action=action, rcpt=item.recipient.address, sender=item.mail_from,
                      dsn_id=queue_id, msg_id=item.queue_id)
        services.queue_runner.kick()

    async def delayed(self, item: QueueItem, result: DeliveryResult,
                      retry_until: float) -> None:
        """Called by the queue runner when ``item``, just deferred, is late enough
        for a delay warning (``[outbound] delay_warning_time``).

        One notice covers every recipient of the message that waits after a failure
        and has not had its warning, NOTIFY permitting; they are marked warned in
        the transaction that queues the notice, so that each gets at most one,
        whatever restarts or crashes come between.  ``retry_until`` (Unix time) is
        when the queue gives up (Will-Retry-Until)."""
        if is_bounce_loop(item.mail_from):
            return
        services = self.services
        original: bytes | None = None
        for _ in range(3):      # again if another node warned some of them meanwhile
            rows = [row for row in await services.queue.delayed_recipients(item.queue_id)
                    if _wants_delay_notice(row["notify"])]
            if not rows:
                return
            if original is None:
                original = await services.blobs.read(item.blob.id)
            now = time.time()
            recipients = []
            for row in rows:
                status, text = _status(row["last_error"] or "", "4")
                this = row["id"] == item.recipient_id
                recipients.append(RecipientStatus(
                    address=row["recipient"], action="delayed", status=status,
                    diagnostic=(result.diagnostic if this and result.diagnostic
                                else f"X-LightMail; {text}"),
                    orcpt=row["orcpt"], remote_mta=(result.remote_mta or None) if this else None,
                    last_attempt=now if this else None, will_retry_until=retry_until))
            dsn = build_dsn(
                reporting_mta=services.config.hostname, original_sender=item.mail_from,
                queue_id=item.queue_id, arrival=queue_id_time(item.queue_id) or now,
                recipients=recipients, original=original, ret=item.envelope.ret,
                envid=item.envelope.envid, smtputf8=item.envelope.smtputf8)
            blob = await services.blobs.put(dsn)
            queue_id = await services.write_port.warn_delayed(
                [row["id"] for row in rows], await self._notice_envelope(item),
                DurableBlob(blob))
            if queue_id is None:
                continue
            self.log.info("sent a delay notice for {rcpts} to <{sender}> as {dsn_id}",
                          rcpts=", ".join(f"<{row['recipient']}>" for row in rows),
                          sender=item.mail_from, dsn_id=queue_id, msg_id=item.queue_id)
            services.queue_runner.kick()
            return

    async def _notice_envelope(self, item: QueueItem) -> Envelope:
        """The envelope of a notice about ``item``: from <>, to its sender."""
        resolution = await self.services.directory.resolve(item.mail_from)
        transport = "local" if resolution.is_local_domain else "smtp"
        return Envelope(mail_from="", recipients=[QueueRecipient(item.mail_from, transport)],
                        source="local", smtputf8=item.envelope.smtputf8)


def _status(detail: str, kind: str) -> tuple[str, str]:
    """(enhanced status code, text) of a result's detail ("4.4.1 connect to ...");
    ``kind`` ("2", "4" or "5") makes the code when the detail has none."""
    status, _, text = detail.partition(" ")
    if not status[:1].isdigit():
        return f"{kind}.0.0", detail
    return status, text


def _wants_delay_notice(notify: str | None) -> bool:
    try:
        return should_notify(notify, "delayed")
    except ValueError:          # validated at RCPT; a bad value asks for nothing
        return False
