"""What a part of a LightMail process offers a reload."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface

from lightmail.config import Config

#: A prepared part's switch to the new configuration: called on the reactor; may
#: return a Deferred (a worker process's answer).
Switch = Callable[[], "Deferred[Any] | None"]


class IReloadable(Interface):
    """A part that takes a new configuration without a restart."""

    def prepare(config: Config) -> Deferred[Switch]:
        """Get ready to run with ``config`` (settled: lightmail.reload.settle), but
        do not switch yet.

        Reads what the configuration names (certificates, keys) off the reactor.
        Fires with the switch, which the reloader calls on the reactor once every
        part is ready; or fails with a ``ConfigError`` (or ``ReloadRefused``) saying
        why ``config`` cannot be used, and then no part switches."""


class ReloadRefused(Exception):
    """A reload that cannot be taken for a reason other than the file's (a worker
    process said no); the message says why."""
