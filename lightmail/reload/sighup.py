"""Under twistd: SIGHUP reloads the configuration, and ``lightmail reload`` is told
what became of it.

:class:`SignalReload` writes the server's pid to ``STATE_DIR/lightmail.pid`` when it
starts (and removes it when it stops), and after each reload writes the outcome to
``STATE_DIR/reload.json``: taken or refused, why, the changes left for a restart,
and when the reload began, so that the command knows the outcome is of a reload
that read the file after it asked (command.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger

from lightmail.reload.reloader import Outcome, Reloader

PID_FILE = "lightmail.pid"
STATUS_FILE = "reload.json"


class SignalReload(Service):
    name = "reload-signal"
    log = Logger()

    def __init__(self, reloader: Reloader, state_dir: Path) -> None:
        self.reloader = reloader
        self.pid_file = state_dir / PID_FILE
        self.status_file = state_dir / STATUS_FILE
        self._writing: defer.Deferred[Any] = defer.succeed(None)

    def startService(self) -> None:
        super().startService()
        # At start-up, before the reactor serves anyone: a few bytes, written at once.
        write_atomically(self.pid_file, f"{os.getpid()}\n")
        signal.signal(signal.SIGHUP, self._signalled)

    def _signalled(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of whatever the reactor was
        # doing: the reload itself waits for the reactor's next turn.
        from twisted.internet import reactor
        reactor.callFromThread(self.reload)  # type: ignore[attr-defined]

    def reload(self) -> defer.Deferred[Any] | None:
        if not self.running:
            self.log.info("SIGHUP ignored: LightMail is stopping")
            return None
        self.log.info("SIGHUP: reloading the configuration")
        return self.reloader.reload().addCallback(self._report)

    def _report(self, outcome: Outcome) -> defer.Deferred[Any]:
        status = json.dumps({"pid": os.getpid(), "taken": outcome.taken,
                             "error": outcome.error, "restart": list(outcome.restart),
                             "began": outcome.began}, indent=1) + "\n"
        # One write at a time, in order, off the reactor.
        self._writing.addCallback(
            lambda _: threads.deferToThread(write_atomically, self.status_file, status))
        self._writing.addErrback(lambda failure: self.log.failure(
            "could not write {path}", failure, path=self.status_file))
        return self._writing

    def stopService(self) -> None:
        super().stopService()
        # A SIGHUP while draining is ignored (reload() says so) rather than left to its
        # default action, which would end the process without draining.
        with contextlib.suppress(OSError):
            if self.pid_file.read_text().strip() == str(os.getpid()):
                self.pid_file.unlink()


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a new file and rename it over ``path``: a reader sees the old
    text or the new, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)
