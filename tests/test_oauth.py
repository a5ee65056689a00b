"""OAUTHBEARER (RFC 7628) and XOAUTH2 with JWTs made here with keys from
``cryptography``: good tokens log in over IMAP, SMTP and POP3; expired, wrong audience,
wrong issuer, wrong key, ``alg: none``, HMAC signed with the public key, another user's
token and an unknown user are refused after the RFC's error challenge; the issuer's
keys come from a file or from a URL, fetched again when a token names a new key."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from lightmail.config import ConfigError, parse_config
from tests.inprocess import in_thread, start
from tests.saslwire import PORTS, Wire, connect, tls_listeners

ISSUER, AUDIENCE = "https://id.example.test", "lightmail-test"
USER = "bob@example.test"


class Issuer:
    """Signing keys and their JWK Set."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {"rsa1": rsa.generate_private_key(65537, 2048),
                                     "ec1": ec.generate_private_key(ec.SECP256R1())}

    def jwks(self) -> str:
        keys = []
        for kid, key in self.keys.items():
            algorithm = jwt.algorithms.RSAAlgorithm if kid.startswith("rsa") \
                else jwt.algorithms.ECAlgorithm
            jwk = json.loads(algorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig"})
        return json.dumps({"keys": keys})

    def token(self, kid: str = "rsa1", lifetime: float = 300, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "email": USER, "iat": now,
                "exp": now + lifetime, **claims}
        algorithm = "RS256" if kid.startswith("rsa") else "ES256"
        return jwt.encode(body, self.keys[kid], algorithm=algorithm, headers={"kid": kid})


def oauth_config(tmp: Path, jwks: str) -> str:
    # Ten refused tokens from one address in a row: the guard against guessing would
    # hold each answer back up to 15 s (tests/test_logins.py tests it).
    return (tls_listeners(tmp, "PLAIN OAUTHBEARER XOAUTH2") +
            "login_max_delay = 0s\n"
            f"[oauth]\nissuer = {ISSUER}\naudience = {AUDIENCE}\njwks = {jwks}\n"
            "jwks_refresh = 1h\n")


def xoauth2(user: str, token: str) -> Any:
    def answer(challenge: Optional[bytes]) -> bytes:
        if challenge is None:
            return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
        return b""                      # after the error challenge
    return answer


def oauthbearer(user: str, token: str) -> Any:
    def answer(challenge: Optional[bytes]) -> bytes:
        if challenge is None:
            authzid = f"a={user}" if user else ""
            return f"n,{authzid},\x01host=mx\x01port=993\x01auth=Bearer {token}\x01\x01" \
                .encode()
        return b"\x01"                  # RFC 7628 §3.2.3: the dummy response
    return answer


def login(port: int, protocol: str, mechanism: str, answer: Any) -> tuple[bool, str, list]:
    wire = Wire(protocol, connect(port))
    try:
        return wire.authenticate(mechanism, answer)
    finally:
        wire.close()


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


@pytest_twisted.inlineCallbacks
def test_bearer_tokens_over_imap_smtp_and_pop3(tmp_path: Path, issuer: Issuer) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(issuer.jwks())
    server = yield start(tmp_path, oauth_config(tmp_path, str(jwks)))
    try:
        yield server.parts.directory.add_user("off@example.test", "x")
        yield server.parts.directory.set_enabled("off@example.test", False)
        good = issuer.token()

        def run() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for protocol, listener in PORTS.items():
                port = server.ports[listener]
                out[protocol, "XOAUTH2"] = login(port, protocol, "XOAUTH2",
                                                 xoauth2(USER, good))
                out[protocol, "OAUTHBEARER"] = login(port, protocol, "OAUTHBEARER",
                                                     oauthbearer(USER, issuer.token("ec1")))
            port = server.ports["imaps"]
            public = issuer.keys["rsa1"].public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            impostor = rsa.generate_private_key(65537, 2048)
            bad = {
                "expired": issuer.token(lifetime=-120),
                "audience": issuer.token(aud="someone-else"),
                "issuer": issuer.token(iss="https://evil.example"),
                "wrong key": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "email": USER,
                                         "exp": int(time.time()) + 300}, impostor,
                                        algorithm="RS256", headers={"kid": "rsa1"}),
                "alg none": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "email": USER,
                                        "exp": int(time.time()) + 300}, None,
                                       algorithm="none", headers={"kid": "rsa1"}),
                "hmac with the public key": _hmac_token(public),
                "unknown user": issuer.token(email="nobody@example.test"),
                "disabled user": issuer.token(email="off@example.test"),
                "not a jwt": "abc.def",
            }
            for name, token in bad.items():
                out["bad", name] = login(port, "imap", "OAUTHBEARER", oauthbearer("", token))
            # A good token of bob's offered as someone else's.
            out["bad", "other user"] = login(port, "imap", "XOAUTH2",
                                             xoauth2("off@example.test", good))
            return out
        out = yield in_thread(run)
        for protocol in PORTS:
            for mechanism in ("XOAUTH2", "OAUTHBEARER"):
                ok, last, challenges = out[protocol, mechanism]
                assert ok and not challenges, (protocol, mechanism, last)
        for (kind, name), (ok, last, challenges) in out.items():
            if kind != "bad":
                continue
            assert not ok, (name, last)
            # A token good in itself, for a user that is not ours (or not this one):
            # no error challenge, the checker says no.
            if name not in ("other user", "unknown user", "disabled user"):
                assert challenges, (name, last)
                status = json.loads(challenges[0])["status"]
                assert status in ("invalid_token", "401"), (name, challenges)
    finally:
        yield server.stop()


