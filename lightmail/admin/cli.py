"""The ``lightmail`` command for administrators.

    lightmail [--config PATH] check-config [PATH]
    lightmail config-reference
    lightmail db upgrade | current | downgrade [--to REV]
    lightmail domain add|remove NAME | list
    lightmail user add ADDRESS [--password-stdin | --no-password] [--quota SIZE]
    lightmail user passwd ADDRESS [--password-stdin] | remove ADDRESS | list [DOMAIN]
    lightmail user enable|disable|expire ADDRESS | quota ADDRESS SIZE | logins [DOMAIN]
    lightmail user import FILE.csv [--dry-run] [--json]
    lightmail user app-password add ADDRESS NAME [--protocols imap,pop3,smtp]
    lightmail user app-password list ADDRESS | revoke ADDRESS NAME
    lightmail alias add SOURCE DESTINATION | remove SOURCE [DESTINATION] | list [DOMAIN]
    lightmail queue list [--state STATE]
    lightmail node list | drain NODE_ID [--wait [--timeout SECONDS]]
    lightmail fsck [--repair [--expunge-missing]] [--json]
    lightmail queue hold|release|requeue|delete (QUEUE_ID... | --all)
    lightmail tls selfsigned --cert PATH --key PATH [--name NAME]
    lightmail dkim genkey DOMAIN [--selector S] [--algorithm rsa|ed25519] [--bits N]
                                 [--out DIR]
    lightmail dkim records        (the DNS records of the configured keys)
    lightmail dmarc send-reports  (the DMARC aggregate reports, queued now)
    lightmail token add NAME [--scope read|write] [--expires DURATION] | revoke NAME | list
    lightmail access add trusted|allow|block client|sender|recipient VALUE [--note TEXT]
                   | remove LIST KIND VALUE | list
    lightmail tlsrpt send-reports (TLS-RPT: the reports of the complete days, now)
    lightmail api-reference       (the admin API reference, rst, from its OpenAPI)
    lightmail demo-setup          (make run: demo domain, user and certificate)
    lightmail reload [--timeout SECONDS]   (the running server reads its config again)
    lightmail backup DEST | restore SRC [--replace]      (lightmail/admin/datatools.py)
    lightmail import ADDRESS MAILDIR|MBOX [--mailbox NAME] | export ADDRESS DEST
    lightmail blobs migrate --to s3|filesystem [--json]  (lightmail/admin/blobmigrate.py)

The config file comes from ``--config``, else ``$LIGHTMAIL_CONFIG``, else
``/etc/lightmail/lightmail.conf``.  Passwords are never taken as arguments (they would
show in ``ps`` and shell history): they are prompted for, or read from standard input.
Exit status: 0 done, 1 the request failed (message on stderr), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightmail.config import (
    Config,
    ConfigError,
    load_config,
    parse_dkim_keys,
    parse_size,
    reference_text,
)

DEFAULT_CONFIG = "/etc/lightmail/lightmail.conf"
DEMO_DOMAIN = "example.test"
DEMO_USER = "demo@example.test"
DEMO_PASSWORD = "demo-password"


class CommandError(Exception):
    """The request failed; the message is for the administrator."""


def _config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("LIGHTMAIL_CONFIG") or DEFAULT_CONFIG


def _load(args: argparse.Namespace) -> Config:
    from lightmail.service import validate
    return load_config(_config_path(args), validators=validate)


def _run(args: argparse.Namespace, work: Callable[[Any], Any]) -> Any:
    """Run ``work(services)`` (a coroutine function) with storage up, then stop."""
    from twisted.internet import defer, task

    from lightmail.storage import migrate
    from lightmail.wiring import Role, wire

    config = _load(args)
    services = wire(config, Role.COMMAND)
    storage = services.storage
    storage.db.start()
    storage.io_pool.start()
    result: list[Any] = []
    errors: list[Exception] = []
    try:
        if migrate.current_revision(storage.db.engine) != migrate.HEAD:
            migrate.upgrade(storage.db.engine)
        directory = services.directory

        async def main(reactor: Any) -> None:
            from lightmail.directory.interfaces import DirectoryError
            from lightmail.policy.access import AccessError
            try:
                result.append(await work(_Context(config, storage, directory,
                                                  services.accounts,
                                                  services.admin_tokens,
                                                  services.access, services)))
            except (CommandError, DirectoryError, AccessError) as exc:
                errors.append(exc)

        def run(reactor: Any) -> Any:
            return defer.ensureDeferred(main(reactor))
        try:
            task.react(run)
        except SystemExit as exc:
            if exc.code:
                raise _ReactFailed() from None
        if errors:
            raise errors[0]
    finally:
        storage.io_pool.stop()
        storage.db.stop()
    return result[0] if result else None


class _ReactFailed(Exception):
    pass


class _Context:
    def __init__(self, config: Config, storage: Any, directory: Any, accounts: Any,
                 tokens: Any, access: Any = None, services: Any = None) -> None:
        self.config = config
        self.storage = storage
        self.directory = directory
        self.accounts = accounts        # the SQL side of every user (wiring.Services)
        self.tokens = tokens            # the admin API's (directory/admintokens.py)
        self.access = access            # allow/block lists (policy/access.py)
        self.services = services        # the whole of wiring.Services


def _read_password(args: argparse.Namespace, prompt: str = "Password: ") -> str:
    if getattr(args, "password_stdin", False):
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != password:
            raise CommandError("the two passwords differ")
    else:
        raise CommandError("no terminal to ask for the password: use --password-stdin "
                           "(or --no-password)")
    if not password:
        raise CommandError("the password is empty")
    return password


# --- commands ------------------------------------------------------------------------

def cmd_check_config(args: argparse.Namespace) -> int:
    if args.path:
        args.config = args.path
    config = _load(args)
    print(f"{config.path}: OK ({len(config.listeners)} listeners: "
          f"{', '.join(f'{x.name}={x.protocol}' for x in config.listeners) or 'none'})")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from lightmail.reload.command import ReloadError, request_reload, state_dir_of
    path = _config_path(args)
    try:
        answer = request_reload(state_dir_of(path), args.timeout)
    except (ReloadError, ConfigError) as exc:
        raise CommandError(f"reload: {exc}") from None
    if not answer.taken:
        raise CommandError(f"reload refused, the running configuration stays: "
                           f"{answer.error}")
    print(f"reloaded {path}")
    for note in answer.restart:
        print(f"{note}; the running value stays")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    sys.stdout.write(reference_text())
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from lightmail.storage import migrate
    from lightmail.storage.database import create_engine
    config = _load(args)
    if args.action == "downgrade":
        from lightmail.admin.downgrade import downgrade_command
        return downgrade_command(config, args.to)
    engine = create_engine(config.database, pool_size=1)
    try:
        if args.action == "upgrade":
            before = migrate.current_revision(engine)
            migrate.upgrade(engine)
            after = migrate.current_revision(engine)
            print(f"schema {before or 'empty'} -> {after}" if before != after
                  else f"schema already at {after}")
        else:
            current = migrate.current_revision(engine)
            head = migrate.head_revision()
            print(f"schema at {current or 'nothing'} (this LightMail needs {head})")
    finally:
        engine.dispose()
    return 0


def cmd_domain(args: argparse.Namespace) -> int:
    async def work(ctx: _Context) -> None:
        if args.action == "add":
            await ctx.directory.add_domain(args.name)
            print(f"added domain {args.name}")
        elif args.action == "remove":
            await ctx.directory.remove_domain(args.name)
            print(f"removed domain {args.name} with its users, aliases and mail")
        else:
            for name in await ctx.directory.list_domains():
                print(name)
    _run(args, work)
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    if args.action == "import":
        from lightmail.admin.userimport import import_users
        return import_users(args, _run)
    password = None
    if (args.action == "add" and not args.no_password) or args.action == "passwd":
        password = _read_password(args)
    quota = None
    if getattr(args, "quota", None):
        try:
            quota = parse_size()(args.quota, Path("."))
        except ValueError as exc:
            raise CommandError(f"--quota: {exc}") from None

    async def work(ctx: _Context) -> None:
        directory, accounts = ctx.directory, ctx.accounts
        if args.action == "add":
            user = await directory.add_user(args.address, password, quota)
            print(f"added user {user.address}")
        elif args.action in ("enable", "disable"):
            await accounts.set_enabled(args.address, args.action == "enable")
            print(f"{args.address} {args.action}d")
        elif args.action == "quota":
            await accounts.set_quota(args.address, quota or 0)
            print(f"quota of {args.address}: {quota or 'none'}")
        elif args.action == "expire":
            await accounts.expire_password(args.address)
            print(f"the password of {args.address} has expired: set a new one with "
                  "lightmail user passwd")
        elif args.action == "logins":
            for login in await accounts.last_logins(args.domain):
                when = _when(login.when) if login.when else "never"
                print(f"{login.address}\t{when}\t{login.source or ''}")
        elif args.action == "app-password":
            await _app_password(args, accounts)
        elif args.action == "passwd":
            await ctx.directory.set_password(args.address, password)
            print(f"password of {args.address} changed")
        elif args.action == "remove":
            await ctx.directory.remove_user(args.address)
            print(f"removed user {args.address} and their mail")
        else:
            for user in await ctx.directory.list_users(args.domain):
                quota_text = f"quota={user.quota_bytes}" if user.quota_bytes else "quota=none"
                state = "" if user.enabled else " disabled"
                print(f"{user.address}\t{quota_text}{state}")
    _run(args, work)
    return 0


async def _app_password(args: argparse.Namespace, directory: Any) -> None:
    from lightmail.directory.apppasswords import parse_protocols
    if args.app_action == "add":
        try:
            protocols = parse_protocols(args.protocols)
        except ValueError as exc:
            raise CommandError(f"--protocols: {exc}") from None
        secret = await directory.add_app_password(args.address, args.name, protocols)
        scope = ", ".join(protocols) or "every protocol"
        print(f"app password {args.name!r} of {args.address} for {scope} (shown only "
              f"now):\n{secret}")
    elif args.app_action == "list":
        for found in await directory.list_app_passwords(args.address):
            used = _when(found.last_used) if found.last_used else "never used"
            print(f"{found.name}\t{','.join(found.protocols) or 'all'}\t"
                  f"created {_when(found.created)}\t{used}")
    else:
        await directory.revoke_app_password(args.address, args.name)
        print(f"app password {args.name!r} of {args.address} revoked")


def _when(ms: int) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC) \
        .strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_alias(args: argparse.Namespace) -> int:
    async def work(ctx: _Context) -> None:
        if args.action == "add":
            await ctx.directory.add_alias(args.source, args.destination)
            print(f"added alias {args.source} -> {args.destination}")
        elif args.action == "remove":
            count = await ctx.directory.remove_alias(args.source, args.destination)
            print(f"removed {count} alias{'es' if count != 1 else ''}")
        else:
            for alias in await ctx.directory.list_aliases(args.domain):
                print(f"{alias.source}\t{alias.destination}")
    _run(args, work)
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    if args.action != "list":
        return cmd_queue_manage(args)

    async def work(ctx: _Context) -> None:
        rows = await ctx.storage.queue.list_recipients(args.state or ())
        for row in rows:
            error = f"\t{row['last_error']}" if row["last_error"] else ""
            print(f"{row['queue_id']}\t{row['state']}\t{row['transport']}\t"
                  f"<{row['mail_from']}> -> <{row['recipient']}>\t{row['size']}B\t"
                  f"tries={row['attempts']}{error}")
        print(f"{len(rows)} recipient{'s' if len(rows) != 1 else ''} in the queue")
    _run(args, work)
    return 0


def cmd_queue_manage(args: argparse.Namespace) -> int:
    if bool(args.queue_ids) == bool(args.all):
        raise CommandError(f"queue {args.action}: give queue ids or --all (not both)")

    async def work(ctx: _Context) -> None:
        count = await ctx.storage.queue.manage(args.action, args.queue_ids)
        done = {"hold": "held", "release": "released", "requeue": "requeued",
                "delete": "deleted"}[args.action]
        print(f"{done} {count} recipient{'s' if count != 1 else ''}")
        if count and args.action in ("release", "requeue"):
            # Due now: a running server tries them at once, not at its next poll.
            from lightmail.queue.wake import WAKE_NAME, wake
            wake(ctx.config.server.state_dir / WAKE_NAME)
    _run(args, work)
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    """The nodes sharing the database (lightmail.cluster.membership)."""
    async def work(ctx: _Context) -> None:
        nodes = ctx.storage.nodes
        if args.action == "list":
            now = _now_ms()
            for node in await nodes.nodes():
                age = max(0, now - node.heartbeat) / 1000
                drain = "\tdrain requested" if (node.drain_requested and node.state
                                                in ("running", "draining")) else ""
                print(f"{node.node_id}\t{node.host}\tpid {node.pid}\t{node.state}\t"
                      f"heartbeat {age:.1f}s ago\tleases={node.leases}\t"
                      f"{node.version}{drain}")
            return
        node = await nodes.request_drain(args.node_id, _now_ms())
        if node is None:
            raise CommandError(f"no node {args.node_id} (see lightmail node list)")
        if node.state not in ("running", "draining"):
            raise CommandError(f"node {args.node_id} is {node.state}: nothing to drain")
        beat = ctx.config.cluster.heartbeat
        print(f"asked node {args.node_id} (pid {node.pid} on {node.host}) to drain; it "
              f"notices within {beat:g}s ([cluster] heartbeat of this config)")
        if args.wait:
            await _wait_stopped(nodes, args.node_id, args.timeout)
    _run(args, work)
    return 0


async def _wait_stopped(nodes: Any, node_id: str, timeout: float) -> None:
    """Until the node's row says stopped (or dead), asking twice a second."""
    import time

    from twisted.internet import reactor, task
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        found = [node for node in await nodes.nodes() if node.node_id == node_id]
        if not found:
            raise CommandError(f"node {node_id}'s row is gone")
        if found[0].state != state:
            state = found[0].state
            print(f"{node_id}: {state}", flush=True)
        if state in ("stopped", "dead"):
            return
        await task.deferLater(reactor, 0.5, lambda: None)
    raise CommandError(f"node {node_id} is still {state} after {timeout:g}s")


