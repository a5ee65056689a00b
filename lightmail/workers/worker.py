"""A worker process: ``python -m lightmail.workers.worker`` (started by WorkerPool).

It runs the configuration the main process runs (the texts it started with and runs
now come on standard input: lightmail.reload.settle makes one config of them), opens
storage without migrating it (the main process did), takes over the listening
sockets it inherited and serves their sessions.  A reload comes from the main
process (Reload, then Commit); SIGHUP is for the main process and is ignored here.
It stops on SIGTERM (draining its sessions as the main process would) and when its
control connection closes (the main process is gone).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, tcp
from twisted.logger import ILogObserver, Logger, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import provider

from lightmail.config import Config, ListenerConfig, load_config, parse_config
from lightmail.listeners import (
    TrackingFactory,
    accepting_factory,
    builder_for,
    describe_address,
)
from lightmail.metrics.interfaces import IMetrics
from lightmail.proxyproto.listener import proxy_trust
from lightmail.reload.interfaces import IReloadable
from lightmail.reload.parts import ServicesPart, listener_part
from lightmail.reload.reloader import Reloader
from lightmail.reload.settle import settle
from lightmail.workers import control
from lightmail.workers.remote import AdmittingFactory, ChangePublisher, WorkerHub

log = Logger(namespace="lightmail.workers.worker")


class MainLink(control.Link):
    """The control connection: relayed changes come in; its loss ends the worker."""

    def __init__(self) -> None:
        super().__init__()
        self.hub: WorkerHub | None = None
        self.metrics: IMetrics | None = None
        self.reloader: Reloader | None = None
        self._snapshot = b""
        self._reload_text = (0, b"")        # (generation, the parts received)

    @control.Scrape.responder
    def scrape(self, part: int) -> dict[str, Any]:
        if part == 0:
            self._snapshot = self.metrics.snapshot() if self.metrics is not None else b""
        size = control.SCRAPE_PART
        parts = max(1, -(-len(self._snapshot) // size))
        return {"data": self._snapshot[part * size:(part + 1) * size], "parts": parts}

    @control.Reload.responder
    def reload(self, generation: int, text: bytes, last: bool) -> Any:
        received = self._reload_text[1] if self._reload_text[0] == generation else b""
        self._reload_text = (generation, received + text)
        if not last:
            return {"error": ""}
        self._reload_text = (0, b"")
        assert self.reloader is not None        # set by build(), before any command
        d = defer.ensureDeferred(self.reloader.prepare_text(
            generation, (received + text).decode("utf-8")))
        return d.addCallbacks(lambda _: {"error": ""},
                              lambda failure: {"error": failure.getErrorMessage()})

    @control.Commit.responder
    def commit(self, generation: int) -> Any:
        assert self.reloader is not None
        d = defer.ensureDeferred(self.reloader.commit(generation))
        return d.addCallback(lambda _: {})

    @control.Changed.responder
    def changed(self, change: bytes) -> dict[str, Any]:
        if self.hub is not None:
            self.hub.mailbox_changed(control.decode_change(change))
        return {}

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        super().connectionLost(reason)
        from twisted.internet import reactor
        if reactor.running:  # type: ignore[attr-defined]
            log.info("the main process is gone: worker stopping")
            reactor.stop()  # type: ignore[attr-defined]


class AdoptedListener(Service):
    """Accepts on an inherited listening socket; drains its sessions on stop."""

    def __init__(self, listener: ListenerConfig, fd: int, factory: TrackingFactory,
                 wrapped: Any, ready: defer.Deferred[Any], shutdown_timeout: float) -> None:
        self.ready = ready
        self.adopted: defer.Deferred[Any] = defer.Deferred()
        self.name = f"listener:{listener.name}"
        self.listener = listener
        self.fd = fd
        self.factory = factory
        self.wrapped = wrapped
        self.shutdown_timeout = shutdown_timeout
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        # Sessions are only accepted once storage is open.
        self.ready.addCallback(lambda _: self._adopt())
        self.ready.chainDeferred(self.adopted)

    def _adopt(self) -> None:
        from twisted.internet import reactor
        with socket.socket(fileno=os.dup(self.fd)) as probe:
            family = probe.family
        self.port = reactor.adoptStreamPort(  # type: ignore[attr-defined]
            self.fd, family, self.wrapped)
        if family == socket.AF_UNIX:
            # The socket file is the main process's, which made it and removes it as
            # it stops; a worker that removed it (as a Unix port does when it stops
            # listening) would cut the others off and fail at the next worker.
            self.port.connectionLost = functools.partial(tcp.Port.connectionLost,
                                                         self.port)
        os.close(self.fd)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
        yield self.factory.drain(self.shutdown_timeout)


def build(config: Config, link: MainLink, listeners: dict[str, int],
          writer_socket: str | None = None, started: Config | None = None) -> MultiService:
    """The worker's service tree: storage, directory, and the adopted listeners;
    writes go to the main process's writer process at ``writer_socket``.  ``config``
    is the one to run, ``started`` the one the main process started with (reloads
    are measured against it; the same when there was no reload)."""
    from lightmail.service import validate
    from lightmail.wiring import Role, wire
    services = wire(config, Role.WORKER, link=link, writer_socket=writer_socket)
    storage = services.storage
    hub = services.imap_hub
    assert isinstance(hub, WorkerHub)       # Role.WORKER's: relayed changes come in
    link.hub = hub
    link.metrics = services.metrics
    storage.mailstore.add_listener(ChangePublisher(link))
    root = _WorkerRoot()
    storage.setServiceParent(root)
    by_name = {listener.name: listener for listener in config.listeners}
    parts: list[IReloadable] = [ServicesPart(services)]
    for name, fd in listeners.items():
        listener = by_name[name]
        factory = builder_for(listener.protocol)(listener, services)
        tls = None
        if listener.tls == "implicit":
            from lightmail.tls import server_context
            tls = server_context(listener)
        proxy = proxy_trust(listener)
        # Admitted by the main process for the client the PROXY header names.
        admitting = AdmittingFactory(name, factory, link)  # type: ignore[arg-type]
        wrapped = accepting_factory(listener, admitting, tls, proxy,
                                    admitting.inner.meters)
        AdoptedListener(listener, fd, factory, wrapped,  # type: ignore[arg-type]
                        storage.ready, config.server.shutdown_timeout).setServiceParent(root)
        # The main process keeps the connection limits of every worker.
        parts.append(listener_part(name, factory, tls, own_limits=False, proxy=proxy))
    link.reloader = Reloader(started or config, parts, validators=validate, current=config)
    return root


class _WorkerRoot(MultiService):
    @defer.inlineCallbacks
    def stopService(self) -> Any:
        # Listeners first (drain), storage last, as the main process does.
        self.running = 0
        for child in reversed(list(self)):
            if child.running:
                try:
                    yield defer.maybeDeferred(child.stopService)
                except Exception:
                    # The next ones (storage last) still stop: what is queued is
                    # written and the pools are closed.
                    log.failure("stopping {name} failed", name=child.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightmail-worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--config-stdin", action="store_true",
                        help="the texts of the config (JSON: started, current) come on "
                             "standard input; --config is the file they were read from")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--writer", help="the writer process's socket")
    parser.add_argument("--listener", action="append", default=[],
                        help="NAME=FD of an inherited listening socket")
    args = parser.parse_args(argv)
    from lightmail.logs import make_outputs, reopen_on_sigusr1
    from lightmail.service import validate
    started = config = None
    if args.config_stdin:
        # Checked by the main process already: only parsed here.
        texts = json.loads(sys.stdin.buffer.read())
        started = parse_config(texts["started"], args.config)
        config = settle(started, parse_config(texts["current"], args.config)).config
    else:
        config = load_config(args.config, validators=validate)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    outputs = make_outputs(config.logging)
    observer = outputs.observer

    @provider(ILogObserver)
    def tagged(event: dict[str, Any]) -> None:
        event["worker_id"] = str(args.index)    # "[... worker=N ...]" on each line
        observer(event)
    globalLogBeginner.beginLoggingTo([tagged], redirectStandardIO=False)

    def reopen() -> None:
        # The main process passes on its SIGUSR1 (logrotate's postrotate).
        outputs.reopen().addCallbacks(
            lambda _: log.info("worker {index}: log file reopened", index=args.index),
            lambda f: log.error("worker {index} could not reopen the log file: {error}",
                                index=args.index, error=f.getErrorMessage()))
    reopen_on_sigusr1(reopen)
    from twisted.internet import reactor
    link = MainLink()
    listeners = {}
    for item in args.listener:
        name, _, fd = item.rpartition("=")
        listeners[name] = int(fd)
    root = build(config, link, listeners, args.writer, started)
    reactor.adoptStreamConnection(  # type: ignore[attr-defined]
        args.control, socket.AF_UNIX, control.OneProtocol(link))
    os.close(args.control)

    def start() -> None:
        # Ctrl-C reaches the whole process group: the main process stops the workers
        # (SIGTERM) in its own order, and must not see them leave first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        root.startService()
        adopted = [child.adopted for child in root if isinstance(child, AdoptedListener)]
        defer.gatherResults(adopted, consumeErrors=True).addCallbacks(ready, failed)

    def ready(_: Any) -> None:
        for child in root:
            if isinstance(child, AdoptedListener):
                log.info("worker {index}: {name} on {address}", index=args.index,
                         name=child.listener.name, address=describe_address(child.port))
        link.callRemote(control.Ready, pid=os.getpid())

    def failed(failure: Failure) -> None:
        log.failure("worker {index} cannot start", failure, index=args.index)
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", lambda: root.stopService() if root.running else None)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
