"""A worker's side of the shared state: each asks the main process (control.py).

:class:`WorkerHub` is the IMAP hub of a worker: its own sessions' watchers, with the
per-user counts and \\Recent claims kept by the main process; :class:`RemoteLocks`
holds POP3 maildrops there; :class:`Admission` makes a connection wait for the main
process's word on the listener's limits before it is greeted.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.imap.hub import MailboxHub
from lightmail.listeners import (
    CONNECTIONS,
    SHUTTING_DOWN,
    ConnectionLimits,
    Handover,
    Refusal,
    TrackedProtocol,
    TrackingFactory,
)
from lightmail.pop3.maildrop import Locks
from lightmail.queue.interfaces import IQueueKick
from lightmail.storage.interfaces import IChangeListener, MailboxChange
from lightmail.workers import control


class WorkerHub(MailboxHub):
    announced_late = True

    def __init__(self, link: amp.AMP) -> None:
        super().__init__()
        self.link = link

    def peek_recent(self, mailbox_id: int, uidnext: int) -> defer.Deferred[int]:
        return self._recent(mailbox_id, uidnext, False)

    def claim_recent(self, mailbox_id: int, uidnext: int) -> defer.Deferred[int]:
        return self._recent(mailbox_id, uidnext, True)

    def _recent(self, mailbox_id: int, uidnext: int, claim: bool) -> defer.Deferred[int]:
        d = control.ask(self.link, control.ClaimRecent, mailbox=mailbox_id, uidnext=uidnext,
                                 claim=claim)
        return d.addCallback(lambda answer: answer["first"])

    def login(self, user_id: int, limit: int) -> defer.Deferred[bool]:
        d = control.ask(self.link, control.Login, user=user_id, limit=limit)
        return d.addCallback(lambda answer: answer["ok"])

    def logout(self, user_id: int) -> None:
        control.notify(self.link, control.Logout, user=user_id)


@implementer(IChangeListener)
class ChangePublisher:
    """Tells the main process of every change this worker's store commits."""

    def __init__(self, link: amp.AMP) -> None:
        self.link = link

    def mailbox_changed(self, change: MailboxChange) -> None:
        control.notify(self.link, control.Changed, change=control.encode_change(change))


class RemoteLocks(Locks):
    def __init__(self, link: amp.AMP) -> None:
        super().__init__()
        self.link = link

    def acquire(self, user_id: int, login_delay: float) -> defer.Deferred[None]:
        d = control.ask(self.link, control.Lock, user=user_id, login_delay=login_delay)
        return d.addCallback(lambda _: None)

    def release(self, user_id: int) -> defer.Deferred[None]:
        if self.link.transport is None:
            # The main process is gone: it let go of everything this worker held.
            return defer.succeed(None)
        d = control.ask(self.link, control.Unlock, user=user_id)
        # A link lost meanwhile: the main process lets go of this worker's locks.
        return d.addCallbacks(lambda _: None, lambda _: None)


@implementer(IQueueKick)
class RemoteKick:
    """Stands in for the queue runner (which runs in the main process): ``kick()``."""

    def __init__(self, link: amp.AMP) -> None:
        self.link = link

    def kick(self) -> None:
        control.notify(self.link, control.Kick)


class Admission(Handover):
    """A connection waiting for the main process to admit it under the listener's
    limits (after this worker's own screen: the address's failed commands); then the
    real protocol (or the listener's refusal) takes over, and what the client sent
    meanwhile is passed on."""

    log = Logger()

    def __init__(self, factory: AdmittingFactory, addr: Any) -> None:
        super().__init__()
        self.admitting = factory
        self.addr = addr
        self.host = getattr(addr, "host", "") or "local"
        self.session: Optional[TrackedProtocol] = None    # the admitted one
        self.admitted = False

    def connectionMade(self) -> None:
        inner = self.admitting.inner
        if inner.draining:
            self.take_over(inner.refuse(self.addr, "shutting down", SHUTTING_DOWN))
            return
        d = defer.maybeDeferred(inner.screen, self.host)
        d.addCallbacks(self._screened, self._failed)

    def _screened(self, refusal: Optional[Refusal]) -> None:
        if self.lost:
            return
        if refusal is not None:
            self.take_over(self.admitting.inner.refuse(self.addr, refusal.text,
                                                       refusal.kind))
            return
        d = control.ask(self.admitting.link, control.Admit, listener=self.admitting.name,
                        host=self.host)
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, answer: dict[str, Any]) -> None:
        refusal = answer["refusal"]
        if not refusal:
            self.admitted = True
        if self.lost:
            self._release()
            return
        inner = self.admitting.inner
        if refusal:
            self.take_over(inner.refuse(self.addr, refusal,
                                        answer.get("kind") or CONNECTIONS))
        else:
            self.session = inner.admitted(self.addr, self.host)
            self.take_over(inner.tap(self.session))

    def _failed(self, failure: Failure) -> None:
        self.log.warn("no admission from the main process: {error}",
                      error=failure.getErrorMessage())
        if not self.lost and self.transport is not None:
            self.take_over(self.admitting.inner.refuse(self.addr, "shutting down",
                                                       SHUTTING_DOWN))

    def ended(self) -> None:
        self._release()

    def _release(self) -> None:
        if self.admitted:
            self.admitted = False
            logged_in = self.session is not None and self.session.logged_in
            control.notify(self.admitting.link, control.Release,
                           listener=self.admitting.name, host=self.host,
                           logged_in=logged_in)


@implementer(IProtocolFactory)
class AdmittingFactory(Factory):
    """Wraps a listener's factory in a worker: its own limits are lifted (the main
    process applies them to all workers at once) and each connection is admitted
    first."""

    noisy = False

    def __init__(self, name: str, inner: TrackingFactory, link: amp.AMP) -> None:
        self.name = name
        self.inner = inner
        self.link = link
        inner.limits = ConnectionLimits(sys.maxsize, sys.maxsize)
        inner.on_login = self._logged_in

    def _logged_in(self, proto: TrackedProtocol) -> None:
        control.notify(self.link, control.LoggedIn, listener=self.name,
                       host=proto.peer_host)

    def buildProtocol(self, addr: Any) -> Protocol:
        return Admission(self, addr)
