"""Interfaces of the storage subsystem: blobs, mailboxes and the mail queue.

Protocol code talks only to these.  Every method that may touch a disk, a database or
a network returns a Deferred; implementations do that work off the reactor thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class BlobRef:
    """A durable, immutable blob: its SHA-256 (hex) and its size in octets."""

    id: str
    size: int


@dataclass(frozen=True)
class Mailbox:
    id: int
    user_id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    special_use: Optional[str] = None
    subscribed: bool = True


@dataclass(frozen=True)
class MessageInfo:
    """One message in a mailbox, without its content."""

    mailbox_id: int
    uid: int
    modseq: int
    blob_id: str
    size: int
    internal_date: int          # ms since the epoch
    flags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Appended:
    """Where an append landed: UIDVALIDITY/UID and the MODSEQ it was given."""

    mailbox_id: int
    uidvalidity: int
    uid: int
    modseq: int
    duplicate: bool = False     # already filed earlier under the same delivery id


@dataclass(frozen=True)
class MailboxStatus:
    """Counts for IMAP STATUS and SELECT, computed by the database."""

    mailbox: Mailbox
    messages: int
    unseen: int
    deleted: int
    size: int


@dataclass(frozen=True)
class MailboxChanges:
    """What changed in a mailbox after a MODSEQ: new or re-flagged messages (in UID
    order) and expunged UIDs.  What a session needs to catch up (RFC 7162 §3.2)."""

    mailbox: Mailbox
    changed: list[MessageInfo]
    expunged: list[int]


@dataclass(frozen=True)
class Copied:
    """Where COPY/MOVE put messages: (source UID, new UID) pairs (RFC 4315 COPYUID)."""

    uidvalidity: int
    pairs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class MailboxChange:
    """Emitted after every committed change to a mailbox (see IChangeListener)."""

    user_id: int
    mailbox_id: int
    kind: str                   # appended, flags, expunged, created, deleted
    uids: tuple[int, ...] = ()
    modseq: int = 0


@dataclass(frozen=True)
class QueueRecipient:
    address: str
    transport: str = "local"    # local, smtp, lmtp
    orcpt: Optional[str] = None
    notify: Optional[str] = None


@dataclass(frozen=True)
class Envelope:
    """What the SMTP/LMTP transaction says about a message besides its content."""

    mail_from: str
    recipients: Sequence[QueueRecipient]
    source: str = "mx"          # mx, submission, lmtp, local
    envid: Optional[str] = None
    ret: Optional[str] = None
    body: Optional[str] = None
    smtputf8: bool = False
    auth_user: Optional[str] = None
    client_address: Optional[str] = None
    priority: int = 0


@dataclass(frozen=True)
class QueueItem:
    """One claimed recipient of a queued message, with what delivery needs."""

    recipient_id: int
    queue_id: str
    recipient: QueueRecipient
    mail_from: str
    blob: BlobRef
    attempts: int
    envelope: Envelope = field(compare=False, repr=False,
                               default=Envelope(mail_from="", recipients=()))
    # The sender has had its delay warning for this recipient (RFC 3464 "delayed").
    delay_warned: bool = field(default=False, compare=False)
    # The blob's content, when a delivery agent read it ahead (small messages, read
    # together after a claim: IDeliveryAgent.prepare); else None (read when sent).
    content: Optional[bytes] = field(default=None, compare=False, repr=False)


class IBlobWriter(Interface):
    """Streams one message into the blob store."""

    def write(data: bytes) -> None:
        """Add ``data`` to the blob.  Buffers; never blocks the reactor."""

    def finish() -> Deferred[BlobRef]:
        """Make the blob durable (fsync file and directory) and return its ref.

        Content already in the store is not written again.
        """

    def abort() -> None:
        """Throw the partial blob away."""


class IBlobStore(Interface):
    """Immutable, content-addressed message blobs."""

    def writer() -> IBlobWriter:
        """A writer for a new blob."""

    def put(data: bytes) -> Deferred[BlobRef]:
        """Store ``data`` durably and return its ref."""

    def read(blob_id: str) -> Deferred[bytes]:
        """The whole content of a blob."""

    def read_range(blob_id: str, offset: int, length: int) -> Deferred[bytes]:
        """``length`` octets from ``offset`` (fewer at the end)."""

    def read_many(blob_ids: Sequence[str]) -> Deferred[dict[str, bytes]]:
        """The whole content of several (small) blobs, read in one go: blob id ->
        content, leaving out those that are missing."""

    def exists_now(blob_id: str) -> bool:
        """Whether the blob is present; called from worker threads only."""

    def delete_now(blob_id: str, older_than: float) -> bool:
        """Remove the blob if its file is older than the timestamp; worker threads only."""

    def sweep(older_than: float) -> Deferred[list[str]]:
        """Remove stray temporary files older than ``older_than`` (a Unix time)
        and return the ids of all complete blobs older than it, for the caller to
        check against its references."""


class IChangeListener(Interface):
    def mailbox_changed(change: MailboxChange) -> None:
        """Called on the reactor thread after a mailbox change has committed."""


class IMailStore(Interface):
    """Mailboxes and the messages in them.

    Every change is made here, in one transaction that assigns UIDs and MODSEQs,
    and is announced to the registered IChangeListeners after it commits.
    """

    blobs = Attribute("The IBlobStore that holds message content.")

    def add_listener(listener: IChangeListener) -> None:
        """Announce mailbox changes to ``listener``."""

    def create_mailbox(
        user_id: int,
        name: str,
        special_use: Optional[str] = None,
        subscribed: bool = True,
    ) -> Deferred[Mailbox]:
        """Create a mailbox; fails with MailboxExists if it is there already.  Mailboxes
        a user creates over IMAP are not subscribed (RFC 9051 §6.3.4, as Dovecot);
        the ones LightMail creates for users are."""

    def get_mailbox(user_id: int, name: str) -> Deferred[Optional[Mailbox]]:
        """The mailbox called ``name`` (INBOX case-insensitively), or None."""

    def get_or_create_mailbox(user_id: int, name: str) -> Deferred[Mailbox]:
        """The named mailbox, created first if missing (INBOX on first delivery)."""

    def list_mailboxes(user_id: int) -> Deferred[list[Mailbox]]:
        """All of a user's mailboxes, by name."""

    def append(
        mailbox_id: int,
        blob: BlobRef,
        flags: Sequence[str] = (),
        internal_date: Optional[int] = None,
        delivery_id: Optional[str] = None,
    ) -> Deferred[Appended]:
        """File a stored blob into a mailbox with the next UID and MODSEQ.

        With ``delivery_id``, a second append under the same id into the same
        mailbox files nothing and returns the first result with duplicate=True.
        """

    def list_messages(mailbox_id: int) -> Deferred[list[MessageInfo]]:
        """The messages of a mailbox in UID order."""

    def set_flags(
        mailbox_id: int,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: str = "replace",
    ) -> Deferred[list[MessageInfo]]:
        """Replace, add or remove flags (mode) and return the changed messages."""

    def expunge(mailbox_id: int, uids: Sequence[int]) -> Deferred[list[int]]:
        """Remove messages; return the UIDs actually removed."""

    def usage(user_id: int) -> Deferred[int]:
        """Octets stored in all of a user's mailboxes (what the quota counts)."""

    def delete_mailbox(user_id: int, name: str) -> Deferred[None]:
        """Delete a mailbox and its messages (not its children); NoSuchMailbox if absent."""

    def rename_mailbox(user_id: int, old: str, new: str) -> Deferred[None]:
        """Rename a mailbox and its children (``old/...``).  Renaming INBOX moves its
        messages to the new mailbox and leaves INBOX empty (RFC 9051 §6.3.6)."""

    def set_subscribed(mailbox_id: int, subscribed: bool) -> Deferred[None]:
        """Mark a mailbox subscribed or not (LSUB, LIST (SUBSCRIBED))."""

    def status(mailbox_id: int) -> Deferred[MailboxStatus]:
        """Message, unseen and deleted counts and total size of a mailbox."""

    def changes_since(mailbox_id: int, modseq: int) -> Deferred[MailboxChanges]:
        """Messages whose MODSEQ is above ``modseq`` and UIDs expunged after it."""

    def copy(source_id: int, uids: Sequence[int], target_id: int,
             move: bool = False) -> Deferred[Copied]:
        """File the messages ``uids`` of one mailbox into another, sharing their blobs;
        with ``move``, expunge them from the source in the same transaction."""


