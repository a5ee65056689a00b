"""A SASL exchange over SMTP AUTH, IMAP AUTHENTICATE or POP3 AUTH, on a TLS socket:
the client's side is a callable answering each challenge (None for the first)."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Callable
from typing import Any, Optional

PORTS = {"smtp": "submissions", "imap": "imaps", "pop3": "pop3s"}


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def connect(port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20))


def tls_listeners(tmp: Any, mechanisms: str) -> str:
    """imaps and pop3s beside inprocess.start's submissions, and the mechanisms."""
    tls = f"tls_cert = {tmp / 'cert.pem'}\ntls_key = {tmp / 'key.pem'}\n"
    return ("[listener:imaps]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
            "tls = implicit\n" + tls +
            "[listener:pop3s]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n"
            "tls = implicit\n" + tls +
            f"[directory]\nmechanisms = {mechanisms}\n")


class Wire:
    """One protocol's SASL exchange on a line-based connection."""

    def __init__(self, protocol: str, sock: Any) -> None:
        self.protocol, self.sock = protocol, sock
        self.file = sock.makefile("rb")
        self.line()                                      # greeting
        if protocol == "smtp":
            self.send("EHLO client.test")
            while not self.line().startswith("250 "):
                pass

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\r\n")

    def line(self) -> str:
        return self.file.readline().decode().rstrip("\r\n")

    def authenticate(self, name: str, answer: Callable[[Optional[bytes]], bytes]
                     ) -> tuple[bool, str, list[bytes]]:
        """Run an exchange with an initial response: (logged in, the last line, the
        challenges seen)."""
        first = b64(answer(None))
        command = {"smtp": f"AUTH {name} {first}", "pop3": f"AUTH {name} {first}",
                   "imap": f"a AUTHENTICATE {name} {first}"}[self.protocol]
        challenges = []
        if self.protocol == "pop3" and len(command) > 253:
            # RFC 5034 §4: an initial response that would make the command longer
            # than 255 octets is not sent: it answers the first (empty) challenge.
            self.send(f"AUTH {name}")
            assert self.line() == "+ "
            command = first
        self.send(command)
        while True:
            line = self.line()
            challenge = line[4:] if line.startswith("334 ") else \
                line[2:] if line.startswith("+ ") else None
            if challenge is None:
                return line.startswith(("235 ", "+OK", "a OK")), line, challenges
            challenges.append(base64.b64decode(challenge))
            self.send(b64(answer(challenges[-1])))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def scram_answers(client: Any) -> Callable[[Optional[bytes]], bytes]:
    """A scramp client's side of the exchange."""
    def answer(challenge: Optional[bytes]) -> bytes:
        if challenge is None:
            return client.get_client_first().encode()
        text = challenge.decode()
        if text.startswith("v="):
            client.set_server_final(text)
            return b""
        client.set_server_first(text)
        return client.get_client_final().encode()
    return answer
