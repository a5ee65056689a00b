"""ARC sealing of the mail LightMail forwards (RFC 8617 §5.1), through dkimpy.

A message that came in from outside (on the MX, or by LMTP) and leaves again (an
alias to a remote address) gets one ARC set, when ``[arc] seal`` is on: the
Authentication-Results field our inbound checks wrote on it (those naming our
authserv-id, ``[inbound] authserv_id``) as its ARC-Authentication-Results, an
ARC-Message-Signature over the message (relaxed/relaxed, dkimpy's list of header
fields: RFC 6376's recommended ones and From: once more), and an ARC-Seal whose
``cv=`` is the ``arc=`` result of that field, what the ARC check found of the chain
the message came with.  So the ARC check should run on the listeners whose mail
may be forwarded (it does by default on smtp listeners).

Nothing is sealed when there is no such Authentication-Results field (a listener
without checks), when the message came with ARC sets but our field has no ``arc=``
result (the chain was not checked: its status is unknown), or when the chain
already has 50 sets: the message then leaves as it is, and the log says why.

The key (``[arc] seal_keys``) is read as a DKIM signing key
(lightmail.policy.dkim.load_key) and must be RSA: ARC seals with rsa-sha256.
Sealing runs in a worker thread, once per delivery attempt (an RSA signature or
two: a forwarded message has one recipient or a few).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

import dkim
from twisted.internet import defer, threads
from zope.interface import implementer

from lightmail.delivery.headers import IOutboundHeaders
from lightmail.logs import BoundLogger
from lightmail.policy.dkim import KeyProblem, SigningKey, load_key
from lightmail.storage.interfaces import IBlobStore, QueueItem

__all__ = ["SEALED_SOURCES", "ARCSealer", "load_seal_key", "seal"]

# Mail that came from outside: what the other sources carry (submission, notices
# LightMail writes) has no chain to continue and is DKIM-signed instead.
SEALED_SOURCES = ("mx", "lmtp")
# The logger dkimverify silenced: dkimpy logs what it refuses at error level.
_QUIET = logging.getLogger("lightmail.dkimpy")


def seal(message: bytes, key: SigningKey, authserv_id: str,
         timestamp: Optional[int] = None) -> bytes:
    """The ARC set to put on top of ``message`` (ARC-Seal first), CRLF-terminated;
    ``b""`` when dkimpy finds nothing to seal (see the module's docstring).  Raises
    dkim.DKIMException for a message or chain it refuses.  CPU work: call it in a
    thread."""
    fields = dkim.arc_sign(message, key.selector.encode("ascii"),
                           key.domain.encode("ascii"), key.private,
                           authserv_id.encode("ascii", "replace"), timestamp=timestamp,
                           logger=_QUIET, linesep=b"\r\n")
    return b"".join(fields)


@implementer(IOutboundHeaders)
class ARCSealer:
    """The SMTP delivery agent's ARC header source (see the module's docstring).
    ``concurrency`` bounds the messages in memory and being sealed at once."""

    def __init__(self, key: SigningKey, authserv_id: str, blobs: IBlobStore,
                 sources: Sequence[str] = SEALED_SOURCES, reactor: Any = None,
                 concurrency: int = 2) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.key, self.authserv_id, self.blobs = key, authserv_id, blobs
        self.sources = frozenset(sources)
        self.reactor = reactor
        self.limit = defer.DeferredSemaphore(concurrency)
        self.sealed = 0                  # ARC sets added

    async def header_for(self, item: QueueItem) -> bytes:
        if item.envelope.source not in self.sources:
            return b""
        return await self.limit.run(lambda: defer.ensureDeferred(self._seal(item)))

    async def _seal(self, item: QueueItem) -> bytes:
        log = BoundLogger(namespace="lightmail.arc", msg_id=item.queue_id)
        message = item.content
        if message is None:
            message = await self.blobs.read(item.blob.id)
        try:
            fields: bytes = await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), seal, message, self.key,
                self.authserv_id)
        except dkim.DKIMException as exc:
            log.warn("not ARC-sealed: {error}", error=str(exc))
            return b""
        if not fields:
            log.info("not ARC-sealed: no Authentication-Results field of {authserv_id} "
                     "with the chain's result", authserv_id=self.authserv_id)
            return b""
        self.sealed += 1
        log.info("ARC set added: {key}", key=self.key.describe())
        return fields


def load_seal_key(config: Any) -> Optional[SigningKey]:
    """The sealing key ``[arc]`` of ``config`` (a :class:`lightmail.config.Config`)
    names, read; None when ``seal`` is off.  A missing or unusable key raises a
    ConfigError naming its line."""
    from lightmail.config import ConfigError, line_of, line_of_text
    section = config.arc
    if not section.seal:
        return None
    if len(section.seal_keys) != 1:
        problem = ("seal = yes needs the sealing key: seal_keys = DOMAIN:SELECTOR:KEYFILE"
                   if not section.seal_keys else
                   "one sealing key, not several: a hop adds one ARC set")
        key_name = "seal_keys" if section.seal_keys else "seal"
        raise ConfigError(problem, config.path, line_of(config, "arc", key_name), "arc",
                          key_name)
    spec = section.seal_keys[0]
    where = (config.path, line_of_text(config, "arc", "seal_keys", spec.text), "arc",
             "seal_keys")
    try:
        key = load_key(spec.domain, spec.selector, spec.path)
    except KeyProblem as exc:
        raise ConfigError(str(exc), *where) from None
    if key.algorithm != "rsa-sha256":
        raise ConfigError(f"{spec.path} is an Ed25519 key; ARC seals with RSA keys "
                          "(rsa-sha256)", *where)
    return key


def load_sealer(config: Any, blobs: IBlobStore) -> Optional[ARCSealer]:
    """The :class:`ARCSealer` of ``config``, or None when it seals nothing."""
    key = load_seal_key(config)
    if key is None:
        return None
    return ARCSealer(key, config.authserv_id, blobs)