def cmd_token(args: argparse.Namespace) -> int:
    from lightmail.config import parse_duration
    lifetime = None
    if getattr(args, "expires", None):
        try:
            lifetime = int(parse_duration(minimum=1.0)(args.expires, Path(".")) * 1000)
        except ValueError as exc:
            raise CommandError(f"--expires: {exc}") from None

    async def work(ctx: _Context) -> None:
        if args.action == "add":
            secret = await ctx.tokens.add(args.name, args.scope, lifetime)
            until = f", until {_when(_now_ms() + lifetime)}" if lifetime else ""
            print(f"admin API token {args.name!r} ({args.scope}{until}; shown only now):"
                  f"\n{secret}")
        elif args.action == "revoke":
            await ctx.tokens.revoke(args.name)
            print(f"admin API token {args.name!r} revoked")
        else:
            for token in await ctx.tokens.list():
                until = _when(token.expires) if token.expires else "never"
                used = _when(token.last_used) if token.last_used else "never used"
                print(f"{token.name}\t{token.scope}\tcreated {_when(token.created)}\t"
                      f"expires {until}\t{used}")
    _run(args, work)
    return 0


def cmd_access(args: argparse.Namespace) -> int:
    async def work(ctx: _Context) -> None:
        if args.action == "add":
            entry = await ctx.access.add(args.list, args.kind, args.value, args.note or "")
            print(f"{entry.kind} {entry.value} added to the {entry.list} list")
        elif args.action == "remove":
            await ctx.access.remove(args.list, args.kind, args.value)
            print(f"{args.kind} {args.value} removed from the {args.list} list")
        else:
            for entry in await ctx.access.entries():
                print(f"{entry.list}\t{entry.kind}\t{entry.value}\t"
                      f"{_when(entry.created)}\t{entry.note}")
            for network in ctx.config.access.trusted_networks:
                print(f"trusted\tclient\t{network}\t(config file)\t")
    _run(args, work)
    return 0


