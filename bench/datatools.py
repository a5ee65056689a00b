"""The data tools on a large mailbox: import, export, backup and restore of N messages.

    .venv/bin/python bench/datatools.py [--messages 100000] [--size 2000] [--json FILE]

A Maildir of N messages (``--size`` octets each, a third flagged with a keyword) is
imported into an empty SQLite store with ``lightmail import``, exported again with
``lightmail export``, the store backed up with ``lightmail backup`` and restored into
a second SQLite store with ``lightmail restore``.  Each is a process of its own; for
each the wall time, messages per second and the process's peak resident memory
(``ru_maxrss``) are printed, and a JSON line at the end (and into ``--json FILE``).
Compare the peaks with ``--messages 10000``: they should not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

USER = "bench@bench.test"


def lightmail(config: Path, *args: str, stdin: str = "") -> tuple[float, int, str]:
    """Run a ``lightmail`` command: (seconds, peak RSS in KB, stdout)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lightmail.admin.cli", "--config",
                             str(config), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"lightmail {' '.join(args)} failed: {err}")
    return time.monotonic() - start, usage.ru_maxrss, out


def make_maildir(root: Path, count: int, size: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    (root / "dovecot-keywords").write_text("0 $Label1\n")
    line = b"A line of text that fills the message up to its size, more or less.\n"
    for number in range(count):
        head = b"From: someone@example.org\nSubject: message %d\n\n" % number
        body = line * max(1, (size - len(head)) // len(line))
        flags = "FSa" if number % 3 == 0 else "S" if number % 3 == 1 else ""
        name = f"{1600000000 + number}.M{number}P1.bench,S={len(head + body)}:2,{flags}"
        (root / "cur" / name).write_bytes(head + body)


def config(root: Path, name: str) -> Path:
    path = root / f"{name}.conf"
    path.write_text(f"[server]\nstate_dir = {root / name}\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--json", help="append the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lightmail-bench-datatools-") as tmp:
        root = Path(tmp)
        started = time.monotonic()
        make_maildir(root / "Maildir", args.messages, args.size)
        print(f"made a Maildir of {args.messages:,} messages in "
              f"{time.monotonic() - started:.1f} s", flush=True)
        source = config(root, "source")
        lightmail(source, "domain", "add", "bench.test")
        lightmail(source, "user", "add", USER, "--no-password")
        results: dict[str, Any] = {"messages": args.messages, "size": args.size}
        steps = [("import", source, ("import", USER, str(root / "Maildir"))),
                 ("export", source, ("export", USER, str(root / "export"))),
                 ("backup", source, ("backup", str(root / "backup"))),
                 ("restore", config(root, "restored"), ("restore", str(root / "backup")))]
        for name, conf, command in steps:
            seconds, rss, _ = lightmail(conf, *command, "--json")
            results[name] = {"seconds": round(seconds, 1),
                             "per_second": round(args.messages / seconds),
                             "peak_rss_mb": round(rss / 1024, 1)}
            print(f"{name:8s} {seconds:7.1f} s  {args.messages / seconds:8,.0f} "
                  f"messages/s  peak RSS {rss / 1024:6.1f} MB", flush=True)
    line = json.dumps(results, sort_keys=True)
    print(line)
    if args.json:
        with open(args.json, "a") as out:
            out.write(line + "\n")


if __name__ == "__main__":
    main()
