"""Which settings a reload changes in a running server, and which wait for a restart.

A setting is *live* when every part that uses it reads it again for new sessions,
messages or deliveries, or is handed it by a reload (lightmail/reload/parts.py).  The
rest (endpoints, storage, logging, the number of workers, account backends...) is
built into the running process: a reload that changes one of them logs that it needs
a restart, and the running value stays.

:func:`settle` compares a new configuration with the one the process *started*
with, key by key, so that the result does not depend on the reloads in between: a
worker process started again later settles the same two texts to the same config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightmail.config import (
    BACKEND_PREFIX,
    LISTENER_PREFIX,
    SECTIONS,
    Config,
    ListenerConfig,
    line_of,
)

#: Every key of the section is live.
EVERY = frozenset({"*"})

#: Live keys by section; a section not named here waits for a restart whole.
LIVE: Mapping[str, frozenset[str]] = {
    # The memory watchdog reads its settings at each measurement.
    "server": frozenset({"hostname", "postmaster", "memory_limit", "memory_resume",
                         "memory_check_interval", "memory_log_interval"}),
    # Read by each new session (SMTP, LMTP, POP3, IMAP) from the services' config.
    "smtp": EVERY,
    "lmtp": EVERY,
    "pop3": EVERY,
    "imap": EVERY,
    "directory": frozenset({
        "default_quota", "recipient_delimiter", "auth_over_plaintext", "mechanisms",
        "resolve_cache_ttl", "login_delay_after", "login_max_delay", "lockout_after",
        "account_lockout_after"}),
    "dkim": EVERY,
    # The inbound checks read these from the services' config at each use.
    "spf": frozenset({"check_helo", "fail_action", "temperror_action",
                      "permerror_action"}),
    "inbound": EVERY,
    "access": EVERY,            # ServicesPart hands them to the access lists
    # The limits check reads the rates at each use; the buckets' backend stays.
    "limits": frozenset({"client_connections", "client_messages", "network_messages",
                         "client_recipients", "user_messages", "user_recipients",
                         "sender_domain_messages", "recipient_domain_recipients",
                         # read by each new session, and at each failed command
                         "imap_commands", "pop3_commands", "command_overrun",
                         "client_errors"}),
    # The greylist check reads its rules at each recipient; the store stays.
    "greylist": frozenset({"delay", "unconfirmed_expiry", "confirmed_expiry",
                           "auto_allow", "spf_pass_domains"}),
    # The dnsbl and reverse checks read theirs at each session and recipient.
    "dnsbl": EVERY,
    "reverse": EVERY,
    # The arc check reads [arc] at each message; the sealer is made anew.
    "arc": EVERY,
    # The checker and the reports take the section (and the suffix list, read
    # again) from ServicesPart; a new report_interval counts from the next run.
    "dmarc": EVERY,
    "outbound": frozenset({
        "relay_host", "port", "tls", "auth_user", "auth_password_file", "auth_password",
        "concurrency", "destination_concurrency", "connect_timeout", "command_timeout",
        "data_timeout", "min_backoff", "max_backoff", "max_lifetime",
        "delay_warning_time", "dane"}),
}
#: Live keys of a [listener:NAME]; its protocol, endpoint, tls and proxy_protocol
#: modes are not (they decide what the listening port is handed).
LISTENER_LIVE = frozenset({"tls_cert", "tls_key", "tls_sni", "max_connections",
                           "max_connections_per_ip", "max_unauthenticated",
                           "proxy_from", "proxy_timeout"})
#: Fields filled from a file a key names: a change is that key's.
_FROM_FILE = {"token": "token_file", "auth_password": "auth_password_file",
              "bind_password": "bind_password_file"}
_OAUTH_MECHANISMS = frozenset({"OAUTHBEARER", "XOAUTH2"})


@dataclass(frozen=True)
class Settled:
    """The config a reload runs with, and the changes it leaves for a restart."""

    config: Config
    #: "FILE:LINE: [section] key: needs a restart", one per change left out.
    restart: tuple[str, ...]


def settle(started: Config, new: Config) -> Settled:
    """``new`` with every setting that cannot change live kept as ``started`` had it.

    Reads the file for the line numbers of its notes: call it off the reactor."""
    notes: list[tuple[str, str | None, str]] = []
    sections: dict[str, Any] = {}
    for name in SECTIONS:
        live = LIVE.get(name, frozenset())
        sections[name] = _settle_section(name, getattr(started, name), getattr(new, name),
                                         live, notes)
    directory = sections["directory"]
    if (set(directory.mechanisms) & _OAUTH_MECHANISMS) and not started.oauth.jwks:
        # The token checker is built at start-up with [oauth], which is not live.
        sections["directory"] = dataclasses.replace(
            directory, mechanisms=started.directory.mechanisms)
        notes.append(("directory", "mechanisms", "OAuth mechanisms need a restart "
                      "([oauth] is read at start-up)"))
    config = dataclasses.replace(
        new, listeners=_settle_listeners(started, new, notes),
        backends=_settle_backends(started, new, notes), **sections)
    return Settled(config, tuple(_describe(new, section, key, text)
                                 for section, key, text in notes))


def _settle_section(name: str, started: Any, new: Any, live: frozenset[str],
                    notes: list[tuple[str, str | None, str]]) -> Any:
    kept = {}
    for field in dataclasses.fields(started):
        if field.name in live or live is EVERY:
            continue
        old_value, new_value = getattr(started, field.name), getattr(new, field.name)
        if old_value != new_value:
            kept[field.name] = old_value
            key = _FROM_FILE.get(field.name, field.name)
            if (name, key, "needs a restart") not in notes:
                notes.append((name, key, "needs a restart"))
    return dataclasses.replace(new, **kept) if kept else new


def _settle_listeners(started: Config, new: Config,
                      notes: list[tuple[str, str | None, str]]) -> tuple[ListenerConfig, ...]:
    by_name = {listener.name: listener for listener in new.listeners}
    listeners = []
    for listener in started.listeners:
        section = LISTENER_PREFIX + listener.name
        reloaded = by_name.pop(listener.name, None)
        if reloaded is None:
            notes.append((section, None, "removed: needs a restart (it still listens)"))
            listeners.append(listener)
            continue
        settled = _settle_section(section, listener, reloaded, LISTENER_LIVE, notes)
        listeners.append(dataclasses.replace(settled, name=listener.name))
    for name in by_name:
        notes.append((LISTENER_PREFIX + name, None, "new: needs a restart to listen"))
    return tuple(listeners)


def _settle_backends(started: Config, new: Config,
                     notes: list[tuple[str, str | None, str]]) -> Any:
    if started.backends == new.backends:
        return new.backends
    old = {backend.name: backend for backend in started.backends}
    for backend in new.backends:
        if old.pop(backend.name, None) != backend:
            notes.append((BACKEND_PREFIX + backend.name, None, "needs a restart"))
    for name in old:
        notes.append((BACKEND_PREFIX + name, None, "removed: needs a restart"))
    return started.backends


def _describe(config: Config, section: str, key: str | None, text: str) -> str:
    line = line_of(config, section, key)
    where = config.path if line is None else f"{config.path}:{line}"
    what = f"[{section}]" if key is None else f"[{section}] {key}"
    return f"{where}: {what}: {text}"
