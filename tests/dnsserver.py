"""A small authoritative DNS server for tests, on dnspython.

::

    server = DNSServer({
        "example.test.": {"MX": [(10, "mx1.example.test."), (20, "mx2.example.test.")]},
        "mx1.example.test.": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "nullmx.test.": {"MX": [(0, ".")]},
        "txt.test.": {"TXT": ["v=spf1 -all"]},
        "alias.test.": {"CNAME": ["mx1.example.test."]},
    }, ttl=300)
    server.start()
    ...  # resolver.nameservers = ["127.0.0.1"]; resolver.port = server.port
    server.stop()

It answers over UDP and TCP on 127.0.0.1 (or ``host``), on one port number (a free
one, or ``port``: 53 for programs that read /etc/resolv.conf, which names no port),
from a background thread per transport (and one per TCP connection).  Every answer is
authoritative (AA).

Record values: A and AAAA an address; MX ``(preference, exchange)`` or
``"10 mx.example.test."``; TXT a string (split into 255-octet character-strings) or a
tuple of strings (one character-string each); CNAME a name; any other type its rdata in
zone-file text (``"SRV": ["0 5 25 mx.example.test."]``).  Names may omit the final dot.

* A name with no data at all, below none of the names given, is NXDOMAIN; a name that
  exists (or has names below it: an empty non-terminal) but has no record of the asked
  type is NOERROR with an empty answer (NODATA).  Both carry an SOA in the authority
  section, its TTL and MINIMUM the negative TTL, so that resolvers cache them
  (RFC 2308).  The SOA is the one given for the closest enclosing name if any, else a
  made-up one owned by the asked name's last two labels (its "zone") when the server
  has names in that zone, else by its last label.
* A CNAME is followed within the server's data for any other asked type (up to 8 links):
  the answer holds the chain and the records at its end.
* ``set(name, rtype, values)`` changes records while running (an empty list removes
  the type), ``remove(name)`` removes a name, ``fail(name, rcode)`` answers that rcode
  (SERVFAIL by default) for every question about the name (``fail(name, None)`` undoes
  it), and ``drop(name)`` never answers (the client times out).
* ``queries`` lists every question received as ``(name, rtype)``: lower-case absolute
  name, type mnemonic: ``("example.test.", "MX")``.  ``errors`` collects exceptions
  raised while answering (the client gets SERVFAIL).
* It cannot sign zones.  For DNSSEC, ``authenticated=True`` makes it play the part of
  the *validating resolver* LightMail trusts (not of an authoritative server): it sets
  the AD bit (RFC 4035 §3.2.3) in every answer to a query that sets AD or EDNS DO
  (RFC 6840 §5.7), as unbound does for a zone whose signatures it validated, answers
  NXDOMAIN and NODATA included; ``insecure(name)`` leaves AD out for questions about
  that name (an unsigned zone), ``insecure(name, False)`` puts it back.  ``fail``
  answers stay without AD (a validating resolver's SERVFAIL for a bogus answer).
* An answer too big for UDP (512 octets, or the client's EDNS size) is sent empty
  with TC set, so the client retries over TCP.
"""

from __future__ import annotations

import errno
import socket
import socketserver
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset

IN = dns.rdataclass.IN
Zones = Mapping[str, Mapping[str, Iterable[Any]]]
RcodeLike = Union[int, str, dns.rcode.Rcode]
_MAX_CNAME_CHAIN = 8


