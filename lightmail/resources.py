"""Self-defence under memory pressure (``[server] memory_limit``): new connections are
refused while the server's memory is above its ceiling, rather than the process
growing until the kernel's OOM killer ends it and every session with it.

:class:`MemoryWatchdog` (a service of the main process) measures, every
``memory_check_interval``, the memory of the server's processes: its own, each worker's
and the writer process's, each one's proportional share (``Pss`` of
``/proc/PID/smaps_rollup``: a page the processes share counts once among them, as
the kernel and a cgroup count it; the forked workers share most of theirs with the
main process, and their resident sizes added up would count it once each).  The ceiling is
``memory_limit``: a size, or a share of what the server may use, which is its cgroup's
limit when it has one (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and
the machine's ``MemTotal`` otherwise.  Above the ceiling :meth:`MemoryWatchdog.refusal`
says why connections are refused, and the listeners (or, with worker processes, the
main process when it admits their connections) refuse them: SMTP ``421 4.3.2``, IMAP
``* BYE [UNAVAILABLE]``, POP3 ``-ERR [SYS/TEMP]``; the sessions already open go on.
Below ``memory_resume`` of the ceiling connections are accepted again.

Each change of state is logged (``event=memory_pressure``), the use every
``memory_log_interval`` ("memory: 612 MB of 700 MB ceiling"), and the metrics carry
the use, the ceiling and the state.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import task
from twisted.logger import Logger
from zope.interface import Interface, implementer

from lightmail.config import ServerConfig
from lightmail.metrics.interfaces import IMetrics

#: What a refused client is told (after its protocol's code).
RESOURCES_LOW = "System resources low, try again later"

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: cgroup v1 says "no limit" with a huge number (the largest page-aligned int64).
_NO_V1_LIMIT = 1 << 60
MB = 1024 * 1024

log = Logger(namespace="lightmail.resources")


class IMemoryGuard(Interface):
    def refusal() -> Optional[str]:
        """Why new connections are refused now (memory is short), or None."""


@implementer(IMemoryGuard)
class NoMemoryGuard:
    """Never refuses: for the lightmail command, and for worker processes (the main
    process's watchdog measures them, and refuses when it admits a connection)."""

    def refusal(self) -> Optional[str]:
        return None


# --- measuring ---------------------------------------------------------------------


def resident_size(pid: int | str = "self", proc: Path = Path("/proc")) -> Optional[int]:
    """The resident set size of process ``pid`` in bytes (None: it is gone)."""
    try:
        fields = (proc / str(pid) / "statm").read_text().split()
        return int(fields[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def proportional_size(pid: int | str = "self", proc: Path = Path("/proc")) -> Optional[int]:
    """The proportional set size of process ``pid`` in bytes: its resident pages,
    each shared one divided by the number of processes that map it (Linux 4.14's
    ``smaps_rollup``; the resident size where there is none).  None: it is gone."""
    try:
        with open(proc / str(pid) / "smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass                    # no such process, or a kernel without smaps_rollup
    except (OSError, ValueError, IndexError):
        return None
    return resident_size(pid, proc)


def cgroup_limit(proc: Path = Path("/proc"),
                 cgroups: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """The memory limit of this process's cgroup (the lowest on its way to the
    root), or None when there is none."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":                           # v2, the unified hierarchy
            limits += _limits_up(cgroups, path, "memory.max")
        elif "memory" in controllers.split(","):        # v1
            limits += _limits_up(cgroups / "memory", path, "memory.limit_in_bytes")
    found = [limit for limit in limits if 0 < limit < _NO_V1_LIMIT]
    return min(found) if found else None


def _limits_up(root: Path, path: str, name: str) -> list[int]:
    """The ``name`` files from the cgroup at ``path`` up to ``root`` (inside a
    container the path may be the host's, and only ``root`` is there)."""
    values = []
    here = Path(path.lstrip("/"))
    while True:
        try:
            text = (root / here / name).read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            values.append(int(text))
        if here == Path("."):
            return values
        here = here.parent


def memory_info(proc: Path = Path("/proc")) -> dict[str, int]:
    """/proc/meminfo's MemTotal and MemAvailable, in bytes."""
    out = {}
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                out[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


@dataclass
class MemoryReading:
    """One measurement: the proportional size of each process, and the ceiling."""

    processes: dict[str, int]
    #: None: no ceiling (memory_limit = 0).
    ceiling: Optional[int]
    #: Where the ceiling comes from: memory_limit, the cgroup, or MemTotal.
    basis: str = ""
    available: Optional[int] = field(default=None)

    @property
    def used(self) -> int:
        return sum(self.processes.values())

    def describe(self) -> str:
        used = f"{self.used / MB:.0f} MB"
        if len(self.processes) > 1:
            used += " (" + ", ".join(f"{name} {size / MB:.0f} MB"
                                     for name, size in self.processes.items()) + ")"
        if self.ceiling is None:
            return f"{used}, no ceiling"
        return f"{used} of {self.ceiling / MB:.0f} MB ceiling ({self.basis})"


def ceiling_of(server: ServerConfig, proc: Path = Path("/proc"),
               cgroups: Path = Path("/sys/fs/cgroup")) -> tuple[Optional[int], str]:
    """The ceiling ``memory_limit`` sets, and what it is a share of."""
    limit = server.memory_limit
    if limit.kind == "none":
        return None, "none"
    if limit.kind == "size":
        return int(limit.amount), "memory_limit"
    whole = cgroup_limit(proc, cgroups)
    basis = "of the cgroup's limit"
    if whole is None:
        whole = memory_info(proc).get("MemTotal")
        basis = "of MemTotal"
    if whole is None:
        return None, "unknown"
    return int(whole * limit.amount), f"{limit.amount:.0%} {basis}"


# --- the watchdog ------------------------------------------------------------------


@implementer(IMemoryGuard)
class MemoryWatchdog(Service):
    """Measures the server's memory and refuses new connections above its ceiling
    (see the module docstring).  ``settings``: the current [server] section (a reload
    changes the ceiling); :meth:`watch` adds the other processes to measure."""

    name = "memory"

    def __init__(self, settings: Callable[[], ServerConfig], metrics: IMetrics,
                 clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.refusing = False
        self.last: Optional[MemoryReading] = None
        self._sources: list[Callable[[], dict[str, int]]] = []
        self._loop: Optional[task.LoopingCall] = None
        self._interval = 0.0
        self._logged_at: Optional[float] = None
        #: Measures the processes (name -> bytes); a test may put a stand-in here.
        self.sample: Callable[[], dict[str, int]] = self._sample
        #: The ceiling and its basis; a test may put a stand-in here too.
        self.ceiling: Callable[[ServerConfig], tuple[Optional[int], str]] = ceiling_of

    def watch(self, pids: Callable[[], dict[str, int]]) -> None:
        """Also measure the processes ``pids()`` names (name -> pid): the workers, the
        writer process."""
        self._sources.append(pids)

    def refusal(self) -> Optional[str]:
        return RESOURCES_LOW if self.refusing else None

    def startService(self) -> None:
        super().startService()
        self._start_loop()

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _start_loop(self) -> None:
        self._interval = self.settings().memory_check_interval
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("memory watchdog stopped", f))

    def _tick(self) -> None:
        self.check()
        if self.settings().memory_check_interval != self._interval and self.running:
            assert self._loop is not None
            self._loop.stop()                  # a reload changed the interval
            self._start_loop()

    def _sample(self) -> dict[str, int]:
        sizes = {"main": proportional_size() or 0}
        for source in self._sources:
            for name, pid in source().items():
                size = proportional_size(pid)
                if size is not None:
                    sizes[name] = size
        return sizes

    def check(self) -> MemoryReading:
        """Measure now: change state if the ceiling (or the lower mark) is crossed,
        log, and update the metrics."""
        server = self.settings()
        ceiling, basis = self.ceiling(server)
        reading = MemoryReading(self.sample(), ceiling, basis)
        self.last = reading
        used = reading.used
        if ceiling is None:
            over = False
        elif self.refusing:
            over = used >= ceiling * server.memory_resume
        else:
            over = used > ceiling
        now = self.clock.seconds()
        if over != self.refusing:
            self.refusing = over
            self._logged_at = now
            if over:
                log.warn("memory: {reading}: refusing new connections",
                              reading=reading.describe(), event="memory_pressure",
                              state="refusing", used=used, ceiling=ceiling)
            else:
                log.info("memory: {reading}: accepting new connections again",
                              reading=reading.describe(), event="memory_pressure",
                              state="accepting", used=used, ceiling=ceiling)
        elif self._logged_at is None or (
                server.memory_log_interval
                and now - self._logged_at >= server.memory_log_interval):
            self._logged_at = now
            log.info("memory: {reading}", reading=reading.describe(), used=used,
                          ceiling=ceiling)
        self.metrics.memory(used, ceiling or 0, self.refusing)
        return reading
