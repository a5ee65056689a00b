"""The admin HTTP listener: a twisted.web site in the main process.

Its root is a plain :class:`~twisted.web.resource.Resource`; each part of the admin
surface is a child: ``/metrics`` (Prometheus' text format, all processes summed:
lightmail.metrics.federation), ``/healthz`` and ``/readyz`` (lightmail.admin.health).
The admin API adds its own children to :attr:`AdminService.root` the same way.

Who may ask: the listener is off by default and on loopback when enabled; with
``[admin] token_file``, ``/metrics`` wants ``Authorization: Bearer TOKEN`` (and the
listener may then leave loopback).  The probes never ask for credentials: they say
only whether the server runs and is ready, as Kubernetes' and load balancers' probes
expect.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from lightmail.admin.endpoint import EndpointService
from lightmail.admin.health import Readiness, Verdict
from lightmail.config import AdminConfig
from lightmail.metrics.interfaces import IMetrics

#: The content type of Prometheus' text format, version 0.0.4.
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class Metrics(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, metrics: IMetrics, token: str) -> None:
        super().__init__()
        self.metrics = metrics
        self.expected = f"Bearer {token}".encode() if token else b""

    def render_GET(self, request: Request) -> Any:
        if self.expected and not hmac.compare_digest(
                request.getHeader(b"authorization") or b"", self.expected):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="lightmail"')
            return b"a bearer token is needed\n"
        d = self.metrics.exposition()

        def send(body: bytes) -> None:
            request.setHeader(b"content-type", METRICS_TYPE)
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            self.log.failure("metrics exposition failed", failure)
            request.setResponseCode(500)
            request.finish()
        d.addCallbacks(send, failed)
        return NOT_DONE_YET


class Alive(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class Ready(Resource):
    isLeaf = True

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self.readiness = readiness

    def render_GET(self, request: Request) -> Any:
        def send(verdict: Verdict) -> None:
            request.setResponseCode(200 if verdict.ready else 503)
            request.setHeader(b"content-type", b"application/json")
            body: dict[str, Any] = {"ready": verdict.ready, "checks": verdict.checks}
            if verdict.draining:
                body["draining"] = True
            request.write(json.dumps(body, sort_keys=True).encode() + b"\n")
            request.finish()
        self.readiness.check().addCallback(send)
        return NOT_DONE_YET


def admin_root(metrics: IMetrics, readiness: Readiness, token: str) -> Resource:
    root = Resource()
    root.putChild(b"metrics", Metrics(metrics, token))
    root.putChild(b"healthz", Alive())
    root.putChild(b"readyz", Ready(readiness))
    return root


class QuietSite(Site):
    """No access log line per request: a scrape every 15 seconds is not news."""

    def log(self, request: Any) -> None:
        pass


class AdminService(EndpointService):
    """Listens on ``[admin] endpoint`` with the admin site."""

    def __init__(self, config: AdminConfig, root: Resource,
                 on_failure: Callable[[str], None] | None = None) -> None:
        #: The resource tree: the admin API puts its children here.
        self.root = root
        self.site = QuietSite(root)
        self.site.noisy = False
        self.site.displayTracebacks = False
        super().__init__("admin", "admin listener", config.endpoint, self.site, on_failure)
