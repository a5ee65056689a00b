"""SCRAM-SHA-256 and SCRAM-SHA-1 (RFC 5802, 7677), with channel binding (-PLUS: RFC 9266
tls-exporter, RFC 5929 tls-server-end-point), over SMTP submission, IMAP and POP3.

The client side is scramp and GNU SASL's gsasl, implementations nobody here wrote;
channel binding data comes from the client's own view of the TLS connection (Python's
ssl for tls-server-end-point; GnuTLS under gsasl for tls-exporter on TLS 1.3), so a man
in the middle of the test's own making shows the binding at work.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
import scramp
import sqlalchemy as sa

from lightmail.admin.certs import write_self_signed
from lightmail.directory import scram
from lightmail.directory.scram import ScramProof
from lightmail.sasl import Context, Exchange, Offer, SASLError
from lightmail.sasl.scram import Scram
from lightmail.storage import schema
from tests import saslwire
from tests.inprocess import in_thread, start
from tests.saslwire import PORTS, b64, connect

USER, PASSWORD = "bob@example.test", "bob-secret"



# -- the mechanism on its own ------------------------------------------------------------

class Verifiers:
    """The directory's IScramVerifiers for one user."""

    def __init__(self, password: str, iterations: int = 4096) -> None:
        self.encoded = scram.make_verifiers(password, iterations)

    def scram_verifier(self, address: str, algorithm: str) -> Any:
        from twisted.internet.defer import succeed
        if address != USER:
            return succeed((None, None))
        return succeed(("user", scram.find_verifier(self.encoded, algorithm)))


def run(exchange: Exchange, client: scramp.ScramClient) -> tuple[Optional[ScramProof], str]:
    """Drive an exchange with scramp; the credentials it ends with, and how."""
    steps: list[Any] = []
    exchange.start(None).addBoth(steps.append)
    assert steps[-1].challenge == b""
    exchange.respond(b64(client.get_client_first())).addBoth(steps.append)
    client.set_server_first(steps[-1].challenge.decode())
    exchange.respond(b64(client.get_client_final())).addBoth(steps.append)
    step = steps[-1]
    if step.credentials is not None:            # refused: no server signature
        return step.credentials, "refused"
    client.set_server_final(step.challenge.decode())    # scramp checks v= here
    exchange.respond(b"").addBoth(steps.append)
    return steps[-1].credentials, "verified"


def exchange_of(name: str, bindings: Optional[dict[str, bytes]] = None,
                password: str = PASSWORD) -> Exchange:
    context = Context(channel_bindings=lambda: bindings or {}, verifiers=Verifiers(password),
                      secret=b"k" * 32, secure=bindings is not None, plus_offered=True)
    return Exchange(Scram(name, context))


@pytest.mark.parametrize("name", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_exchange_with_an_independent_client(name: str) -> None:
    exchange = exchange_of(name)
    credentials, how = run(exchange, scramp.ScramClient([name], USER, PASSWORD))
    assert how == "verified" and credentials is not None
    # The checker's own test (ScramChecker) passes on the proof the exchange made.
    verifier = exchange.mechanism.context.verifiers.scram_verifier(USER, name[6:]).result[1]
    assert scram.client_proof_matches(verifier, credentials.auth_message, credentials.proof)


def test_wrong_password_and_unknown_user_are_refused_alike() -> None:
    wrong, how = run(exchange_of("SCRAM-SHA-256", password="other"),
                     scramp.ScramClient(["SCRAM-SHA-256"], USER, PASSWORD))
    assert how == "refused" and wrong is not None
    salts = []
    for _ in range(2):
        exchange = exchange_of("SCRAM-SHA-256")
        exchange.start(None)
        client = scramp.ScramClient(["SCRAM-SHA-256"], "nobody@example.test", "x")
        steps: list[Any] = []
        exchange.respond(b64(client.get_client_first())).addBoth(steps.append)
        server_first = steps[-1].challenge.decode()
        salts.append(dict(item.split("=", 1) for item in server_first.split(","))["s"])
        client.set_server_first(server_first)
        exchange.respond(b64(client.get_client_final())).addBoth(steps.append)
        assert steps[-1].credentials is not None          # to the checker, which fails
    # A made-up salt, the same at every try (a new one each time would tell).
    assert salts[0] == salts[1]


def test_channel_binding_must_match() -> None:
    # (scramp has no tls-exporter: gsasl binds with it over the wire, below.)
    data = {"tls-server-end-point": b"server's view", "tls-exporter": b"exported"}
    client = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], USER, PASSWORD,
                                channel_binding=("tls-server-end-point", data[
                                    "tls-server-end-point"]))
    assert run(exchange_of("SCRAM-SHA-256-PLUS", data), client)[1] == "verified"
    forged = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], USER, PASSWORD,
                                channel_binding=("tls-server-end-point", b"a proxy's view"))
    credentials, how = run(exchange_of("SCRAM-SHA-256-PLUS", data), forged)
    assert how == "refused" and credentials is not None and credentials.proof == b""


