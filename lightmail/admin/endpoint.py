"""A service that listens on one endpoint for an administrator's tool (the admin
HTTP listener, the manhole): logs where it listens, and tells ``on_failure`` (the
start-up, which then stops) when it cannot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger

from lightmail.listeners import describe_address


class EndpointService(Service):
    log = Logger()

    def __init__(self, name: str, what: str, endpoint: str, factory: IProtocolFactory,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.what = what                    # for the log: "admin listener", "manhole: SSH"
        self.endpoint = endpoint
        self.factory = factory
        self.on_failure = on_failure
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor
        d = endpoints.serverFromString(reactor, self.endpoint).listen(self.factory)
        d.addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        self.log.info("{what} on {address}", what=self.what, address=describe_address(port))

    def _failed(self, failure: Any) -> None:
        self.log.critical("{what} ({endpoint}) could not start: {error}", what=self.what,
                          endpoint=self.endpoint, error=failure.getErrorMessage())
        if self.on_failure is not None:
            self.on_failure(f"{self.what} could not start")

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None
