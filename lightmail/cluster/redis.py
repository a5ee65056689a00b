"""LightMail's connections to Redis (txredisapi), for everything that shares state in it:
the cluster's IMAP hub and POP3 locks (lightmail.cluster), the rate limits' buckets,
greylisting's triplets and the login guard's failure counts.

* :class:`LazyRedis`: a connection pool made at the first question (the ``lightmail``
  command, which asks nothing, never connects), over the link (user, password, TLS)
  lightmail.cluster.redislink makes.  Every question is a Lua script
  (``eval``): what must be atomic is, and a node's view is never half-updated.
* :class:`SharedBackend`: each question gets a deadline, and the log says once that
  Redis stopped answering (and what is done meanwhile), then once that it is back.
* :class:`Subscription`: one connection that listens on a pub/sub channel, connected
  again (with back-off) whenever it is lost, or silent (it is PINGed regularly: a
  Redis gone without a word, or a network that drops everything, is noticed); each
  time it is subscribed again the owner is told, so that it can read what it may
  have missed.

While Redis is down a txredisapi question waits for the connection to come back rather
than fail: whoever asks must give it a deadline (SharedBackend does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.cluster.redislink import (
    LinkStart,
    LinkWatch,
    RedisLink,
    WatchedFactory,
    connection_pool,
)

__all__ = ["LazyRedis", "RedisLink", "SharedBackend", "Subscription"]

log = Logger(namespace="lightmail.redis")


class LazyRedis:
    """A txredisapi connection pool to one Redis (:class:`RedisLink`: where, as whom,
    over TLS or not), made at the first call.

    ``poolsize`` 1 keeps the questions in the order they were asked (txredisapi sends
    each on any free connection of a pool)."""

    def __init__(self, link: RedisLink, poolsize: int = 4, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.link = link
        self.poolsize = poolsize
        self.reactor = reactor
        #: Why the connections fail, said once (and kept: see :attr:`trouble`).
        self.watch = LinkWatch(link)
        self._pool: Any = None

    @property
    def trouble(self) -> str:
        """Why the last connection failed ("" when it worked): a TLS handshake's
        reason, a refused AUTH, a refused connection."""
        return self.watch.trouble

    def eval(self, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        if self._pool is None:
            # A refused AUTH or SELECT stops the pool's connecting: the next
            # disconnect() lets a new pool try.
            self._pool = connection_pool(self.link, self.poolsize, self.watch, self.reactor)
        result: Deferred[Any] = self._pool.eval(script, keys=keys, args=args)
        return result

    def disconnect(self) -> Deferred[Any]:
        """Close the pool; the next question makes a new one (a pool whose connection
        stopped answering is dropped so)."""
        if self._pool is None:
            return defer.succeed(None)
        pool, self._pool = self._pool, None
        result: Deferred[Any] = pool.disconnect()
        return result


class SharedBackend:
    """What a process knows of a shared backend (Redis) it falls back from: each
    question gets ``timeout`` seconds, and the log says once that the backend
    stopped answering (and what is done meanwhile) and once that it is back, not
    once per message."""

    def __init__(self, what: str, meanwhile: str, timeout: float = 0.5,
                 clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor
            clock = reactor
        self.what = what                # "rate limits", for the log
        self.meanwhile = meanwhile      # what is done while it is down, for the log
        self.timeout = timeout
        self.clock = clock
        self.down = False

    def ask(self, question: Deferred[Any], fallback: Callable[[], Any]) -> Deferred[Any]:
        """``question``'s answer, or ``fallback()``'s when it fails or is late."""
        question.addTimeout(self.timeout, self.clock)

        def answered(value: Any) -> Any:
            if self.down:
                self.down = False
                log.info("{what}: the shared backend answers again", what=self.what)
            return value

        def failed(failure: Any) -> Any:
            if not self.down:
                self.down = True
                error = (f"no answer within {self.timeout:g}s"
                         if failure.check(defer.TimeoutError) else failure.getErrorMessage())
                log.warn("{what}: the shared backend does not answer ({error}); "
                         "{meanwhile} until it does", what=self.what, error=error,
                         meanwhile=self.meanwhile)
            return fallback()
        return question.addCallbacks(answered, failed)


class Subscription:
    """Listens on ``channel`` of the Redis at ``address``: each message's payload goes
    to ``heard``; ``subscribed`` is called each time the subscription is (again) in
    place, after the first time too.  Started by :meth:`start`, ended by :meth:`stop`.

    Every ``keepalive`` seconds the connection is PINGed; one that does not answer
    within ``timeout`` seconds (nor to SUBSCRIBE) is dropped and made again."""

    def __init__(self, link: RedisLink, channel: str,
                 heard: Callable[[bytes], None], subscribed: Callable[[], None],
                 keepalive: float = 10.0, timeout: float = 2.0, clock: Any = None,
                 watch: LinkWatch | None = None) -> None:
        """``watch``: the LinkWatch of the pool to the same Redis, for its failures
        to be said once for both (a new one without it)."""
        if clock is None:
            from twisted.internet import reactor
            clock = reactor
        self.link = link                # its db is not used: channels know none
        self.watch = watch if watch is not None else LinkWatch(link)
        self.channel = channel
        self.heard = heard
        self.subscribed = subscribed
        self.keepalive = keepalive
        self.timeout = timeout
        self.clock = clock
        self.listening = False
        self._factory: Any = None
        self._conn: Any = None
        self._pings: Any = None
        self._pinging = False

    def start(self) -> None:
        import txredisapi
        subscription = self

        class Listener(LinkStart, txredisapi.SubscriberProtocol):     # type: ignore[misc]
            def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
                payload = message.encode() if isinstance(message, str) else message
                try:
                    subscription.heard(payload)
                except Exception:
                    log.failure("a message on {channel} could not be taken",
                                channel=subscription.channel)

            def connectionLost(self, why: Any) -> None:
                if subscription._conn is self:
                    subscription._conn = None
                if subscription.listening:
                    subscription.listening = False
                    log.warn("Redis: the subscription to {channel} is lost; connecting "
                             "again", channel=subscription.channel)
                super().connectionLost(why)

        class Factory(WatchedFactory, txredisapi.SubscriberFactory):  # type: ignore[misc]
            protocol = Listener

            def addConnection(self, conn: Any) -> None:
                super().addConnection(conn)
                if conn.connected:
                    subscription._listen(conn)

        factory = Factory(isLazy=True)
        factory.link_watch = self.watch
        factory.password = self.link.password or None
        factory.username = self.link.user or None
        factory.deferred.addErrback(lambda _: None)     # a refused AUTH: the watch said it
        factory.startConnecting(self.link.endpoint(self.clock, self.timeout, self.watch))
        self._factory = factory
        self._pings = task.LoopingCall(self._ping)
        self._pings.clock = self.clock
        self._pings.start(self.keepalive, now=False)

    def _listen(self, conn: Any) -> None:
        self._conn = conn
        d = conn.subscribe(self.channel)
        d.addTimeout(self.timeout, self.clock)

        def done(_: Any) -> None:
            self.listening = True
            log.info("Redis: subscribed to {channel}", channel=self.channel)
            self.subscribed()

        def failed(failure: Any) -> None:
            self._drop(conn, "could not subscribe", failure)
        d.addCallbacks(done, failed)

    def _ping(self) -> None:
        conn = self._conn
        if conn is None or not self.listening or self._pinging:
            return
        self._pinging = True
        d = conn.ping()
        d.addTimeout(self.timeout, self.clock)

        def answered(_: Any) -> None:
            self._pinging = False

        def failed(failure: Any) -> None:
            self._pinging = False
            self._drop(conn, "no answer to PING", failure)
        d.addCallbacks(answered, failed)

    def _drop(self, conn: Any, why: str, failure: Any) -> None:
        if conn is not self._conn or conn.transport is None:
            return                                  # that connection is gone already
        self._conn = None
        error = (f"no answer within {self.timeout:g}s"
                 if failure.check(defer.TimeoutError) else failure.getErrorMessage())
        log.warn("Redis: {why} on {channel} ({error}); connecting again", why=why,
                 channel=self.channel, error=error)
        conn.transport.abortConnection()            # and the factory connects again

    def stop(self) -> Deferred[Any]:
        self.listening = False
        if self._pings is not None and self._pings.running:
            self._pings.stop()
        factory, self._factory = self._factory, None
        if factory is None:
            return defer.succeed(None)
        result: Deferred[Any] = factory.disconnect()
        return result
