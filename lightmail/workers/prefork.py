"""Worker and writer processes forked from the main process as it starts, to share memory.

Why: each LightMail process is a Python interpreter that has imported Twisted,
SQLAlchemy, cryptography, numpy, dnspython and LightMail itself, some 70 MB of
objects before it serves anyone; started as new interpreters, the demo's main
process, two workers and writer process held 331 MiB of Pss between them (issue 22).
Forked from one process that has imported all of it, they share those pages
(copy-on-write) until one of them writes to one.

When: from the twistd plugin's ``makeService`` (:func:`prefork`), before anything
has installed the reactor and while the main process runs one thread.  Not later,
when the main process knows what the children need (its listening sockets, the
writer's socket): by then it runs its reactor and thread pools, and ``fork()``
copies the calling thread only (a lock another thread held stays locked in the
child for ever), and the child would share the parent's epoll instance.  So each
child is made then, and waits on a socket pair until the main process hands it, as
:class:`PreforkStarter`, what an exec'ed child gets on its command line: its
arguments, its file descriptors (passed over the socket, SCM_RIGHTS, and put at the
numbers asked for) and its standard input; it then runs the module's ``main`` as
``python -m`` would.  Its end is reaped by the main process, its parent, through
Twisted's process reaper, as a spawned process's is.

``gc.freeze()`` before the fork: a collection walks every object it tracks and writes
to each one's header, which would copy every page of the image into every process at
its first full collection; frozen objects are left out of collections (those of
start-up, which live as long as the process anyway).

Each child is used once: a worker or writer process that ends is started again as a
new interpreter (the fallback, :class:`~lightmail.processes.ExecStarter`), the main
process having threads by then.  A fork server (a process kept clean to fork such
restarts from) was measured and left out: it keeps the original of every page the
others have copied since, 20 to 30 MB, for restarts that are rare.  Every child is a
new interpreter too when no fork can be made here (a reactor already installed, a
thread running, ``[server] prefork = no``; a log line says why), and when twistd
went into the background after the fork (without ``-n``): the children are then its
former self's, and end as their sockets close.
"""

from __future__ import annotations

import fcntl
import gc
import importlib
import importlib.util
import json
import os
import signal
import socket
import sys
from typing import Any, NoReturn

from twisted.internet import error, protocol
from twisted.internet.process import registerReapProcessHandler, unregisterReapProcessHandler
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.config import Config
from lightmail.processes import ChildProcess, ExecStarter, IProcessStarter

__all__ = ["PreforkStarter", "prefork"]

log = Logger(namespace="lightmail.workers.prefork")

WORKER = "lightmail.workers.worker"
WRITER = "lightmail.workers.writer"
#: The most descriptors one child is given (a worker's: its control socket and one
#: listening socket per listener).
MAX_FDS = 256
#: Signals a waiting child ignores: Ctrl-C reaches the whole process group, and so
#: may logrotate's SIGUSR1 and a SIGHUP; each is for the main process, which stops
#: (or reopens, or reloads) what it started, and a waiting child ends with it.
WAITING_IGNORES = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def prefork(config: Config, fallback: IProcessStarter | None = None) -> IProcessStarter:
    """Fork now the children ``config`` will need (its workers and writer process),
    or say why not; the starter that hands them over (see the module docstring)."""
    from lightmail.wiring import runs_writer_process
    fallback = fallback or ExecStarter()
    modules = [WORKER] * config.server.workers
    if runs_writer_process(config):
        modules.append(WRITER)
    if not modules:
        return fallback
    why_not = _cannot_fork(config)
    if not why_not:
        _preload(config)
        why_not = _cannot_fork(config)      # (an import could have started a thread)
    if why_not:
        log.info("worker and writer processes start as new interpreters: {why}",
                 why=why_not)
        return fallback
    gc.collect()
    gc.freeze()
    sys.stdout.flush()
    sys.stderr.flush()
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in modules]
    children = []
    for module, (ours, theirs) in zip(modules, pairs, strict=True):
        pid = os.fork()
        if pid == 0:
            for other in pairs:             # nobody else's end, not even the parent's
                for sock in other:
                    if sock is not theirs:
                        sock.close()
            _wait_and_run(theirs, module)   # never returns
        theirs.close()
        children.append(Waiting(module, pid, ours))
    for child in children:
        # Once all are forked: a child must not inherit the others' reapers.
        child.watch()
    return PreforkStarter(children, fallback)


