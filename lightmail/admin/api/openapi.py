"""The OpenAPI 3.1 document of the admin API, made from its routes (served at
``/openapi.json``; ``lightmail api-reference`` turns it into docs/api.rst)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightmail import __version__
from lightmail.admin.api import schemas as js
from lightmail.admin.api.routing import Route

REASONS = {400: "Malformed: the message and field say what", 401: "No token, or an "
           "unknown, revoked or expired one", 403: "A read token on a write",
           404: "No such thing", 409: "It exists already (a node: it is not running)",
           413: "Too large",
           415: "Not JSON", 422: "Refused by policy", 503: "The directory cannot be "
           "reached"}


def document(routes: Sequence[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "LightMail admin API", "version": __version__,
                 "description": "Domains, users, aliases, app passwords, DKIM keys, the "
                 "queue, sending as a user, and the nodes sharing the database.  "
                 "Every request needs `Authorization: Bearer TOKEN` (`lightmail token "
                 "add`); GET needs a read or write token, every other method a write "
                 "token."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": js.ERROR},
        },
        "paths": paths,
    }


def _operation(route: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if route.status == 204:
        responses["204"] = {"description": "Done"}
    else:
        responses[str(route.status)] = {
            "description": "Done",
            "content": {"application/json": {"schema": route.response or {}}}}
        if route.links:
            responses[str(route.status)]["links"] = {
                target: {"operationId": target, "parameters": parameters}
                for target, parameters in route.links}
    error = {"content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}
    for status in sorted({400, 401, 403, *route.errors,
                          *((415,) if route.body is not None else ())}):
        responses[str(status)] = {"description": REASONS[status], **error}
    operation: dict[str, Any] = {
        "operationId": route.operation_id, "summary": route.summary, "tags": [route.tag],
        "responses": responses}
    if route.params:
        operation["parameters"] = [
            {"name": p.name, "in": p.where, "required": p.where == "path" or p.required,
             "description": p.description, "schema": p.schema} for p in route.params]
    if route.body is not None:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": route.body}}}
    return operation
