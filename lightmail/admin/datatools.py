"""What the data tools (backup, restore, import, export) share: errors, storage for a
tool that needs the reactor, and what they show while they work.

A progress bar on standard error when it is a terminal (lightmail.admin.progressbar,
as fsck's); nothing when it is not (a cron job's mail, a log, a pipe get no carriage
returns).  The summary a tool ends with goes to standard output, as text or, with
``--json``, as one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from lightmail.admin import progressbar
from lightmail.config import Config

#: Reads the configuration the command line names (lightmail.admin.cli's _load).
Loader = Callable[[argparse.Namespace], Config]


class ToolError(Exception):
    """The tool could not do what was asked; the message says why, for the
    administrator (one line on stderr, exit status 1)."""


class Progress:
    """One tool's progress in phases (``start(label, total)``, ``advance(count)``,
    ``finish()`` or the next ``start``), each shown as lightmail.admin.progressbar's
    line: on a terminal only."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._line: progressbar.Progress | None = None

    def start(self, label: str, total: int | None = None) -> None:
        self.finish()
        self._line = progressbar.Progress(label, total, self.stream)

    def advance(self, count: int = 1) -> None:
        if self._line is not None:
            self._line.advance(count)

    def finish(self) -> None:
        if self._line is not None:
            self._line.close()
            self._line = None


def report(summary: dict[str, Any], as_json: bool, text: str) -> None:
    """The tool's last word on standard output: ``text``, or ``summary`` as JSON."""
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(text)


def register(sub: Any, load: Loader) -> None:
    """The data tools' commands (for lightmail.admin.cli).  Their modules are imported
    when one runs, not for every ``lightmail`` command."""
    p = sub.add_parser("backup", help="copy the metadata and blobs while the server runs")
    p.add_argument("dest", help="a new directory for the backup")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.set_defaults(func=command("backup", "run_backup", load))
    p = sub.add_parser("restore", help="put a backup into the configured (empty) "
                       "database and blob store")
    p.add_argument("src", help="a directory made by lightmail backup")
    p.add_argument("--replace", action="store_true",
                   help="delete whatever the database holds first")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.set_defaults(func=command("backup", "run_restore", load))
    p = sub.add_parser("import", help="a Maildir (with its folders) or an mbox file into "
                       "a user's mailboxes")
    p.add_argument("address", help="the user")
    p.add_argument("source", help="a Maildir directory or an mbox file")
    p.add_argument("--mailbox", help="mbox: the mailbox to fill (default INBOX); "
                   "Maildir: the mailbox its folders go under (default: INBOX to INBOX)")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.set_defaults(func=command("mailimport", "run_import", load))
    p = sub.add_parser("export", help="a user's mailboxes to a Maildir")
    p.add_argument("address", help="the user")
    p.add_argument("dest", help="a new directory for the Maildir")
    p.add_argument("--mailbox", action="append", metavar="NAME",
                   help="only this mailbox (more than once for several)")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.set_defaults(func=command("mailimport", "run_export", load))
    p = sub.add_parser("blobs", help="the blob store")
    bsub = p.add_subparsers(dest="action", required=True)
    p = bsub.add_parser("migrate", help="copy every blob into the filesystem or the S3 "
                        "store, from the other one")
    p.add_argument("--to", required=True, choices=("s3", "filesystem"),
                   help="the store to fill")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.set_defaults(func=command("blobmigrate", "run_migrate", load))


def command(module: str, name: str, load: Loader) -> Callable[[argparse.Namespace], int]:
    """An argparse ``func`` for a data tool: ``lightmail.admin.MODULE.NAME(args,
    load)`` returns its summary (already reported); a ToolError becomes one line on
    stderr (and, with ``--json``, ``{"ok": false, "error": ...}`` on stdout) and exit
    status 1."""
    def func(args: argparse.Namespace) -> int:
        import importlib
        run = getattr(importlib.import_module(f"lightmail.admin.{module}"), name)
        try:
            run(args, load)
        except ToolError as exc:
            if getattr(args, "json", False):
                print(json.dumps({"ok": False, "error": str(exc)}))
            print(f"lightmail: {exc}", file=sys.stderr)
            return 1
        return 0
    return func


def with_storage(config: Config, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``await work(services)`` (lightmail.wiring's Services of the command's
    role) with the reactor and storage running, then stop them; its result, or its
    ToolError raised again here.  The schema must be this LightMail's."""
    from twisted.internet import defer, task

    from lightmail.directory.interfaces import DirectoryError
    from lightmail.storage import migrate
    from lightmail.wiring import Role, wire

    services = wire(config, Role.COMMAND)
    storage = services.storage
    storage.db.start()
    storage.io_pool.start()
    outcome: list[Any] = []
    try:
        current, head = migrate.current_revision(storage.db.engine), migrate.HEAD
        if current != head:
            raise ToolError(f"the database schema is at {current or 'nothing'}, this "
                            f"LightMail needs {head}: run 'lightmail db upgrade'")

        async def main() -> None:
            try:
                outcome.append(await work(services))
            except (ToolError, DirectoryError) as exc:
                outcome.append(ToolError(str(exc)))
            except Exception as exc:        # a bug or a storage failure: say what
                outcome.append(ToolError(f"{exc.__class__.__name__}: {exc}"))
                raise
        try:
            task.react(lambda reactor: defer.ensureDeferred(main()))
        except SystemExit:
            pass
    finally:
        storage.io_pool.stop()
        storage.db.stop()
    if not outcome:
        raise ToolError("interrupted")
    if isinstance(outcome[0], ToolError):
        raise outcome[0]
    return outcome[0]


def sync_filesystem(path: Path) -> None:
    """Make everything written under ``path`` durable (a backup or an export, before
    it says it is done): syncfs(2) of its filesystem where there is one, else
    sync(2)."""
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), str(path))
    finally:
        os.close(fd)


def remove_partial(dest: Path, made: bool) -> None:
    """Take away what a failed backup or export wrote: ``dest`` itself if the tool
    made it, else what it put in it (it was empty)."""
    if made:
        shutil.rmtree(dest, ignore_errors=True)
    elif dest.is_dir():
        for entry in dest.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