def _cannot_fork(config: Config) -> str:
    """Why no child can be forked now ("" if one can)."""
    if not config.server.prefork:
        return "[server] prefork = no"
    if "twisted.internet.reactor" in sys.modules:
        return "a reactor is installed already"
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        return f"the main process runs {threads} threads"
    if not hasattr(os, "memfd_create"):
        return "this system has no memfd_create"
    return ""


def _preload(config: Config) -> None:
    """Import (and load) before the fork what the children will, for them to share it:
    the entry points, the protocols of the listeners and their inbound checks, TLS,
    the reactor's module (not installed), the database's dialect and the Public
    Suffix List the package ships."""
    from sqlalchemy.engine import make_url

    from lightmail.listeners import builder_for
    from lightmail.policy.dmarc import load_suffixes
    for name in (WORKER, WRITER, "lightmail.storage.writer", "lightmail.tls",
                 "lightmail.policy.inbound.checks", "twisted.internet.epollreactor"):
        importlib.import_module(name)
    for listener in config.listeners:
        builder_for(listener.protocol)
    make_url(config.database_url).get_dialect()
    if config.dmarc.public_suffix_list is None:
        load_suffixes(None)


# -- the main process's side ------------------------------------------------------------

@implementer(IProcessStarter)
class PreforkStarter:
    """Starts each module in a child forked for it while one waits, else through
    ``fallback``."""

    def __init__(self, children: list[Waiting], fallback: IProcessStarter) -> None:
        self.children = children
        self.fallback = fallback

    def start(self, protocol: protocol.ProcessProtocol, module: str, args: list[str],
              fds: dict[int, int], stdin: bytes) -> ChildProcess:
        for child in self.children:
            if not child.ours():
                # twistd without -n forked itself into a daemon since: the children
                # are its parent's, which is gone.  They end as their socket closes.
                log.info("worker and writer processes start as new interpreters: "
                         "twistd went into the background after forking them")
                for gone in self.children:
                    gone.let_go()
                self.children = []
                break
            if child.module == module and child.waiting:
                self.children.remove(child)
                child.run(protocol, args, fds, stdin)
                return child
        return self.fallback.start(protocol, module, args, fds, stdin)


class Waiting:
    """A forked child, waiting for :meth:`run` and then running: Twisted's process
    reaper calls :meth:`reapProcess` as for a spawned process."""

    def __init__(self, module: str, pid: int, sock: socket.socket) -> None:
        self.module = module
        self.pid: int | None = pid
        self.sock = sock
        self.protocol: protocol.ProcessProtocol | None = None
        self.parent = os.getpid()
        self.watched = False

    def ours(self) -> bool:
        """Whether this process is the child's parent (the one that forked it)."""
        return os.getpid() == self.parent

    def let_go(self) -> None:
        """Never to be used: it ends (EOF on its socket), and is not reaped here."""
        if self.pid is not None and self.watched:
            unregisterReapProcessHandler(self.pid, self)
        self.pid = None
        self.sock.close()

    def watch(self) -> None:
        """Have Twisted's process reaper tell of its end (:meth:`processEnded`)."""
        assert self.pid is not None
        self.watched = True
        registerReapProcessHandler(self.pid, self)

    @property
    def waiting(self) -> bool:
        return self.pid is not None and self.protocol is None

    def run(self, protocol: protocol.ProcessProtocol, args: list[str],
            fds: dict[int, int], stdin: bytes) -> None:
        from twisted.internet import reactor
        self.protocol = protocol
        header = json.dumps({"args": args, "fds": list(fds)}).encode()
        # Ours to close once sent: the caller closes its own as this returns.
        handover = _Handover([os.dup(fd) for fd in fds.values()], header + b"\n" + stdin)
        reactor.adoptStreamConnection(  # type: ignore[attr-defined]
            self.sock.fileno(), socket.AF_UNIX, _HandoverFactory(handover))
        self.sock.close()

    def signalProcess(self, signalID: str | int) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        number = getattr(signal, f"SIG{signalID}") if isinstance(signalID, str) else signalID
        os.kill(self.pid, number)

    def reapProcess(self) -> None:
        if self.pid is None:
            return
        if not self.ours():
            self.let_go()
            return
        status: int | None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:       # reaped by someone else: it ended, how is lost
            pid, status = self.pid, None
        if pid:
            unregisterReapProcessHandler(pid, self)
            self.processEnded(status)

    def processEnded(self, status: int | None) -> None:
        """(Twisted's reaper, or :meth:`reapProcess`.)  The child ended."""
        reason: Exception
        if status is None:
            reason = error.ProcessTerminated()
        elif os.WIFEXITED(status) and not os.WEXITSTATUS(status):
            reason = error.ProcessDone(status)
        else:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            number = None if os.WIFEXITED(status) else os.WTERMSIG(status)
            reason = error.ProcessTerminated(code, number, status)
        self.pid = None
        if self.protocol is None:
            # Ended while waiting: it is never handed over; its start falls back.
            log.warn("a forked {module} process ended before it was used: {reason}",
                     module=self.module, reason=str(reason))
            self.sock.close()
            return
        self.protocol.processExited(Failure(reason))
        self.protocol.processEnded(Failure(reason))