def cmd_tlsrpt(args: argparse.Namespace) -> int:
    async def work(ctx: _Context) -> None:
        if not ctx.config.tlsrpt.enabled:
            raise CommandError("TLS-RPT is off: [tlsrpt] enabled = no")
        from lightmail.queue.wake import WAKE_NAME, wake
        from lightmail.service import tls_report_job

        def kick() -> None:
            wake(ctx.config.server.state_dir / WAKE_NAME)
        _, job = tls_report_job(ctx.config, ctx.storage, ctx.directory, kick)
        sent = await job.run()
        for day, domain, uri in sent.reports:
            print(f"{day}\t{domain}\tsent to {uri}")
        for day, domain, uri, why in sent.failures:
            print(f"{day}\t{domain}\tNOT sent to {uri}: {why}")
        for day, domain, why in sent.skipped:
            print(f"{day}\t{domain}\tnot reported: {why}")
        print(f"{len(sent.reports)} report{'s' if len(sent.reports) != 1 else ''} sent")
        if sent.failures:
            raise CommandError(f"{len(sent.failures)} could not be sent")
    _run(args, work)
    return 0


def _now_ms() -> int:
    import time
    return int(time.time() * 1000)


def cmd_api_reference(args: argparse.Namespace) -> int:
    from lightmail.admin.api.reference import reference_text as api_reference
    print(api_reference(), end="")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from lightmail.admin.fsck import fsck_command
    return fsck_command(args, _run)


