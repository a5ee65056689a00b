"""The admin API's plumbing on twisted.web: routes, bearer tokens, JSON in and out.

Each endpoint is a :class:`Route`: method, path template, what it takes (path and
query parameters, a JSON body described by a JSON Schema) and what it answers.  The
same declarations check requests (:mod:`jsonschema`, draft 2020-12, the dialect of
OpenAPI 3.1) and make the OpenAPI document (:mod:`lightmail.admin.api.openapi`), so
the document cannot drift from what the server does.

Every answer is JSON.  An error is ``{"error": {"status": N, "message": "...",
"field": "..."}}``: ``field`` names the body member or parameter at fault (400), when
there is one.  401: no token, or one that is unknown, revoked or expired; 403: a read
token on a write (anything but GET); 404: no such path, or no such domain, user,
alias, app password or queued message; 405: the path exists, the method does not;
409: it exists already; 413: a message too large to send; 415: a body that is not
JSON; 422: valid, but refused (a sender or recipient the submission policy refuses).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import unquote

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from lightmail.directory.admintokens import AdminToken, AdminTokens, TokenError
from lightmail.directory.interfaces import (
    AlreadyExists,
    DirectoryError,
    DirectoryUnavailable,
    NotFound,
)

#: Bodies larger than this are refused unread (413): the largest is a message to
#: send, bounded by [smtp] max_message_size, checked again once parsed.
MAX_BODY = 64 * 1024 * 1024
#: Bodies up to this size are parsed on the reactor; larger ones in a thread.
INLINE_BODY = 64 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}


@dataclass(frozen=True)
class Param:
    name: str
    where: str                          # "path" or "query"
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass
class Call:
    """What a handler gets: the parameters (decoded and checked), the body, the
    token that was shown, and the request (for headers)."""

    params: dict[str, Any]
    body: Any
    token: AdminToken
    request: Request


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str                           # "/api/v1/users/{address}"
    handler: Handler
    summary: str
    tag: str
    params: Sequence[Param] = ()
    body: Optional[dict[str, Any]] = None           # JSON Schema of the request body
    response: Optional[dict[str, Any]] = None       # JSON Schema of a success body
    status: int = 200                               # 204: no body
    errors: Sequence[int] = ()                      # beyond 400, 401, 403
    operation_id: str = ""
    #: OpenAPI links from a success: (operation id, {its parameter: expression}),
    #: e.g. ("showUser", {"address": "$response.body#/address"}).
    links: Sequence[tuple[str, dict[str, str]]] = ()
    pattern: re.Pattern[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.path))
        object.__setattr__(self, "pattern", re.compile(regex + r"\Z"))

    @property
    def writes(self) -> bool:
        return self.method != "GET"


class Api(Resource):
    """Everything under ``/api``: finds the route, checks the token and the input,
    runs the handler and writes its answer."""

    isLeaf = True
    log = Logger(namespace="lightmail.admin.api")

    def __init__(self, routes: Sequence[Route], tokens: AdminTokens) -> None:
        super().__init__()
        self.routes = list(routes)
        self.tokens = tokens
        self.validators = {id(route): Draft202012Validator(route.body)
                           for route in self.routes if route.body is not None}

    def render(self, request: Request) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self._answer(request, gone))
        d.addErrback(self._internal_error, request, gone)
        return NOT_DONE_YET

    async def _answer(self, request: Request, gone: list[bool]) -> None:
        try:
            status, result = await self._run(request)
        except ApiError as exc:
            status, result = exc.status, _error_body(exc)
            for name, value in exc.headers.items():
                request.setHeader(name.encode(), value.encode())
        if gone:
            return              # the client left: what was done stays done
        if status == 204:
            request.setResponseCode(204)
            request.finish()
            return
        _send_json(request, status, result)

    async def _run(self, request: Request) -> tuple[int, Any]:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("ascii", "replace")
        route, found = self._route(method, path)
        token = await self._authorised(request, route)
        params = dict(found)
        params.update(_query(request, route))
        try:
            call = Call(params=_checked_params(route, params),
                        body=await self._body(request, route), token=token,
                        request=request)
            result = await route.handler(call)
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None
        except AlreadyExists as exc:
            raise ApiError(409, str(exc)) from None
        except DirectoryUnavailable as exc:
            raise ApiError(503, str(exc)) from None
        except (DirectoryError, TokenError) as exc:
            raise ApiError(400, str(exc)) from None
        return route.status, result

    def _route(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        for route in self.routes:
            match = route.pattern.match(path)
            if match is None:
                continue
            if route.method == method:
                return route, {k: unquote(v) for k, v in match.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            methods = ", ".join(sorted(set(allowed)))
            raise ApiError(405, f"{method} is not a method of {path}: use {methods}",
                           headers={"allow": methods})
        raise ApiError(404, f"no such path: {path} (see /openapi.json)")

    async def _authorised(self, request: Request, route: Route) -> AdminToken:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            request.setHeader(b"www-authenticate", b'Bearer realm="lightmail"')
            raise ApiError(401, "a bearer token is needed (Authorization: Bearer TOKEN; "
                           "make one with lightmail token add)")
        token = await self.tokens.check(secret.strip())
        if token is None:
            request.setHeader(b"www-authenticate",
                              b'Bearer realm="lightmail", error="invalid_token"')
            raise ApiError(401, "the token is unknown, revoked or expired")
        if route.writes and not token.allows_writes():
            raise ApiError(403, f"the token {token.name!r} is read-only: "
                           f"{route.method} needs a write token")
        return token

    async def _body(self, request: Request, route: Route) -> Any:
        if route.body is None:
            return None
        kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if kind != b"application/json":
            raise ApiError(415, "the body must be JSON (Content-Type: application/json)")
        content = request.content
        if content is None:
            return self._decoded(None, route)
        content.seek(0, 2)
        size = content.tell()
        content.seek(0)
        if size > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} octets")
        if size <= INLINE_BODY:
            return self._decoded(content, route)
        # twisted.web keeps a large body in a temporary file; reading, parsing and
        # validating up to MAX_BODY octets would hold the reactor for seconds.
        return await threads.deferToThread(self._decoded, content, route)

    def _decoded(self, content: Any, route: Route) -> Any:
        """The body read, parsed and checked against the route's schema (on the
        reactor for a small one, in a thread for a large one)."""
        try:
            body = json.loads(content.read() if content is not None else b"")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed JSON: {exc}") from None
        error = best_match(self.validators[id(route)].iter_errors(body))
        if error is not None:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                            for p in error.absolute_path).lstrip(".")
            raise ApiError(400, f"{where or 'body'}: {error.message}", where or None)
        return body

    def _internal_error(self, failure: Any, request: Request, gone: list[bool]) -> None:
        self.log.failure("admin API request {method} {path} failed", failure,
                         method=request.method, path=request.path)
        if not gone and not request.finished:
            error = ApiError(500, "internal error (see the server's log)")
            _send_json(request, 500, _error_body(error))


def _query(request: Request, route: Route) -> dict[str, str]:
    names = {p.name for p in route.params if p.where == "query"}
    out = {}
    for raw, values in (request.args or {}).items():
        name = raw.decode("utf-8", "replace")
        if name in names and values:
            out[name] = values[-1].decode("utf-8", "replace")
    return out


def _checked_params(route: Route, given: dict[str, str]) -> dict[str, Any]:
    """The parameters, converted to their schema's type and checked against it."""
    out: dict[str, Any] = {}
    for param in route.params:
        if param.name not in given:
            if param.required:
                raise ApiError(400, f"{param.name}: missing", param.name)
            continue
        text = given[param.name]
        value: Any = text
        if param.schema.get("type") == "integer":
            if not (text.isascii() and text.lstrip("-").isdigit()) or len(text) > 19:
                raise ApiError(400, f"{param.name}: {text!r} is not an integer", param.name)
            value = int(text)
        error = best_match(Draft202012Validator(param.schema).iter_errors(value))
        if error is not None:
            raise ApiError(400, f"{param.name}: {error.message}", param.name)
        out[param.name] = value
    return out


def _send_json(request: Request, status: int, body: Any) -> None:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.write(json.dumps(body, sort_keys=True).encode() + b"\n")
    request.finish()


def _error_body(error: ApiError) -> dict[str, Any]:
    body: dict[str, Any] = {"status": error.status, "message": error.message}
    if error.field is not None:
        body["field"] = error.field
    return {"error": body}
