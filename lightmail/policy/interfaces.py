"""The seams of content scanning: antivirus, spam scoring and Junk training.

Which implementation runs is chosen once, at wiring (lightmail.wiring): the
protocols call these interfaces and never ask what is behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet.defer import Deferred
from zope.interface import Interface

from lightmail.storage.interfaces import IStagedBlob, Mailbox


@dataclass(frozen=True)
class ScanResult:
    """An antivirus scanner's answer about one message."""

    #: clean, infected, or unscanned (too large for the scanner: tagged, not refused)
    status: str
    #: The virus's name when infected.
    name: str = ""
    #: Why it was not scanned, for the log and the X-Virus-Status field.
    reason: str = ""


class IContentScanner(Interface):
    """An antivirus scanner (lightmail.policy.clamav)."""

    def scan(message: bytes) -> Deferred[ScanResult]:
        """Scan a whole message; ScannerError (lightmail.policy.scanclient) when the
        scanner gives no answer."""


class IAppendCheck(Interface):
    """What IMAP APPEND asks before it files a message a user uploads."""

    def check(staged: IStagedBlob, conn_id: str) -> Deferred[Optional[str]]:
        """None to file it, or the text of the NO that refuses it."""


@dataclass(frozen=True)
class SpamRequest:
    """What a spam scanner is told about a message besides its content."""

    client_address: str = ""
    helo: str = ""
    mail_from: str = ""
    recipients: Sequence[str] = ()
    queue_id: str = ""
    user: str = ""                  # the authenticated user, if any
    hostname: str = ""              # the client's name, if known


@dataclass(frozen=True)
class SpamVerdict:
    """A spam scanner's answer, in rspamd's terms (spamd's are mapped onto them)."""

    #: reject, soft reject, rewrite subject, add header, greylist or no action
    action: str
    score: float
    required_score: float
    symbols: tuple[str, ...] = ()
    #: What the scanner would have the SMTP reply say (rspamd's smtp_message).
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


class ISpamScanner(Interface):
    """A spam scanner (rspamd over HTTP, or SpamAssassin's spamd)."""

    name: str

    def check(message: bytes, request: SpamRequest) -> Deferred[SpamVerdict]:
        """Score a message; ScannerError when the scanner gives no answer."""

    def learn(kind: str, message: bytes, user: str) -> Deferred[None]:
        """Teach the scanner that ``message`` is ``kind`` ("spam" or "ham");
        ScannerError when it did not take the lesson (to be tried again)."""


class ITrainer(Interface):
    """Told of messages a user copies or moves between mailboxes over IMAP: one
    moved into Junk is spam, one moved out of it (not to Trash) is ham."""

    def filed(user_address: str, source: Mailbox, target: Mailbox,
              blob_ids: Sequence[str]) -> None:
        """Note the copies (queued; returns at once, never fails the command)."""