def _hmac_token(public_pem: bytes) -> str:
    """The classic confusion: an HS256 token keyed with the issuer's public key."""
    import base64
    import hashlib
    import hmac

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    head = part({"alg": "HS256", "typ": "JWT", "kid": "rsa1"})
    body = part({"iss": ISSUER, "aud": AUDIENCE, "email": USER, "exp": int(time.time()) + 300})
    signature = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


class JWKSServer:
    """The issuer's jwks_uri: serves whatever ``jwks`` holds now, counts fetches."""

    def __init__(self, jwks: str) -> None:
        self.jwks, self.fetches = jwks, 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = owner.jwks.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server(issuer: Issuer) -> Iterator[JWKSServer]:
    served = JWKSServer(issuer.jwks())
    yield served
    served.close()


@pytest_twisted.inlineCallbacks
def test_keys_from_a_url_are_cached_and_fetched_again_for_a_new_key(
        tmp_path: Path, issuer: Issuer, jwks_server: JWKSServer) -> None:
    server = yield start(tmp_path, oauth_config(tmp_path, jwks_server.url))
    try:
        def run() -> list[bool]:
            port = server.ports["imaps"]
            results = [login(port, "imap", "XOAUTH2", xoauth2(USER, issuer.token()))[0]
                       for _ in range(3)]
            # The issuer rotates: a new key, published, then used.
            issuer.keys["rsa2"] = rsa.generate_private_key(65537, 2048)
            jwks_server.jwks = issuer.jwks()
            results.append(login(port, "imap", "XOAUTH2",
                                 xoauth2(USER, issuer.token("rsa2")))[0])
            return results
        assert (yield in_thread(run)) == [True, True, True, True]
        assert jwks_server.fetches == 2        # once, then once for the new key
    finally:
        yield server.stop()


def test_offering_bearer_mechanisms_needs_an_issuer_and_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[oauth\] issuer is not set"):
        parse_config("[directory]\nmechanisms = PLAIN XOAUTH2\n", "x.conf")
    with pytest.raises(ConfigError, match="none and HMAC"):
        parse_config("[directory]\nmechanisms = OAUTHBEARER\n[oauth]\nissuer = x\n"
                     "jwks = /k\nalgorithms = RS256 HS256\n", "x.conf")
