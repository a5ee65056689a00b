"""Milters for the tests.

:class:`FakeMilter`, a scripted one: speaks the milter protocol's filter side over a
Unix socket, in a thread, answers each command as the test says, and records what it
was sent.  :class:`LibMilter`: a milter on Sendmail's own libmilter (Debian's
python3-milter) that makes the envelope changes a test lists.  (The real filters are
OpenDKIM and rspamd, in test_milter.py.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONTINUE = b"c"
#: Answers a script can give instead of packets.
HANG, CLOSE = "hang", "close"


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def negotiation(version: int = 6, actions: int = 0x1FF, protocol: int = 0,
                symlists: bytes = b"") -> bytes:
    return packet(b"O", struct.pack("!III", version, actions, protocol) + symlists)


Answer = Any       # a list of packets, HANG, CLOSE, or raw bytes sent as they are


class FakeMilter:
    """``script`` maps a command octet to a function of the command's data giving
    the answer; commands it does not name get CONTINUE (none for MACRO, ABORT and
    QUIT, which have no answer)."""

    def __init__(self, script: dict[bytes, Callable[[bytes], Answer]] | None = None,
                 optneg: bytes | None = None) -> None:
        self.script = script or {}
        self.optneg = optneg if optneg is not None else negotiation()
        self.received: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.dir = Path(tempfile.mkdtemp(prefix="lm-milter-"))
        self.path = self.dir / "milter.sock"
        self.stop_hanging = threading.Event()
        milter = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                milter.connections += 1
                milter.serve(self.request)

        self.server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def socket(self) -> str:
        return f"unix:{self.path}"

    def commands(self) -> bytes:
        """The command octets received, in order, macros left out."""
        return b"".join(command for command, _ in self.received if command != b"D")

    def serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        buffer = b""
        while True:
            while len(buffer) < 4 or len(buffer) < 4 + struct.unpack("!I", buffer[:4])[0]:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
            length = struct.unpack("!I", buffer[:4])[0]
            command, data, buffer = buffer[4:5], buffer[5:4 + length], buffer[4 + length:]
            self.received.append((command, data))
            if command == b"O":
                answer: Answer = self.script.get(b"O", lambda _: [self.optneg])(data)
            elif command in self.script:
                answer = self.script[command](data)
            elif command in (b"D", b"A", b"Q"):
                answer = []
            else:
                answer = [packet(CONTINUE)]
            if answer == HANG:
                self.stop_hanging.wait(60)
                return
            if answer == CLOSE:
                return
            try:
                sock.sendall(answer if isinstance(answer, bytes) else b"".join(answer))
            except OSError:
                return            # the MTA hung up (it may: after a failure, say)
            if command == b"Q":
                return

    def close(self) -> None:
        self.stop_hanging.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def free_socket_dir() -> Path:
    """A short directory for Unix sockets (their paths are limited to 107 octets)."""
    path = Path(tempfile.mkdtemp(prefix="lm-"))
    os.chmod(path, 0o755)
    return path


#: Debian's interpreter, where python3-milter (scripts/test-peers.sh) is installed.
SYSTEM_PYTHON = "/usr/bin/python3"


class LibMilter:
    """tests/libmilter_edits.py under Debian's python3: ``edits`` are
    ``(kind, address, args)``, kind ``chgfrom`` or ``addrcpt``, made at end of
    message by libmilter's smfi_chgfrom and smfi_addrcpt_par."""

    def __init__(self, edits: list[tuple[str, str, str | None]]) -> None:
        found = subprocess.run([SYSTEM_PYTHON, "-c", "import Milter"], capture_output=True)
        if found.returncode != 0:
            raise AssertionError("python3-milter is not installed: run "
                                 "scripts/test-peers.sh (part of `make test`)")
        self.dir = free_socket_dir()
        self.path = self.dir / "libmilter.sock"
        self.log = open(self.dir / "log", "wb")
        self.process = subprocess.Popen(
            [SYSTEM_PYTHON, str(Path(__file__).with_name("libmilter_edits.py")),
             str(self.path), json.dumps(edits)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                said = self.output()
                self.stop()
                raise AssertionError(f"the libmilter milter did not start: {said}")
            time.sleep(0.05)

    @property
    def socket(self) -> str:
        return f"unix:{self.path}"

    def output(self) -> str:
        return (self.dir / "log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
