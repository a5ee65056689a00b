"""``POST /api/v1/send``: submit a message as a user, as if they had logged in on the
submission port: the same SMTP policy decides on the sender (``require_sender_match``)
and each recipient (local, aliased, or relayed out because the sender is
authenticated), and the message is queued, or filed at once, as submission does.
Like Postfix's ``sendmail`` for local programs, a message without ``Date:`` or
``Message-ID:`` gets them."""

from __future__ import annotations

import re
from email.utils import formatdate, make_msgid
from typing import Any

from twisted.internet import defer

from lightmail.admin.api import schemas as js
from lightmail.admin.api.routing import ApiError, Call, Route
from lightmail.directory.cred import MailAccount
from lightmail.directory.interfaces import NotFound
from lightmail.logs import new_id
from lightmail.policy.dkim import header_fields, header_section
from lightmail.smtp.codes import Reply
from lightmail.smtp.policy import Session, SMTPHandler, Transaction
from lightmail.storage.queuestore import new_queue_id

V1 = "/api/v1"
_LINE_END = re.compile(rb"\r\n|\r|\n")


class Send:
    def __init__(self, services: Any) -> None:
        self.services = services
        self.handler = SMTPHandler(services)

    async def send(self, call: Call) -> Any:
        body, services = call.body, self.services
        user = await services.directory.get_user(body["user"])
        if user is None:
            raise NotFound(f"no such user: {body['user']}")
        if not user.enabled:
            raise ApiError(422, f"{user.address} is disabled: they cannot send", "user")
        account = MailAccount(user, services.directory, services.mailstore)
        session = Session(conn_id=new_id(), peer="admin-api", submission=True,
                          esmtp=True, account=account)
        sender = body.get("from", user.address)
        content = self._content(body["message"])
        tx = Transaction(mail_from=sender, smtputf8=not all(
            text.isascii() for text in [sender, *body["to"]]),
            body=None if content.isascii() else "8BITMIME")
        _refused(await defer.maybeDeferred(self.handler.handle_mail, session, tx), "from")
        for index, address in enumerate(body["to"]):
            reply, targets = await self.handler.handle_rcpt(session, tx, address, None, None)
            _refused(reply, f"to[{index}]")
            tx.recipients += targets
            tx.rcpt_count += 1
            tx.accepted.append((address, targets))
        queue_id = new_queue_id()
        writer = services.blobs.writer()
        writer.write(self._received(queue_id, user.address) + content)
        staged = await writer.stage()
        try:
            reply = await self.handler.handle_message(session, tx, staged, queue_id)
        except Exception:
            staged.discard()
            raise
        if reply.code != 250:
            raise ApiError(503, f"not queued: {reply.code} {reply.status} {reply.text}")
        return {"queue_id": queue_id, "recipients": [r.address for r in tx.recipients]}

    def _content(self, text: str) -> bytes:
        content = _LINE_END.sub(b"\r\n", text.encode("utf-8", "surrogateescape"))
        if not content.endswith(b"\r\n"):
            content += b"\r\n"
        head = header_section(content)
        if head is None or not head:
            raise ApiError(400, "message: no header section (header fields, an empty "
                           "line, then the body)", "message")
        names = {name for name, _ in header_fields(head)}
        if "from" not in names:
            raise ApiError(400, "message: no From: field (RFC 5322 §3.6)", "message")
        added = b""
        if "date" not in names:
            added += f"Date: {formatdate(localtime=False)}\r\n".encode()
        if "message-id" not in names:
            domain = self.services.config.hostname
            added += f"Message-ID: {make_msgid(domain=domain)}\r\n".encode()
        content = added + content
        limit = self.services.config.smtp.max_message_size
        if len(content) > limit:
            raise ApiError(413, f"message: {len(content)} octets, more than the "
                           f"{limit} [smtp] max_message_size allows", "message")
        return content

    def _received(self, queue_id: str, user: str) -> bytes:
        return (f"Received: by {self.services.config.hostname} (LightMail) with HTTP "
                f"(admin API, as {user}) id {queue_id};\r\n\t"
                f"{formatdate(localtime=False)}\r\n").encode()

    def routes(self) -> list[Route]:
        return [Route("POST", f"{V1}/send", self.send, "Submit a message as a user",
                      "send", body=js.SEND_IN, response=js.SEND_OUT, status=202,
                      errors=(404, 413, 422), operation_id="send",
                      links=[(op, {"queue_id": "$response.body#/queue_id"}) for op in (
                          "showQueued", "holdQueued", "releaseQueued", "requeueQueued",
                          "bounceQueued", "deleteQueued")])]


def _refused(reply: Any, field: str) -> None:
    if isinstance(reply, Reply) and reply.code >= 400:
        raise ApiError(422, f"{field}: {reply.code} {reply.status} {reply.text}", field)
