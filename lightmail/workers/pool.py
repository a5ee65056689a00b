"""The main process's side: starts the workers, answers them, restarts the dead.

:class:`WorkerPool` is a service of the main process's tree.  Once storage is ready
and every listener's socket is open (the main process listens but never accepts:
:class:`~lightmail.listeners.ListenerService` with ``accept=False``), it starts the
workers, each with the listening sockets and one end of a socket pair, and fires
``ready`` when all have said Ready.  :class:`WorkerLink` is the AMP responder for
one worker: it keeps what that worker holds (admitted connections, IMAP sessions,
POP3 locks), so that all of it is released when the worker goes.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.config import Config
from lightmail.imap.hub import MailboxHub
from lightmail.listeners import MEMORY, SHUTTING_DOWN, ConnectionLimits, ListenerService
from lightmail.metrics.interfaces import IMetrics
from lightmail.pop3.maildrop import Locks
from lightmail.processes import ChildProcess, ExecStarter, IProcessStarter
from lightmail.reload.interfaces import IReloadable, ReloadRefused, Switch
from lightmail.storage.interfaces import IChangeListener, MailboxChange
from lightmail.workers import control

# A worker that dies is started again after this many seconds (not at once: a worker
# that cannot start would otherwise spin).
RESTART_DELAY = 1.0
# Child file descriptor of the control socket; listening sockets follow it.
CONTROL_FD = 3


class WorkerLink(control.Link):
    log = Logger()

    def __init__(self, pool: WorkerPool, index: int) -> None:
        super().__init__()
        self.pool = pool
        self.index = index
        self.pid = 0
        self.ready: defer.Deferred[None] = defer.Deferred()
        # What this worker holds, released when it goes.
        self.connections: Counter[tuple[str, str]] = Counter()
        self.logged_in: Counter[tuple[str, str]] = Counter()     # of those
        self.sessions: Counter[int] = Counter()
        self.locked: set[int] = set()

    @control.Ready.responder
    def worker_ready(self, pid: int) -> dict[str, Any]:
        self.pid = pid
        if not self.ready.called:
            self.ready.callback(None)
        return {}

    @control.Admit.responder
    def admit(self, listener: str, host: str) -> dict[str, Any]:
        limits = self.pool.limits.get(listener)
        if limits is None:
            return {"refusal": "no such listener"}
        if self.pool.draining:
            return {"refusal": "shutting down", "kind": SHUTTING_DOWN}
        # The memory of every process is measured here: refused for all of them.
        memory = self.pool.services.memory.refusal()
        if memory is not None:
            return {"refusal": memory, "kind": MEMORY}
        refusal = limits.admit(host)
        if refusal is None:
            self.connections[(listener, host)] += 1
        return {"refusal": refusal or ""}

    @control.LoggedIn.responder
    def logged_in_(self, listener: str, host: str) -> dict[str, Any]:
        key = (listener, host)
        if self.logged_in[key] < self.connections[key]:
            self.logged_in[key] += 1
            self.pool.limits[listener].logged_in()
        return {}

    @control.Release.responder
    def release(self, listener: str, host: str, logged_in: bool) -> dict[str, Any]:
        key = (listener, host)
        if self.connections[key] > 0:
            logged_in = logged_in and self.logged_in[key] > 0
            _take(self.connections, key)
            if logged_in:
                _take(self.logged_in, key)
            self.pool.limits[listener].release(host, logged_in)
        return {}

    # The hub and the locks answer with Deferreds: at once in a node alone, after
    # Redis's answer in a cluster.

    @control.Login.responder
    def login(self, user: int, limit: int) -> defer.Deferred[dict[str, Any]]:
        def counted(ok: bool) -> dict[str, Any]:
            if ok:
                if self.transport is None:      # the worker went meanwhile
                    self.pool.hub.logout(user)
                else:
                    self.sessions[user] += 1
            return {"ok": ok}
        return self.pool.hub.login(user, limit).addCallback(counted)

    @control.Logout.responder
    def logout(self, user: int) -> dict[str, Any]:
        if self.sessions[user] > 0:
            self.sessions[user] -= 1
            if not self.sessions[user]:
                del self.sessions[user]
            self.pool.hub.logout(user)
        return {}

    @control.ClaimRecent.responder
    def claim_recent(self, mailbox: int, uidnext: int, claim: bool
                     ) -> defer.Deferred[dict[str, Any]]:
        hub = self.pool.hub
        d = hub.claim_recent(mailbox, uidnext) if claim else hub.peek_recent(mailbox, uidnext)
        return d.addCallback(lambda first: {"first": first})

    @control.Lock.responder
    def lock(self, user: int, login_delay: float) -> defer.Deferred[dict[str, Any]]:
        def locked(_: None) -> dict[str, Any]:
            if self.transport is None:          # the worker went meanwhile
                self.pool.locks.release(user)
            else:
                self.locked.add(user)
            return {}
        # Fails with what AMP passes on (MaildropLocked, LoginTooSoon, LockUnavailable).
        return self.pool.locks.acquire(user, login_delay).addCallback(locked)

    @control.Unlock.responder
    def unlock(self, user: int) -> defer.Deferred[dict[str, Any]]:
        if user not in self.locked:
            return defer.succeed({})
        self.locked.discard(user)
        return self.pool.locks.release(user).addCallback(lambda _: {})

    @control.Kick.responder
    def kick(self) -> dict[str, Any]:
        self.pool.kick()
        return {}

    @control.Changed.responder
    def changed(self, change: bytes) -> dict[str, Any]:
        self.pool.relay(control.decode_change(change), data=change, origin=self)
        return {}

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        super().connectionLost(reason)
        self.let_go()

    def let_go(self) -> None:
        """The worker is gone: release all it held."""
        for (listener, host), count in self.connections.items():
            logged_in = self.logged_in[(listener, host)]
            for index in range(count):
                self.pool.limits[listener].release(host, index < logged_in)
        self.connections.clear()
        self.logged_in.clear()
        for user, count in self.sessions.items():
            for _ in range(count):
                self.pool.hub.logout(user)
        self.sessions.clear()
        for user in self.locked:
            self.pool.locks.release(user)
        self.locked.clear()
        self.pool.links.discard(self)


def _first_error(failure: Failure) -> Failure:
    """gatherResults' FirstError: the failure it wraps."""
    error = failure.value
    return error.subFailure if isinstance(error, defer.FirstError) else failure


