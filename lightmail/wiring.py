"""The one place LightMail's object graph is built: :func:`wire`.

Every process calls it, with its role: the server's main process (``makeService``),
a worker process (lightmail.workers.worker) and the ``lightmail`` command
(lightmail.admin.cli); the writer process (lightmail.workers.writer) builds its
storage alone (:func:`wire_writer`).  What differs between them is decided here, once,
from the role and the configuration:

=========  =====================================  ===============================
role       write port engine                      shared state (hub, POP3 locks)
=========  =====================================  ===============================
SERVER     the writer process's when the config   this process's; with [cluster]
           file asks for it (and there is one);   redis, the nodes' in Redis
           else grouped in this process           (lightmail.cluster)
WORKER     the main process's writer process      the main process's, over the
           (when it has one); else grouped here   control link
WRITER     grouped, here (it is the writer)       none used
COMMAND    grouped, here                          none used
=========  =====================================  ===============================

Protocol code receives the :class:`Services` and uses its typed fields; it never
asks which implementation it got.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred

from lightmail import sasl
from lightmail.cluster.hub import ClusterHub
from lightmail.cluster.locks import ClusterLocks
from lightmail.cluster.membership import Membership
from lightmail.cluster.node import Node
from lightmail.cluster.redislink import redis_link
from lightmail.config import BackendConfig, Config
from lightmail.delivery.local import LocalDeliveryAgent
from lightmail.directory.admintokens import AdminTokens
from lightmail.directory.cred import make_portal, stand_in_secret
from lightmail.directory.interfaces import IAccountBackend
from lightmail.directory.logins import (
    GuardSettings,
    IFailureCounts,
    LocalFailureCounts,
    LoginGuard,
    Logins,
)
from lightmail.directory.oauth import BearerChecker, TokenValidator
from lightmail.directory.routing import RoutingDirectory
from lightmail.directory.sharedfailures import SharedFailureCounts
from lightmail.directory.sql import SQLDirectory
from lightmail.dns import IResolver, Resolver
from lightmail.imap.hub import MailboxHub
from lightmail.metrics.interfaces import IMetrics
from lightmail.metrics.registry import Metrics
from lightmail.policy.access import AccessLists
from lightmail.policy.arc.verify import ARCVerifier
from lightmail.policy.clamav import ClamdScanner
from lightmail.policy.dkimverify import DKIMVerifier
from lightmail.policy.dmarc import DMARCChecker, DMARCReports, ReportSettings, load_suffixes
from lightmail.policy.greylist import (
    FallingBackGreylist,
    Greylist,
    IGreylistStore,
    RedisGreylist,
    RememberedPasses,
    SQLGreylist,
)
from lightmail.policy.interfaces import IContentScanner, ISpamScanner, ITrainer
from lightmail.policy.limits import (
    FallingBackBuckets,
    IRateLimiter,
    LazyRedis,
    LocalBuckets,
    RedisBuckets,
)
from lightmail.policy.limits.errors import ClientErrors
from lightmail.policy.rspamd import RspamdClient
from lightmail.policy.spamd import SpamdClient
from lightmail.policy.spf import SPFChecker
from lightmail.policy.srs import SRSForwarding, load_srs
from lightmail.policy.training import NO_TRAINER, JunkTrainer, LessonQueue, training_on
from lightmail.pop3.maildrop import Locks
from lightmail.processes import ExecStarter, IProcessStarter
from lightmail.queue.interfaces import IQueueKick
from lightmail.queue.runner import QueueRunner
from lightmail.queue.wake import WAKE_NAME
from lightmail.resources import IMemoryGuard, MemoryWatchdog, NoMemoryGuard
from lightmail.storage.database import Database
from lightmail.storage.interfaces import IBlobStore, IWritePort
from lightmail.storage.queuestore import SQLQueueStore
from lightmail.storage.service import StorageService
from lightmail.storage.sqlstore import SQLMailStore
from lightmail.storage.writerlink import WriterLink, WriterLost
from lightmail.telemetry import NO_TELEMETRY, Telemetry, make_telemetry
from lightmail.transcripts.tap import NoTranscripts, Transcripts, make_transcripts

if TYPE_CHECKING:
    from lightmail.workers.worker import MainLink


Directory = SQLDirectory | RoutingDirectory


class Role(Enum):
    SERVER = "server"
    WORKER = "worker"
    WRITER = "writer"
    COMMAND = "command"


@dataclass
class Services:
    """The running parts a protocol factory (or an embedder) works with."""

    config: Config
    storage: StorageService
    #: The SQL directory, or the routing one when [backend:NAME] sections send some
    #: domains to LDAP or a passwd-file.
    directory: Directory
    portal: Portal
    #: Where the users of [backend:NAME] domains live (LDAP, passwd-files).
    account_backends: list[IAccountBackend]
    #: The SQL side of every user (backend users have shadow rows there): app
    #: passwords, enable/disable, quota, expiry, last logins.
    accounts: SQLDirectory
    #: Logging in for every protocol: the portal behind the guard against guessing.
    logins: Logins
    #: The SASL mechanisms offered, and what they need.
    sasl: sasl.Offer
    #: The queue runner (in a worker process, a stand-in whose kick() asks the main
    #: process's runner to look for work).
    queue_runner: IQueueKick
    #: Files messages straight into mailboxes: LMTP, and SMTP's acceptance.
    local_delivery: LocalDeliveryAgent
    #: Which users have a POP3 session open.
    pop3_locks: Locks
    #: The IMAP sessions of this process and their mailbox changes.
    imap_hub: MailboxHub
    #: This process's metrics (its own registry; the main process serves them).
    metrics: IMetrics
    #: The admin API's bearer tokens.
    admin_tokens: AdminTokens
    #: DNS for everything this process looks up (outbound routing, the inbound
    #: checks): one cache.  ``[outbound] dns_servers`` says which servers.
    resolver: IResolver
    #: Trusted networks, allow- and blocklists (relaying, the access check).
    access: AccessLists
    #: The token buckets of rate limits (in this process, or shared in Redis).
    limiter: IRateLimiter
    #: Failed commands per client address ([limits] client_errors), in ``limiter``.
    client_errors: ClientErrors
    #: Greylisting's triplets (in SQL or Redis) and its clock.
    greylist: Greylist
    #: The inbound chain's evaluators, shared by every listener's checks.
    spf: SPFChecker
    dkim_verifier: DKIMVerifier
    arc_verifier: ARCVerifier
    #: DMARC verdicts for incoming mail ([dmarc]): ``dmarc.header_from(headers)``,
    #: ``dmarc.check(from_domain, spf, dkim)`` (lightmail/policy/dmarc).
    dmarc: DMARCChecker
    #: DMARC aggregate reports: ``dmarc_reports.record(result, ...)`` keeps a
    #: message's result (IDMARCReports); the main process sends the reports.
    dmarc_reports: DMARCReports
    #: The content scanners ([antivirus], [spam]; each listener's checks say where
    #: they run) and Junk training (NO_TRAINER when off).
    antivirus: IContentScanner
    spam_scanner: ISpamScanner
    trainer: ITrainer
    #: Junk training's queued lessons (the main process's LessonRunner sends them).
    lessons: LessonQueue
    #: Which sessions get a protocol transcript ([transcript]), and where it goes.
    transcripts: Transcripts | NoTranscripts = field(default_factory=NoTranscripts)
    #: Spans of sessions, messages and deliveries ([telemetry]; NO_TELEMETRY: none).
    telemetry: Telemetry = NO_TELEMETRY
    #: SRS ([srs]): the MAIL FROM of forwarded mail, and bounces to SRS addresses
    #: (off in the writer process and the lightmail command, which need neither;
    #: its settings follow a reload).
    srs: SRSForwarding = field(default_factory=SRSForwarding)
    #: Whether new connections are refused for memory ([server] memory_limit): the
    #: server's MemoryWatchdog (started by makeService), NoMemoryGuard elsewhere (a
    #: worker's connections are admitted by the main process, which measures it).
    memory: IMemoryGuard = field(default_factory=NoMemoryGuard)
    #: This node's part in a cluster ([cluster] redis), in the server's main process
    #: (a service to start): the Redis that ``imap_hub`` and ``pop3_locks`` use.
    #: None for a node alone, and in the other processes.
    cluster: Node | None = None
    #: This node's row in the database's nodes table (heartbeats, dead nodes'
    #: leases, drains), in the server's main process (a service to start).  None in
    #: the other processes.
    membership: Membership | None = None

    @property
    def mailstore(self) -> SQLMailStore:
        return self.storage.mailstore

    @property
    def queue(self) -> SQLQueueStore:
        return self.storage.queue

    @property
    def blobs(self) -> IBlobStore:
        return self.storage.blobs

    @property
    def write_port(self) -> IWritePort:
        return self.storage.write_port


def wire(config: Config, role: Role, *, link: MainLink | None = None,
         writer_socket: str | None = None,
         write_port: Callable[[IWritePort], IWritePort] | None = None,
         starter: IProcessStarter | None = None) -> Services:
    """Build the object graph of one process (nothing is started).

    ``link``: a worker's control link to the main process; ``writer_socket``: where a
    worker reaches the main process's writer process; ``write_port``: an embedder's
    write port, given the engine LightMail would run (see docs/embedding.rst);
    ``starter``: how the server's main process starts its writer process (a new
    interpreter unless said).
    """
    # Not at the top: a module that imports the reactor installs the default one,
    # which the main process forks its workers before (lightmail.workers.prefork).
    from twisted.internet import reactor
    # First, as a config error stops the start.  The SRS secret file is made by
    # whichever process comes first (the main one, unless it was removed since).
    srs_scheme = (load_srs(config, create=True)
                  if role in (Role.SERVER, Role.WORKER) else None)
    metrics = Metrics()
    storage = _storage(config, role, writer_socket, write_port, metrics,
                       starter or ExecStarter())
    auth = config.directory
    backends = [_backend(backend) for backend in config.backends]
    sql = SQLDirectory(storage.db,
                       recipient_delimiter=auth.recipient_delimiter,
                       default_quota=auth.default_quota,
                       resolve_cache_ttl=auth.resolve_cache_ttl,
                       scram_iterations=auth.scram_iterations,
                       keep_cram_md5="CRAM-MD5" in auth.mechanisms,
                       delegated_domains=frozenset(
                           domain for backend in backends for domain in backend.domains))
    # The routing directory only where some domains live elsewhere: the SQL one
    # alone otherwise, without a layer in front of every RCPT.
    directory: Directory = RoutingDirectory(sql, backends) if backends else sql
    portal = make_portal(directory, storage.mailstore, auth.auth_cache_ttl,
                         auth.scram_iterations, sql=sql, backends=backends)
    guard = LoginGuard(
        GuardSettings(window=auth.login_failure_window, delay_after=auth.login_delay_after,
                      max_delay=auth.login_max_delay, lockout_after=auth.lockout_after,
                      account_lockout_after=auth.account_lockout_after),
        make_failure_counts(config, role))
    tokens = TokenValidator(config.oauth) if config.oauth.jwks else None
    if tokens is not None:
        portal.registerChecker(BearerChecker(tokens, directory))
    offer = sasl.Offer(auth.mechanisms, directory, stand_in_secret(config.server.state_dir),
                       auth.scram_iterations, tokens)
    local_delivery = LocalDeliveryAgent(directory, storage.write_port, config.node_id)
    telemetry = make_telemetry(config.telemetry,
                               serves_sessions=role in (Role.SERVER, Role.WORKER))
    runner: IQueueKick
    cluster: Node | None = None
    membership: Membership | None = None
    if role is Role.WORKER:
        from lightmail.workers.remote import RemoteKick, RemoteLocks, WorkerHub
        assert link is not None, "a worker is wired with its link to the main process"
        runner = RemoteKick(link)
        locks: Locks = RemoteLocks(link)
        hub: MailboxHub = WorkerHub(link)
    else:
        out = config.outbound
        if role is Role.SERVER:
            # The runner takes its leases back once the node id is this process's.
            membership = Membership(storage.nodes, config.cluster, config.node_id,
                                    lambda: storage.ready)
        runner = QueueRunner(storage.queue,
                             ready=storage.ready if membership is None else membership.ready,
                             owner=config.node_id,
                             concurrency=out.concurrency, min_backoff=out.min_backoff,
                             max_backoff=out.max_backoff, max_lifetime=out.max_lifetime,
                             delay_warning_time=out.delay_warning_time,
                             wake_path=config.server.state_dir / WAKE_NAME,
                             metrics=metrics, telemetry=telemetry)
        if membership is not None:
            membership.kick = runner.kick
        if role is Role.SERVER and config.cluster.redis:
            cluster = Node(config.cluster, config.node_id)
            locks, hub = ClusterLocks(cluster), ClusterHub(cluster)
        else:
            locks, hub = Locks(), MailboxHub()
        if role is Role.SERVER:
            _sample_server(metrics, storage)
    storage.mailstore.add_listener(hub)
    resolver = Resolver(config.outbound.dns_servers, metrics=metrics)
    access = AccessLists(storage.db, config.access.trusted_networks, config.access.refresh)
    srs = SRSForwarding(srs_scheme, directory, config.srs.exclude_domains, access)
    # The list was checked by the configuration's validation (service.validate).
    suffixes = load_suffixes(config.dmarc.public_suffix_list)
    dmarc_reports = DMARCReports(storage.db, storage.blobs, storage.write_port, directory,
                                 resolver, suffixes, ReportSettings.from_config(config),
                                 kick=runner.kick)
    lessons = LessonQueue(storage.db)
    limiter = make_limiter(config)
    services: Services | None = None

    def config_now() -> Config:
        return services.config if services is not None else config
    services = Services(config=config, storage=storage, directory=directory, portal=portal,
                        account_backends=backends, accounts=sql,
                        logins=Logins(portal, guard, sql), sasl=offer, queue_runner=runner,
                        local_delivery=local_delivery, pop3_locks=locks, imap_hub=hub,
                        cluster=cluster, membership=membership,
                        metrics=metrics, admin_tokens=AdminTokens(storage.db),
                        transcripts=make_transcripts(config.transcript), telemetry=telemetry,
                        resolver=resolver,
                        access=access,
                        limiter=limiter,
                        client_errors=ClientErrors(limiter, lambda: config_now().limits),
                        greylist=Greylist(make_greylist_store(config, storage.db)),
                        spf=SPFChecker(resolver, time_limit=config.spf.time_limit,
                                       receiver=config.hostname),
                        dkim_verifier=DKIMVerifier(resolver), arc_verifier=ARCVerifier(resolver),
                        srs=srs,
                        dmarc=DMARCChecker(resolver, suffixes, config.dmarc),
                        dmarc_reports=dmarc_reports,
                        antivirus=ClamdScanner(reactor, lambda: config_now().antivirus),
                        spam_scanner=_spam_scanner(config, config_now),
                        trainer=_trainer(config, lessons, config_now), lessons=lessons)
    if role is Role.SERVER:
        services.memory = MemoryWatchdog(lambda: config_now().server, metrics)
    return services


def wire_writer(config: Config) -> StorageService:
    """The writer process's graph: its storage alone.  It runs storage operations
    only (lightmail.storage.writer), and the rest of a process's graph (directory,
    checks, DNS, the Public Suffix List) would cost it some 4 MB for nothing."""
    return _storage(config, Role.WRITER, None, None, Metrics(), ExecStarter())


def _spam_scanner(config: Config, config_now: Callable[[], Config]) -> ISpamScanner:
    """[spam] backend, chosen once (a reload cannot change it)."""
    from twisted.internet import reactor
    if config.spam.backend == "spamd":
        return SpamdClient(reactor, lambda: config_now().spam)
    return RspamdClient(reactor, lambda: config_now().spam)


def _trainer(config: Config, lessons: LessonQueue,
             config_now: Callable[[], Config]) -> ITrainer:
    """Junk training: on where [spam] learn is and some listener scores spam."""
    if not training_on(config):
        return NO_TRAINER
    return JunkTrainer(lessons, lambda: config_now().spam.junk_name)


def make_limiter(config: Config) -> IRateLimiter:
    """[limits] backend: buckets in this process, or in Redis with the fallback of
    redis_down.  The Redis connection is made at the first use (the lightmail command
    never makes one)."""
    limits = config.limits
    if limits.backend == "local":
        return LocalBuckets()
    fallback = LocalBuckets() if limits.redis_down == "local" else None
    return FallingBackBuckets(RedisBuckets(shared_redis(config, limits.redis)), fallback,
                              timeout=limits.redis_timeout)


def make_failure_counts(config: Config, role: Role) -> IFailureCounts:
    """The login guard's counts: this process's, or with [cluster] redis every node's
    (in the processes that serve logins), each process counting alone while Redis
    does not answer.  The Redis connection is made at the first failure."""
    from twisted.internet import reactor
    window = config.directory.login_failure_window
    local = LocalFailureCounts(window, reactor.seconds)  # type: ignore[attr-defined]
    cluster = config.cluster
    if not cluster.redis or role not in (Role.SERVER, Role.WORKER):
        return local
    return SharedFailureCounts(LazyRedis(redis_link(cluster, cluster.redis), poolsize=2),
                               cluster.prefix, window, local, cluster.redis_timeout)


def make_greylist_store(config: Config, db: Database) -> IGreylistStore:
    """[greylist] store: SQL, or Redis with the fallback of redis_down (accept: no
    greylisting while it is away), behind this process's memory of the passes it
    gave (most attempts are known clients').  The Redis connection is made at the
    first use."""
    cfg = config.greylist
    store: IGreylistStore
    if cfg.store == "sql":
        store = SQLGreylist(db)
    else:
        fallback = SQLGreylist(db) if cfg.redis_down == "sql" else None
        store = FallingBackGreylist(RedisGreylist(shared_redis(config, cfg.redis)),
                                    fallback, timeout=cfg.redis_timeout)
    return RememberedPasses(store)


def shared_redis(config: Config, address: str) -> LazyRedis:
    """A connection to the Redis at ``address``, reached as [cluster]'s link keys say
    (user, password, TLS: every Redis's)."""
    return LazyRedis(redis_link(config.cluster, address))


def _sample_server(metrics: IMetrics, storage: StorageService) -> None:
    """What the main process asks for at each scrape: the queue's sizes, and the
    writer process's counts when it has one."""
    metrics.add_sampler(lambda: storage.queue.census().addCallback(metrics.queue_census))
    writer = storage.writer
    if writer is None:
        return

    def ask_writer() -> Deferred[Any]:
        d: Deferred[Any] = writer.snapshot()
        d.addCallback(lambda data: metrics.update_source("writer", data))
        # Not running (it is being started again): the last counts stand in.
        d.addErrback(lambda failure: failure.trap(WriterLost))
        return d
    metrics.add_sampler(ask_writer)


def _backend(config: BackendConfig) -> IAccountBackend:
    """The account backend of one [backend:NAME] section.  Imported here, where one is
    configured: ldap3 and pyasn1 weigh some 5 MB in every process, passlib less."""
    if config.type == "ldap":
        from lightmail.directory.ldap import LDAPBackend
        return LDAPBackend(config)
    from lightmail.directory.passwdfile import PasswdFileBackend
    return PasswdFileBackend(config)


def runs_writer_process(config: Config) -> bool:
    """Whether the server's main process runs a writer process: when it asks for one
    and runs from a configuration file (the writer process reads it)."""
    return config.storage.writer_process and os.path.isfile(config.path)


def _storage(config: Config, role: Role, writer_socket: str | None,
             write_port: Callable[[IWritePort], IWritePort] | None,
             metrics: IMetrics, starter: IProcessStarter) -> StorageService:
    if role is Role.WRITER:
        # One connection, and no pools: the writer runs its groups in its one thread.
        return StorageService(config, primary=False, sql_threads=1, one_writer=True,
                              spare_files=False, metrics=metrics)
    if role is Role.COMMAND:
        return StorageService(config, write_port=write_port, metrics=metrics)
    if role is Role.WORKER:
        writer = WriterLink(connect=writer_socket) if writer_socket is not None else None
        return StorageService(config, primary=False, writer=writer, write_port=write_port,
                              metrics=metrics)
    # The server: the writer process, when it runs from a configuration file (the
    # writer process reads it) and asks for one.
    if not runs_writer_process(config):
        return StorageService(config, write_port=write_port, metrics=metrics)
    writer_dir = listen = None
    if config.server.workers:
        listen, writer_dir = _writer_socket(config)
    # The configuration's text comes on its standard input: started again after a
    # crash, it runs what this process runs, whatever the file holds since.
    command = ["--config", str(config.path), "--config-stdin"]

    def restarted() -> None:
        metrics.writer_restarted()
        metrics.retire_source("writer")
    return StorageService(config, writer=WriterLink(command, listen=listen,
                                                    restarted=restarted,
                                                    stdin=config.text.encode(),
                                                    starter=starter),
                          writer_dir=writer_dir, write_port=write_port, metrics=metrics)


#: A Unix socket's path is at most 107 octets on Linux.
_SOCKET_PATH_MAX = 100


def _writer_socket(config: Config) -> tuple[str, str | None]:
    """Where the workers reach the writer process: ``state_dir/run/writer.sock`` (its
    directory 0700: only this user's processes), as Postfix and Dovecot keep their
    sockets under their own directories, so that a server killed with kill -9 leaves
    nothing elsewhere; in a new directory of its own under the system's temporary
    directory when that path is too long for a socket (then removed at stop: the
    second value)."""
    run = config.server.state_dir / "run"
    path = str(run / "writer.sock")
    if len(path.encode()) <= _SOCKET_PATH_MAX:
        run.mkdir(mode=0o700, parents=True, exist_ok=True)
        run.chmod(0o700)
        return path, None
    writer_dir = tempfile.mkdtemp(prefix="lightmail-")
    return os.path.join(writer_dir, "writer.sock"), writer_dir
