"""The parts of a LightMail process that take a new configuration live.

Which parts a process has is decided where it is built (lightmail/service.py for
the main process, lightmail/workers/worker.py for a worker), once:

- :class:`ServicesPart`: the services' config, which every new session reads its
  limits from ([smtp], [imap]...), the SASL offer, the directory's and the login
  guard's settings, SRS's settings and secrets, DMARC's settings and Public Suffix
  List (read in a thread);
- :class:`ListenerPart`: one listener's connection limits, settings, certificates
  (read in a thread) and load balancers (PROXY protocol); connections made before
  keep theirs;
- :class:`OutboundPart`: the queue runner's schedule, the SMTP agent's routes and
  timeouts, the DKIM keys and the ARC sealing key (read in a thread).

The worker pool is a part too (lightmail/workers/pool.py): it hands the new
configuration to each worker, which reloads these same parts of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet import defer, threads
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from zope.interface import implementer

from lightmail.config import LISTENER_PREFIX, Config, ConfigError, ListenerConfig, line_of
from lightmail.listeners import ConnectionLimits, ServiceFactory
from lightmail.policy.dmarc import PublicSuffixes, ReportSettings
from lightmail.proxyproto.listener import ProxyTrust
from lightmail.reload.interfaces import IReloadable, Switch
from lightmail.tls import CertificateProblem, Certificates, ServerTLS, certificate_pairs
from lightmail.wiring import Services

if TYPE_CHECKING:
    from lightmail.delivery.smtp import SMTPDeliveryAgent, Transport
    from lightmail.policy.arc.seal import ARCSealer
    from lightmail.policy.dkim import DKIMSigner, Signer, SigningKey
    from lightmail.policy.srs import SRS
    from lightmail.queue.runner import QueueRunner
    from lightmail.storage.interfaces import IBlobStore

#: An SMTP agent's default transport and its [transport:DOMAIN] ones.
Routes = tuple["Transport", dict[str, "Transport"]]

log = Logger(namespace="lightmail.reload")


@implementer(IReloadable)
class ServicesPart:
    """What the sessions of a process read: ``services.config`` and the objects made
    from [directory]."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def prepare(self, config: Config) -> defer.Deferred[Switch]:
        d = threads.deferToThread(self._read, config)
        return d.addCallback(lambda read: lambda: self._switch(config, *read))

    def _read(self, config: Config) -> tuple[SRS | None, PublicSuffixes, ReportSettings]:
        """In a thread: the SRS secrets (made if SRS was off until now; a ConfigError
        refuses the reload), the Public Suffix List (70 ms to parse; a cron job may
        have fetched a new one) and the DMARC report settings (the server's name may
        ask the resolver)."""
        from lightmail.policy.dmarc import SuffixListError, load_suffixes
        from lightmail.policy.srs import load_srs
        srs = load_srs(config, True)
        try:
            suffixes = load_suffixes(config.dmarc.public_suffix_list)
        except SuffixListError as exc:
            raise ConfigError(str(exc), config.path,
                              line_of(config, "dmarc", "public_suffix_list"), "dmarc",
                              "public_suffix_list") from None
        return srs, suffixes, ReportSettings.from_config(config)

    def _switch(self, config: Config, srs: SRS | None, suffixes: PublicSuffixes,
                report_settings: ReportSettings) -> None:
        services = self.services
        services.config = config
        services.srs.configure(srs, config.srs.exclude_domains)
        services.dmarc.use(config.dmarc, suffixes)
        services.dmarc_reports.use(report_settings, suffixes)
        auth = config.directory
        services.accounts.reconfigure(auth.recipient_delimiter, auth.default_quota,
                                      auth.resolve_cache_ttl, "CRAM-MD5" in auth.mechanisms)
        services.sasl = dataclasses.replace(services.sasl, enabled=auth.mechanisms)
        services.access.configure(config.access.trusted_networks, config.access.refresh)
        guard = services.logins.guard
        guard.settings = dataclasses.replace(
            guard.settings, delay_after=auth.login_delay_after,
            max_delay=auth.login_max_delay, lockout_after=auth.lockout_after,
            account_lockout_after=auth.account_lockout_after)


