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

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from lightmail.admin.health import Readiness, Verdict
from lightmail.config import AdminConfig
from lightmail.listeners import describe_address
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
            body = {"ready": verdict.ready, "checks": verdict.checks}
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


class AdminService(Service):
    """Listens on ``[admin] endpoint`` with the admin site."""

    name = "admin"
    log = Logger()

    def __init__(self, config: AdminConfig, root: Resource,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.on_failure = on_failure
        #: The resource tree: the admin API puts its children here.
        self.root = root
        self.site = QuietSite(root)
        self.site.noisy = False
        self.site.displayTracebacks = False
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor
        endpoint = endpoints.serverFromString(reactor, self.config.endpoint)
        d = endpoint.listen(self.site)
        d.addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        self.log.info("admin listener on {address}: /metrics, /healthz, /readyz",
                      address=describe_address(port))

    def _failed(self, failure: Any) -> None:
        self.log.critical("admin listener ({endpoint}) could not start: {error}",
                          endpoint=self.config.endpoint, error=failure.getErrorMessage())
        if self.on_failure is not None:
            self.on_failure("the admin listener could not start")

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None