class DNSServer:
    """An authoritative server for the records given, on 127.0.0.1 (UDP and TCP)."""

    def __init__(self, zones: Zones, ttl: int = 300, *, negative_ttl: Optional[int] = None,
                 host: str = "127.0.0.1", port: int = 0, authenticated: bool = False) -> None:
        self.ttl = ttl
        self.negative_ttl = ttl if negative_ttl is None else negative_ttl
        self.host = host
        self.port = 0
        self._wanted_port = port        # 0: any free one
        self.queries: list[tuple[str, str]] = []
        self.errors: list[Exception] = []     # exceptions raised while answering
        self._lock = threading.RLock()
        self._data: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self._failures: dict[dns.name.Name, dns.rcode.Rcode] = {}
        self._dropped: set[dns.name.Name] = set()
        self.authenticated = authenticated
        self._insecure: set[dns.name.Name] = set()
        self._udp: Optional[_UDPServer] = None
        self._tcp: Optional[_TCPServer] = None
        self._running = False
        self._threads: list[threading.Thread] = []
        for name, records in zones.items():
            owner = _name(name)
            self._data.setdefault(owner, {})
            for rtype, values in records.items():
                self.set(name, rtype, values)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> DNSServer:
        """Bind UDP and TCP to one free port number (or the one given) and serve in
        background threads."""
        if self._udp is not None:
            raise RuntimeError("a DNSServer starts only once")
        for _ in range(50):
            udp = _UDPServer((self.host, self._wanted_port), _UDPHandler, self)
            port = udp.server_address[1]
            try:
                tcp = _TCPServer((self.host, port), _TCPHandler, self)
            except OSError as exc:
                udp.server_close()
                if exc.errno == errno.EADDRINUSE and not self._wanted_port:
                    continue
                raise
            break
        else:
            raise RuntimeError("no port number free for both UDP and TCP")
        self._udp, self._tcp, self.port, self._running = udp, tcp, port, True
        self._threads = [
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             name=f"dns-{kind}-{port}", daemon=True)
            for kind, server in (("udp", udp), ("tcp", tcp))
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every socket and wait for the threads to end."""
        udp, tcp = self._udp, self._tcp
        if not self._running or udp is None or tcp is None:
            return
        self._running = False
        for server in (udp, tcp):
            server.shutdown()
        tcp.close_connections()
        udp.server_close()
        tcp.server_close()      # joins the connection threads
        for thread in self._threads:
            thread.join()

    @property
    def threads(self) -> list[threading.Thread]:
        """The serving threads, the TCP connections' too (for tests that check they end)."""
        return list(self._threads) + (self._tcp.connection_threads() if self._tcp else [])

    @property
    def sockets(self) -> list[socket.socket]:
        """The UDP and the listening TCP socket (closed after ``stop``)."""
        return [server.socket for server in (self._udp, self._tcp) if server is not None]

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- data ---------------------------------------------------------------------------------

    def set(self, name: str, rtype: str, values: Iterable[Any], ttl: Optional[int] = None) -> None:
        """Replace the ``rtype`` records of ``name`` (creating the name); an empty list
        removes that type but keeps the name (NODATA)."""
        owner = _name(name)
        kind = dns.rdatatype.from_text(rtype)
        rrset = dns.rrset.RRset(owner, IN, kind)
        for value in values:
            rrset.add(_rdata(kind, value), self.ttl if ttl is None else ttl)
        with self._lock:
            records = self._data.setdefault(owner, {})
            if len(rrset):
                records[kind] = rrset
            else:
                records.pop(kind, None)

    def remove(self, name: str) -> None:
        """Remove the name and all its records (it answers NXDOMAIN)."""
        with self._lock:
            self._data.pop(_name(name), None)

    def fail(self, name: str, rcode: Optional[RcodeLike] = dns.rcode.SERVFAIL) -> None:
        """Answer every question about ``name`` with ``rcode`` (None: answer normally)."""
        owner = _name(name)
        with self._lock:
            if rcode is None:
                self._failures.pop(owner, None)
            elif isinstance(rcode, str):
                self._failures[owner] = dns.rcode.from_text(rcode)
            else:
                self._failures[owner] = dns.rcode.Rcode.make(rcode)

    def insecure(self, name: str, insecure: bool = True) -> None:
        """With ``authenticated``: answer questions about ``name`` without AD (or
        with it again)."""
        with self._lock:
            (self._insecure.add if insecure else self._insecure.discard)(_name(name))

    def drop(self, name: str, dropped: bool = True) -> None:
        """Leave questions about ``name`` unanswered (or answer them again)."""
        with self._lock:
            (self._dropped.add if dropped else self._dropped.discard)(_name(name))

    # -- answering ------------------------------------------------------------------------------

    def handle(self, wire: bytes, udp: bool = False) -> Optional[bytes]:
        """The wire answer to a wire query, or None to send nothing.  Over UDP an
        answer is at most 512 octets, or the EDNS size the client offers."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            if len(wire) < 12:
                return None
            # Echo the id with FORMERR, as servers do for what they cannot parse.
            return wire[:2] + bytes([0x80 | (wire[2] & 0x78), dns.rcode.FORMERR]) + bytes(8)
        try:
            response = self.answer(query)
        except Exception as exc:     # a bug here: say so, and answer SERVFAIL
            self.errors.append(exc)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
        if response is None:
            return None
        max_size = 65535
        if udp:
            max_size = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | dns.flags.AA
            return truncated.to_wire(max_size=max_size)

    def answer(self, query: dns.message.Message) -> Optional[dns.message.Message]:
        """The response to a parsed query (None: drop it)."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        self.queries.append((qname.to_text().lower(), dns.rdatatype.to_text(qtype)))
        if question.rdclass != IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        with self._lock:
            if qname in self._dropped:
                return None
            if qname in self._failures:
                response.set_rcode(self._failures[qname])
                return response
            self._resolve(response, qname, qtype)
            asks_ad = bool(query.flags & dns.flags.AD) or bool(query.ednsflags & dns.flags.DO)
            if self.authenticated and asks_ad and qname not in self._insecure:
                response.flags |= dns.flags.AD
        return response

    def _resolve(self, response: dns.message.Message, qname: dns.name.Name, qtype: int) -> None:
        name = qname
        for _ in range(_MAX_CNAME_CHAIN + 1):
            records = self._data.get(name)
            if records is None:
                if name == qname or self._owns(name):
                    if not self._exists(name):
                        response.set_rcode(dns.rcode.NXDOMAIN)
                    response.authority.append(self._soa(name))
                return      # a CNAME out of the server's data: the client goes on
            if qtype in records:
                response.answer.append(records[qtype])
                return
            if qtype == dns.rdatatype.ANY and records:
                response.answer.extend(records.values())
                return
            cname = records.get(dns.rdatatype.CNAME)
            if cname is None:
                response.authority.append(self._soa(name))      # NODATA
                return
            response.answer.append(cname)
            name = cname[0].target
        response.answer.clear()
        response.set_rcode(dns.rcode.SERVFAIL)     # a CNAME loop or too long a chain

    def _exists(self, name: dns.name.Name) -> bool:
        return name in self._data or any(owner.is_subdomain(name) for owner in self._data)

    def _owns(self, name: dns.name.Name) -> bool:
        """Whether ``name`` is within the data: an NXDOMAIN at the end of a CNAME chain
        is ours to say when the name shares a zone (last two labels) with ours."""
        apex = _apex(name)
        return any(owner.is_subdomain(apex) for owner in self._data)

    def _soa(self, name: dns.name.Name) -> dns.rrset.RRset:
        for candidate in _ancestors(name):
            records = self._data.get(candidate)
            if records and dns.rdatatype.SOA in records:
                return records[dns.rdatatype.SOA]
        apex = _apex(name)
        if not self._owns(name):    # no zone of ours: the SOA of the top-level domain
            apex = dns.name.Name(name.labels[-2:]) if len(name.labels) > 1 else name
        rrset = dns.rrset.RRset(apex, IN, dns.rdatatype.SOA)
        rrset.add(dns.rdtypes.ANY.SOA.SOA(
            IN, dns.rdatatype.SOA, dns.name.Name(("ns",) + apex.labels),
            dns.name.Name(("hostmaster",) + apex.labels), 1, 3600, 600, 86400,
            self.negative_ttl), self.negative_ttl)
        return rrset


