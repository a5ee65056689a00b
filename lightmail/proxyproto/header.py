"""Reading a PROXY protocol header: what a load balancer says of the client it stands
for, ahead of the client's own octets (HAProxy's proxy-protocol.txt, versions 1 and 2).

No I/O here: :func:`read_header` is handed what has come so far and answers a
:class:`ProxyHeader`, None (not complete yet), or raises :class:`HeaderError`.  It is
called again on each read with all that came, and only looks at the octets a header
can take (107 for version 1, 16 and then the announced length for version 2), so a
header split over many reads costs no more than one that came whole.

Why not Twisted's ``twisted.protocols.haproxy``: its wrapper builds the session's
protocol before the header is read (so the connection limits and the screening
would see the balancer's address), decides the version on the first read alone
(a header split after its first octets is refused), and its parsers are private
modules whose version 1 lets a bad port or address through as a ValueError.  The
tests hold this parser to Twisted's on the headers both take.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional, Union

#: §2.2: the twelve octets every version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: §2.1: a version 1 header is one line starting so...
V1_START = b"PROXY "
#: ...of at most 107 octets, CRLF included.
V1_LONGEST = 107
#: §2.2: signature, version and command, family and transport, length.
V2_FIXED = 16

#: What a client that speaks the protocol begins with (to tell it from a client that
#: does not, on a connection that is not to send one): a version 2 signature, or a
#: version 1 line with one of its three protocols (``PROXY`` alone could be an IMAP
#: tag).
_HEADER_STARTS = (V2_SIGNATURE, b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN")
_LONGEST_START = max(len(start) for start in _HEADER_STARTS)

_LOCAL, _PROXY = 0x0, 0x1                      # §2.2: the commands
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3   # address families
_STREAM, _DGRAM = 0x1, 0x2                     # transports (0: UNSPEC)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class HeaderError(ValueError):
    """Not a PROXY header this listener takes; the message says why (for the log)."""


@dataclass(frozen=True)
class ProxyHeader:
    """A complete header."""

    version: int
    #: The client's address and port as the balancer saw them; None when it names
    #: none (version 2 LOCAL: its own health check; version 1 UNKNOWN; a family or
    #: transport it does not name; a Unix socket): the connection's own stands.
    source: Optional[tuple[str, int]]
    #: Where the client connected to (the balancer's frontend); None as ``source``.
    destination: Optional[tuple[str, int]]
    #: Octets the header took (what follows is the client's protocol).
    length: int


def read_header(data: Union[bytes, bytearray], versions: frozenset[int]) -> Optional[ProxyHeader]:
    """The header at the start of ``data``, of one of ``versions`` (1, 2); None while
    ``data`` may still become one.  HeaderError when it cannot."""
    version = _version(data)
    if version is None:
        return None
    if version not in versions:
        (wanted,) = versions
        start = V2_SIGNATURE if version == 2 else V1_START
        if len(data) < len(start):
            return None                   # not sure yet that it is the other version
        raise HeaderError(f"a version {version} PROXY header; this listener takes "
                          f"version {wanted} (proxy_protocol = v{wanted})")
    return _read_v2(data) if version == 2 else _read_v1(data)


def looks_like_header(data: Union[bytes, bytearray]) -> Optional[bool]:
    """Whether ``data`` (the first octets of a connection) begins with a PROXY header
    of either version; None while too few octets have come to tell."""
    head = bytes(data[:_LONGEST_START])
    if any(head.startswith(start) for start in _HEADER_STARTS):
        return True
    if any(start.startswith(head) for start in _HEADER_STARTS):
        return None
    return False


def _version(data: Union[bytes, bytearray]) -> Optional[int]:
    if not data:
        return None
    if V2_SIGNATURE.startswith(bytes(data[:len(V2_SIGNATURE)])):
        return 2
    if V1_START.startswith(bytes(data[:len(V1_START)])):
        return 1
    raise HeaderError(f"no PROXY header: the connection began with "
                      f"{bytes(data[:24])!r}")


# -- version 1 -----------------------------------------------------------------------


def _read_v1(data: Union[bytes, bytearray]) -> Optional[ProxyHeader]:
    # §2.1: CRLF within the first 107 octets; a receiver must not read further.
    end = data.find(b"\r\n", 0, V1_LONGEST)
    if end < 0:
        if len(data) >= V1_LONGEST:
            raise HeaderError("a version 1 PROXY header longer than 107 octets")
        return None
    raw = bytes(data[:end])
    try:
        line = raw.decode("ascii")
    except UnicodeDecodeError:
        raise HeaderError(f"a version 1 PROXY header that is not ASCII: {raw!r}") from None
    fields = line.split(" ")
    length = end + 2
    if fields[1:2] == ["UNKNOWN"]:
        # §2.1: the rest of the line is to be ignored, the connection's own address used.
        return ProxyHeader(1, None, None, length)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise HeaderError(f"a malformed version 1 PROXY header: {raw!r}")
    family = ipaddress.IPv4Address if fields[1] == "TCP4" else ipaddress.IPv6Address
    source = _v1_endpoint(family, fields[2], fields[4], raw)
    destination = _v1_endpoint(family, fields[3], fields[5], raw)
    return ProxyHeader(1, source, destination, length)


def _v1_endpoint(family: type[IPAddress], host: str, port: str, raw: bytes) -> tuple[str, int]:
    try:
        address = family(host)
    except ValueError:
        raise HeaderError(f"a version 1 PROXY header with a bad address {host!r}: "
                          f"{raw!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise HeaderError(f"a version 1 PROXY header with a scoped address: {raw!r}")
    # §2.1: decimal, 0 to 65535 (ASCII digits only: "٣" is a digit to str.isdigit).
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise HeaderError(f"a version 1 PROXY header with a bad port {port!r}: {raw!r}")
    return _endpoint(address, int(port))


# -- version 2 -----------------------------------------------------------------------


def _read_v2(data: Union[bytes, bytearray]) -> Optional[ProxyHeader]:
    if len(data) < V2_FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise HeaderError(f"a PROXY header of version {version} after the version 2 "
                          "signature")
    if command not in (_LOCAL, _PROXY):
        raise HeaderError(f"a version 2 PROXY header with an unknown command {command}")
    length = V2_FIXED + int.from_bytes(data[14:16], "big")
    if len(data) < length:
        return None
    if command == _LOCAL:
        # §2.2: the balancer's own connection (a health check): whatever address
        # block follows is skipped, the connection's own address stands.
        return ProxyHeader(2, None, None, length)
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family > _UNIX or transport > _DGRAM:
        raise HeaderError(f"a version 2 PROXY header with an unknown family or "
                          f"transport 0x{data[13]:02x}")
    if transport == _DGRAM:
        raise HeaderError("a version 2 PROXY header for a datagram (UDP) connection")
    if family in (_UNSPEC, _UNIX) or transport != _STREAM:
        # §2.2: a client the balancer cannot name in IP terms: the connection's own
        # address stands (as for LOCAL).
        return ProxyHeader(2, None, None, length)
    size = 4 if family == _INET else 16
    block = bytes(data[V2_FIXED:length])
    # Addresses, then ports; TLVs after them are skipped (the length covers them).
    if len(block) < 2 * size + 4:
        raise HeaderError(f"a version 2 PROXY header whose addresses are cut short "
                          f"({len(block)} octets for {2 * size + 4})")
    make = ipaddress.IPv4Address if family == _INET else ipaddress.IPv6Address
    source = _endpoint(make(block[:size]), int.from_bytes(block[2 * size:2 * size + 2], "big"))
    destination = _endpoint(make(block[size:2 * size]),
                            int.from_bytes(block[2 * size + 2:2 * size + 4], "big"))
    return ProxyHeader(2, source, destination, length)


def _endpoint(address: IPAddress, port: int) -> tuple[str, int]:
    # An IPv4-mapped IPv6 address is its IPv4 address, as lightmail.address.client_ip
    # has it: the limits and lists key on that one.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped), port
    return str(address), port