@pytest.mark.parametrize("first", [
    "y,,n=bob@example.test,r=abc",         # could bind, thinks we cannot: a downgrade
    "p=tls-server-end-point,,n=bob@example.test,r=abc",     # binding without -PLUS
    "n,,r=abc",                             # no user
    "n,,n=bob@example.test",                # no nonce
    "n,,m=ext,n=bob@example.test,r=abc",    # mandatory extension
    "n,a=someone@else,n=bob@example.test,r=abc",
    "n,,n=bad=name,r=abc",
])
def test_malformed_or_downgraded_first_messages(first: str) -> None:
    exchange = exchange_of("SCRAM-SHA-256", {"tls-server-end-point": b"x"})
    exchange.start(None)
    steps: list[Any] = []
    exchange.respond(b64(first)).addBoth(steps.append)
    assert steps[-1].check(SASLError), first


def test_offer_names_plus_only_under_tls() -> None:
    offer = Offer(("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"))
    assert offer.names(offer.context(None, secure=False)) == ["PLAIN", "SCRAM-SHA-256"]
    assert "SCRAM-SHA-256-PLUS" in offer.names(offer.context(None, secure=True))
    assert offer.exchange("scram-sha-1", offer.context(None, secure=True)) is None


# -- over the wire ----------------------------------------------------------------------

def tls_listeners(tmp: Path) -> str:
    return saslwire.tls_listeners(tmp, "PLAIN SCRAM-SHA-256 SCRAM-SHA-256-PLUS SCRAM-SHA-1 "
                                  "SCRAM-SHA-1-PLUS")


class Wire(saslwire.Wire):
    def authenticate(self, name: str, client: Any) -> tuple[bool, str]:  # type: ignore[override]
        ok, last, _ = super().authenticate(name, saslwire.scram_answers(client))
        return ok, last


def end_point(sock: ssl.SSLSocket) -> bytes:
    """RFC 5929 tls-server-end-point as the client sees it: the server certificate
    (the tests' is signed with SHA-256) hashed with SHA-256."""
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).digest()


@pytest_twisted.inlineCallbacks
def test_scram_over_smtp_imap_and_pop3(tmp_path: Path) -> None:
    server = yield start(tmp_path, tls_listeners(tmp_path))
    try:
        def attempts() -> list[tuple[str, str, bool, str]]:
            out = []
            for protocol, listener in PORTS.items():
                for name in ("SCRAM-SHA-256", "SCRAM-SHA-1", "SCRAM-SHA-256-PLUS"):
                    for password in (PASSWORD, "wrong"):
                        sock = connect(server.ports[listener])
                        binding = ("tls-server-end-point", end_point(sock)) \
                            if name.endswith("PLUS") else None
                        client = scramp.ScramClient([name], USER, password,
                                                    channel_binding=binding)
                        wire = Wire(protocol, sock)
                        try:
                            ok, last = wire.authenticate(name, client)
                        except scramp.ScramException as exc:
                            ok, last = False, f"client refused: {exc}"
                        out.append((protocol, name, password == PASSWORD and ok, last))
                        if password != PASSWORD:
                            assert not ok, (protocol, name, last)
                        wire.close()
            return out
        results = yield in_thread(attempts)
        good = [(p, n, last) for p, n, ok, last in results if ok]
        assert len(good) == 9, results
    finally:
        yield server.stop()


def gsasl(port: int, protocol: str, mechanism: str, password: str, ca: Path) -> tuple[int, str]:
    """GNU SASL's command-line client (Debian's gsasl: GnuTLS under it) logging in over
    STARTTLS, binding to the channel itself where the mechanism is -PLUS."""
    result = subprocess.run(
        ["gsasl", f"--connect=127.0.0.1:{port}", f"--{protocol}", "--starttls",
         f"--x509-ca-file={ca}", "-m", mechanism, "-a", USER, "-p", password]
        # gsasl 2.2 fails the plain SCRAM forms on its own side when it has binding
        # data (against Dovecot too): those run without.
        + ([] if mechanism.endswith("-PLUS") else ["--no-cb"]),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return result.returncode, result.stdout + result.stderr


@pytest_twisted.inlineCallbacks
def test_gsasl_logs_in_with_every_scram_form_over_imap_and_smtp(tmp_path: Path) -> None:
    assert shutil.which("gsasl"), "gsasl is missing: scripts/test-peers.sh installs it"
    tls = f"tls_cert = {tmp_path / 'cert.pem'}\ntls_key = {tmp_path / 'key.pem'}\n"
    server = yield start(tmp_path, tls_listeners(tmp_path)
                         + "[listener:imap]\nprotocol = imap\n"
                         "endpoint = tcp:0:interface=127.0.0.1\ntls = starttls\n" + tls)
    try:
        runs = {}
        for protocol, listener in (("imap", "imap"), ("smtp", "submission")):
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1",
                              "SCRAM-SHA-1-PLUS"):
                for password in (PASSWORD, "wrong"):
                    runs[protocol, mechanism, password] = yield in_thread(
                        gsasl, server.ports[listener], protocol, mechanism, password,
                        tmp_path / "cert.pem")
        for (protocol, mechanism, password), (code, output) in runs.items():
            assert (code == 0) == (password == PASSWORD), (protocol, mechanism, output)
    finally:
        yield server.stop()