# -- the records -------------------------------------------------------------------------------

def _name(name: str) -> dns.name.Name:
    return dns.name.from_text(name)


def _ancestors(name: dns.name.Name) -> Iterable[dns.name.Name]:
    while True:
        yield name
        if name == dns.name.root:
            return
        name = name.parent()


def _apex(name: dns.name.Name) -> dns.name.Name:
    labels = name.labels
    return dns.name.Name(labels[-3:]) if len(labels) > 3 else name


def _rdata(kind: dns.rdatatype.RdataType, value: Any) -> dns.rdata.Rdata:
    if kind == dns.rdatatype.A:
        return dns.rdtypes.IN.A.A(IN, kind, str(value))
    if kind == dns.rdatatype.AAAA:
        return dns.rdtypes.IN.AAAA.AAAA(IN, kind, str(value))
    if kind == dns.rdatatype.MX and not isinstance(value, str):
        preference, exchange = value
        return dns.rdtypes.ANY.MX.MX(IN, kind, int(preference), _name(exchange))
    if kind == dns.rdatatype.CNAME:
        return dns.rdtypes.ANY.CNAME.CNAME(IN, kind, _name(value))
    if kind == dns.rdatatype.TXT:
        if isinstance(value, (str, bytes)):
            data = value.encode() if isinstance(value, str) else value
            strings = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        else:
            strings = [s.encode() if isinstance(s, str) else s for s in value]
        return dns.rdtypes.ANY.TXT.TXT(IN, kind, strings)
    return dns.rdata.from_text(IN, kind, str(value), origin=dns.name.root, relativize=False)


# -- the transports -------------------------------------------------------------------------

class _UDPServer(socketserver.UDPServer):
    allow_reuse_address = False     # on UDP it would let two servers share a port

    def __init__(self, address: tuple[str, int], handler: Any, dns_server: DNSServer) -> None:
        self.dns = dns_server
        super().__init__(address, handler)


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.dns.handle(data, udp=True)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True      # TIME_WAIT from an earlier test must not block us
    daemon_threads = False          # only these are tracked, for server_close to join
    block_on_close = True

    def __init__(self, address: tuple[str, int], handler: Any, dns_server: DNSServer) -> None:
        self.dns = dns_server
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self.closing = False
        super().__init__(address, handler)

    def close_connections(self) -> None:
        with self.connections_lock:
            self.closing = True
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def connection_threads(self) -> list[threading.Thread]:
        # ThreadingMixIn keeps them in _threads once the first connection came.
        return list(vars(self).get("_threads", []))


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def setup(self) -> None:
        with self.server.connections_lock:
            if self.server.closing:
                self.request.shutdown(socket.SHUT_RDWR)
            self.server.connections.add(self.request)
        self.request.settimeout(30)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.request)

    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            try:
                length = _recv_exactly(sock, 2)
                if length is None:
                    return
                wire = _recv_exactly(sock, int.from_bytes(length, "big"))
                if wire is None:
                    return
            except OSError:
                return
            reply = self.server.dns.handle(wire)
            if reply is None:
                continue
            try:
                sock.sendall(len(reply).to_bytes(2, "big") + reply)
            except OSError:
                return


def _recv_exactly(sock: socket.socket, count: int) -> Optional[bytes]:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data
