"""The server the fuzzer talks to, built once per run and shared by every input.

The same objects ``makeService`` builds (``wire(config, Role.SERVER)`` and each
listener's protocol factory from ``listeners.builder_for``), on SQLite and blobs in a
temporary directory, with one domain, one user with a known password, an alias to a
remote address and a few messages in the INBOX.  Nothing listens: sessions are made
with ``factory.buildProtocol`` and talk over ``StringTransport`` (``play.py``).

Each protocol has a second factory, ``NAME/strict``, for the same listener with
``[directory] auth_over_plaintext = no``: the refusals of a session without TLS are
fuzzed too, not only the paths after login.

Limits are set lower than the defaults (1 MiB messages and literals) so that inputs
reach them, and so that memory stays small while a run lasts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from twisted.internet import defer

from lightmail.config import parse_config
from lightmail.listeners import builder_for
from lightmail.wiring import Role, Services, wire

USER, PASSWORD = "bob@example.test", "bob-secret"
# Recreated every so many inputs: APPEND, COPY, SMTP and LMTP add messages, CREATE
# adds mailboxes, and a mailbox that grows for a million inputs makes later inputs
# slower for reasons that have nothing to do with them.
RESET_EVERY = 200
# ...and as soon as their mail takes more than this: repeated "COPY 1:* INBOX" doubles
# a mailbox each time, and some inputs grew it to 295,000 messages within the 200.
# Mailboxes that size are tested on their own (tests/test_imap_large_mailbox.py).
RESET_USAGE = 4 * 1024 * 1024

LISTENERS = {
    "smtp": "smtp", "submission": "submission", "lmtp": "lmtp", "pop3": "pop3",
    "imap": "imap",
}
CONFIG = """\
[server]
state_dir = {state}
hostname = mx.example.test
shutdown_timeout = 1s
[directory]
auth_over_plaintext = yes
# Every input comes from the same address: failed logins held back and then
# locked out would make the run wait, and the later inputs never log in.
login_max_delay = 0s
lockout_after = 0
account_lockout_after = 0
[smtp]
max_message_size = 1M
[imap]
max_literal = 1M
max_line_length = 8192
""" + "".join(f"[listener:{name}]\nprotocol = {protocol}\nendpoint = tcp:0\n"
              for name, protocol in LISTENERS.items())

SEED = [
    b"From: Ann <ann@example.org>\r\nTo: bob@example.test\r\nSubject: plain\r\n"
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\nMessage-ID: <1@example.org>\r\n\r\n"
    b"Hello Bob.\r\n.\r\n..leading dot\r\n",
    b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org>\r\nTo: bob@example.test\r\n"
    b"Subject: parts\r\nMIME-Version: 1.0\r\nReferences: <1@example.org>\r\n"
    b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: "
    b"quoted-printable\r\n\r\ncaf=C3=A9\r\n--b1\r\nContent-Type: application/"
    b"octet-stream; name=x.bin\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAwQF/w==\r\n"
    b"--b1\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n"
    b"--b1--\r\n",
    b"Subject: no from, bare LF\nX-Long: " + b"x" * 1200 + b"\n\nbody\n",
]


@dataclasses.dataclass
class World:
    services: Services
    #: Listener name (and NAME/strict) -> its protocol factory.
    factories: dict[str, Any]
    inputs: int = 0

    @property
    def pools(self) -> list[Any]:
        """The thread pools storage work runs in (``play.drain`` waits for them)."""
        return [self.services.storage.db.pool, self.services.storage.io_pool]

    @defer.inlineCallbacks
    def counted(self) -> Any:
        """One more input: every RESET_EVERY, or once the user's mail takes more than
        RESET_USAGE, the user starts over."""
        self.inputs += 1
        user = yield self.services.directory.get_user(USER)
        used = (yield self.services.mailstore.usage(user.id)) if user is not None else 0
        if self.inputs % RESET_EVERY == 0 or used > RESET_USAGE:
            yield self.services.directory.remove_user(USER)
            yield add_user(self.services)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.services.storage.stopService()


@defer.inlineCallbacks
def add_user(services: Services) -> Any:
    yield services.directory.add_user(USER, PASSWORD)
    user = yield services.directory.get_user(USER)
    inbox = yield services.mailstore.get_or_create_mailbox(user.id, "INBOX")
    for content in SEED:
        blob = yield services.blobs.put(content)
        yield services.mailstore.append(inbox.id, blob)
    yield services.mailstore.create_mailbox(user.id, "lists")


def cheap_passwords() -> None:
    """argon2 with the least work it takes (one pass over 1 MiB) instead of RFC 9106's
    profile: a wrong password or an unknown user in an input costs its verification,
    60 ms of CPU by design, and mutated inputs are full of them.  The module's hasher
    is replaced because no setting chooses it (a test reaching in, on purpose)."""
    from argon2 import PasswordHasher

    from lightmail.directory import passwords
    passwords._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    passwords._DUMMY_HASH = passwords._hasher.hash("not a real password")


@defer.inlineCallbacks
def build(tmp: Path) -> Any:
    """The started storage, the directory's contents and every factory: a World."""
    cheap_passwords()
    config = parse_config(CONFIG.format(state=tmp / "state"), str(tmp / "fuzz.conf"))
    services = wire(config, Role.SERVER)
    services.storage.startService()
    yield services.storage.ready
    yield services.directory.add_domain("example.test")
    yield services.directory.add_alias("postmaster@example.test", USER)
    yield services.directory.add_alias("outside@example.test", "friend@remote.example")
    yield add_user(services)
    strict_config = dataclasses.replace(
        config, directory=dataclasses.replace(config.directory, auth_over_plaintext=False))
    strict = dataclasses.replace(services, config=strict_config)
    factories = {}
    for listener in config.listeners:
        build_factory = builder_for(listener.protocol)
        factories[listener.name] = build_factory(listener, services)
        factories[listener.name + "/strict"] = build_factory(listener, strict)
    return World(services, factories)
