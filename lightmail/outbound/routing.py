"""Where a domain's mail goes: relay host, MX records (RFC 5321 §5.1), null MX (RFC 7505).

The result is an ordered list of hosts with their addresses: MX preference order,
equal preferences shuffled (so load spreads, as §5.1 asks), and the domain itself
when it has no MX (implicit MX).  What cannot work is a permanent failure; what may
work later is a temporary one.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from lightmail.dns import DNSError, IResolver, NoSuchDomain


class RoutingError(Exception):
    def __init__(self, status: str, text: str, permanent: bool) -> None:
        super().__init__(f"{status} {text}")
        self.status, self.text, self.permanent = status, text, permanent


@dataclass(frozen=True)
class Destination:
    host: str                   # the name (MX exchange or relay), for TLS and logs
    addresses: tuple[str, ...]
    port: int


def parse_relay(relay: str, default_port: int) -> tuple[str, int, bool]:
    """``[host]:port`` (no MX lookup) or ``host:port`` -> (host, port, look up MX?)."""
    text = relay.strip()
    lookup_mx = not text.startswith("[")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    else:
        host, _, port_text = text.partition(":")
        port = int(port_text) if port_text else default_port
    return host, port, lookup_mx


class Router:
    def __init__(self, resolver: IResolver, port: int = 25, relay_host: str = "") -> None:
        self.resolver = resolver
        self.port = port
        self.relay = parse_relay(relay_host, port) if relay_host.strip() else None

    async def route(self, domain: str) -> list[Destination]:
        if self.relay is not None:
            host, port, lookup_mx = self.relay
            return await self._destinations(host, port, lookup_mx)
        return await self._destinations(domain, self.port, True)

    async def _destinations(self, name: str, port: int,
                            lookup_mx: bool) -> list[Destination]:
        literal = _address_literal(name)
        if literal is not None:
            return [Destination(name, (literal,), port)]
        try:
            records = await self.resolver.mx(name) if lookup_mx else []
        except NoSuchDomain:
            raise RoutingError("5.1.2", f"{name}: domain does not exist", True) from None
        except DNSError as exc:
            raise RoutingError("4.4.3", f"MX lookup for {name} failed: {exc}",
                               False) from None
        if any(exchange in ("", ".") for _, exchange in records):
            if len(records) == 1:
                raise RoutingError("5.1.10", f"{name} accepts no mail (null MX)", True)
            records = [r for r in records if r[1] not in ("", ".")]
        hosts = _ordered(records) if records else [name]
        destinations, errors = [], []
        for host in hosts:
            try:
                addresses = await self.resolver.addresses(host)
            except NoSuchDomain as exc:
                errors.append((True, str(exc)))
                continue
            except DNSError as exc:
                errors.append((False, str(exc)))
                continue
            if addresses:
                destinations.append(Destination(host, tuple(addresses), port))
            else:
                errors.append((True, f"{host} has no address"))
        if destinations:
            return destinations
        permanent = bool(errors) and all(p for p, _ in errors)
        detail = "; ".join(text for _, text in errors) or f"no host for {name}"
        if permanent:
            raise RoutingError("5.1.2" if not records else "5.4.4", detail, True)
        raise RoutingError("4.4.3", detail, False)


def _ordered(records: list[tuple[int, str]]) -> list[str]:
    """Preference order; hosts of equal preference in random order (RFC 5321 §5.1)."""
    out: list[str] = []
    for _, group in groupby(sorted(records), key=lambda r: r[0]):
        hosts = [host for _, host in group]
        random.shuffle(hosts)
        out += [h for h in hosts if h not in out]
    return out


def _address_literal(name: str) -> Any:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` domains, or a bare IP relay host."""
    text = name.strip("[]")
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None
