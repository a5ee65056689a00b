"""``lightmail user import FILE.csv [--dry-run] [--json]``: many SQL users at once.

The file is CSV in UTF-8 with a header row naming its columns, in any order:

=================  =====================================================================
``address``        the user's address (required); its domain must be local, in SQL
``password``       a password, hashed here as ``user add`` hashes it (argon2id, and
                   SCRAM's verifiers)
``password_hash``  or an argon2 hash made elsewhere (``$argon2id$...``), kept as it
                   is; SCRAM's verifiers are made at the user's first password login
``quota``          a size (``2G``); empty: ``[directory] default_quota``
``enabled``        ``yes`` or ``no`` (a disabled user cannot log in; mail is still
                   delivered); empty: yes
=================  =====================================================================

A line with neither password nor hash makes a user without password login, as ``user
add --no-password`` does.  All or nothing: every line is checked first (its syntax,
then against the database: a local domain served by SQL, an address not taken), each
problem is reported with its line number, and one bad line means no user is added.
The passwords are then hashed in a pool of threads (argon2 is slow on purpose: one
thread per core, never the reactor's), and every user is inserted in one transaction.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from argon2 import extract_parameters
from argon2.exceptions import InvalidHashError
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from lightmail.address import AddressError, split_address
from lightmail.admin.progressbar import Progress
from lightmail.config import parse_bool, parse_size
from lightmail.directory.bulk import NewUser, UsersRefused, add_users_now, problems_now
from lightmail.directory.passwords import Secrets, make_secrets

COLUMNS = ("address", "password", "password_hash", "quota", "enabled")
#: Threads hashing at once: argon2 takes 64 MiB each.
MAX_HASH_THREADS = 8


class ImportFailed(Exception):
    """The file cannot be read at all; the message is for the administrator."""


@dataclass(frozen=True)
class Line:
    """A line that parsed: the user to add and the password to hash, if any."""

    user: NewUser
    password: str | None = None


@dataclass(frozen=True)
class Rules:
    """What a line is checked against from the configuration."""

    delimiter: str
    default_quota: int


def read_file(path: Path, rules: Rules) -> tuple[list[Line], list[tuple[int, str]]]:
    """The lines of the file that parse, and the problems of the others, by line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return _read(csv.reader(f), rules)
    except OSError as exc:
        raise ImportFailed(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ImportFailed(f"{path} is not UTF-8 text") from None
    except csv.Error as exc:
        raise ImportFailed(f"{path}: not CSV: {exc}") from None


def _read(reader: Any, rules: Rules) -> tuple[list[Line], list[tuple[int, str]]]:
    header = next(reader, None)
    if header is None:
        return [], [(1, "the file is empty: it needs a header row (address,password,...)")]
    names = [name.strip().lower() for name in header]
    unknown = [name for name in names if name not in COLUMNS]
    if unknown or "address" not in names or len(set(names)) != len(names):
        return [], [(1, f"the header row names {', '.join(header) or 'nothing'}: it needs "
                        f"address and may have {', '.join(COLUMNS[1:])}, each once")]
    lines: list[Line] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for fields in reader:
        number = reader.line_num
        if not any(field.strip() for field in fields):
            continue                    # blank lines are left alone
        if len(fields) != len(names):
            problems.append((number, f"{len(fields)} fields, the header has {len(names)}"))
            continue
        try:
            line = _line(number, dict(zip(names, fields, strict=True)), rules)
        except ValueError as exc:
            problems.append((number, str(exc)))
            continue
        address = line.user.address
        if address in seen:
            problems.append((number, f"{address}: also on line {seen[address]}"))
            continue
        seen[address] = number
        lines.append(line)
    return lines, problems


def _line(number: int, row: dict[str, str], rules: Rules) -> Line:
    raw = row["address"].strip()
    try:
        local, domain = split_address(raw)
    except AddressError as exc:
        raise ValueError(f"{raw or 'empty address'}: {exc}") from None
    address = f"{local}@{domain}"
    if rules.delimiter and rules.delimiter in local:
        raise ValueError(f"{address}: a user name may not contain the recipient "
                         f"delimiter {rules.delimiter!r}")
    if local == "*":
        raise ValueError(f"{address}: '*' is for catch-all aliases")
    password = row.get("password") or None      # kept exactly: spaces are characters
    hashed = (row.get("password_hash") or "").strip() or None
    if password and hashed:
        raise ValueError(f"{address}: a password or a password_hash, not both")
    if hashed is not None:
        try:
            extract_parameters(hashed)
        except InvalidHashError:
            raise ValueError(f"{address}: password_hash is not an argon2 hash "
                             "($argon2id$v=19$...)") from None
    quota = rules.default_quota
    if (row.get("quota") or "").strip():
        try:
            quota = parse_size()(row["quota"], Path("."))
        except ValueError as exc:
            raise ValueError(f"{address}: quota: {exc}") from None
    enabled = True
    if (row.get("enabled") or "").strip():
        try:
            enabled = parse_bool(row["enabled"].strip(), Path("."))
        except ValueError as exc:
            raise ValueError(f"{address}: enabled: {exc}") from None
    secrets = Secrets(hashed, "") if hashed is not None else None
    return Line(NewUser(number, local, domain, quota, enabled, secrets), password)


def import_users(args: argparse.Namespace,
                 run: Callable[[argparse.Namespace, Any], Any]) -> int:
    """The command; ``run`` is the CLI's: ``run(args, work)`` with storage up.
    Exit status 1 (and nobody added) when a line has a problem."""
    path = Path(args.file)

    async def work(ctx: Any) -> dict[str, Any] | str:
        auth = ctx.config.directory
        rules = Rules(auth.recipient_delimiter, auth.default_quota)
        try:
            lines, problems = await threads.deferToThread(read_file, path, rules)
        except ImportFailed as exc:
            return str(exc)
        delegated = ctx.accounts.delegated_domains
        users = [line.user for line in lines]
        if users:
            problems += await ctx.storage.db.read(problems_now, users, delegated)
        report: dict[str, Any] = {"file": str(path), "dry_run": args.dry_run,
                                  "users": len(lines) if not problems else 0,
                                  "added": 0, "problems": [
                                      {"line": line, "error": error}
                                      for line, error in sorted(problems)]}
        if problems or args.dry_run:
            return report
        hashed = await _hash_all(lines, auth.scram_iterations,
                                 "CRAM-MD5" in auth.mechanisms)
        try:
            report["added"] = await ctx.storage.db.write(add_users_now, hashed, delegated)
        except UsersRefused as exc:       # someone added one meanwhile: none was added
            report["users"] = 0
            report["problems"] = [{"line": line, "error": error}
                                  for line, error in exc.problems]
        return report

    report = run(args, work)
    if isinstance(report, str):
        print(f"lightmail: {report}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for problem in report["problems"]:
            print(f"{path}:{problem['line']}: {problem['error']}", file=sys.stderr)
        if report["added"]:
            print(f"added {report['added']} users from {path}")
        elif args.dry_run and not report["problems"]:
            print(f"{path}: {report['users']} users can be added (dry run: nothing was "
                  "changed)")
    if report["problems"]:
        count = len(report["problems"])
        print(f"lightmail: {count} line{'s' if count != 1 else ''} with problems: no user "
              "was added" + (" (dry run)" if args.dry_run else ""), file=sys.stderr)
        return 1
    return 0


async def _hash_all(lines: list[Line], iterations: int, cram: bool) -> list[NewUser]:
    """Each line's password hashed, on a thread per core; the users in order."""
    from twisted.internet import reactor
    todo = [index for index, line in enumerate(lines) if line.password]
    users = [line.user for line in lines]
    if not todo:
        return users
    pool = ThreadPool(minthreads=1,
                      maxthreads=max(1, min(os.cpu_count() or 1, MAX_HASH_THREADS)),
                      name="lightmail-import")
    pool.start()
    progress = Progress("hashing passwords", len(todo))

    def one(index: int) -> defer.Deferred[None]:
        password = lines[index].password
        assert password is not None
        d = threads.deferToThreadPool(reactor, pool,  # type: ignore[arg-type]
                                      make_secrets, password, iterations, cram)

        def done(secrets: Secrets) -> None:
            users[index] = replace(users[index], secrets=secrets)
            progress.advance()
        return d.addCallback(done)
    try:
        await defer.gatherResults([one(index) for index in todo], consumeErrors=True)
    finally:
        progress.close()
        pool.stop()
    return users
