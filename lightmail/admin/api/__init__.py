"""The admin REST API (twisted.web), on the admin listener next to ``/metrics``:
``/api/v1/...`` and its OpenAPI 3.1 document at ``/openapi.json``.  See routing.py for
tokens and errors, and docs/api.rst for the reference."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from lightmail.admin.api.access import Access
from lightmail.admin.api.accounts import Accounts
from lightmail.admin.api.dkim import DkimKeys
from lightmail.admin.api.nodes import Nodes
from lightmail.admin.api.openapi import document
from lightmail.admin.api.queue import Queue
from lightmail.admin.api.routing import Api, Route
from lightmail.admin.api.send import Send


def api_routes(services: Any, runner: Any) -> list[Route]:
    """Every route; ``runner`` is the main process's queue runner (bounces)."""
    return [*Accounts(services).routes(), *Access(services).routes(),
            *DkimKeys(services).routes(),
            *Queue(services, runner).routes(), *Send(services).routes(),
            *Nodes(services).routes()]


class OpenApiDocument(Resource):
    isLeaf = True

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__()
        self.body = json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return self.body


def mount(root: Resource, services: Any, runner: Any) -> None:
    """Put the API and its document on the admin site's ``root``."""
    routes = api_routes(services, runner)
    root.putChild(b"api", Api(routes, services.admin_tokens))
    root.putChild(b"openapi.json", OpenApiDocument(document(routes)))