def _take(counter: Counter[tuple[str, str]], key: tuple[str, str]) -> None:
    counter[key] -= 1
    if not counter[key]:
        del counter[key]


class WorkerProcess(ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.exited: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.pool.worker_ended(self, reason)
        self.exited.callback(None)


@implementer(IChangeListener, IReloadable)
class WorkerPool(Service):
    """Runs ``count`` workers for ``listeners`` (their ListenerServices, accept=False).

    A reload reaches the workers through it (:meth:`prepare`): each is sent the new
    file's text, checks it and gets ready, and all switch once all are ready.  A
    worker (re)started is given the text this process started with and the one it
    runs now, so that it runs what this process checked, whatever the file holds
    since."""

    name = "workers"
    log = Logger()

    def __init__(self, services: Any, listeners: list[ListenerService], count: int,
                 ready: defer.Deferred[Any], shutdown_timeout: float = 30.0,
                 on_failure: Callable[[str], None] | None = None,
                 starter: IProcessStarter | None = None) -> None:
        self.on_failure = on_failure
        #: What starts the workers (lightmail.processes): new interpreters unless said.
        self.starter: IProcessStarter = starter or ExecStarter()
        self.services = services
        self.config = services.config
        #: The configuration text this process started with (lightmail.reload.settle
        #: measures every reload against it).
        self.started_text = services.config.text
        self.generation = 0         # of reloads sent to the workers
        self.listeners = listeners
        self.count = count
        self.storage_ready = ready
        self.shutdown_timeout = shutdown_timeout
        self.hub: MailboxHub = services.imap_hub
        self.locks: Locks = services.pop3_locks
        self.limits = {s.listener.name: ConnectionLimits(
            s.listener.max_connections, s.listener.max_connections_per_ip,
            s.listener.unauthenticated_limit) for s in listeners}
        self.links: set[WorkerLink] = set()
        self.processes: dict[int, WorkerProcess] = {}
        self.transports: dict[int, ChildProcess] = {}
        self.draining = False
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.metrics: IMetrics = services.metrics
        # The workers' sessions are counted there: each scrape asks them.
        self.metrics.add_sampler(self.scrape)

    # -- starting ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Changes committed in this process (deliveries, the queue) go to the workers,
        # and so do those of other nodes.
        self.services.mailstore.add_listener(self)
        self.hub.add_relay(self)
        waits = [self.storage_ready] + [s.listening for s in self.listeners]
        d = defer.gatherResults(waits, consumeErrors=True)
        d.addCallback(lambda _: self._start_all())
        d.addErrback(lambda f: None)    # the listeners and storage report their own

    def _start_all(self) -> Any:
        if not self.running:
            return None
        for index in range(self.count):
            self.spawn(index)
        d = defer.gatherResults([link.ready for link in self.links])
        d.addCallback(self._all_ready)
        return d

    def _all_ready(self, _: Any) -> None:
        self.log.info("{count} worker processes serve the listeners", count=self.count)
        if not self.ready.called:
            self.ready.callback(None)

    def spawn(self, index: int) -> None:
        from twisted.internet import reactor
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        link = WorkerLink(self, index)
        self.links.add(link)
        reactor.adoptStreamConnection(  # type: ignore[attr-defined]
            ours.fileno(), socket.AF_UNIX, control.OneProtocol(link))
        ours.close()
        fds = {CONTROL_FD: theirs.fileno()}
        args = ["--config", str(self.config.path), "--config-stdin", "--index", str(index),
                "--control", str(CONTROL_FD)]
        writer_socket = self.services.storage.writer_socket
        if writer_socket is not None:
            args += ["--writer", writer_socket]
        for offset, service in enumerate(self.listeners, start=CONTROL_FD + 1):
            assert service.port is not None
            fds[offset] = service.port.fileno()  # type: ignore[attr-defined]
            args += ["--listener", f"{service.listener.name}={offset}"]
        process = WorkerProcess(self, index)
        self.processes[index] = process
        texts = {"started": self.started_text, "current": self.services.config.text}
        self.transports[index] = self.starter.start(
            process, "lightmail.workers.worker", args, fds, json.dumps(texts).encode())
        theirs.close()
        self.log.info("worker {index} started (pid {pid})", index=index,
                      pid=self.transports[index].pid)

    def pids(self) -> dict[str, int]:
        """The running workers' process ids, by name (the memory watchdog measures
        each: lightmail/resources.py)."""
        return {f"worker {index}": transport.pid
                for index, transport in self.transports.items() if transport.pid}

    def worker_ended(self, process: WorkerProcess, reason: Failure) -> None:
        index = process.index
        if self.processes.get(index) is process:
            del self.processes[index]
            self.transports.pop(index, None)
        self.metrics.retire_source(f"worker-{index}")
        if not self.running:
            return
        if not self.ready.called:
            # Never got going (its error is on standard error): starting it again
            # would fail the same way, every second.
            self.log.critical("worker {index} could not start: {reason}", index=index,
                              reason=reason.getErrorMessage())
            if self.on_failure is not None:
                self.on_failure(f"worker {index} could not start")
            return
        self.log.error("worker {index} ended: {reason}; starting it again",
                       index=index, reason=reason.getErrorMessage())
        self.metrics.worker_restarted()
        from twisted.internet import reactor
        reactor.callLater(RESTART_DELAY, self._restart, index)  # type: ignore[attr-defined]

    def _restart(self, index: int) -> None:
        if self.running and index not in self.processes:
            self.spawn(index)

    # -- while running -------------------------------------------------------------

    def scrape(self) -> defer.Deferred[Any]:
        """Ask every running worker for its metrics (a sampler of the exposition)."""
        return defer.gatherResults([self._scrape(link) for link in list(self.links)
                                    if link.ready.called and link.transport is not None])

    @defer.inlineCallbacks
    def _scrape(self, link: WorkerLink) -> Any:
        try:
            first = yield control.ask(link, control.Scrape, part=0)
            data = [first["data"]]
            for part in range(1, first["parts"]):
                data.append((yield control.ask(link, control.Scrape, part=part))["data"])
        except Exception as exc:
            # A worker that ends meanwhile: its last counts stand in (retire_source).
            self.log.info("worker {index} gave no metrics: {error}", index=link.index,
                          error=str(exc))
            return
        self.metrics.update_source(f"worker-{link.index}", b"".join(data))

    def signal_workers(self, signum: int) -> None:
        """Send every running worker the signal ``signum`` (SIGUSR1: reopen logs)."""
        for transport in list(self.transports.values()):
            try:
                transport.signalProcess(signum)
            except error.ProcessExitedAlready:
                pass

    def kick(self) -> None:
        self.services.queue_runner.kick()       # (a stopped runner ignores it)

    def mailbox_changed(self, change: MailboxChange) -> None:
        """A change committed in this process: the workers' sessions hear of it."""
        self.relay(change, control.encode_change(change), origin=None, local=False)

    def relay(self, change: MailboxChange, data: bytes, origin: Optional[WorkerLink],
              local: bool = True) -> None:
        if local:
            self.hub.mailbox_changed(change)
        for link in list(self.links):
            if link is not origin:
                control.notify(link, control.Changed, change=data)

    # -- reloading -----------------------------------------------------------------

    def prepare(self, config: Config) -> defer.Deferred[Switch]:
        """Every worker reads ``config``'s text and gets ready (IReloadable)."""
        self.generation += 1
        generation = self.generation
        links = [link for link in self.links if link.transport is not None]
        d = defer.gatherResults([self._send(link, generation, config.text)
                                 for link in links], consumeErrors=True)
        d.addErrback(_first_error)
        return d.addCallback(lambda ready: lambda: self._switch(
            config, generation, {link for link, ok in zip(links, ready, strict=True) if ok}))

    @defer.inlineCallbacks
    def _send(self, link: WorkerLink, generation: int, text: str) -> Any:
        """Send the text; True once the worker is ready, False when it is gone (it is
        started again with the texts of the moment); fails when it refuses."""
        data = text.encode()
        size = control.RELOAD_PART
        parts = [data[start:start + size] for start in range(0, len(data), size)] or [b""]
        try:
            for number, part in enumerate(parts, start=1):
                answer = yield control.ask(link, control.Reload, generation=generation,
                                           text=part, last=number == len(parts))
        except Exception as exc:
            self.log.info("worker {index} was not asked to reload: {error}",
                          index=link.index, error=str(exc))
            return False
        if answer["error"]:
            raise ReloadRefused(f"worker {link.index}: {answer['error']}")
        return True

    @defer.inlineCallbacks
    def _switch(self, config: Config, generation: int, ready: set[WorkerLink]) -> Any:
        by_name = {listener.name: listener for listener in config.listeners}
        for name, limits in self.limits.items():
            limits.follow(by_name[name])
        commits = []
        for link in list(self.links):
            if link in ready:
                commits.append(control.ask(link, control.Commit, generation=generation))
            elif link.transport is not None:
                # Started while the others got ready, with the texts of then.
                commits.append(self._send_and_commit(link, generation, config.text))
        for ok, result in (yield defer.DeferredList(commits, consumeErrors=True)):
            if not ok:
                self.log.warn("a worker did not switch to the reloaded configuration: "
                              "{error}", error=result.getErrorMessage())

    @defer.inlineCallbacks
    def _send_and_commit(self, link: WorkerLink, generation: int, text: str) -> Any:
        if (yield self._send(link, generation, text)):
            yield control.ask(link, control.Commit, generation=generation)

    # -- stopping ------------------------------------------------------------------

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self.draining = True
        waits = [process.exited for process in self.processes.values()]
        for transport in list(self.transports.values()):
            try:
                transport.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass
        from twisted.internet import reactor
        timer = reactor.callLater(  # type: ignore[attr-defined]
            self.shutdown_timeout + 5, self._kill_all)
        yield defer.DeferredList(waits)
        if timer.active():
            timer.cancel()

    def _kill_all(self) -> None:
        for transport in list(self.transports.values()):
            try:
                transport.signalProcess("KILL")
            except (OSError, error.ProcessExitedAlready):
                pass
