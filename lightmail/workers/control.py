"""The AMP commands between the main process and its workers (AMP is the one scheme
between LightMail's processes: lightmail.storage.wire).

Worker to main: Admit/LoggedIn/Release (connection limits), Login/Logout (IMAP sessions per
user), ClaimRecent (\\Recent), Lock/Unlock (POP3 maildrops), Kick (the queue has
work), Ready.  Main to worker: Scrape (metrics), Reload/Commit (a reloaded
configuration: lightmail.reload).  Both ways: Changed (a committed mailbox change,
relayed to the other workers).  Commands without an answer are notices: nothing
waits for them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from lightmail.pop3.maildrop import LockUnavailable, LoginTooSoon, MaildropLocked
from lightmail.storage import wire
from lightmail.storage.interfaces import MailboxChange

# AMP values are at most 65,535 bytes; a change whose messages do not fit goes without
# them, and the sessions that hear of it read the store instead.  One whose UIDs do
# not fit either (a COPY of 300,000 messages) goes without those too: it could not be
# sent at all, and the other workers' sessions did not hear of it.
MAX_CHANGE = 60_000
# Messages past which a change is not even tried with them (encoding 300,000 took
# 0.7 s of the reactor, only to be dropped for their size).
MAX_MESSAGES = 400


def encode_change(change: MailboxChange) -> bytes:
    """A change as declared records (lightmail.storage.wire), encoded once for all the
    workers it is relayed to."""
    if len(change.messages) > MAX_MESSAGES:
        change = replace(change, messages=())
    data = wire.encode(change)
    if len(data) > MAX_CHANGE:
        data = wire.encode(replace(change, messages=()))
    if len(data) > MAX_CHANGE:
        data = wire.encode(replace(change, messages=(), uids=()))
    return data


def decode_change(data: bytes) -> MailboxChange:
    change = wire.decode(data)
    if not isinstance(change, MailboxChange):
        raise TypeError("not a mailbox change")
    return change


class Ready(amp.Command):
    arguments = [(b"pid", amp.Integer())]
    response = []  # type: ignore[var-annotated]


class Admit(amp.Command):
    arguments = [(b"listener", amp.Unicode()), (b"host", amp.Unicode())]
    # "" when admitted; kind: why not (listeners.CONNECTIONS, MEMORY...).
    response = [(b"refusal", amp.Unicode()), (b"kind", amp.Unicode(optional=True))]


class Release(amp.Command):
    arguments = [(b"listener", amp.Unicode()), (b"host", amp.Unicode()),
                 (b"logged_in", amp.Boolean())]
    requiresAnswer = False


class LoggedIn(amp.Command):
    """A connection admitted on ``listener`` from ``host`` has logged in: it no longer
    counts against the listener's max_unauthenticated."""

    arguments = [(b"listener", amp.Unicode()), (b"host", amp.Unicode())]
    requiresAnswer = False


class Login(amp.Command):
    arguments = [(b"user", amp.Integer()), (b"limit", amp.Integer())]
    response = [(b"ok", amp.Boolean())]


class Logout(amp.Command):
    arguments = [(b"user", amp.Integer())]
    requiresAnswer = False


class ClaimRecent(amp.Command):
    arguments = [(b"mailbox", amp.Integer()), (b"uidnext", amp.Integer()),
                 (b"claim", amp.Boolean())]
    response = [(b"first", amp.Integer())]


class Lock(amp.Command):
    arguments = [(b"user", amp.Integer()), (b"login_delay", amp.Float())]
    response = []  # type: ignore[var-annotated]
    errors = {MaildropLocked: b"LOCKED", LoginTooSoon: b"TOO_SOON",
              LockUnavailable: b"UNAVAILABLE"}


class Unlock(amp.Command):
    # Answered: QUIT's +OK waits for it, so that a client that logs in again at once,
    # through another worker, finds the maildrop free.
    arguments = [(b"user", amp.Integer())]
    response = []  # type: ignore[var-annotated]


class Kick(amp.Command):
    arguments = []  # type: ignore[var-annotated]
    requiresAnswer = False


class Scrape(amp.Command):
    """The worker's metrics (lightmail.metrics.federation's encoding), a part at a
    time: an AMP value holds at most 65,535 bytes.  Part 0 takes the snapshot."""

    arguments = [(b"part", amp.Integer())]
    response = [(b"data", amp.String()), (b"parts", amp.Integer())]


#: Bytes of a snapshot in one Scrape answer.
SCRAPE_PART = 60_000


class Reload(amp.Command):
    """The main process reloaded its configuration file: read its text, check it and
    get ready, but do not switch until Commit.  The text comes a part at a time (an
    AMP value holds at most 65,535 bytes), ``last`` on the final one; the answer to
    it is the error that stops the reload here, or ''."""

    arguments = [(b"generation", amp.Integer()), (b"text", amp.String()),
                 (b"last", amp.Boolean())]
    response = [(b"error", amp.Unicode())]


class Commit(amp.Command):
    """Switch to the configuration of Reload ``generation`` (every process is ready)."""

    arguments = [(b"generation", amp.Integer())]
    response = []  # type: ignore[var-annotated]


#: Bytes of a configuration's text in one Reload.
RELOAD_PART = 60_000


class Changed(amp.Command):
    arguments = [(b"change", amp.String())]
    requiresAnswer = False


def ask(proto: amp.AMP, command: type[amp.Command], **kwargs: Any) -> Deferred[Any]:
    """callRemote; a connection that is gone fails the Deferred rather than raise."""
    return maybeDeferred(proto.callRemote, command, **kwargs)


def notify(proto: amp.AMP, command: type[amp.Command], **kwargs: Any) -> None:
    """Send a notice (a command without an answer), unless the connection is gone:
    then the other side has let go of everything anyway."""
    if proto.transport is not None:
        proto.callRemote(command, **kwargs)


class Link(amp.AMP):
    """AMP without its connection log lines (the pool logs workers coming and going)."""

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Any = None) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class OneProtocol(Factory):
    """The factory of one connection made already (adoptStreamConnection)."""

    noisy = False

    def __init__(self, proto: amp.AMP) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> amp.AMP:
        return self.proto
