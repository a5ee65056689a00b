"""``lightmail reload``: ask the running server to reload, and say what became of it.

The server (under twistd) keeps its pid in ``STATE_DIR/lightmail.pid``; the command
sends it SIGHUP and waits for ``STATE_DIR/reload.json`` to hold the outcome of a
reload that began after the signal was sent (sighup.py).

The state directory is read from the configuration file leniently: the file may be
the very one with the error the server is to refuse, and the command should still
reach the server and report its answer.
"""

from __future__ import annotations

import configparser
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightmail.config import ServerConfig, load_config, parse_path
from lightmail.reload.sighup import PID_FILE, STATUS_FILE

#: How often the status file is looked at while waiting.
POLL = 0.05


class ReloadError(Exception):
    """The server could not be asked, or gave no answer; the message says why."""


@dataclass(frozen=True)
class Answer:
    taken: bool
    error: str
    restart: tuple[str, ...]


def state_dir_of(path: str) -> Path:
    """``[server] state_dir`` of the file at ``path``, even if other settings in it are
    wrong; a file that cannot be read as INI at all gives its error."""
    parser = configparser.ConfigParser(interpolation=None, strict=False,
                                       default_section="\0no-default-section")
    try:
        with open(path, encoding="utf-8") as text:
            parser.read_file(text)
    except (OSError, UnicodeDecodeError, configparser.Error):
        load_config(path)           # raises the ConfigError that says where and why
        raise
    raw = parser.get("server", "state_dir", fallback=None)
    if raw is None:
        state_dir: Path = ServerConfig().state_dir
        return state_dir
    try:
        return parse_path(raw.strip(), Path(path).resolve().parent)
    except ValueError:
        load_config(path)           # the error, with its line
        raise


def request_reload(state_dir: Path, timeout: float) -> Answer:
    """Signal the server of ``state_dir`` and wait up to ``timeout`` seconds for its
    answer."""
    pid = _server_pid(state_dir)
    asked = time.time()
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise ReloadError(f"not allowed to signal the server (pid {pid}): run this as "
                          "the server's user") from None
    except ProcessLookupError:
        raise ReloadError(f"the server (pid {pid}) is gone") from None
    status_file = state_dir / STATUS_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _read_status(status_file)
        if status is not None and status.get("pid") == pid and \
                float(status.get("began", 0)) >= asked:
            return Answer(bool(status["taken"]), str(status.get("error", "")),
                          tuple(status.get("restart", ())))
        if not _alive(pid):
            raise ReloadError(f"the server (pid {pid}) ended before it answered")
        time.sleep(POLL)
    raise ReloadError(f"no answer from the server (pid {pid}) within {timeout:g} s; "
                      "its log says what it is doing")


def _server_pid(state_dir: Path) -> int:
    pid_file = state_dir / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except FileNotFoundError:
        raise ReloadError(f"no server is running with this state directory ({pid_file} "
                          "does not exist)") from None
    except (OSError, ValueError) as exc:
        raise ReloadError(f"cannot read {pid_file}: {exc}") from None
    if not _alive(pid):
        raise ReloadError(f"no server is running: {pid_file} names pid {pid}, which has "
                          "ended (a server killed without a clean stop leaves it)")
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid              # no /proc here: the pid file is all there is
    if b"lightmail" not in command:
        raise ReloadError(f"{pid_file} names pid {pid}, which is not LightMail (a stale "
                          "pid file, its number reused)")
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None
