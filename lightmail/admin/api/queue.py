"""The admin API's queue: list with filters and pages, show one message's envelope and
header, hold, release, requeue, delete (as ``lightmail queue`` and postsuper), and
bounce (return to the sender with a notice, as the queue does when it gives up)."""

from __future__ import annotations

import re
from typing import Any

from lightmail.admin.api import schemas as js
from lightmail.admin.api.routing import ApiError, Call, Param, Route
from lightmail.directory.interfaces import NotFound
from lightmail.policy.dkim import header_fields, header_section
from lightmail.storage.queuestore import QueueSearch

V1 = "/api/v1"
#: How much of a queued message is read for its header section.
HEADER_READ = 256 * 1024
BOUNCE_REASON = "5.3.0 returned to the sender by the postmaster"
_CURSOR = re.compile(r"(\d{1,19})\.([0-9A-Z]{1,32})\Z")
QUEUE_ID = Param("queue_id", "path", {"type": "string", "pattern": r"^[0-9A-Z]{1,32}$"},
                 "the queue id (as in the log and in Received:)")


class Queue:
    def __init__(self, services: Any, runner: Any) -> None:
        self.store = services.queue
        self.blobs = services.blobs
        self.runner = runner

    async def listing(self, call: Call) -> Any:
        p = call.params
        after = None
        if "cursor" in p:
            match = _CURSOR.match(p["cursor"])
            if match is None:
                raise ApiError(400, "cursor: not a cursor this API gave", "cursor")
            after = (int(match.group(1)), match.group(2))
        sender = p.get("sender")
        search = QueueSearch(state=p.get("state"),
                             sender="" if sender == "<>" else sender,
                             recipient=p.get("recipient"), domain=p.get("domain"),
                             older_than_ms=p.get("older_than", 0) * 1000,
                             limit=p.get("limit", 100), after=after)
        rows = await self.store.find_messages(search)
        last = rows[-1] if len(rows) == search.limit else None
        return {"items": [_message(row) for row in rows],
                "next": f"{last['received']}.{last['id']}" if last else None}

    async def show(self, call: Call) -> Any:
        row = await self._found(call.params["queue_id"])
        head = await self.blobs.read_range(row["blob_id"], 0, HEADER_READ)
        section = header_section(head)
        if section is None:             # no end of header within the part read
            section = head
        headers = [{"name": name, "value": value.decode("utf-8", "replace").strip()}
                   for name, value in header_fields(section)]
        return {**_message(row), "envid": row["envid"], "ret": row["ret"],
                "body": row["body"], "smtputf8": bool(row["smtputf8"]),
                "headers": headers}

    async def _found(self, queue_id: str) -> dict[str, Any]:
        row = await self.store.message(queue_id)
        if row is None:
            raise NotFound(f"no message {queue_id} in the queue")
        return row

    def _manager(self, action: str) -> Any:
        async def manage(call: Call) -> Any:
            queue_id = call.params["queue_id"]
            await self._found(queue_id)
            count = await self.store.manage(action, [queue_id])
            if count and action in ("release", "requeue"):
                self.runner.kick()
            return None if action == "delete" else {"recipients": count}
        return manage

    async def bounce(self, call: Call) -> Any:
        queue_id = call.params["queue_id"]
        await self._found(queue_id)
        count = await self.runner.return_to_sender(queue_id, BOUNCE_REASON)
        return {"recipients": count}

    def routes(self) -> list[Route]:
        listing = (
            Param("state", "query", js.QUEUE_STATE, "messages with a recipient in this "
                  "state"),
            Param("sender", "query", {"type": "string", "maxLength": 320},
                  "the envelope sender (<> for the null sender)"),
            Param("recipient", "query", js.ADDRESS, "messages to this recipient"),
            Param("domain", "query", js.DOMAIN, "messages to a recipient at this domain"),
            Param("older_than", "query", {"type": "integer", "minimum": 0,
                                          "maximum": 10 ** 9},
                  "arrived at least this many seconds ago"),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000},
                  "messages per page (100 unless given)"),
            Param("cursor", "query", {"type": "string", "maxLength": 64},
                  "the next member of the page before"),
        )
        routes = [
            Route("GET", f"{V1}/queue", self.listing, "Queued messages, oldest first, a page "
                  "at a time", "queue", params=listing, response=js.QUEUE_PAGE,
                  operation_id="listQueue"),
            Route("GET", f"{V1}/queue/{{queue_id}}", self.show, "One queued message: its "
                  "envelope, recipients and header fields", "queue", params=(QUEUE_ID,),
                  response=js.QUEUE_DETAIL, errors=(404,), operation_id="showQueued"),
            Route("DELETE", f"{V1}/queue/{{queue_id}}", self._manager("delete"),
                  "Delete a message (no notice to anyone)", "queue", params=(QUEUE_ID,),
                  status=204, errors=(404,), operation_id="deleteQueued"),
            Route("POST", f"{V1}/queue/{{queue_id}}/bounce", self.bounce,
                  "Return a message to its sender, with a delivery status notice",
                  "queue", params=(QUEUE_ID,), response=js.QUEUE_CHANGED, errors=(404,),
                  operation_id="bounceQueued"),
        ]
        for action, summary in (
                ("hold", "Hold a message: no more attempts until released"),
                ("release", "Release a held message: due now"),
                ("requeue", "Try a message again now (also held or dead ones)")):
            routes.append(Route("POST", f"{V1}/queue/{{queue_id}}/{action}",
                                self._manager(action), summary, "queue",
                                params=(QUEUE_ID,), response=js.QUEUE_CHANGED,
                                errors=(404,), operation_id=f"{action}Queued"))
        return routes


def _message(row: dict[str, Any]) -> dict[str, Any]:
    return {"queue_id": row["id"], "from": row["mail_from"], "size": row["size"],
            "received": row["received"], "source": row["source"],
            "auth_user": row["auth_user"], "client_address": row["client_address"],
            "recipients": [{"address": r["recipient"], "state": r["state"],
                            "transport": r["transport"], "attempts": r["attempts"],
                            "next_attempt": r["next_attempt"],
                            "last_error": r["last_error"]} for r in row["recipients"]]}
