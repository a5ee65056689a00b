"""The one owner of a process's running configuration: :class:`Reloader`.

A reload reads the file again in a thread, validates it as start-up does, settles it
against the configuration the process started with (settle.py), asks every part to
get ready (each reads what it needs off the reactor: certificates, keys), and only
when all are ready switches them all, in one reactor turn.  A file that fails
validation, or a part that cannot use it, is refused: nothing switches, the running
configuration stays, and the log says why (file, line, key, reason).

The main process reads the file; a worker process is handed its text by the main
process (:meth:`prepare_text`, then :meth:`commit` once every worker is ready).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from lightmail.config import Config, ConfigError, load_config, parse_config
from lightmail.reload.interfaces import IReloadable, ReloadRefused, Switch
from lightmail.reload.settle import Settled, settle

Validators = Callable[[Config], None]


@dataclass(frozen=True)
class Outcome:
    """What became of one reload."""

    taken: bool
    #: Why it was refused ("FILE:LINE: [section] key: reason").
    error: str = ""
    #: Changes left for a restart, one line each.
    restart: tuple[str, ...] = ()
    #: When the reload began (time.time()): it read the file after this.
    began: float = 0.0


class Reloader:
    """Holds ``started`` (the configuration the process started with) and ``current``
    (the one it runs), and switches ``parts`` to a new one."""

    log = Logger()

    def __init__(self, started: Config, parts: list[IReloadable],
                 validators: Validators | None = None, current: Config | None = None) -> None:
        self.started = started
        self.current = current or started
        self.parts = parts
        self.validators = validators
        self._busy = False
        self._waiting: list[defer.Deferred[Outcome]] = []
        self._pending: tuple[int, Settled, list[Switch]] | None = None

    # -- the main process: the file ------------------------------------------------

    def reload(self) -> defer.Deferred[Outcome]:
        """Read the configuration file again and switch to it, or refuse it.

        One reload runs at a time; a request made meanwhile waits for the next one,
        which reads the file after it was asked."""
        d: defer.Deferred[Outcome] = defer.Deferred()
        self._waiting.append(d)
        if not self._busy:
            self._run()
        return d

    def _run(self) -> None:
        self._busy = True
        waiting, self._waiting = self._waiting, []

        def done(outcome: Outcome) -> None:
            self._busy = False
            for d in waiting:
                d.callback(outcome)
            if self._waiting:
                self._run()
        defer.ensureDeferred(self._reload()).addCallback(done)

    async def _reload(self) -> Outcome:
        began = time.time()
        path = self.current.path
        self.log.info("reloading the configuration from {path}", path=path)
        try:
            settled = await threads.deferToThread(self._read, path)
            switches = await self._prepare(settled)
        except Exception:
            return self._refused(Failure(), began)
        await self._switch(settled, switches)
        for note in settled.restart:
            self.log.warn("{note}; the running value stays", note=note)
        self.log.info("configuration reloaded from {path}", path=path)
        return Outcome(True, restart=settled.restart, began=began)

    def _read(self, path: str) -> Settled:
        """In a thread: the file, validated as at start-up, settled."""
        if not Path(path).is_file():
            raise ConfigError("no configuration file to read again (the server was "
                              "given its configuration as an object)", path)
        return settle(self.started, load_config(path, validators=self.validators))

    def _refused(self, failure: Failure, began: float) -> Outcome:
        if failure.check(ConfigError, ReloadRefused):
            error = str(failure.value)
        else:
            self.log.failure("reload failed", failure)
            error = f"reload failed: {failure.getErrorMessage()}"
        self.log.error("reload refused, the running configuration stays: {error}",
                       error=error)
        return Outcome(False, error=error, began=began)

    # -- a worker process: the text the main process read --------------------------

    async def prepare_text(self, generation: int, text: str) -> None:
        """Get ready to switch to ``text`` (the main process's new file); raises
        ConfigError when it cannot be used here."""
        self._pending = None
        settled = await threads.deferToThread(self._parse, text)
        self._pending = (generation, settled, await self._prepare(settled))

    def _parse(self, text: str) -> Settled:
        new = parse_config(text, self.current.path, validators=self.validators)
        return settle(self.started, new)

    async def commit(self, generation: int) -> None:
        """Switch to what :meth:`prepare_text` got ready for ``generation``."""
        if self._pending is None or self._pending[0] != generation:
            raise ReloadRefused(f"reload {generation} was not prepared here")
        _, settled, switches = self._pending
        self._pending = None
        await self._switch(settled, switches)
        self.log.info("configuration reloaded")

    # -- both ----------------------------------------------------------------------

    async def _prepare(self, settled: Settled) -> list[Switch]:
        ready = [defer.maybeDeferred(part.prepare, settled.config) for part in self.parts]
        try:
            return list(await defer.gatherResults(ready, consumeErrors=True))
        except defer.FirstError as exc:
            exc.subFailure.raiseException()
            raise       # (not reached: raiseException raises)

    async def _switch(self, settled: Settled, switches: list[Switch]) -> None:
        # Every part switches in this reactor turn; only answers from other
        # processes (the workers') are waited for after it.
        answers: list[defer.Deferred[Any]] = [defer.maybeDeferred(switch)
                                              for switch in switches]
        self.current = settled.config
        for answer in await defer.DeferredList(answers, consumeErrors=True):
            ok, result = answer
            if not ok:
                self.log.failure("a part did not switch to the reloaded configuration",
                                 result)
