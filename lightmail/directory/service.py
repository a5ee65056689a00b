"""The directory service: the directory backend's place in the service tree.

The SQL backend shares the storage service's database, so starting it is only a
matter of reporting what it serves; backends with connections of their own (LDAP,
from the roadmap) open and close them here.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger


class DirectoryService(Service):
    name = "directory"
    log = Logger()

    def __init__(self, directory: Any, backend: str,
                 storage_ready: defer.Deferred[Any] | None = None) -> None:
        self.directory = directory
        self.backend = backend
        self.storage_ready = storage_ready

    def startService(self) -> None:
        super().startService()
        ready: defer.Deferred[Any] = (self.storage_ready if self.storage_ready is not None
                                      else defer.succeed(None))
        ready.addCallback(lambda _: self.directory.list_domains())
        ready.addCallback(self._report)
        ready.addErrback(lambda f: None)    # the storage service reports its own failure

    def _report(self, domains: list[str]) -> None:
        self.log.info("directory ready: {backend} backend, {count} local domains",
                      backend=self.backend, count=len(domains))
