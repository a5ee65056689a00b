"""A private HAProxy for tests (Debian's haproxy package), in TCP mode.

Each instance has its own generated configuration under a temporary directory: one
frontend per route on a free loopback port, to a LightMail port with the server
options the test gives (``send-proxy-v2``, ``send-proxy``, ``check``...) or to several
(a Pool: one backend, a server per LightMail node), and a stats
socket to ask for its servers' health.  It runs in the foreground (``haproxy -db``)
as a child process in a session of its own, and is killed when the test leaves the
``with`` block.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Optional

from tests.harness import free_ports

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class Route:
    """One frontend: what it forwards to (a LightMail port), with which ``server``
    options, and more ``backend`` lines (``option smtpchk``)."""

    def __init__(self, target: int, server: str, backend: str = "") -> None:
        self.target = target
        self.server = server
        self.backend = backend

    def server_lines(self) -> list[str]:
        return [f"server lightmail 127.0.0.1:{self.target} {self.server}"]


class Pool(Route):
    """One frontend to several LightMail nodes: ``servers`` maps each server's name
    to its port and ``server`` options (``check port ADMIN``...)."""

    def __init__(self, servers: dict[str, tuple[int, str]], backend: str = "") -> None:
        super().__init__(0, "", backend)
        self.servers = servers

    def server_lines(self) -> list[str]:
        return [f"server {name} 127.0.0.1:{port} {options}"
                for name, (port, options) in self.servers.items()]


class HAProxy:
    """``routes``: name -> Route; ``ports``: name -> the frontend's port (once
    started)."""

    def __init__(self, routes: dict[str, Route]) -> None:
        if not os.access(HAPROXY, os.X_OK):
            raise AssertionError("HAProxy is not installed: run scripts/test-peers.sh "
                                 "(part of `make test`)")
        self.base = Path(tempfile.mkdtemp(prefix="lightmail-haproxy-"))
        self.stats_socket = self.base / "stats.sock"
        self.ports = dict(zip(routes, free_ports(len(routes)), strict=True))
        lines = ["global",
                 f"    stats socket {self.stats_socket} mode 600 level admin",
                 "defaults",
                 "    mode tcp",
                 "    timeout connect 5s",
                 "    timeout client 60s",
                 "    timeout server 60s"]
        for name, route in routes.items():
            lines += [f"frontend fe_{name}",
                      f"    bind 127.0.0.1:{self.ports[name]}",
                      f"    default_backend be_{name}",
                      f"backend be_{name}",
                      # Its own address towards LightMail: the one proxy_from names.
                      "    source 127.0.0.1",
                      *(f"    {line}" for line in route.backend.splitlines() if line),
                      *(f"    {line}" for line in route.server_lines())]
        self.config = self.base / "haproxy.cfg"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = self.base / "haproxy.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def __enter__(self) -> HAProxy:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: Optional[type[BaseException]], value: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self.stop()

    def _wait_listening(self, timeout: float = 20.0) -> None:
        # Asked on the stats socket, which answers once every frontend is bound: a
        # connection to a frontend would reach LightMail as a session of its own.
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited ({self.proc.returncode}):\n"
                                     f"{self.output()}")
            try:
                rows = self.stats()
                if all(rows.get((f"fe_{name}", "FRONTEND"), {}).get("status") == "OPEN"
                       for name in self.ports):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy does not listen:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stats(self) -> dict[tuple[str, str], dict[str, str]]:
        """``show stat``: (proxy, server) -> its row (status, check_status...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        header, *rows = [line for line in b"".join(chunks).decode().splitlines() if line]
        names = header.lstrip("# ").split(",")
        found = {}
        for row in rows:
            fields = dict(zip(names, row.split(","), strict=False))
            found[fields["pxname"], fields["svname"]] = fields
        return found

    def server(self, route: str, name: str = "lightmail") -> dict[str, str]:
        """The stats row of ``route``'s LightMail server (a Pool's: ``name``)."""
        return self.stats()[f"be_{route}", name]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        shutil.rmtree(self.base, ignore_errors=True)