class _Handover(protocol.Protocol):
    """Writes a child's descriptors and what it is to run, then closes."""

    def __init__(self, fds: list[int], data: bytes) -> None:
        self.fds = fds
        self.data = data

    def connectionMade(self) -> None:
        assert self.transport is not None
        for fd in self.fds:
            self.transport.sendFileDescriptor(fd)  # type: ignore[attr-defined]
        self.transport.write(self.data)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        for fd in self.fds:
            os.close(fd)


class _HandoverFactory(protocol.Factory):
    noisy = False

    def __init__(self, handover: _Handover) -> None:
        self.handover = handover

    def buildProtocol(self, addr: Any) -> _Handover:
        return self.handover


# -- the child's side -------------------------------------------------------------------

def _wait_and_run(sock: socket.socket, module: str) -> NoReturn:
    """(A forked child.)  Wait for the main process's handover, then be ``python -m
    module`` with it; end when the main process closes the socket first."""
    code: Any = 1
    try:
        for number in WAITING_IGNORES:
            signal.signal(number, signal.SIG_IGN)
        _name_process(module)
        data, fds = _receive(sock)
        sock.close()
        if not data:
            code = 0             # never used: the server stopped
        else:
            header, _, stdin = data.partition(b"\n")
            request = json.loads(header)
            _place(fds, request["fds"])
            _stdin_from(stdin)
            # As an exec'ed interpreter starts (Python's SIGINT handler).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for number in WAITING_IGNORES[1:]:
                signal.signal(number, signal.SIG_DFL)
            spec = importlib.util.find_spec(module)
            sys.argv = [spec.origin if spec and spec.origin else module, *request["args"]]
            code = importlib.import_module(module).main(request["args"])
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    _exit(code)


def _exit(code: Any) -> NoReturn:
    """End the child here, as an interpreter ends (exit handlers, then the output
    flushed), but not by SystemExit: that would unwind, in this process, through the
    stack the fork was made from (twistd's start-up) and run its clean-ups."""
    import atexit
    try:
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)        # SystemExit("why"), as Python does
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def _name_process(module: str) -> None:
    """``ps -o comm`` and top show "lm-worker" or "lm-writer" (the command line stays
    the main process's)."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write("lm-" + module.rpartition(".")[2])
    except OSError:
        pass


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Everything the main process sends, until it closes: bytes, and descriptors in
    the order they were sent."""
    data: list[bytes] = []
    fds: list[int] = []
    while True:
        chunk, received, flags, _ = socket.recv_fds(sock, 1 << 16, MAX_FDS)
        if flags & socket.MSG_CTRUNC:
            raise OSError("more descriptors than a child takes")
        fds += received
        if not chunk:
            return b"".join(data), fds
        data.append(chunk)


def _place(received: list[int], targets: list[int]) -> None:
    """Put descriptor ``received[i]`` at number ``targets[i]``: above them all first,
    so that no move overwrites one still to be made."""
    if len(received) != len(targets):
        raise OSError(f"{len(received)} descriptors received, {len(targets)} expected")
    floor = max([*targets, *received, 2]) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in received]
    for fd in received:
        os.close(fd)
    for fd, target in zip(high, targets, strict=True):
        os.dup2(fd, target, inheritable=False)
        os.close(fd)


def _stdin_from(data: bytes) -> None:
    """Standard input holding ``data``, read from the start, as the pipe an exec'ed
    child reads (an anonymous memory file: nothing on disk, no size limit)."""
    fd = os.memfd_create("lightmail-stdin")
    try:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        os.lseek(fd, 0, os.SEEK_SET)
        os.dup2(fd, 0)
    finally:
        os.close(fd)