@implementer(IReloadable)
class ListenerPart:
    """One listener: its settings for new sessions (``factory``), its certificates
    (``tls``, implicit or STARTTLS), its connection limits (``limits``: the
    factory's, or with workers the main process's) and whom it takes a PROXY header
    from (``proxy``, where it reads them)."""

    def __init__(self, name: str, factory: ServiceFactory | None = None,
                 tls: ServerTLS | None = None, limits: ConnectionLimits | None = None,
                 proxy: ProxyTrust | None = None) -> None:
        self.name = name
        self.factory = factory
        self.tls = tls
        self.limits = limits
        self.proxy = proxy

    def prepare(self, config: Config) -> defer.Deferred[Switch]:
        listener = next(x for x in config.listeners if x.name == self.name)
        d = threads.deferToThread(self._read, config, listener)
        return d.addCallback(lambda read: lambda: self._switch(listener, *read))

    def _read(self, config: Config, listener: ListenerConfig) -> tuple[str, Certificates | None]:
        """In a thread: the server's name (may ask the resolver) and the certificates."""
        hostname = config.hostname
        if self.tls is None:
            return hostname, None
        try:
            return hostname, Certificates(certificate_pairs(listener))
        except CertificateProblem as exc:
            section = LISTENER_PREFIX + listener.name
            default = {"certificate": listener.tls_cert, "key": listener.tls_key}
            key = ("tls_sni" if exc.path != default[exc.what] else
                   "tls_cert" if exc.what == "certificate" else "tls_key")
            raise ConfigError(str(exc), config.path, line_of(config, section, key),
                              section, key) from None

    def _switch(self, listener: ListenerConfig, hostname: str,
                certificates: Certificates | None) -> None:
        if self.limits is not None:
            self.limits.follow(listener)
        if self.proxy is not None:
            self.proxy.follow(listener)
        if self.factory is not None:
            self.factory.reconfigure(listener, hostname)
        if self.tls is not None and certificates is not None:
            self.tls.use(certificates)


def listener_part(name: str, factory: IProtocolFactory, implicit_tls: ServerTLS | None,
                  own_limits: bool = True, proxy: ProxyTrust | None = None) -> ListenerPart:
    """The part of a listener whose sessions run in this process: with one of
    LightMail's factories, its settings, its STARTTLS certificates and, when it keeps
    its limits itself (``own_limits``: not in a worker, whose limits the main process
    keeps), its connection limits; and its PROXY settings (``proxy``)."""
    if not isinstance(factory, ServiceFactory):
        # A protocol an embedder registered: its implicit TLS and PROXY header are
        # LightMail's.
        return ListenerPart(name, tls=implicit_tls, proxy=proxy)
    return ListenerPart(name, factory, implicit_tls or factory.tls_context,
                        factory.limits if own_limits else None, proxy)


@implementer(IReloadable)
class OutboundPart:
    """The main process's outbound side.  ``routes(config)`` makes the SMTP agent's
    default transport and its [transport:DOMAIN] ones (lightmail/service.py)."""

    def __init__(self, runner: QueueRunner, agent: SMTPDeliveryAgent,
                 dkim: DKIMSigner | None, routes: Callable[[Config], Routes],
                 blobs: IBlobStore, arc: ARCSealer | None = None) -> None:
        self.runner = runner
        self.agent = agent
        self.dkim = dkim                # the agent's signer; None while none is made
        self.arc = arc                  # the agent's ARC sealer; None when it seals not
        self.routes = routes
        self.blobs = blobs

    def prepare(self, config: Config) -> defer.Deferred[Switch]:
        d = threads.deferToThread(self._read, config)
        return d.addCallback(lambda read: lambda: self._switch(config, *read))

    def _read(self, config: Config
              ) -> tuple[str, Routes, Signer | None, SigningKey | None]:
        """In a thread: the server's name, the routes, the DKIM keys and the ARC
        sealing key (ConfigError)."""
        from lightmail.policy.arc.seal import load_seal_key
        from lightmail.policy.dkim import load_signer
        return (config.hostname, self.routes(config), load_signer(config),
                load_seal_key(config))

    def _switch(self, config: Config, hostname: str, routes: Routes,
                signer: Signer | None, seal_key: SigningKey | None) -> None:
        from lightmail.delivery.headers import outbound_headers
        from lightmail.outbound.client import Timeouts
        from lightmail.policy.arc.seal import ARCSealer
        from lightmail.policy.dkim import DKIMSigner
        out = config.outbound
        runner = self.runner
        runner.concurrency = out.concurrency
        runner.min_backoff, runner.max_backoff = out.min_backoff, out.max_backoff
        runner.max_lifetime = out.max_lifetime
        runner.delay_warning_time = out.delay_warning_time
        default, transports = routes
        self.agent.reconfigure(default, transports, hostname,
                               Timeouts(out.command_timeout, out.data_timeout),
                               out.connect_timeout, out.destination_concurrency)
        self.arc = None
        if seal_key is not None:
            # It keeps nothing between messages: a new one costs nothing.
            self.arc = ARCSealer(seal_key, config.authserv_id, self.blobs)
            log.info("ARC: sealing forwarded mail with {key}", key=seal_key.describe())
        if signer is None:
            self.agent.signer = outbound_headers(self.arc)
            return
        if self.dkim is None:
            self.dkim = DKIMSigner(signer, self.blobs, config.dkim.sources)
        else:
            self.dkim.use(signer, config.dkim.sources)
        self.agent.signer = outbound_headers(self.arc, self.dkim)
        for domain_keys in signer.keys.values():
            for key in domain_keys:
                log.info("DKIM: signing with {key}", key=key.describe())
