"""Access lists: trusted networks, and allow- and blocklists of client addresses,
senders and recipients (as Postfix's mynetworks and its check_client_access,
check_sender_access and check_recipient_access tables).

Entries live in SQL (``schema.access_entries``), managed with ``lightmail access``
(and the admin API), so every process and node sees the same lists; each process
keeps a snapshot it reads again when it is older than ``[access] refresh`` (5 s by
default), so a change is in force within seconds, without a restart.  ``[access]
trusted_networks`` adds networks from the configuration file.

Each entry is on one list (``trusted``, ``allow``, ``block``) for one kind of thing:

* ``client``: an IP address or network (CIDR); the longest prefix that matches
  decides, and between lists with the same prefix, trusted before allow before
  block.  ``trusted`` clients may relay without AUTH (mynetworks).
* ``sender`` (MAIL FROM) and ``recipient`` (RCPT TO): a whole address, a domain, or
  a parent domain written with a leading dot (``.example.com`` matches its
  subdomains); the address before its domain, the domain before its parents.

What a list does is the inbound ``access`` check's (lightmail.policy.inbound): a
blocked client, sender or recipient is refused at RCPT TO with 554 5.7.1; an
allowed (or trusted) one skips the checks meant for strangers (greylisting,
DNSBLs, content scanners) through Findings.allowlisted.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet import defer
from twisted.internet.defer import Deferred

from lightmail.address import client_ip
from lightmail.storage import schema as s
from lightmail.storage.database import Database, now_ms

LISTS = ("trusted", "allow", "block")
KINDS = ("client", "sender", "recipient")
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class AccessError(Exception):
    """An entry that cannot be added or removed; the text says why."""


class AlreadyListed(AccessError):
    """The entry is on that list already."""


class NotListed(AccessError):
    """The entry to remove is not on that list."""


@dataclass(frozen=True)
class AccessEntry:
    list: str
    kind: str
    value: str
    note: str = ""
    created: int = 0


def normalise(kind: str, value: str) -> str:
    """The stored form of an entry's value, or AccessError saying what is wrong."""
    value = value.strip()
    if kind == "client":
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise AccessError(f"{value!r} is not an IP address or network") from None
    if kind not in KINDS:
        raise AccessError(f"the kind is one of {', '.join(KINDS)}, not {kind!r}")
    value = value.lower().rstrip(".")
    local, at, domain = value.rpartition("@")
    if at and not local:
        value = domain                        # "@example.com" means the domain
    name = value.rpartition("@")[2].lstrip(".")
    if not name or any(not label or len(label) > 63 for label in name.split(".")) or \
            any(c.isspace() for c in value):
        raise AccessError(f"{value!r} is not an address, a domain or a .parent domain")
    return value


class Snapshot:
    """The lists as read at one moment, for lookups without I/O."""

    def __init__(self, entries: Iterable[AccessEntry], networks: Sequence[str] = ()) -> None:
        self.networks: list[tuple[Network, str]] = [
            (ipaddress.ip_network(net, strict=False), "trusted") for net in networks]
        self.names: dict[tuple[str, str], str] = {}
        for entry in entries:
            if entry.kind == "client":
                self.networks.append((ipaddress.ip_network(entry.value), entry.list))
            else:
                key = (entry.kind, entry.value)
                current = self.names.get(key)
                if current is None or _rank(entry.list) < _rank(current):
                    self.names[key] = entry.list
        # Longest prefix first; the same prefix: trusted, allow, block.
        self.networks.sort(key=lambda item: (-item[0].prefixlen, _rank(item[1])))

    def client(self, ip: str) -> Optional[str]:
        address = client_ip(ip)
        if address is None:
            return None
        for network, name in self.networks:
            if address.version == network.version and address in network:
                return name
        return None

    def address(self, kind: str, address: str) -> Optional[str]:
        """The list of a sender or recipient address: the address itself, its
        domain, then each parent domain (written ``.parent``)."""
        address = address.lower().rstrip(".")
        found = self.names.get((kind, address))
        if found is not None:
            return found
        domain = address.rpartition("@")[2]
        found = self.names.get((kind, domain))
        if found is not None:
            return found
        labels = domain.split(".")
        for start in range(1, len(labels)):
            found = self.names.get((kind, "." + ".".join(labels[start:])))
            if found is not None:
                return found
        return None


