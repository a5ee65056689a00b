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

#: The queue source of a notice to postmaster about a notice that bounced.
DOUBLE_BOUNCE = "double-bounce"


class Notifier:
    log = Logger(namespace="lightmail.queue")

    def __init__(self, services: Any) -> None:
        self.services = services

    def nobody_to_tell(self, item: QueueItem) -> bool:
        """Whether the failure of ``item`` can be told to nobody: it has the null
        sender (a notice, never answered with a notice), and either no postmaster is
        configured or it is the notice to postmaster itself.  The queue keeps such a
        recipient, dead, instead of dropping it."""
        return is_bounce_loop(item.mail_from) and (
            not self.services.config.server.postmaster
            or item.envelope.source == DOUBLE_BOUNCE)

    async def outcome(self, item: QueueItem, result: DeliveryResult) -> None:
        """Called by the queue runner once a recipient is final."""
        if result.status == "bounced":
            action = "failed"
        elif result.status == "delivered":
            action = "relayed" if item.recipient.transport == "smtp" else "delivered"
        else:
            return
        double_bounce = is_bounce_loop(item.mail_from)
        if double_bounce:
            # A notice that could not be delivered: postmaster hears of it, once
            # (that notice, should it bounce too, is kept dead: nobody_to_tell).
            if action != "failed" or self.nobody_to_tell(item):
                return
        elif not should_notify(item.recipient.notify, action):
            return
        status, text = _status(result.detail, "5" if action == "failed" else "2")
        services = self.services
        original = await services.blobs.read(item.blob.id)
        to = services.config.server.postmaster if double_bounce else item.mail_from
        dsn = build_dsn(
            reporting_mta=services.config.hostname, original_sender=to,
            queue_id=item.queue_id, arrival=queue_id_time(item.queue_id) or time.time(),
            recipients=[RecipientStatus(
                address=item.recipient.address, action=action, status=status,
                diagnostic=result.diagnostic or f"X-LightMail; {text}",
                orcpt=item.recipient.orcpt, remote_mta=result.remote_mta or None,
                last_attempt=time.time())],
            original=original, ret=_ret(item), envid=item.envelope.envid,
            smtputf8=item.envelope.smtputf8)
        blob = await services.blobs.put(dsn)
        envelope = await self._notice_envelope(item, to, DOUBLE_BOUNCE if double_bounce
                                               else "local")
        queue_id = await services.write_port.enqueue(envelope, DurableBlob(blob))
        self.log.info("sent a {action} notice for <{rcpt}> to <{sender}> as {dsn_id}",
                      action="double bounce" if double_bounce else action,
                      rcpt=item.recipient.address, sender=to, dsn_id=queue_id,
                      msg_id=item.queue_id)
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
                recipients=recipients, original=original, ret=_ret(item),
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

    async def _notice_envelope(self, item: QueueItem, to: str | None = None,
                               source: str = "local") -> Envelope:
        """The envelope of a notice about ``item``: from <>, to its sender (or ``to``).
        ``source`` marks the notices to postmaster (DOUBLE_BOUNCE)."""
        to = to or item.mail_from
        resolution = await self.services.directory.resolve(to)
        transport = "local" if resolution.is_local_domain else "smtp"
        return Envelope(mail_from="", recipients=[QueueRecipient(to, transport)],
                        source=source, smtputf8=item.envelope.smtputf8)


def _ret(item: QueueItem) -> str | None:
    """What of the original a notice returns: for a REQUIRETLS message only its
    header section, whatever RET asked (RFC 8689 §5): the notice, from the null
    sender, may travel without TLS."""
    return "HDRS" if item.envelope.requiretls else item.envelope.ret


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
