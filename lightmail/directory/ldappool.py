"""Connections to one LDAP server (RFC 4511), used off the reactor.

ldap3's synchronous strategy blocks, so every operation runs on one of a fixed number
of threads (:class:`~lightmail.storage.threads.WorkerThreads`, as SQL does) behind a
Deferred, and each thread borrows an open connection from an idle stack: at most
``size`` connections at once, opened when first needed and kept.  Two kinds, so that
a user's bind never changes who the lookups run as:

- lookup connections, bound as the service DN (or anonymous), for searches;
- login connections, re-bound as each user whose password is checked (RFC 4513 §5.2).

Transport security (RFC 4513 §3): ldaps:// (TLS from the first byte) or StartTLS on
ldap://, the server's certificate verified against ``ca_file`` or the system's roots.
A server that is down, too slow or refuses in a way that is not "wrong password" makes
the operation fail with :class:`DirectoryUnavailable`; a connection that failed is
dropped, and the operation tried once more on a new one (a kept connection may have
been closed by the server meanwhile).  The service password is never logged.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

import ldap3
from ldap3.core.exceptions import LDAPException
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred

from lightmail.directory.interfaces import DirectoryUnavailable
from lightmail.storage.threads import WorkerThreads

T = TypeVar("T")

SUCCESS, NO_SUCH_OBJECT, INVALID_CREDENTIALS = 0, 32, 49
SIZE_LIMIT_EXCEEDED = 4


@dataclass(frozen=True)
class Found:
    """One entry a search found: its DN and the attributes asked for (lists of
    strings)."""

    dn: str
    attributes: dict[str, list[str]]


class LDAPPool:
    def __init__(self, uri: str, *, starttls: bool, ca_file: Optional[Path],
                 timeout: float, size: int, name: str, bind_dn: str = "",
                 bind_password: str = "") -> None:
        self.uri, self.starttls, self.timeout = uri, starttls, timeout
        self.bind_dn = bind_dn
        self._bind_password = bind_password
        self.threads = WorkerThreads(size, f"ldap-{name}")
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, version=ssl.PROTOCOL_TLS_CLIENT,
                        ca_certs_file=str(ca_file) if ca_file else None)
        self.server = ldap3.Server(uri, tls=tls, get_info=ldap3.NONE,
                                   connect_timeout=timeout)
        self._idle: dict[str, list[ldap3.Connection]] = {"lookup": [], "login": []}

    def __repr__(self) -> str:
        return f"<LDAPPool {self.uri} as {self.bind_dn or 'anonymous'}>"

    def start(self) -> None:
        self.threads.start()

    def stop(self) -> None:
        self.threads.stop()
        for kept in self._idle.values():
            while kept:
                _close(kept.pop())

    # -- what the backend asks (on the reactor) ---------------------------------------

    def search(self, base: str, search_filter: str, attributes: list[str],
               limit: int = 2) -> Deferred[list[Found]]:
        """Entries under ``base`` matching ``search_filter`` (already escaped), at
        most ``limit`` (more is reported as ``limit`` + 1 entries: ambiguous)."""
        return self._run("lookup", _search, base, search_filter, attributes, limit)

    def bind(self, dn: str, password: str, attributes: Optional[list[str]] = None
             ) -> Deferred[Optional[Found]]:
        """Bind as ``dn`` with ``password``: None when the server says the
        credentials are wrong; else the entry (read as the user itself when
        ``attributes`` are asked for, with no attributes otherwise)."""
        if not password:
            # RFC 4513 §5.1.2: a bind with a DN and no password is an anonymous
            # "unauthenticated" bind that servers may let succeed.  Never ask.
            raise ValueError("an empty password is never sent to the LDAP server")
        return self._run("login", _bind, dn, password, attributes)

    # -- on a pool thread -------------------------------------------------------------

    def _run(self, kind: str, operation: Callable[..., T], *args: Any) -> Deferred[T]:
        # Started on first use, so that whatever process asks first (the server, the
        # lightmail command) has its threads; stopped with the directory service.
        self.threads.start()
        return threads.deferToThreadPool(reactor, self.threads,  # type: ignore[arg-type]
                                         self._with_connection, kind, operation, *args)

    def _with_connection(self, kind: str, operation: Callable[..., T], *args: Any) -> T:
        for attempt in (1, 2):
            fresh = not self._idle[kind]
            try:
                conn = self._idle[kind].pop() if not fresh else self._open(kind)
            except IndexError:          # another thread took the last one
                conn, fresh = self._open(kind), True
            try:
                result = operation(conn, *args)
            except (LDAPException, OSError) as exc:
                _close(conn)
                if fresh or attempt == 2:
                    raise DirectoryUnavailable(
                        f"LDAP server {self.uri}: {_reason(exc)}") from None
                # A kept connection gone stale (the server restarted, or closed it
                # as idle): the others kept with it likely are too.  Once more, anew.
                while self._idle[kind]:
                    try:
                        _close(self._idle[kind].pop())
                    except IndexError:
                        break
                continue
            self._idle[kind].append(conn)
            return result
        raise AssertionError("unreachable")

    def _open(self, kind: str) -> ldap3.Connection:
        lookup = kind == "lookup"
        # ldap3 skips addresses that failed within the last few minutes: a server
        # back after a restart must be tried at once.
        self.server.reset_availability()
        conn = ldap3.Connection(
            self.server, user=self.bind_dn if lookup and self.bind_dn else None,
            password=self._bind_password if lookup and self.bind_dn else None,
            auto_bind=ldap3.AUTO_BIND_NONE, read_only=True, raise_exceptions=False,
            # ldap3 packs this into SO_RCVTIMEO as whole seconds: an int, or it fails.
            receive_timeout=max(1, round(self.timeout)), auto_escape=False,
            auto_encode=True)
        try:
            conn.open()
            if self.starttls and not self.uri.lower().startswith("ldaps:"):
                if not conn.start_tls():
                    raise DirectoryUnavailable(f"LDAP server {self.uri} refused StartTLS: "
                                               f"{_said(conn)}")
            if lookup and self.bind_dn and not conn.bind():
                # The service account itself failing is the administrator's problem,
                # not the user's: a temporary failure, and the log says why.
                raise DirectoryUnavailable(f"LDAP server {self.uri} refused the bind as "
                                           f"{self.bind_dn}: {_said(conn)}")
        except (LDAPException, OSError) as exc:
            _close(conn)
            raise DirectoryUnavailable(f"LDAP server {self.uri}: {_reason(exc)}") from None
        except DirectoryUnavailable:
            _close(conn)
            raise
        return conn


def _search(conn: ldap3.Connection, base: str, search_filter: str,
            attributes: list[str], limit: int) -> list[Found]:
    conn.search(base, search_filter, ldap3.SUBTREE, attributes=attributes or [ldap3.NO_ATTRIBUTES],
                size_limit=limit + 1, time_limit=0)
    code = conn.result.get("result") if conn.result else None
    if code == NO_SUCH_OBJECT:
        return []
    if code not in (SUCCESS, SIZE_LIMIT_EXCEEDED):
        _refused(conn)
    return [Found(entry["dn"], _strings(entry.get("raw_attributes", {})))
            for entry in conn.response or [] if entry.get("type") == "searchResEntry"]


def _bind(conn: ldap3.Connection, dn: str, password: str,
          attributes: Optional[list[str]]) -> Optional[Found]:
    conn.authentication, conn.user, conn.password = ldap3.SIMPLE, dn, password
    try:
        bound = conn.bind()
    finally:
        conn.password = None            # not kept in the pooled connection
    if not bound:
        if conn.result and conn.result.get("result") == INVALID_CREDENTIALS:
            return None
        _refused(conn)
    if not attributes:
        return Found(dn, {})
    conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=attributes)
    entries = [entry for entry in conn.response or [] if entry.get("type") == "searchResEntry"]
    if not entries:
        _refused(conn)
    return Found(entries[0]["dn"], _strings(entries[0].get("raw_attributes", {})))


def _strings(raw: dict[str, list[bytes]]) -> dict[str, list[str]]:
    return {name.lower(): [value.decode("utf-8", "replace") for value in values]
            for name, values in raw.items()}


def _refused(conn: ldap3.Connection) -> None:
    raise _Refused(_said(conn))


class _Refused(LDAPException):
    """An answer that is neither success nor a wrong password (busy, unavailable,
    insufficient access): the connection is dropped and the operation fails as
    unavailable."""


def _said(conn: ldap3.Connection) -> str:
    result = conn.result or {}
    return f"{result.get('description', 'no answer')} {result.get('message', '')}".strip()


def _reason(exc: Exception) -> str:
    return f"{exc.__class__.__name__}: {exc}"


def _close(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except (LDAPException, OSError):
        pass
