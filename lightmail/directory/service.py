"""The directory service: the directory backend's place in the service tree.

The SQL backend shares the storage service's database, so starting it is only a
matter of reporting what it serves; account backends with threads and connections
of their own (LDAP) open them on first use and close them here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger

from lightmail.directory.interfaces import IAccountBackend


class DirectoryService(Service):
    name = "directory"
    log = Logger()

    def __init__(self, directory: Any, backend: str,
                 storage_ready: defer.Deferred[Any] | None = None,
                 account_backends: Sequence[IAccountBackend] = ()) -> None:
        self.directory = directory
        self.backend = backend
        self.storage_ready = storage_ready
        self.account_backends = account_backends

    def startService(self) -> None:
        super().startService()
        ready: defer.Deferred[Any] = (self.storage_ready if self.storage_ready is not None
                                      else defer.succeed(None))
        ready.addCallback(lambda _: self.directory.list_domains())
        ready.addCallback(self._report)
        ready.addErrback(lambda f: None)    # the storage service reports its own failure

    def stopService(self) -> Any:
        super().stopService()
        # In a thread: a pool's threads may be finishing an LDAP call (bounded by
        # the backend's timeout).
        return threads.deferToThread(self._stop_backends)

    def _stop_backends(self) -> None:
        for backend in self.account_backends:
            backend.stop()

    def _report(self, domains: list[str]) -> None:
        self.log.info("directory ready: {backend} backend, {count} local domains",
                      backend=self.backend, count=len(domains))
        for backend in self.account_backends:
            self.log.info("directory: {domains} served by [backend:{name}]",
                          domains=", ".join(backend.domains), name=backend.name)
