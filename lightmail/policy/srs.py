"""The Sender Rewriting Scheme (SRS) for mail LightMail forwards to other domains.

An alias that leads outside sends a stranger's message on from our address: the
receiving MX checks SPF (RFC 7208) of the MAIL FROM domain against us, and fails it.
SRS sends the forwarded copy from an address at our SRS domain that carries the
original sender, signed, so that a bounce comes back to us and we can send it on:

    alice@origin.example  ->  SRS0=HHHH=TT=origin.example=alice@srs.domain

SRS is not an RFC: this is the "guarded" scheme of Shevek's paper as libsrs2
implements it and postsrsd (with Postfix) and Exim run it, so that LightMail and a
postsrsd with the same secret read each other's addresses:

- ``HHHH``: HMAC-SHA1 with the first secret over the ASCII-lower-cased fields
  (timestamp, domain, local part), the first 4 characters of its base64; any secret
  of the list verifies (key rotation), compared without regard to case (as libsrs2
  does: some MTAs lower-case the local parts they pass on).
- ``TT``: the day number (Unix time / 86400) modulo 1024 in two base32 characters;
  an address older than ``max_age`` days is refused.
- A sender that is itself an SRS0 address (another forwarder's) becomes
  ``SRS1=HHHH=first.hop==HHHH=TT=origin.example=alice@srs.domain``: its bounce goes
  straight back to the first forwarder, who alone can check the inner part.

:class:`SRS` is the scheme; :class:`SRSForwarding` is what LightMail does with it:
the SMTP delivery agent asks it for the MAIL FROM of each forwarded recipient, and
the SMTP handler asks it about each RCPT TO at the SRS domain.

Long addresses.  The SRS form adds about 30 octets and the sender's domain to the
local part, so a long sender (a mailing list's VERP bounce address) gets a local
part longer than RFC 5321 §4.5.3.1.1's 64 octets.  The RFC lets a client send
longer ones (servers "MUST be prepared" to refuse them, §4.5.3.1) and asks servers
to impose no limits they can avoid; Postfix takes them (the tests forward through
one), as do most servers in practice, and libsrs2 (postsrsd 1.10) rewrites whatever
the length.  So LightMail rewrites such senders too, giving the address postsrsd
gives, and its MX takes RCPT TO for its own SRS addresses however long their local
part (every other recipient is still held to the 64).  What it keeps is
§4.5.3.1.3's limit on the whole path, 256 octets with the angle brackets
(lightmail.address.MAX_PATH): a sender whose SRS form would be longer is sent as it
is, with a warning (postsrsd would rewrite it; a server may well refuse such a path,
and our MX would refuse the bounce).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lightmail.address import MAX_PATH
from lightmail.config import Config, ConfigError, line_of
from lightmail.directory.interfaces import Resolution
from lightmail.queue.interfaces import ISenderRewriter
from lightmail.smtp.codes import Reply
from lightmail.storage.interfaces import QueueItem

_HASH_LENGTH = 4                      # libsrs2's default (postsrsd -n)
_STAMP_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_DAY = 86400
_SLOTS = 1024                         # two base32 characters of days
_SEPARATORS = "=-+"                   # after SRS0/SRS1; inside, always "="


class SRSError(ValueError):
    """An address at the SRS domain that cannot be reversed; the message says why,
    in words for the sender of the bounce."""


class SRS:
    """The scheme: ``forward`` a sender to an address at ``domain``, ``reverse`` one
    of those.  ``secrets``: the first signs, all verify."""

    def __init__(self, domain: str, secrets: Sequence[bytes], max_age_days: int = 21,
                 clock: Callable[[], float] = time.time) -> None:
        if not secrets:
            raise ValueError("SRS needs at least one secret")
        if not 0 < max_age_days < _SLOTS:
            raise ValueError(f"the maximum age is 1 to {_SLOTS - 1} days")
        self.domain = domain.lower().rstrip(".")
        self.secrets = list(secrets)
        self.max_age_days = max_age_days
        self.clock = clock

    @staticmethod
    def is_srs(local: str) -> bool:
        """``local`` is an SRS0 or SRS1 local part (by its tag)."""
        return (len(local) > 4 and local[:3].upper() == "SRS" and local[3] in "01"
                and local[4] in _SEPARATORS)

    def forward(self, sender: str) -> str:
        """The address to send ``sender``'s mail from (``local@domain``)."""
        local, _, domain = sender.rpartition("@")
        if self.is_srs(local) and local[3] == "1":
            hashed, _, rest = local[5:].partition("=")
            first_hop, sep, opaque = rest.partition("=")
            if hashed and first_hop and sep and opaque:
                # Another forwarder's SRS1: a new hash, the bounce still goes to the
                # first hop (the paper's "hop n" case).
                return self._srs1(first_hop, opaque)
        elif self.is_srs(local):
            # Another forwarder's SRS0: its whole local part, with its separator,
            # becomes the opaque part; bounces go back to that forwarder.
            return self._srs1(domain, local[4:])
        stamp = self.timestamp()
        hashed = self._hash(self.secrets[0], stamp, domain, local)
        return f"SRS0={hashed}={stamp}={domain}={local}@{self.domain}"

    def _srs1(self, first_hop: str, opaque: str) -> str:
        hashed = self._hash(self.secrets[0], first_hop, opaque)
        return f"SRS1={hashed}={first_hop}={opaque}@{self.domain}"

    def reverse(self, address: str) -> str:
        """Where a bounce to ``address`` (an SRS address of ours) goes: the original
        sender of an SRS0, the first forwarder's SRS0 address of an SRS1.
        SRSError if it is forged, expired or malformed."""
        local, _, _ = address.rpartition("@")
        if not self.is_srs(local):
            raise SRSError("not an SRS address")
        fields = local[5:]
        if local[3] == "1":
            hashed, _, rest = fields.partition("=")
            first_hop, sep, opaque = rest.partition("=")
            if not (hashed and first_hop and sep and opaque):
                raise SRSError("malformed SRS1 address (expected SRS1=HASH=HOST=...)")
            self._check_hash(hashed, first_hop, opaque)
            return f"SRS0{opaque}@{first_hop}"
        parts = fields.split("=", 3)
        if len(parts) < 4 or not all(parts):
            raise SRSError("malformed SRS0 address "
                           "(expected SRS0=HASH=TIMESTAMP=DOMAIN=LOCAL)")
        hashed, stamp, domain, user = parts
        self._check_hash(hashed, stamp, domain, user)
        self._check_stamp(stamp)
        return f"{user}@{domain}"

    def timestamp(self, when: Optional[float] = None) -> str:
        """Two base32 characters: the day number modulo 1024."""
        day = int((self.clock() if when is None else when) // _DAY)
        return _STAMP_CHARS[(day >> 5) & 31] + _STAMP_CHARS[day & 31]

    def _check_stamp(self, stamp: str) -> None:
        upper = stamp.upper()
        if len(upper) != 2 or any(ch not in _STAMP_CHARS for ch in upper):
            raise SRSError("malformed SRS timestamp")
        then = _STAMP_CHARS.index(upper[0]) << 5 | _STAMP_CHARS.index(upper[1])
        # As libsrs2: the days since ``then``, modulo the 1024-day cycle.
        age = (int(self.clock() // _DAY) - then) % _SLOTS
        if age > self.max_age_days:
            raise SRSError(f"the SRS address has expired (bounces are accepted for "
                           f"{self.max_age_days} days after forwarding)")

    def _check_hash(self, hashed: str, *fields: str) -> None:
        if len(hashed) != _HASH_LENGTH:
            raise SRSError("malformed SRS hash")
        given = hashed.lower().encode("ascii", "replace")
        for secret in self.secrets:
            expected = self._hash(secret, *fields).lower().encode("ascii")
            if hmac.compare_digest(given, expected):
                return
        raise SRSError("the SRS hash does not match: the address was not made here "
                       "(forged, or signed with a secret no longer kept)")

    @staticmethod
    def _hash(secret: bytes, *fields: str) -> str:
        # libsrs2 lower-cases ASCII letters only (C's tolower), octet by octet.
        data = b"".join(field.encode("utf-8").lower() for field in fields)
        digest = hmac.new(secret, data, hashlib.sha1).digest()
        return base64.b64encode(digest).decode("ascii")[:_HASH_LENGTH]


def fits_a_path(address: str) -> bool:
    """Whether ``<address>`` is within RFC 5321 §4.5.3.1.3's 256 octets (its local
    part may be longer than §4.5.3.1.1's 64: see the module's docstring)."""
    return len(address.encode("utf-8")) + 2 <= MAX_PATH


# --- the secrets file --------------------------------------------------------------

def read_secrets(path: Path) -> list[bytes]:
    """The secrets in ``path``, one a line, first first (as postsrsd reads them:
    only the line break is taken off; empty lines are skipped).  OSError if it
    cannot be read, ValueError if it holds none."""
    secrets = [line.rstrip(b"\r") for line in path.read_bytes().split(b"\n")]
    secrets = [secret for secret in secrets if secret]
    if not secrets:
        raise ValueError(f"{path} holds no secret")
    return secrets


def load_or_create_secrets(path: Path) -> list[bytes]:
    """:func:`read_secrets`, making the file first when there is none: one random
    secret, mode 0600 (written aside and linked into place, so that another process
    never reads it half-written)."""
    try:
        return read_secrets(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".srs-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(base64.b64encode(os.urandom(24)) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:           # another process made it first
            pass
    finally:
        os.unlink(temporary)
    return read_secrets(path)


def load_srs(config: Config, create: bool = False) -> Optional[SRS]:
    """The scheme [srs] asks for (None when it is off), its secrets read from the
    secret file (made when missing, with ``create``).  ConfigError when they cannot
    be read."""
    settings = config.srs
    if not settings.enabled:
        return None
    path = config.srs_secret_file
    try:
        secrets = load_or_create_secrets(path) if create else read_secrets(path)
    except (OSError, ValueError) as exc:
        key = "secret_file" if settings.secret_file else None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read the SRS secrets from {path}: {reason}",
                          config.path, line_of(config, "srs", key), "srs", key) from None
    return SRS(config.srs_domain, secrets, int(settings.max_age // _DAY))


# --- LightMail's use of it -----------------------------------------------------------

#: Where forwarded mail comes from: strangers on the MX, and an LMTP client's.
FORWARDED_SOURCES = frozenset({"mx", "lmtp"})


@implementer(ISenderRewriter)
class SRSForwarding:
    """SRS as LightMail applies it ([srs]); ``srs`` None: off.

    Outbound (:meth:`envelope_sender`): a recipient that came in from outside (MX or
    LMTP, no AUTH, not from a trusted network) and leaves over SMTP is there because
    an alias leads outside; its MAIL FROM is rewritten unless it is the null sender,
    in one of our local domains, in ``exclude`` or at the SRS domain itself.  Only the
    wire's MAIL FROM changes: the queue keeps the original sender, so our own delivery
    notices go to it.

    Inbound (:meth:`resolve`): an SRS0/SRS1 address at the SRS domain is accepted
    when its hash (and, for SRS0, its age) checks out, and leads to the address it
    decodes to, relayed over SMTP; otherwise 550 with the reason.  The SRS domain
    needs no entry in the directory, only an MX record pointing at us.
    """

    log = Logger(namespace="lightmail.srs")

    def __init__(self, srs: Optional[SRS] = None, directory: Any = None,
                 exclude: Iterable[str] = (), access: Any = None) -> None:
        self.directory = directory          # IDirectory: which domains are ours
        # AccessLists: a trusted client ([access] trusted networks) relays as our own
        # users do, it does not forward.
        self.access = access
        self.configure(srs, exclude)

    def configure(self, srs: Optional[SRS], exclude: Iterable[str] = ()) -> None:
        """New settings (a reload): the scheme, and the senders' domains left alone."""
        self.srs = srs
        self.exclude = frozenset(domain.lower() for domain in exclude)

    def resolve(self, address: str) -> Resolution | Reply | None:
        """For a RCPT TO: the resolution of one of our SRS addresses, or the reply
        refusing it; None when ``address`` is not one (the directory decides)."""
        srs = self.srs
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if (srs is None or not at or domain.lower().rstrip(".") != srs.domain
                or not srs.is_srs(local)):
            return None
        try:
            original = srs.reverse(f"{local}@{domain}")
        except SRSError as exc:
            return Reply(550, "5.1.1", f"Recipient address rejected: {exc}")
        self.log.info("SRS: <{address}> leads back to <{original}>", address=address,
                      original=original)
        return Resolution(address, remote=(original,), is_local_domain=True)

    def envelope_sender(self, item: QueueItem) -> defer.Deferred[str]:
        sender, envelope, srs = item.mail_from, item.envelope, self.srs
        _, at, domain = sender.rpartition("@")
        domain = domain.lower().rstrip(".")
        if (srs is None or not at or envelope.source not in FORWARDED_SOURCES
                or envelope.auth_user or domain == srs.domain or domain in self.exclude):
            return defer.succeed(sender)
        d = self._trusted(envelope.client_address)
        d.addCallback(lambda trusted: trusted or self._local(domain, item))
        return d.addCallback(lambda ours: sender if ours else self._forward(srs, item))

    def _trusted(self, client: Optional[str]) -> defer.Deferred[bool]:
        if self.access is None or not client:
            return defer.succeed(False)
        return defer.maybeDeferred(self.access.is_trusted, client)

    def _local(self, domain: str, item: QueueItem) -> defer.Deferred[bool]:
        d = defer.maybeDeferred(self.directory.is_local_domain, domain)
        return d.addErrback(self._unknown, domain, item)

    def _unknown(self, failure: Failure, domain: str, item: QueueItem) -> bool:
        """The directory could not say whether ``domain`` is ours: rewrite (harmless
        for a local sender, whose bounces still come back) rather than hold the mail."""
        self.log.warn("SRS: could not ask the directory about {domain} ({error}); "
                      "rewriting the sender", domain=domain,
                      error=failure.getErrorMessage(), msg_id=item.queue_id)
        return False

    def _forward(self, srs: SRS, item: QueueItem) -> str:
        rewritten = srs.forward(item.mail_from)
        if not fits_a_path(rewritten):
            self.log.warn("SRS: <{sender}> sent as it is: its SRS form would be longer "
                          "than RFC 5321's 256-octet path, so a bounce could not come "
                          "back", sender=item.mail_from, msg_id=item.queue_id)
            return item.mail_from
        self.log.info("SRS: MAIL FROM:<{sender}> sent as <{rewritten}> to <{rcpt}>",
                      sender=item.mail_from, rewritten=rewritten,
                      rcpt=item.recipient.address, msg_id=item.queue_id)
        return rewritten