def cmd_manhole_password(args: argparse.Namespace) -> int:
    from lightmail.admin.manhole import password_line
    if ":" in args.name:
        raise CommandError("a manhole user name has no ':'")
    print(password_line(args.name, _read_password(args)))
    return 0


def cmd_tls(args: argparse.Namespace) -> int:
    from lightmail.admin.certs import write_self_signed
    write_self_signed(Path(args.cert), Path(args.key), args.name)
    print(f"wrote a self-signed certificate for {args.name} to {args.cert} and {args.key}")
    return 0


def cmd_dkim(args: argparse.Namespace) -> int:
    from lightmail.policy import dkim
    if args.action == "records":
        signer = dkim.load_signer(_load(args))
        if signer is None:
            raise CommandError("no DKIM keys in use ([dkim] keys is empty, or enabled = "
                               "no)")
        for keys in signer.keys.values():
            for key in keys:
                print(f"; {key.describe()}, key file {key.path}")
                print(dkim.zone_line(key))
        return 0
    try:
        domain = dkim.normalise_domain(args.domain)
    except UnicodeError:
        raise CommandError(f"not a domain name: {args.domain}") from None
    selector = args.selector or ("ed25519" if args.algorithm == "ed25519" else "default")
    try:
        spec = parse_dkim_keys(f"{domain}:{selector}:key", Path("."))[0]
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.algorithm == "ed25519" and args.bits is not None:
        raise CommandError("--bits is for RSA keys (Ed25519 keys have one size)")
    bits = args.bits or 2048
    if args.algorithm == "rsa" and not 1024 <= bits <= 4096:
        raise CommandError("--bits: DKIM RSA keys have 1024 to 4096 bits (RFC 8301); "
                           "2048 is usual")
    out = Path(args.out).resolve()
    path = out / f"{spec.domain}.{spec.selector}.pem"
    pem, key = dkim.generate_key(args.algorithm, bits)
    signing = dkim.signing_key(spec.domain, spec.selector, key, path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CommandError(f"{path} exists already: choose another --selector (or "
                           "remove the file)") from None
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    print(f"; DKIM key {signing.describe()}, private key written to {path} (mode 0600)")
    print("; publish this record in DNS:")
    print(dkim.zone_line(signing))
    print("; and add this to [dkim] keys in lightmail.conf (after a comma if there are "
          "others):")
    print(f"keys = {spec.domain}:{spec.selector}:{path}")
    return 0


def cmd_dmarc(args: argparse.Namespace) -> int:
    """``lightmail dmarc send-reports``: the aggregate reports of every result kept so
    far, queued now (the running server's queue runner is woken to send them)."""
    async def work(ctx: _Context) -> None:
        if not ctx.config.dmarc.reports:
            raise CommandError("DMARC reports are off ([dmarc] reports = no)")
        run = await ctx.services.dmarc_reports.send_reports()
        for report in run.reports:
            queued = ", ".join(f"<{address}> as {queue_id}"
                               for address, queue_id in report.queued) or "nobody"
            print(f"{report.policy_domain}\t{report.report_id}\t{report.messages} "
                  f"message{'s' if report.messages != 1 else ''}\t{report.size}B\t"
                  f"queued for {queued}")
            for uri, why in report.skipped:
                print(f"{report.policy_domain}\tnot sent to {uri}: {why}")
        print(f"{len(run.reports)} report{'s' if len(run.reports) != 1 else ''}")
        if any(report.queued for report in run.reports):
            from lightmail.queue.wake import WAKE_NAME, wake
            wake(ctx.config.server.state_dir / WAKE_NAME)
    _run(args, work)
    return 0


def cmd_demo_setup(args: argparse.Namespace) -> int:
    """Idempotent set-up for `make run`: demo domain, user and TLS certificate."""
    from lightmail.admin.certs import write_self_signed
    # Parse without the file checks: the certificate is what we are about to make.
    config = load_config(_config_path(args))
    for listener in config.listeners:
        if listener.tls_cert and listener.tls_key and not listener.tls_cert.exists():
            write_self_signed(listener.tls_cert, listener.tls_key, config.hostname)
            print(f"wrote a self-signed demo certificate to {listener.tls_cert}")

    async def work(ctx: _Context) -> None:
        if DEMO_DOMAIN not in await ctx.directory.list_domains():
            await ctx.directory.add_domain(DEMO_DOMAIN)
            print(f"added demo domain {DEMO_DOMAIN}")
        if await ctx.directory.get_user(DEMO_USER) is None:
            await ctx.directory.add_user(DEMO_USER, DEMO_PASSWORD)
            print(f"added demo user {DEMO_USER} (password: {DEMO_PASSWORD})")
    _run(args, work)
    return 0


# --- parser --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightmail", description="LightMail administration")
    parser.add_argument("--config", "-c", help=f"config file (default: $LIGHTMAIL_CONFIG "
                        f"or {DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate a config file without starting")
    p.add_argument("path", nargs="?")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("reload", help="make the running server read its config again")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the server's answer (default 60)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("config-reference", help="print the configuration reference (rst)")
    p.set_defaults(func=cmd_config_reference)

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["upgrade", "current", "downgrade"])
    p.add_argument("--to", metavar="REV", help="downgrade: to this revision (default: "
                   "one step back)")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("domain", help="local domains")
    dsub = p.add_subparsers(dest="action", required=True)
    dsub.add_parser("add").add_argument("name")
    dsub.add_parser("remove").add_argument("name")
    dsub.add_parser("list")
    p.set_defaults(func=cmd_domain)

    p = sub.add_parser("user", help="users (mailbox owners)")
    usub = p.add_subparsers(dest="action", required=True)
    a = usub.add_parser("add")
    a.add_argument("address")
    group = a.add_mutually_exclusive_group()
    group.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input")
    group.add_argument("--no-password", action="store_true",
                       help="no password login (mail is still delivered)")
    a.add_argument("--quota", help="mailbox quota, e.g. 2G (default from the config)")
    a = usub.add_parser("passwd")
    a.add_argument("address")
    a.add_argument("--password-stdin", action="store_true")
    usub.add_parser("remove").add_argument("address")
    usub.add_parser("list").add_argument("domain", nargs="?")
    usub.add_parser("enable", help="allow logins again").add_argument("address")
    usub.add_parser("disable", help="refuse logins (mail is still delivered)") \
        .add_argument("address")
    a = usub.add_parser("quota", help="change the mailbox quota (0: none)")
    a.add_argument("address")
    a.add_argument("quota", help="e.g. 2G; 0 for none")
    usub.add_parser("expire", help="the password works no more until a new one is set") \
        .add_argument("address")
    usub.add_parser("logins", help="last successful logins").add_argument(
        "domain", nargs="?")
    a = usub.add_parser("import", help="add many users from a CSV file (all or none)")
    a.add_argument("file", help="CSV with a header row: address, and password or "
                   "password_hash, quota, enabled (docs/operations.rst)")
    a.add_argument("--dry-run", action="store_true", help="check the file, add nobody")
    a.add_argument("--json", action="store_true", help="the outcome as JSON")
    a = usub.add_parser("app-password", help="app passwords: one per mail client")
    asub_ = a.add_subparsers(dest="app_action", required=True)
    b = asub_.add_parser("add", help="make one; it is shown only once")
    b.add_argument("address")
    b.add_argument("name", help="e.g. the client or device it is for")
    b.add_argument("--protocols", default="",
                   help="some of imap, pop3, smtp, comma-separated (default: all)")
    asub_.add_parser("list").add_argument("address")
    b = asub_.add_parser("revoke")
    b.add_argument("address")
    b.add_argument("name")
    p.set_defaults(func=cmd_user)

    p = sub.add_parser("alias", help="aliases and catch-alls (*@domain)")
    asub = p.add_subparsers(dest="action", required=True)
    a = asub.add_parser("add")
    a.add_argument("source")
    a.add_argument("destination")
    a = asub.add_parser("remove")
    a.add_argument("source")
    a.add_argument("destination", nargs="?")
    asub.add_parser("list").add_argument("domain", nargs="?")
    p.set_defaults(func=cmd_alias)

    p = sub.add_parser("queue", help="the mail queue")
    qsub = p.add_subparsers(dest="action", required=True)
    a = qsub.add_parser("list")
    a.add_argument("--state", action="append",
                   choices=["queued", "active", "deferred", "held", "dead"])
    for action, text in (("hold", "stop delivery attempts"),
                         ("release", "let held mail be tried again, now"),
                         ("requeue", "try now, whatever the retry schedule says"),
                         ("delete", "remove without a notice to the sender")):
        a = qsub.add_parser(action, help=text)
        a.add_argument("queue_ids", nargs="*", metavar="QUEUE_ID")
        a.add_argument("--all", action="store_true", help="every queued message")
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("node", help="the nodes sharing the database")
    nsub = p.add_subparsers(dest="action", required=True)
    nsub.add_parser("list", help="each node: host, pid, state, heartbeat age, queue "
                    "leases held, version")
    a = nsub.add_parser("drain", help="ask a node to drain and stop, as SIGTERM does "
                        "(it notices at its next heartbeat)")
    a.add_argument("node_id", metavar="NODE_ID")
    a.add_argument("--wait", action="store_true", help="until its row says stopped")
    a.add_argument("--timeout", type=float, default=600.0,
                   help="longest wait with --wait, in seconds (600)")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("fsck", help="check the store (blobs, counts, UIDs); --repair")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed safely "
                   "(refused while a server runs)")
    p.add_argument("--expunge-missing", action="store_true", help="with --repair: "
                   "expunge the messages whose content file is gone")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser("tls", help="TLS certificates")
    tsub = p.add_subparsers(dest="action", required=True)
    a = tsub.add_parser("selfsigned")
    a.add_argument("--cert", required=True)
    a.add_argument("--key", required=True)
    a.add_argument("--name", default="localhost")
    p.set_defaults(func=cmd_tls)

    p = sub.add_parser("dkim", help="DKIM signing keys")
    ksub = p.add_subparsers(dest="action", required=True)
    a = ksub.add_parser("genkey", help="write a new private key; print its DNS record")
    a.add_argument("domain", help="the signing domain (d=): the From: domain")
    a.add_argument("--selector", "-s", help="the selector (s=); default: 'default' for "
                   "RSA, 'ed25519' for Ed25519")
    a.add_argument("--algorithm", "-a", choices=["rsa", "ed25519"], default="rsa")
    a.add_argument("--bits", "-b", type=int, help="RSA key size (default 2048)")
    a.add_argument("--out", "-o", default=".", help="directory for the key file, "
                   "DOMAIN.SELECTOR.pem (default: the current directory)")
    ksub.add_parser("records", help="print the DNS records of the configured keys")
    p.set_defaults(func=cmd_dkim)

    p = sub.add_parser("dmarc", help="DMARC aggregate reports")
    dsub_ = p.add_subparsers(dest="action", required=True)
    dsub_.add_parser("send-reports", help="build and queue the aggregate reports now")
    p.set_defaults(func=cmd_dmarc)

    p = sub.add_parser("token", help="bearer tokens of the admin API")
    tsub_ = p.add_subparsers(dest="action", required=True)
    a = tsub_.add_parser("add", help="make one; it is shown only once")
    a.add_argument("name")
    a.add_argument("--scope", choices=("read", "write"), default="read",
                   help="read: GET only (the default); write: everything")
    a.add_argument("--expires", metavar="DURATION", help="e.g. 90d, 12h (default: never)")
    tsub_.add_parser("revoke").add_argument("name")
    tsub_.add_parser("list")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("access", help="trusted networks, allow- and blocklists")
    asub2 = p.add_subparsers(dest="action", required=True)
    for name, text in (("add", "put an entry on a list"),
                       ("remove", "take an entry off a list")):
        a = asub2.add_parser(name, help=text)
        a.add_argument("list", choices=("trusted", "allow", "block"))
        a.add_argument("kind", choices=("client", "sender", "recipient"),
                       help="client: an IP address or network; sender, recipient: an "
                       "address, a domain or a .parent domain")
        a.add_argument("value")
        if name == "add":
            a.add_argument("--note", help="why (shown by list)")
    asub2.add_parser("list")
    p.set_defaults(func=cmd_access)

    p = sub.add_parser("tlsrpt", help="SMTP TLS reporting (RFC 8460)")
    rsub = p.add_subparsers(dest="action", required=True)
    rsub.add_parser("send-reports", help="send the reports of the complete days now "
                    "(mail goes through the queue of the running server)")
    p.set_defaults(func=cmd_tlsrpt)

    p = sub.add_parser("api-reference", help="print the admin API reference (rst)")
    p.set_defaults(func=cmd_api_reference)

    p = sub.add_parser("manhole-password",
                       help="print a [manhole] passwords_file line for a user")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.set_defaults(func=cmd_manhole_password)

    p = sub.add_parser("demo-setup", help="demo domain, user and certificate (make run)")
    p.set_defaults(func=cmd_demo_setup)

    from lightmail.admin import datatools
    datatools.register(sub, _load)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lightmail.directory.interfaces import DirectoryError
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"lightmail: {exc}", file=sys.stderr)
        return 2
    except (CommandError, DirectoryError) as exc:
        print(f"lightmail: {exc}", file=sys.stderr)
        return 1
    except _ReactFailed:
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
