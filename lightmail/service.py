"""makeService(config): the whole of LightMail as one Twisted MultiService.

This is the public embedding API.  A Twisted application that wants LightMail's
services calls :func:`makeService` with a :class:`~lightmail.config.Config` and adds
the result to its own service tree; ``twistd lightmail`` does exactly that.  The
:class:`Services` object it carries (``get_services(service)``) gives the embedder the
storage, directory, queue and auth portal to use directly.

Start-up order: storage (schema migrations), then directory, queue runner, and the
listeners, which only listen once storage is ready.  Shutdown runs the other way round
and waits for each step: stop accepting and drain sessions, let deliveries finish,
then close the thread pools.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService
from twisted.internet import defer, task
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from lightmail import __version__
from lightmail.config import Config, ConfigError, line_of
from lightmail.directory.service import DirectoryService
from lightmail.listeners import ListenerService, available_protocols, builder_for
from lightmail.logs import LogOutputs, make_outputs, reopen_on_sigusr1
from lightmail.processes import ExecStarter, IProcessStarter
from lightmail.queue.runner import QueueRunner
from lightmail.reload.interfaces import IReloadable
from lightmail.reload.parts import OutboundPart, ServicesPart, listener_part
from lightmail.reload.reloader import Reloader
from lightmail.resources import MemoryWatchdog
from lightmail.storage.database import DatabaseURLError, check_url
from lightmail.storage.interfaces import IWritePort
from lightmail.tlsrpt.interfaces import ITLSReports
from lightmail.wiring import Role, Services, wire

if TYPE_CHECKING:
    from lightmail.directory.interfaces import IDirectory
    from lightmail.storage.service import StorageService
    from lightmail.tlsrpt.job import ReportJob
    from lightmail.tlsrpt.store import SQLTLSReports


def validate(config: Config) -> None:
    """Checks that need more than one key, or code beyond the config module."""
    if config.storage.url:
        try:
            url = check_url(config.storage.url)
        except DatabaseURLError as exc:
            raise ConfigError(str(exc), config.path, line_of(config, "storage", "url"),
                              "storage", "url") from None
        if url.password is not None and config.storage.password_file is not None:
            raise ConfigError("the URL holds a password and password_file names one: "
                              "keep it in password_file alone", config.path,
                              line_of(config, "storage", "url"), "storage", "url")
    from twisted.internet import endpoints
    # The descriptions are parsed, never listened on: no reactor is needed, and
    # importing one would install it before the main process forks its workers
    # (lightmail.workers.prefork), which must come first.
    reactor = None
    names = set()
    for listener in config.listeners:
        section = f"listener:{listener.name}"
        if listener.protocol not in available_protocols():
            raise ConfigError(
                f"unknown protocol {listener.protocol!r}; this LightMail offers "
                f"{', '.join(available_protocols()) or 'none'}", config.path,
                line_of(config, section, "protocol"), section, "protocol")
        try:
            endpoints.serverFromString(reactor, listener.endpoint)
        except Exception as exc:
            raise ConfigError(f"not a usable endpoint description: {exc}", config.path,
                              line_of(config, section, "endpoint"), section,
                              "endpoint") from None
        # Port 0 asks for any free port: several such listeners never clash.
        if listener.endpoint in names and not re.match(r"^\w+:0(:|$)", listener.endpoint):
            raise ConfigError("another listener uses the same endpoint", config.path,
                              line_of(config, section, "endpoint"), section, "endpoint")
        names.add(listener.endpoint)
        paths = [(key, getattr(listener, key)) for key in ("tls_cert", "tls_key")]
        paths += [("tls_sni", path) for pair in listener.tls_sni for path in pair]
        for key, path in paths:
            if path is not None and not path.is_file():
                raise ConfigError(f"no such file: {path}", config.path,
                                  line_of(config, section, key), section, key)
    for section, key, enabled in (("admin", "endpoint", config.admin.enabled),
                                  ("manhole", "endpoint", config.manhole.enabled),
                                  ("manhole", "telnet_endpoint", config.manhole.enabled)):
        endpoint = getattr(getattr(config, section), key)
        if not (enabled and endpoint):
            continue
        try:
            endpoints.serverFromString(reactor, endpoint)
        except Exception as exc:
            raise ConfigError(f"not a usable endpoint description: {exc}", config.path,
                              line_of(config, section, key), section, key) from None
    if len(config.node_id) > 64:
        raise ConfigError("a node id is at most 64 characters (it names the node's "
                          "queue leases)", config.path, line_of(config, "server", "node_id"),
                          "server", "node_id")
    if config.server.workers and not Path(config.path).is_file():
        raise ConfigError("worker processes read the config file, and there is none "
                          "(set workers = 0 when embedding)", config.path,
                          line_of(config, "server", "workers"), "server", "workers")
    ca_file = config.outbound.ca_file
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError(f"no such file: {ca_file}", config.path,
                          line_of(config, "outbound", "ca_file"), "outbound", "ca_file")
    from lightmail.policy.arc.seal import load_seal_key
    from lightmail.policy.dkim import load_signer
    load_signer(config)        # reads the DKIM keys: a bad one is a config error
    load_seal_key(config)      # and the ARC sealing key
    _check_suffix_list(config)
    _check_syslog(config)
    _check_telemetry(config)
    _check_s3(config)
    unknown = set(config.transcript.listeners) - {lst.name for lst in config.listeners}
    if unknown:
        raise ConfigError(f"no such listener: {', '.join(sorted(unknown))}", config.path,
                          line_of(config, "transcript", "listeners"), "transcript",
                          "listeners")


def _check_suffix_list(config: Config) -> None:
    """[dmarc] public_suffix_list can be read and holds rules (a download that went
    wrong must not give every domain a wrong organizational domain)."""
    path = config.dmarc.public_suffix_list
    if path is None:
        return
    from lightmail.policy.dmarc import SuffixListError, read_suffix_list
    try:
        read_suffix_list(path)
    except SuffixListError as exc:
        raise ConfigError(str(exc), config.path,
                          line_of(config, "dmarc", "public_suffix_list"), "dmarc",
                          "public_suffix_list") from None


def _check_telemetry(config: Config) -> None:
    endpoint = config.telemetry.otlp_endpoint
    if not endpoint:
        return
    where = (config.path, line_of(config, "telemetry", "otlp_endpoint"), "telemetry",
             "otlp_endpoint")
    if not re.match(r"^https?://[^/]+", endpoint):
        raise ConfigError("expected an http:// or https:// URL (OTLP over HTTP)", *where)
    try:
        import opentelemetry.exporter.otlp.proto.http
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise ConfigError("OpenTelemetry is not installed: pip install "
                          "'lightmail[telemetry]'", *where) from None


def _check_s3(config: Config) -> None:
    if config.storage.blob_backend != "s3":
        return
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise ConfigError("blob_backend = s3 needs boto3: pip install 'lightmail[s3]'",
                          config.path, line_of(config, "storage", "blob_backend"),
                          "storage", "blob_backend") from None


def _check_syslog(config: Config) -> None:
    """The syslog host resolves (once, at start-up: the output sends to an address)."""
    if not config.logging.syslog:
        return
    import socket

    from lightmail.syslog5424 import parse_target
    target = parse_target(config.logging.syslog)
    if target.kind == "unix":
        return
    try:
        socket.getaddrinfo(target.address, target.port)
    except OSError as exc:
        raise ConfigError(f"cannot resolve {target.address}: {exc}", config.path,
                          line_of(config, "logging", "syslog"), "logging",
                          "syslog") from None


class LightMailService(MultiService):
    """The root service: ordered shutdown, and config-driven logging under twistd."""

    log = Logger()

    def __init__(self, parts: Services) -> None:
        super().__init__()
        # Not "services": MultiService keeps its children in that attribute.
        self.parts = parts
        self.name = "lightmail"
        # Under twistd a part that cannot start ends the process with status 1;
        # an embedding application decides for itself (see ``failed``).
        self.exit_on_failure = False
        self.failed: defer.Deferred[str] = defer.Deferred()
        self.workers: Any = None     # the WorkerPool, with [server] workers
        self.log_outputs: LogOutputs | None = None      # under twistd
        #: Owns the running configuration: ``reloader.reload()`` reads the file again
        #: (SIGHUP under twistd; lightmail.reload).
        self.reloader = Reloader(parts.config, [])
        #: Stopped after the listeners and the queue, just before the node's row is
        #: marked stopped: the admin listener answers /readyz through the drain.
        self.stopped_late: list[IService] = []

    def fatal(self, reason: str) -> None:
        """A part could not start: report it, and under twistd stop with status 1."""
        if self.failed.called:
            return
        self.log.critical("LightMail cannot run: {reason}", reason=reason)
        self.failed.callback(reason)
        if self.exit_on_failure:
            import atexit
            import os

            from twisted.internet import reactor
            atexit.register(os._exit, 1)   # twistd itself would exit with 0
            if reactor.running:  # type: ignore[attr-defined]
                reactor.stop()  # type: ignore[attr-defined]
            else:
                reactor.callWhenRunning(reactor.stop)  # type: ignore[attr-defined]

    def setServiceParent(self, parent: Any) -> None:
        # twistd makes an Application (a Componentized) for a plugin's service and asks
        # it for an ILogObserver before it starts logging: ours follows the config.
        # It then owns the process's logging, and SIGUSR1 (logrotate) reopens the file.
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            self.log_outputs = make_outputs(self.parts.config.logging)
            parent.setComponent(ILogObserver, self.log_outputs.observer)
            reopen_on_sigusr1(self.reopen_logs)
        super().setServiceParent(parent)

    def reopen_logs(self) -> defer.Deferred[Any]:
        """SIGUSR1: this process and the workers open their log files again (the
        writer process logs to this one's standard error, which stays)."""
        if self.workers is not None:
            self.workers.signal_workers(signal.SIGUSR1)
        if self.log_outputs is None:
            return defer.succeed(None)
        self.log.info("SIGUSR1: reopening the log file")
        d = self.log_outputs.reopen()
        d.addCallbacks(
            lambda _: self.log.info("log file reopened"),
            lambda f: self.log.error("could not reopen the log file (still writing to "
                                     "the old one): {error}", error=f.getErrorMessage()))
        return d

    def startService(self) -> None:
        config = self.parts.config
        self.log.info("LightMail {version} starting as {hostname} with config {path}",
                      version=__version__, hostname=config.hostname, path=config.path)
        super().startService()
        listening = [child.listening for child in self if isinstance(child, ListenerService)]
        if self.workers is not None:
            listening.append(self.workers.ready)
        ready = defer.gatherResults(listening, consumeErrors=True)
        ready.addCallbacks(self._ready, lambda failure: None)

    def _ready(self, ports: list[Any]) -> None:
        # Said once the reactor runs: under twistd, signal handlers (Ctrl-C, SIGTERM)
        # are in place from then on, so "ready" means ready to be stopped cleanly too.
        from twisted.internet import reactor

        def say() -> None:
            if self.running:
                count = len(self.parts.config.listeners)
                self.log.info("LightMail ready: {count} listeners", count=count)
        reactor.callWhenRunning(say)  # type: ignore[attr-defined]

    def stop_requested(self, why: str) -> None:
        """The database asked this node to stop (lightmail node drain): under twistd
        the process drains and exits as on SIGTERM; embedded, this service stops
        and the application's process goes on."""
        self.log.info("{why}: draining and stopping", why=why)
        if not self.exit_on_failure:
            self.stopService()
            return
        from twisted.internet import reactor
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        self.log.info("LightMail stopping: draining connections and deliveries")
        self.running = 0
        # /readyz answers 503 with "draining": true from here, and the node's row
        # says draining; a load balancer stops sending before the listeners close.
        membership = self.parts.membership
        if membership is not None:
            yield membership.drain()
        notice = self.parts.config.cluster.drain_notice
        if notice > 0 and membership is not None and membership.registered:
            from twisted.internet import reactor
            self.log.info("draining: the listeners close in {notice:g}s ([cluster] "
                          "drain_notice), once the load balancer has seen /readyz",
                          notice=notice)
            yield task.deferLater(reactor, notice, lambda: None)
        # Stop children one by one, last added first: listeners, queue, storage.
        # (MultiService would stop them all at once, closing the database under
        # sessions that are still finishing their transaction.)
        for child in self._stop_order():
            if child.running:
                yield defer.maybeDeferred(child.stopService)
        self.log.info("LightMail stopped")

    def _stop_order(self) -> list[IService]:
        """Last added first, but ``stopped_late`` (the admin listener) just before
        the node's row and storage: after the listeners and the queue."""
        order = [child for child in reversed(list(self)) if child not in self.stopped_late]
        membership = self.parts.membership
        at = order.index(membership) if membership in order else len(order)
        return order[:at] + [child for child in reversed(list(self))
                             if child in self.stopped_late] + order[at:]


def makeService(config: Config,
                write_port: Callable[[IWritePort], IWritePort] | None = None,
                starter: IProcessStarter | None = None) -> LightMailService:
    """Build LightMail's service tree from a validated configuration.

    ``write_port``: an embedding application's own write port; it is given the engine
    LightMail would run, and returns the port every protocol will use (see
    docs/embedding.rst).  ``starter``: how the worker and writer processes are
    started (the twistd plugin's forks them as it starts: lightmail.workers.prefork;
    new interpreters unless said).
    """
    validate(config)
    if write_port is not None and config.server.workers:
        # Worker processes are started from the configuration file: an object of the
        # application's cannot reach them, and their writes would go past it.
        raise ValueError("an application's own write port serves this process only: "
                         "set [server] workers = 0")
    starter = starter or ExecStarter()
    services = wire(config, Role.SERVER, write_port=write_port, starter=starter)
    storage = services.storage
    root = LightMailService(services)
    storage.ready.addErrback(lambda f: root.fatal(f"storage failed: {f.getErrorMessage()}"))
    storage.setServiceParent(root)
    if services.cluster is not None:
        # Before the listeners and workers, after storage: stopped after the sessions
        # let go of their locks, and before the database closes.
        services.cluster.setServiceParent(root)
    membership = services.membership
    assert membership is not None               # Role.SERVER has its row
    # Beats until the rest has stopped; the listeners, the workers and the queue
    # wait for its row (a node id another process holds stops the start).
    membership.setServiceParent(root)
    membership.on_stop_request = root.stop_requested
    ready = membership.ready
    ready.addErrback(lambda f: root.fatal(f.getErrorMessage()))
    DirectoryService(services.directory, config.directory.backend,
                     storage.ready, services.account_backends).setServiceParent(root)
    runner = services.queue_runner
    assert isinstance(runner, QueueRunner)      # Role.SERVER runs the queue
    runner.setServiceParent(root)
    from lightmail.policy.dmarc import ReportService
    # After the runner: stopped before it, so that a report run in progress ends
    # while the queue still takes its reports.
    ReportService(services.dmarc_reports, storage.ready).setServiceParent(root)
    _add_training(services, root)
    watchdog = services.memory
    assert isinstance(watchdog, MemoryWatchdog)  # and measures the server's memory
    watchdog.setServiceParent(root)
    writer = storage.writer
    if writer is not None:
        watchdog.watch(lambda: {"writer": writer.pid} if writer.pid else {})
    outbound = _outbound(services, runner, _tls_reports(root, services))
    from lightmail.outbound.notices import Notifier
    runner.notifier = Notifier(services)
    parts: list[IReloadable] = [ServicesPart(services), outbound]
    if config.server.workers:
        listeners = _add_workers(root, services, starter)
        parts.append(root.workers)
    else:
        listeners = []
        for listener in config.listeners:
            factory = builder_for(listener.protocol)(listener, services)
            tls = None
            if listener.tls == "implicit":
                from lightmail.tls import server_context
                tls = server_context(listener)
            service = ListenerService(listener, factory, ready=membership.ready,
                                      tls_context=tls,
                                      shutdown_timeout=config.server.shutdown_timeout,
                                      on_failure=root.fatal)
            service.setServiceParent(root)
            listeners.append(service)
            parts.append(listener_part(listener.name, factory, tls, proxy=service.proxy))
    root.reloader = Reloader(config, parts, validators=validate)
    _add_operations(root, services, runner, listeners)
    return root


def _add_training(services: Services, root: LightMailService) -> None:
    """Junk training's runner, which sends the queued lessons (this process only: the
    workers' sessions queue theirs in the database, where it finds them)."""
    from lightmail.policy.training import JunkTrainer, LessonRunner, training_on
    if not training_on(services.config):
        return
    lessons = LessonRunner(services.lessons, services.spam_scanner, services.blobs,
                           services.storage.ready, lambda: services.config.spam)
    lessons.setServiceParent(root)
    trainer = services.trainer
    assert isinstance(trainer, JunkTrainer)     # training_on: wired as one
    trainer.kick = lessons.kick


def _add_operations(root: LightMailService, services: Services, runner: QueueRunner,
                    listeners: list[ListenerService]) -> None:
    """The admin HTTP listener and the manhole, when enabled (last: they stop first)."""
    config = services.config
    if config.admin.enabled:
        from lightmail.admin.health import Readiness
        from lightmail.admin.http import AdminService, admin_root
        readiness = Readiness(services, runner, listeners, root.workers,
                              services.membership)
        # Each scrape checks readiness too: lightmail_ready follows it.
        services.metrics.add_sampler(readiness.check)
        from lightmail.admin.api import mount
        site_root = admin_root(services.metrics, readiness, config.admin.token)
        mount(site_root, services, runner)
        admin = AdminService(config.admin, site_root, on_failure=root.fatal)
        admin.setServiceParent(root)
        root.stopped_late.append(admin)
    if config.manhole.enabled:
        from lightmail.admin.manhole import ManholeService
        manhole = ManholeService(config, root, services, runner, root.workers,
                                 on_failure=root.fatal)
        manhole.setServiceParent(root)
        root.stopped_late.append(manhole)


def _add_workers(root: LightMailService, services: Services,
                 starter: IProcessStarter) -> list[ListenerService]:
    """``[server] workers``: this process listens, worker processes accept and serve
    (lightmail.workers); it keeps the limits, locks and \\Recent claims for all."""
    from twisted.internet.protocol import Factory

    from lightmail.workers.pool import WorkerPool
    config = services.config
    listeners = []
    membership = services.membership
    assert membership is not None
    for listener in config.listeners:
        quiet = Factory()
        quiet.noisy = False      # never accepts: nothing to say
        service = ListenerService(listener, quiet, ready=membership.ready,
                                  shutdown_timeout=config.server.shutdown_timeout,
                                  on_failure=root.fatal, accept=False)
        service.setServiceParent(root)
        listeners.append(service)
    pool = WorkerPool(services, listeners, config.server.workers, membership.ready,
                      config.server.shutdown_timeout, on_failure=root.fatal,
                      starter=starter)
    pool.setServiceParent(root)
    root.workers = pool
    assert isinstance(services.memory, MemoryWatchdog)
    services.memory.watch(pool.pids)
    return listeners


def _tls_reports(root: LightMailService, services: Services) -> ITLSReports:
    """Where outbound TLS outcomes are counted, and the service that stores them and
    sends the daily reports (``[tlsrpt]``; nothing when it is off)."""
    from lightmail.tlsrpt.interfaces import NoTLSReports
    config = services.config
    if not config.tlsrpt.enabled:
        return NoTLSReports()
    from lightmail.tlsrpt.service import TLSReportService
    store, job = tls_report_job(config, services.storage, services.directory,
                                services.queue_runner.kick)
    TLSReportService(store, job, config.tlsrpt.interval, config.tlsrpt.flush_interval,
                     ready=services.storage.ready).setServiceParent(root)
    return store


def tls_report_job(config: Config, storage: StorageService, directory: IDirectory,
                   kick: Callable[[], None]) -> tuple[SQLTLSReports, ReportJob]:
    """The TLS-RPT store and report job (the server's, and ``lightmail tlsrpt
    send-reports``'s): reports go out through the queue, ``kick`` nudges it."""
    from twisted.internet import reactor

    from lightmail.dns import Resolver
    from lightmail.tlsrpt.job import ReportJob, https_poster, queue_mailer
    from lightmail.tlsrpt.report import Reporter
    from lightmail.tlsrpt.store import SQLTLSReports
    out, settings = config.outbound, config.tlsrpt
    resolver = Resolver(out.dns_servers)
    sender = settings.sender(config.hostname)
    reporter = Reporter(settings.org_name or config.hostname, settings.contact or sender,
                        sender)
    store = SQLTLSReports(storage.db)
    mailer = queue_mailer(directory, storage.blobs, storage.write_port, sender, kick)
    job = ReportJob(store, resolver, reporter, mailer,
                    https_poster(reactor, resolver, str(out.ca_file or ""),
                                 settings.http_timeout),
                    grace=2 * settings.flush_interval, give_up_after=settings.give_up_after)
    return store, job


def _outbound(services: Services, runner: QueueRunner,
              tls_reports: ITLSReports) -> OutboundPart:
    """The queue runner's delivery agents; what a reload changes of them."""
    from lightmail.delivery.headers import outbound_headers
    from lightmail.delivery.smtp import SMTPDeliveryAgent
    from lightmail.outbound.client import Timeouts
    from lightmail.outbound.dane import DANE
    from lightmail.policy.arc.seal import load_sealer
    from lightmail.policy.dkim import DKIMSigner, load_signer
    out = services.config.outbound
    resolver = services.resolver
    ca_file = str(out.ca_file) if out.ca_file else ""
    mta_sts = None
    if out.mta_sts:
        from twisted.internet import reactor

        from lightmail.outbound.mtasts import MTASTS, https_fetcher
        from lightmail.storage.mtastsstore import SQLMTASTSPolicyStore
        mta_sts = MTASTS(resolver, https_fetcher(reactor, resolver, ca_file),
                         store=SQLMTASTSPolicyStore(services.storage.db),
                         reports=tls_reports)
    signer = None
    dkim_keys = load_signer(services.config)
    if dkim_keys is not None:
        signer = DKIMSigner(dkim_keys, services.blobs, services.config.dkim.sources)
        for domain_keys in dkim_keys.keys.values():
            for key in domain_keys:
                LightMailService.log.info("DKIM: signing with {key}", key=key.describe())
    # ARC sets go on top of DKIM signatures (each covers the stored message alone).
    sealer = load_sealer(services.config, services.blobs)
    if sealer is not None:
        LightMailService.log.info("ARC: sealing forwarded mail with {key}",
                                  key=sealer.key.describe())

    def routes(config: Config) -> Any:
        return _routes(config, resolver)
    default, transports = routes(services.config)
    smtp = SMTPDeliveryAgent(default.router, services.blobs, services.config.hostname,
                             tls_policy=out.tls,
                             timeouts=Timeouts(out.command_timeout, out.data_timeout),
                             connect_timeout=out.connect_timeout,
                             destination_concurrency=out.destination_concurrency,
                             session_idle=out.session_idle, mta_sts=mta_sts,
                             ca_file=ca_file, signer=outbound_headers(sealer, signer),
                             credentials=default.credentials, dane=DANE(resolver),
                             tls_reports=tls_reports, sender_rewriter=services.srs)
    smtp.transports = transports
    runner.add_agent(services.local_delivery)
    runner.add_agent(smtp)
    return OutboundPart(runner, smtp, signer, routes, services.blobs, sealer)


def _routes(config: Config, resolver: Any) -> Any:
    """The SMTP agent's default transport ([outbound]) and its [transport:DOMAIN]
    ones, as lightmail.reload.parts.Routes."""
    from lightmail.delivery.smtp import Transport
    from lightmail.outbound.routing import Router
    out = config.outbound
    default = Transport(Router(resolver, port=out.port, relay_host=out.relay_host),
                        out.tls, False, _credentials(out), out.dane)
    transports = {override.domain: Transport(
        Router(resolver, port=out.port, relay_host=override.relay), override.tls,
        override.protocol == "lmtp", _credentials(override),
        out.dane if override.dane == "outbound" else override.dane == "yes")
        for override in config.transports}
    return default, transports


def _credentials(section: Any) -> Any:
    """SMTP AUTH credentials of ``[outbound]`` or a ``[transport:DOMAIN]``, if any."""
    from lightmail.outbound.client import Credentials
    if not section.auth_user:
        return None
    return Credentials(section.auth_user, section.auth_password)


def get_services(service: IService) -> Services:
    """The :class:`Services` of a service tree made by :func:`makeService`."""
    if isinstance(service, LightMailService):
        return service.parts
    raise TypeError("not a LightMail service tree")