class TLSProxy:
    """A man in the middle of the test's own making: ends the client's TLS with its
    own certificate and opens another TLS connection to the server."""

    def __init__(self, upstream: int, cert: Path, key: Path) -> None:
        self.upstream = upstream
        self.server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_side.load_cert_chain(cert, key)
        self.client_side = ssl.create_default_context()
        self.client_side.check_hostname, self.client_side.verify_mode = False, ssl.CERT_NONE
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            inside = self.server_side.wrap_socket(raw, server_side=True)
            outside = self.client_side.wrap_socket(
                socket.create_connection(("127.0.0.1", self.upstream)))
            for source, sink in ((inside, outside), (outside, inside)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: ssl.SSLSocket, sink: ssl.SSLSocket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


@pytest_twisted.inlineCallbacks
def test_channel_binding_fails_across_a_man_in_the_middle(tmp_path: Path) -> None:
    """Through a TLS proxy the client sees the proxy's certificate: SCRAM without
    binding still logs in (the proxy learns no password, but sits in the middle),
    SCRAM-SHA-256-PLUS is refused, as are the proxy's later tries with the session."""
    server = yield start(tmp_path, tls_listeners(tmp_path))
    write_self_signed(tmp_path / "proxy.pem", tmp_path / "proxy.key", "mx.example.test")
    proxy = TLSProxy(server.ports["imaps"], tmp_path / "proxy.pem", tmp_path / "proxy.key")
    try:
        def through_proxy(name: str) -> tuple[bool, str]:
            sock = connect(proxy.port)
            binding = ("tls-server-end-point", end_point(sock)) \
                if name.endswith("PLUS") else None
            wire = Wire("imap", sock)
            try:
                return wire.authenticate(name, scramp.ScramClient(
                    [name], USER, PASSWORD, channel_binding=binding))
            finally:
                wire.close()
        plain = yield in_thread(through_proxy, "SCRAM-SHA-256")
        bound = yield in_thread(through_proxy, "SCRAM-SHA-256-PLUS")
        assert plain[0], plain
        assert not bound[0] and "AUTHENTICATIONFAILED" in bound[1], bound
    finally:
        proxy.close()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_keys_are_made_at_the_next_password_login_of_an_older_user(tmp_path: Path) -> None:
    """A user whose password was set before SCRAM (no keys stored) cannot use SCRAM
    until a password login (PLAIN) makes the keys; then SCRAM works."""
    server = yield start(tmp_path, tls_listeners(tmp_path))
    try:
        engine = server.parts.storage.db.engine
        yield in_thread(_forget_keys, engine)

        def scram_login() -> bool:
            wire = Wire("imap", connect(server.ports["imaps"]))
            try:
                return wire.authenticate("SCRAM-SHA-256", scramp.ScramClient(
                    ["SCRAM-SHA-256"], USER, PASSWORD))[0]
            finally:
                wire.close()

        def plain_login() -> str:
            wire = Wire("imap", connect(server.ports["imaps"]))
            try:
                plain = b64(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())
                wire.send(f"a AUTHENTICATE PLAIN {plain}")
                return wire.line()
            finally:
                wire.close()
        assert not (yield in_thread(scram_login))
        assert (yield in_thread(plain_login)).startswith("a OK")
        for _ in range(100):                   # made in the background after the login
            if (yield in_thread(_keys_of, engine)):
                break
            yield in_thread(time.sleep, 0.05)
        assert (yield in_thread(scram_login))
    finally:
        yield server.stop()


def _forget_keys(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(schema.users).values(scram_verifiers=None))


def _keys_of(engine: Any) -> Optional[str]:
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.users.c.scram_verifiers).where(
            schema.users.c.localpart == "bob")).scalar()
