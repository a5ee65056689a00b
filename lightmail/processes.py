"""How the main process starts its child processes: the workers and the writer process.

:class:`IProcessStarter` is the seam, chosen once where the server is built
(``makeService``'s ``starter``).  :class:`ExecStarter` runs a new Python interpreter,
``python -m MODULE ARGS``; lightmail.workers.prefork's starter hands the start over
to a process forked from the main one as it started, which shares its memory, and
falls back on an ExecStarter.  Either way the child gets the same arguments, the
same file descriptors at the same numbers and the same standard input, and the
caller's ProcessProtocol hears of its end (``processEnded``).
"""

from __future__ import annotations

import os
import sys
from typing import Protocol

from twisted.internet.protocol import ProcessProtocol
from zope.interface import Interface, implementer


class ChildProcess(Protocol):
    """What a caller keeps of a child it started (Twisted's process transports have it)."""

    @property
    def pid(self) -> int | None:
        """The child's process id; None once it ended."""

    def signalProcess(self, signalID: str | int) -> None:
        """Send a signal ("TERM", "KILL", "INT", "HUP" or a number); raises
        twisted.internet.error.ProcessExitedAlready once the child ended."""


class IProcessStarter(Interface):
    def start(protocol: ProcessProtocol, module: str, args: list[str],
              fds: dict[int, int], stdin: bytes) -> ChildProcess:
        """Start ``python -m module *args``: ``fds`` maps the child's descriptor
        numbers to this process's descriptors (which the caller may close as soon
        as this returns), standard output and error are this process's, ``stdin``
        is the whole of the child's standard input.  ``protocol.processEnded`` is
        called once the child ended."""


@implementer(IProcessStarter)
class ExecStarter:
    """A new Python interpreter for each child (``reactor.spawnProcess``)."""

    def start(self, protocol: ProcessProtocol, module: str, args: list[str],
              fds: dict[int, int], stdin: bytes) -> ChildProcess:
        from twisted.internet import reactor
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2, **fds}
        transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            protocol, sys.executable, [sys.executable, "-m", module, *args],
            env=dict(os.environ), childFDs=child_fds)
        if stdin:
            transport.writeToChild(0, stdin)
        transport.closeChildFD(0)
        return transport  # type: ignore[no-any-return]