def _rank(name: str) -> int:
    return LISTS.index(name)


class AccessLists:
    """The lists in SQL, with a snapshot refreshed every ``refresh`` seconds."""

    def __init__(self, db: Database, networks: Sequence[str] = (),
                 refresh: float = 5.0, clock: Any = time.monotonic) -> None:
        self.db = db
        self.networks = tuple(networks)
        self.refresh = refresh
        self.clock = clock
        self._snapshot: Optional[Snapshot] = None
        self._read_at = 0.0
        self._reading: Optional[Deferred[Snapshot]] = None

    def configure(self, networks: Sequence[str], refresh: float) -> None:
        """A reload's new [access] settings: in force at the next lookup."""
        self.networks, self.refresh = tuple(networks), refresh
        self._snapshot = None

    def snapshot(self) -> Deferred[Snapshot]:
        """The current snapshot; read again (once, however many ask) when stale."""
        if self._snapshot is not None and self.clock() - self._read_at < self.refresh:
            return defer.succeed(self._snapshot)
        if self._reading is None:
            reading: Deferred[Any] = self.db.read(_entries_now)
            self._reading = reading.addBoth(self._read)
        waiting: Deferred[Snapshot] = Deferred()

        def tell(snap: Snapshot) -> Snapshot:
            waiting.callback(snap)
            return snap
        self._reading.addCallback(tell)
        return waiting

    def _read(self, result: Any) -> Any:
        self._reading = None
        if isinstance(result, list):
            self._snapshot = Snapshot(result, self.networks)
            self._read_at = self.clock()
            return self._snapshot
        if self._snapshot is not None:        # the database is away: keep the last
            return self._snapshot
        return Snapshot((), self.networks)

    def is_trusted(self, ip: str) -> Deferred[bool]:
        return self.snapshot().addCallback(lambda snap: snap.client(ip) == "trusted")

    def entries(self) -> Deferred[list[AccessEntry]]:
        return self.db.read(_entries_now)

    def add(self, list_name: str, kind: str, value: str, note: str = ""
            ) -> Deferred[AccessEntry]:
        if list_name not in LISTS:
            raise AccessError(f"the list is one of {', '.join(LISTS)}, not {list_name!r}")
        if list_name == "trusted" and kind != "client":
            raise AccessError("only clients (IP networks) can be trusted")
        value = normalise(kind, value)
        entry = AccessEntry(list_name, kind, value, note[:255], now_ms())

        def add_(conn: Connection) -> AccessEntry:
            if _find(conn, entry) is not None:
                raise AlreadyListed(f"{kind} {value} is on the {list_name} list already")
            conn.execute(s.access_entries.insert().values(
                list=entry.list, kind=entry.kind, value=entry.value, note=entry.note,
                created=entry.created))
            return entry
        return self._changed(self.db.write(add_))

    def remove(self, list_name: str, kind: str, value: str) -> Deferred[None]:
        value = normalise(kind, value)

        def remove_(conn: Connection) -> None:
            done = conn.execute(s.access_entries.delete().where(
                (s.access_entries.c.list == list_name) & (s.access_entries.c.kind == kind)
                & (s.access_entries.c.value == value)))
            if not done.rowcount:
                raise NotListed(f"{kind} {value} is not on the {list_name} list")
        return self._changed(self.db.write(remove_))

    def _changed(self, d: Deferred[Any]) -> Deferred[Any]:
        def forget(result: Any) -> Any:
            self._snapshot = None             # this process sees its change at once
            return result
        return d.addCallback(forget)


def _find(conn: Connection, entry: AccessEntry) -> Any:
    table = s.access_entries
    return conn.execute(sa.select(table.c.id).where(
        (table.c.list == entry.list) & (table.c.kind == entry.kind)
        & (table.c.value == entry.value))).first()


def _entries_now(conn: Connection) -> list[AccessEntry]:
    table = s.access_entries
    rows = conn.execute(sa.select(table).order_by(table.c.list, table.c.kind,
                                                  table.c.value))
    return [AccessEntry(row.list, row.kind, row.value, row.note or "", row.created)
            for row in rows]
