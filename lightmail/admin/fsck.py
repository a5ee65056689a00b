"""``lightmail fsck [--repair [--expunge-missing]] [--json]``: the store checked
against what it promises (lightmail/storage/fsck.py says what and how), with a
line per problem as it is found and a progress line on a terminal.

The check only reads, so it may run beside a server (what was in flight at that
moment may show: run it again, or stop the server for an exact answer).  A repair
writes where the server writes and moves blob files: it refuses while a server runs
on this state directory (stop every node of a shared database yourself)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from lightmail.admin.progressbar import Progress
from lightmail.queue.wake import WAKE_NAME, listening
from lightmail.storage.fsck import Finding, Report, StoreCheck


def fsck_command(args: argparse.Namespace,
                 run: Callable[[argparse.Namespace, Any], Any]) -> int:
    """The command; ``run`` is the CLI's: ``run(args, work)`` with storage up.
    Exit status 0 when nothing is left wrong, 1 otherwise."""
    if args.expunge_missing and not args.repair:
        print("lightmail: --expunge-missing goes with --repair", file=sys.stderr)
        return 2
    meters: list[Progress] = []

    def found(finding: Finding) -> None:
        if args.json:
            return
        for meter in meters:
            meter.clear()
        print(describe(finding), flush=True)

    def progress(label: str, total: int | None) -> Progress:
        meters.append(Progress(label, total))
        return meters[-1]

    async def work(ctx: Any) -> Report | str:
        state_dir = ctx.config.server.state_dir
        if args.repair and listening(state_dir / WAKE_NAME):
            return (f"a LightMail server is running on {state_dir}: stop it before "
                    "--repair (the check alone may run beside it)")
        storage = ctx.storage
        if storage.filesystem_blobs is None:
            return ("fsck checks the blob files of the filesystem store; this one is on "
                    "S3 ([storage] blob_backend = s3), where the service checks each "
                    "object's SHA-256 as it is stored")
        check = StoreCheck(storage.db, storage.filesystem_blobs, storage.writes,
                           ctx.config.storage.blob_gc_grace, repair=args.repair,
                           expunge_missing=args.expunge_missing, found=found,
                           progress=progress)
        report: Report = await storage.db.run(check.run_now)
        return report

    report = run(args, work)
    if isinstance(report, str):
        print(f"lightmail: {report}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print(summary(report))
    return 0 if report.left == 0 else 1


def describe(finding: Finding) -> str:
    state = {None: "", True: " [repaired]", False: " [NOT repaired]"}[finding.repaired]
    action = f": {finding.action}" if finding.action else ""
    return f"{finding.kind} {finding.subject}: {finding.detail}{state}{action}"


def summary(report: Report) -> str:
    seen = (f"{report.blobs} blobs ({report.files} files, {report.bytes_hashed:,} bytes "
            f"hashed), {report.messages} messages in {report.mailboxes} mailboxes")
    if not report.problems:
        return f"fsck: {seen}: no problems"
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(report.counts.items()))
    if report.repair:
        return (f"fsck: {seen}: {report.problems} problems ({kinds}); {report.repaired} "
                f"repaired, {report.left} left")
    return f"fsck: {seen}: {report.problems} problems ({kinds}); lightmail fsck --repair"
