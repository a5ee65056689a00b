"""LightMail's connections to Redis (txredisapi), for everything that shares state in it:
the cluster's IMAP hub and POP3 locks (lightmail.cluster), the rate limits' buckets,
greylisting's triplets and the login guard's failure counts.

* :class:`LazyRedis`: a connection pool made at the first question (the ``lightmail``
  command, which asks nothing, never connects).  Every question is a Lua script
  (``eval``): what must be atomic is, and a node's view is never half-updated.
* :class:`SharedBackend`: each question gets a deadline, and the log says once that
  Redis stopped answering (and what is done meanwhile), then once that it is back.
* :class:`Subscription`: one connection that listens on a pub/sub channel, connected
  again (with back-off) whenever it is lost; each time it is subscribed again the
  owner is told, so that it can read what it may have missed.

While Redis is down a txredisapi question waits for the connection to come back rather
than fail: whoever asks must give it a deadline (SharedBackend does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger(namespace="lightmail.redis")


def parse_address(address: str) -> tuple[str, int, Optional[int]]:
    """HOST:PORT[/DB] (as the configuration checked it): host, port and db."""
    host_port, _, db = address.partition("/")
    host, _, port = host_port.rpartition(":")
    return host.strip("[]"), int(port), int(db) if db else None


class LazyRedis:
    """A txredisapi connection pool to ``HOST:PORT[/DB]``, made at the first call.

    ``poolsize`` 1 keeps the questions in the order they were asked (txredisapi sends
    each on any free connection of a pool)."""

    def __init__(self, address: str, password: Optional[str] = None,
                 poolsize: int = 4) -> None:
        self.host, self.port, self.db = parse_address(address)
        self.password = password or None
        self.poolsize = poolsize
        self._pool: Any = None

    def eval(self, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        if self._pool is None:
            import txredisapi
            self._pool = txredisapi.lazyConnectionPool(
                self.host, self.port, dbid=self.db, poolsize=self.poolsize,
                password=self.password, connectTimeout=2, replyTimeout=2)
        result: Deferred[Any] = self._pool.eval(script, keys=keys, args=args)
        return result

    def disconnect(self) -> Deferred[Any]:
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
                log.warn("{what}: the shared backend does not answer ({error}); "
                         "{meanwhile} until it does", what=self.what,
                         error=failure.getErrorMessage(), meanwhile=self.meanwhile)
            return fallback()
        return question.addCallbacks(answered, failed)


class Subscription:
    """Listens on ``channel`` of the Redis at ``address``: each message's payload goes
    to ``heard``; ``subscribed`` is called each time the subscription is (again) in
    place, after the first time too.  Started by :meth:`start`, ended by :meth:`stop`."""

    def __init__(self, address: str, password: Optional[str], channel: str,
                 heard: Callable[[bytes], None], subscribed: Callable[[], None]) -> None:
        self.host, self.port, _ = parse_address(address)    # channels know no db
        self.password = password or None
        self.channel = channel
        self.heard = heard
        self.subscribed = subscribed
        self.listening = False
        self._factory: Any = None

    def start(self) -> None:
        import txredisapi
        subscription = self

        class Listener(txredisapi.SubscriberProtocol):     # type: ignore[misc]
            def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
                payload = message.encode() if isinstance(message, str) else message
                try:
                    subscription.heard(payload)
                except Exception:
                    log.failure("a message on {channel} could not be taken",
                                channel=subscription.channel)

            def connectionLost(self, why: Any) -> None:
                if subscription.listening:
                    subscription.listening = False
                    log.warn("Redis: the subscription to {channel} is lost; connecting "
                             "again", channel=subscription.channel)
                super().connectionLost(why)

        class Factory(txredisapi.SubscriberFactory):       # type: ignore[misc]
            protocol = Listener

            def addConnection(self, conn: Any) -> None:
                super().addConnection(conn)
                if conn.connected:
                    subscription._listen(conn)

        from twisted.internet import reactor
        from twisted.internet.endpoints import HostnameEndpoint
        factory = Factory(isLazy=True)
        factory.password = self.password
        factory.startConnecting(HostnameEndpoint(reactor, self.host, self.port, timeout=2))
        self._factory = factory

    def _listen(self, conn: Any) -> None:
        d = conn.subscribe(self.channel)

        def done(_: Any) -> None:
            self.listening = True
            log.info("Redis: subscribed to {channel}", channel=self.channel)
            self.subscribed()

        def failed(failure: Any) -> None:
            log.warn("Redis: could not subscribe to {channel}: {error}",
                     channel=self.channel, error=failure.getErrorMessage())
            conn.transport.loseConnection()         # and the factory connects again
        d.addCallbacks(done, failed)

    def stop(self) -> Deferred[Any]:
        self.listening = False
        factory, self._factory = self._factory, None
        if factory is None:
            return defer.succeed(None)
        result: Deferred[Any] = factory.disconnect()
        return result
