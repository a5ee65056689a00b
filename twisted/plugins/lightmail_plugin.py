"""twistd plugin: ``twistd -n lightmail --config etc/lightmail.conf``."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", None,
         "LightMail config file (default: $LIGHTMAIL_CONFIG or "
         "/etc/lightmail/lightmail.conf)"],
    ]

    def postOptions(self) -> None:
        from lightmail.config import ConfigError, load_config
        from lightmail.service import validate
        path = (self["config"] or os.environ.get("LIGHTMAIL_CONFIG")
                or "/etc/lightmail/lightmail.conf")
        try:
            self["loaded"] = load_config(path, validators=validate)
        except ConfigError as exc:
            # twistd prints a UsageError as one line and exits with status 1.
            raise usage.UsageError(str(exc)) from None


@implementer(IServiceMaker, IPlugin)
class LightMailServiceMaker:
    tapname = "lightmail"
    description = "LightMail: SMTP, submission, LMTP, IMAP and POP3 mail server."
    options = Options

    def makeService(self, options: Any) -> Any:
        config = options["loaded"]
        # First, before anything installs the reactor or starts a thread: the worker
        # and writer processes are forked now (lightmail/workers/prefork.py).
        from lightmail.workers.prefork import prefork
        starter = prefork(config)
        from lightmail.reload.sighup import SignalReload
        from lightmail.service import makeService
        service = makeService(config, starter=starter)
        service.exit_on_failure = True
        # SIGHUP reloads the configuration; `lightmail reload` finds this process by
        # the pid file it writes.  (Added last, it is the first to stop.)
        SignalReload(service.reloader, config.server.state_dir).setServiceParent(service)
        return service


serviceMaker = LightMailServiceMaker()
