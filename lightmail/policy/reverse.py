"""Forward-confirmed reverse DNS (FCrDNS) of a client: the names its address's PTR
records give, and whether one of them has that address among its own A (or AAAA)
records, as Postfix's smtpd finds a client's name (and RFC 8601 §3's ``iprev``).

Results, as the log's ``fcrdns=`` says them:

* ``pass``: a name confirms the address (that name is the client's);
* ``fail``: PTR names exist, none confirms it;
* ``none``: no PTR record (NXDOMAIN or none at the address's name);
* ``temperror``: a lookup failed or did not answer within the time given, and no
  name confirmed the address.

At most 10 PTR names are tried (a PTR set can be large; SPF's ptr mechanism stops
at 10 too, RFC 7208 §5.5).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.address import client_ip
from lightmail.dns import DNSError, IResolver, NoSuchDomain

log = Logger(namespace="lightmail.reverse")
MAX_NAMES = 10
#: fcrdns result -> RFC 8601 iprev result (no PTR record at all is a fail there).
IPREV = {"pass": "pass", "fail": "fail", "none": "fail", "temperror": "temperror"}


@dataclass(frozen=True)
class ReverseResult:
    result: str          # pass, fail, none, temperror
    ip: str
    #: The confirmed name (pass), else the first PTR name, else "".
    name: str = ""
    reason: str = ""

    @property
    def client(self) -> str:
        """``name[ip]`` as Postfix logs a client; ``unknown[ip]`` without a
        confirmed name."""
        return f"{self.name if self.result == 'pass' else 'unknown'}[{self.ip}]"

    @property
    def iprev(self) -> str:
        return IPREV[self.result]


class ReverseLookup:
    """Finds clients' names through the (cached) resolver; each lookup waits at most
    ``timeout`` seconds."""

    def __init__(self, resolver: IResolver, clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor
            clock = reactor
        self.resolver = resolver
        self.clock = clock

    def check(self, ip: str, timeout: float) -> Deferred[ReverseResult]:
        """The FCrDNS result of ``ip``; never fails."""
        return Deferred.fromCoroutine(self._check(ip, timeout))

    async def _check(self, ip: str, timeout: float) -> ReverseResult:
        address = client_ip(ip)
        if address is None:
            return ReverseResult("none", ip, reason="not an IP address")
        ip = str(address)
        try:
            names = await self._bounded(self.resolver.ptr(ip), timeout)
        except NoSuchDomain:
            return ReverseResult("none", ip, reason="no PTR record")
        except (DNSError, defer.TimeoutError) as exc:
            return ReverseResult("temperror", ip, reason=f"PTR lookup: {_say(exc)}")
        except Exception:
            log.failure("the PTR lookup of {ip} failed", ip=ip)
            return ReverseResult("temperror", ip, reason="PTR lookup failed")
        # Sorted: DNS gives a set in any order, and the log should not change.
        names = sorted({name.lower() for name in names})[:MAX_NAMES]
        if not names:
            return ReverseResult("none", ip, reason="no PTR record")
        forward = self.resolver.a if address.version == 4 else self.resolver.aaaa
        answers = await defer.gatherResults(
            [self._addresses(forward(name), timeout) for name in names])
        errors = []
        for name, found in zip(names, answers, strict=True):
            if isinstance(found, str):
                errors.append(f"{name}: {found}")
            elif address in found:
                return ReverseResult("pass", ip, name, f"{name} resolves to {ip}")
        if errors:
            return ReverseResult("temperror", ip, names[0], "; ".join(errors))
        return ReverseResult("fail", ip, names[0],
                             f"{', '.join(names)} do{'es' if len(names) == 1 else ''} "
                             f"not resolve to {ip}")

    def _bounded(self, d: Deferred[Any], timeout: float) -> Deferred[Any]:
        return d.addTimeout(timeout, self.clock)

    def _addresses(self, d: Deferred[list[str]], timeout: float) -> Deferred[Any]:
        """The addresses, as ip_address objects ([] for a name that does not
        exist), or a string saying what failed."""
        def parsed(found: list[str]) -> list[Any]:
            return [ipaddress.ip_address(one) for one in found]

        def failed(failure: Any) -> Any:
            if failure.check(NoSuchDomain):
                return []
            if not failure.check(DNSError, defer.TimeoutError):
                log.failure("the address lookup of a PTR name failed", failure)
            return _say(failure.value)
        return self._bounded(d, timeout).addCallbacks(parsed, failed)


def _say(exc: Optional[BaseException]) -> str:
    if isinstance(exc, defer.TimeoutError):
        return "no answer in time"
    return str(exc)