class IQueueStore(Interface):
    """The durable mail queue: one row per message, one per recipient."""

    def enqueue(
        envelope: Envelope, blob: BlobRef, queue_id: Optional[str] = None
    ) -> Deferred[str]:
        """Queue a stored message for its recipients; fires with the queue id once
        the queue rows are committed (durable)."""

    def claim(
        owner: str,
        transports: Sequence[str],
        limit: int,
        lease_seconds: float,
    ) -> Deferred[list[QueueItem]]:
        """Lease up to ``limit`` due recipients for ``owner``."""

    def delivered(item: QueueItem, owner: str) -> Deferred[None]:
        """Record a successful delivery."""

    def deferred(item: QueueItem, owner: str, error: str, next_attempt: int) -> Deferred[None]:
        """Record a temporary failure; retry at ``next_attempt`` (ms)."""

    def bounced(item: QueueItem, owner: str, error: str) -> Deferred[None]:
        """Record a permanent failure."""

    def release_leases(owner: str) -> Deferred[int]:
        """Give back the leases ``owner`` holds (its previous run crashed)."""

    def list_recipients(states: Sequence[str] = ()) -> Deferred[list[dict]]:
        """Queue entries for listing by the admin tools."""

    def delayed_recipients(queue_id: str) -> Deferred[list[dict]]:
        """The recipients of ``queue_id`` that are waiting after a temporary failure
        and whose sender has not been warned of the delay yet (each a dict of ``id``,
        ``recipient``, ``orcpt``, ``notify``, ``last_error``, ``attempts``)."""

    def warn_delayed(recipient_ids: Sequence[int], notice: Envelope,
                     blob: BlobRef) -> Deferred[Optional[str]]:
        """Mark the recipients as warned and queue the warning ``notice`` (with
        content ``blob``), in one transaction; fires with the notice's queue id.
        When any of them was warned meanwhile (by another node, say), nothing
        changes and it fires with None."""


class StorageError(Exception):
    """A storage operation could not be done; the message says why."""


class MailboxExists(StorageError):
    pass


class NoSuchMailbox(StorageError):
    pass


class BlobMissing(StorageError):
    """A blob that metadata refers to is not in the blob store."""
