"""An in-process LightMail for protocol tests, and a raw line client to talk to it.

``start`` runs ``makeService`` with the SMTP listeners (and any given in ``extra``) on
port 0 and a demo directory; clients run in threads so the reactor keeps serving them.
"""

from __future__ import annotations

import atexit
import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads

from lightmail.admin.certs import write_self_signed
from lightmail.config import parse_config
from lightmail.service import get_services, makeService


class Raw:
    """A minimal blocking SMTP client that shows exactly what the server said."""

    def __init__(self, port: int, tls: bool = False) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            sock = ctx.wrap_socket(sock)
        self.sock = sock
        self.file = sock.makefile("rb")
        self.greeting = self.reply()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def reply(self) -> list[str]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                lines.append("<closed>")
                return lines
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return lines

    def cmd(self, line: str) -> str:
        self.send(line + "\r\n")
        return "\n".join(self.reply())

    def close(self) -> None:
        # The file from makefile() keeps the socket open until it is closed too.
        self.file.close()
        self.sock.close()


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return threads.deferToThread(fn, *args, **kwargs)


class Server:
    def __init__(self, root: Any, ports: dict[str, int], tmp: Path) -> None:
        self.root, self.ports, self.tmp = root, ports, tmp
        self.parts = get_services(root)

    def stop(self) -> defer.Deferred[None]:
        return self.root.stopService()

    @defer.inlineCallbacks
    def queued(self) -> Any:
        return (yield self.parts.queue.list_recipients())

    @defer.inlineCallbacks
    def inbox(self, address: str, mailbox: str = "INBOX") -> Any:
        user = yield self.parts.directory.get_user(address)
        box = yield self.parts.mailstore.get_mailbox(user.id, mailbox)
        if box is None:
            return []
        contents = []
        for message in (yield self.parts.mailstore.list_messages(box.id)):
            contents.append((yield self.parts.blobs.read(message.blob_id)))
        return contents

    @defer.inlineCallbacks
    def delivered(self, address: str, count: int, mailbox: str = "INBOX") -> Any:
        from twisted.internet import reactor, task
        for _ in range(200):
            found = yield self.inbox(address, mailbox)
            if len(found) >= count:
                return found
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"{count} messages never reached {address}/{mailbox}")


_QUIET_DNS: list[Any] = []


def quiet_dns_port() -> int:
    """The port of an empty test DNS server (tests/dnsserver.py: NXDOMAIN for every
    name), shared by the in-process servers whose configuration has no [outbound]
    section: the MX listener's default checks (SPF, DKIM, DMARC, ARC) look names up,
    and a test must not ask this machine's resolver (or wait for its timeouts)."""
    if not _QUIET_DNS:
        from dnsserver import DNSServer
        server = DNSServer({}, ttl=60).start()
        atexit.register(server.stop)
        _QUIET_DNS.append(server)
    return int(_QUIET_DNS[0].port)


@defer.inlineCallbacks
def start(tmp: Path, extra: str = "", server: str = "", populate: bool = True) -> Any:
    """The in-process server; ``extra``: more sections, ``server``: more lines of its
    [server] section; ``populate``: add the demo domain and users (not on a restart
    over the same state directory).  Without an [outbound] section in ``extra`` its
    DNS is :func:`quiet_dns_port`'s server."""
    if not re.search(r"^\[outbound\]", extra, re.MULTILINE):
        extra = f"[outbound]\ndns_servers = 127.0.0.1:{quiet_dns_port()}\n" + extra
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    if not cert.exists():
        write_self_signed(cert, key, "mx.example.test")
    tls = f"tls_cert = {cert}\ntls_key = {key}\n"
    config = parse_config(
        f"[server]\nstate_dir = {tmp / 'state'}\nhostname = mx.example.test\n"
        "shutdown_timeout = 2s\n" + server +
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "tls = starttls\n" + tls +
        "[listener:submission]\nprotocol = submission\nendpoint = tcp:0:interface=127.0.0.1\n"
        "tls = starttls\n" + tls +
        "[listener:submissions]\nprotocol = submission\n"
        "endpoint = tcp:0:interface=127.0.0.1\ntls = implicit\n" + tls + extra,
        str(tmp / "lm.conf"))
    root = makeService(config)
    root.startService()
    parts = get_services(root)
    yield parts.storage.ready
    ports = {}
    for listener in config.listeners:
        port = yield root.getServiceNamed(f"listener:{listener.name}").listening
        ports[listener.name] = getattr(port.getHost(), "port", 0)
    if not populate:
        return Server(root, ports, tmp)
    d = parts.directory
    yield d.add_domain("example.test")
    yield d.add_user("bob@example.test", "bob-secret")
    yield d.add_user("jörg@example.test", None)
    yield d.add_alias("postmaster@example.test", "bob@example.test")
    yield d.add_alias("outside@example.test", "friend@remote.example")
    bob = yield d.get_user("bob@example.test")
    yield parts.mailstore.get_or_create_mailbox(bob.id, "INBOX")
    yield parts.mailstore.create_mailbox(bob.id, "lists")
    return Server(root, ports, tmp)


def session(port: int, *lines: str, tls: bool = False) -> list[str]:
    client = Raw(port, tls)
    try:
        return [client.cmd(line) for line in lines]
    finally:
        client.close()
