"""``/api/v1/access``: the trusted networks, allow- and blocklists (what ``lightmail
access`` manages; lightmail/policy/access.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from lightmail.admin.api import schemas as js
from lightmail.admin.api.routing import ApiError, Call, Param, Route
from lightmail.policy.access import LISTS, AccessError, AlreadyListed, NotListed

V1 = "/api/v1"
ENTRY = js.obj({
    "list": {"enum": list(LISTS)},
    "kind": {"enum": ["client", "sender", "recipient"]},
    "value": {"type": "string", "minLength": 1, "maxLength": 320,
              "description": "client: an IP address or network; sender, recipient: an "
                             "address, a domain or a .parent domain"},
    "note": {"type": "string", "maxLength": 255},
}, ("list", "kind", "value"))
ENTRY_OUT = js.obj({**ENTRY["properties"], "created": js.MILLIS},
                   ("list", "kind", "value", "note", "created"))
PATH = (Param("list", "path", {"enum": list(LISTS)}, "the list"),
        Param("kind", "path", {"enum": ["client", "sender", "recipient"]}, "the kind"),
        Param("value", "path", {"type": "string"},
              "the entry's value (a network's / written %2F)"))


class Access:
    def __init__(self, services: Any) -> None:
        self.services = services

    @property
    def lists(self) -> Any:
        return self.services.access

    async def listing(self, call: Call) -> Any:
        return [_out(entry) for entry in await self.lists.entries()]

    async def add(self, call: Call) -> Any:
        body = call.body
        try:
            entry = await self.lists.add(body["list"], body["kind"], body["value"],
                                         body.get("note", ""))
        except AlreadyListed as exc:
            raise ApiError(409, str(exc)) from None
        except AccessError as exc:
            raise ApiError(400, str(exc), field="value") from None
        return _out(entry)

    async def remove(self, call: Call) -> Any:
        params = call.params
        try:
            await self.lists.remove(params["list"], params["kind"], unquote(params["value"]))
        except NotListed as exc:
            raise ApiError(404, str(exc)) from None
        except AccessError as exc:
            raise ApiError(400, str(exc), field="value") from None
        return None

    def routes(self) -> list[Route]:
        return [
            Route("GET", f"{V1}/access", self.listing, "The access lists' entries",
                  "access", response=js.array(ENTRY_OUT), operation_id="listAccess"),
            Route("POST", f"{V1}/access", self.add, "Put an entry on a list (in force "
                  "within [access] refresh)", "access", body=ENTRY, response=ENTRY_OUT,
                  status=201, errors=(409,), operation_id="addAccess"),
            Route("DELETE", f"{V1}/access/{{list}}/{{kind}}/{{value}}", self.remove,
                  "Take an entry off a list", "access", params=PATH, status=204,
                  errors=(404,), operation_id="removeAccess"),
        ]


def _out(entry: Any) -> dict[str, Any]:
    return {"list": entry.list, "kind": entry.kind, "value": entry.value,
            "note": entry.note, "created": entry.created}
