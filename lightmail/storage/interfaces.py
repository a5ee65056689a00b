"""Interfaces of the storage subsystem: blobs, mailboxes and the mail queue.

Protocol code talks only to these.  Every method that may touch a disk, a database or
a network returns a Deferred; implementations do that work off the reactor thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple, Optional

from twisted.internet.defer import Deferred, succeed
from zope.interface import Attribute, Interface, implementer


@dataclass(frozen=True, slots=True)
class BlobRef:
    """A durable, immutable blob: its SHA-256 (hex) and its size in octets.

    ``headers``: the message's top-level header block (see :func:`header_block`)
    when the writer saw it, stored with the blob's row at its first reference so
    that SEARCH, SORT and header FETCHes need not read the blob; None if unknown.
    """

    id: str
    size: int
    headers: Optional[bytes] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Mailbox:
    id: int
    user_id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    special_use: Optional[str] = None
    subscribed: bool = True


class MessageInfo(NamedTuple):
    """One message in a mailbox, without its content.

    A named tuple, not a frozen dataclass: a SELECTed mailbox holds one per message,
    and a tuple is built about 6 times faster (no per-field ``object.__setattr__``)
    and is smaller (no ``__dict__``).  Messages with the same flags share one
    frozenset (see ``sqlstore``).
    """

    mailbox_id: int
    uid: int
    modseq: int
    blob_id: str
    size: int
    internal_date: int          # ms since the epoch
    flags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Appended:
    """Where an append landed: UIDVALIDITY/UID and the MODSEQ it was given."""

    mailbox_id: int
    uidvalidity: int
    uid: int
    modseq: int
    duplicate: bool = False     # already filed earlier under the same delivery id
    internal_date: int = 0      # as filed (ms since the epoch); 0 for a duplicate


@dataclass(frozen=True, slots=True)
class MailboxStatus:
    """Counts for IMAP STATUS and SELECT, computed by the database."""

    mailbox: Mailbox
    messages: int
    unseen: int
    deleted: int
    size: int
    from_uid: int = 0         # messages whose UID is at least the one asked for


@dataclass(frozen=True, slots=True)
class MailboxChanges:
    """What changed in a mailbox after a MODSEQ: new or re-flagged messages (in UID
    order) and expunged UIDs.  What a session needs to catch up (RFC 7162 §3.2)."""

    mailbox: Mailbox
    changed: list[MessageInfo]
    expunged: list[int]


@dataclass(frozen=True, slots=True)
class Copied:
    """Where COPY/MOVE put messages (RFC 4315 COPYUID): the source UIDs and their new
    UIDs, each as ascending runs (low, high); the n-th source UID went to the n-th new
    UID.  Runs, not pairs: a COPY of 300,000 messages is a few runs to carry between
    processes and to format, where pairs took megabytes and 0.3 s of the reactor."""

    uidvalidity: int
    source: tuple[tuple[int, int], ...] = ()
    target: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, uidvalidity: int, source_uids: Sequence[int], first_new: int) -> Copied:
        """``source_uids`` (ascending) copied to consecutive UIDs from ``first_new``."""
        if not source_uids:
            return cls(uidvalidity)
        return cls(uidvalidity, ascending_runs(source_uids),
                   ((first_new, first_new + len(source_uids) - 1),))

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """(source UID, new UID) for each message (for tests and small copies)."""
        new = [uid for low, high in self.target for uid in range(low, high + 1)]
        old = [uid for low, high in self.source for uid in range(low, high + 1)]
        return tuple(zip(old, new, strict=True))


def ascending_runs(numbers: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The runs of consecutive numbers in ``numbers`` (ascending, no repeats)."""
    runs = []
    start = prev = numbers[0]
    for number in numbers[1:]:
        if number != prev + 1:
            runs.append((start, prev))
            start = number
        prev = number
    runs.append((start, prev))
    return tuple(runs)


#: The kind of a MailboxChange that says changes may have gone unheard (the link to the
#: other nodes was down): sessions read the mailbox again.  With ANY_MAILBOX as its
#: mailbox id, every mailbox.
MISSED = "missed"
ANY_MAILBOX = 0


@dataclass(frozen=True, slots=True)
class MailboxChange:
    """Emitted after every committed change to a mailbox (see IChangeListener)."""

    user_id: int
    mailbox_id: int
    kind: str                   # appended, flags, expunged, created, deleted; MISSED
    uids: tuple[int, ...] = ()
    modseq: int = 0
    # The appended or re-flagged messages as committed, when the store has them at
    # hand (empty otherwise): an IMAP session that knows the mailbox up to the MODSEQ
    # just before this change takes them in without reading the store again.
    messages: tuple[MessageInfo, ...] = ()


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
    # Local recipients get it in this folder, not where their address leads (a
    # quarantine decided by the inbound checks: "Junk"); None: as addressed.
    folder: Optional[str] = None
    # MAIL FROM ... REQUIRETLS (RFC 8689): every relay hop over verified TLS, to a
    # server that offers REQUIRETLS, or a bounce.
    requiretls: bool = False


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


@dataclass(frozen=True, slots=True)
class BlobHandoff:
    """A staged blob handed to another process to make durable (the writer process):
    the path of its temporary file (None when nothing was written to one yet), the
    octets still to be appended there, and its ref."""

    path: Optional[str]
    data: bytes
    ref: BlobRef


@dataclass(frozen=True, slots=True)
class FilingTarget:
    """A mailbox owner that a delivery files into, as the directory resolved it (the
    write port never asks the directory: whoever calls it has)."""

    user_id: int
    address: str                # the owner's address, for the result's text
    quota_bytes: int = 0        # 0: no quota
    folder: Optional[str] = None  # +detail: this mailbox if the owner has it, else INBOX
    # A quarantine's folder: made (as \Junk when it is "Junk") if the owner lacks it,
    # rather than falling back to INBOX.
    create_folder: bool = False


@dataclass(frozen=True, slots=True)
class Filing:
    """One recipient's delivery: the owners its address leads to, under one delivery
    id (a second filing with the same id into the same mailbox files nothing).
    ``fresh``: the id was made for this delivery, so no earlier append can carry it
    (the duplicate check is skipped)."""

    targets: tuple[FilingTarget, ...]
    delivery_id: str
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class Filed:
    """What became of a Filing: where it was filed (``"owner/mailbox uid=N"`` each)
    and the owners over quota, who got nothing."""

    placed: tuple[str, ...] = ()
    full: tuple[str, ...] = ()

    @property
    def delivered(self) -> bool:
        """Some owner has it, or nobody was refused (an alias to several users is
        delivered to those with room)."""
        return bool(self.placed) or not self.full


class IBlobWriter(Interface):
    """Streams one message into the blob store."""

    def write(data: bytes) -> None:
        """Add ``data`` to the blob.  Buffers; never blocks the reactor."""

    def backlog() -> int:
        """Octets written and still held in memory, not yet in the blob's file: a
        caller that streams a large input stops reading it while this is high."""

    def drained() -> Deferred[None]:
        """Fires once the octets written so far are out of memory: in the blob's
        file, or dropped because the writer failed or was aborted (:meth:`finish` and
        :meth:`stage` report a failure).  At once when none are held."""

    def finish() -> Deferred[BlobRef]:
        """Make the blob durable (fsync file and directory) and return its ref.

        Content already in the store is not written again.
        """

    def stage() -> Deferred[IStagedBlob]:
        """End the blob and leave its durability step to the write port, which folds it
        into the transaction that refers to it (one flush for a group's blobs).  Fires
        at once, or, while a write of this blob is in flight, once the blob is durable
        (a staged blob with nothing left to do)."""

    def abort() -> None:
        """Throw the partial blob away."""


class IStagedBlob(Interface):
    """A message's content, complete, whose durability step is still to come.

    Every operation of :class:`IWritePort` takes one: it makes the blob durable before
    anything that refers to it commits.  Exactly one operation (or :meth:`commit`)
    must be given a staged blob that is not ``durable``.
    """

    ref = Attribute("The BlobRef it will have once durable.")
    store = Attribute("The IBlobStore whose commit_staged_now makes it durable.")
    durable = Attribute("True when nothing is left to make durable.")

    def commit() -> Deferred[BlobRef]:
        """Make it durable on its own, off the reactor thread."""

    def discard() -> None:
        """Drop it unless its commit has started (any thread; a no-op then)."""

    def handoff() -> BlobHandoff:
        """Give its commit to another process (reactor thread), which makes a staged
        blob of it again with :meth:`IBlobStore.adopt`."""


class IBlobStore(Interface):
    """Immutable, content-addressed message blobs."""

    location = Attribute(
        "Where the blobs are, for people (logs, the lightmail command): a directory, "
        "or s3://BUCKET/PREFIX.")

    def writer() -> IBlobWriter:
        """A writer for a new blob."""

    def put(data: bytes) -> Deferred[BlobRef]:
        """Store ``data`` durably and return its ref."""

    def read(blob_id: str) -> Deferred[bytes]:
        """The whole content of a blob."""

    def read_range(blob_id: str, offset: int, length: int) -> Deferred[bytes]:
        """``length`` octets from ``offset`` (fewer at the end)."""

    def read_staged(staged: IStagedBlob) -> Deferred[bytes]:
        """The whole content of a blob that one of this store's writers staged and
        nobody has committed or discarded yet (the policy checks of incoming mail
        read it before it is queued); the staged blob is left as it was."""

    def read_now(blob_id: str, length: int = -1) -> bytes:
        """The blob's content (its first ``length`` octets if not -1); worker threads
        only.  BlobMissing if it is not there."""

    def read_many(blob_ids: Sequence[str]) -> Deferred[list[bytes | BlobMissing]]:
        """The contents of several blobs, in order, read in one worker-thread call
        (cheaper than one :meth:`read` each for small blobs); a missing blob's place
        holds a BlobMissing, and the others are read all the same."""

    def open_now(blob_id: str) -> IO[bytes]:
        """The blob's content as a stream to read and close (a backup's or a
        migration's copy, whatever the blob's size); worker threads only.
        BlobMissing if it is not there."""

    def stage_now(source: IO[bytes], ref: BlobRef) -> IStagedBlob:
        """A staged blob of this store holding what ``source`` gives (read to its end,
        not closed), checked against ``ref`` (BlobDamaged if its SHA-256 or size
        differs); made durable by :meth:`commit_staged_now`, with others.  Worker
        threads only (a restore, a migration)."""

    def exists_now(blob_id: str) -> bool:
        """Whether the blob is present; called from worker threads only."""

    def delete_now(blob_id: str, older_than: float) -> bool:
        """Remove the blob if its file is older than the timestamp; worker threads only."""

    def sweep(older_than: float) -> Deferred[list[str]]:
        """Remove stray temporary files older than ``older_than`` (a Unix time)
        and return the ids of all complete blobs older than it, for the caller to
        check against its references."""

    batches_commits = Attribute(
        "True when commit_staged_now makes a group of blobs durable with one flush, "
        "so that a grouped transaction is the best place for a blob's commit even "
        "when groups are busy.")

    def commit_staged_now(staged: Sequence[IStagedBlob]) -> list[Optional[BaseException]]:
        """Make staged blobs of this store durable together (worker thread): one
        result each, None when durable or the exception that left it out."""

    def adopt(handoff: BlobHandoff) -> IStagedBlob:
        """The staged blob that another process handed over (:meth:`IStagedBlob.handoff`)."""

    def pin_now() -> AbstractContextManager[None]:
        """While the context lasts, garbage collection deletes no blob, in any process
        (a backup copying the blobs of its snapshot).  Waits for a collection in
        progress to end first; any thread but the reactor's."""

    def collecting_now() -> AbstractContextManager[bool]:
        """For garbage collection (worker thread): True, and no pin can start until
        the context ends; or False at once when a pin is held (collect later)."""

    def recover() -> Deferred[int]:
        """Put right what a crash left (at start, in the process that owns the store,
        before anything is served); fires with how many blobs it moved."""

    def close() -> None:
        """Let go of what the store holds (spare files, threads), once nothing uses
        it any more."""


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
        blob: IStagedBlob | BlobRef,
        flags: Sequence[str] = (),
        internal_date: Optional[int] = None,
    ) -> Deferred[Appended]:
        """File a blob into a mailbox with the next UID and MODSEQ, through the write
        port (a BlobRef is a blob that is durable already)."""

    def list_messages(mailbox_id: int) -> Deferred[list[MessageInfo]]:
        """The messages of a mailbox in UID order."""

    def messages_page(mailbox_id: int, after_uid: int, limit: int
                      ) -> Deferred[list[MessageInfo]]:
        """Up to ``limit`` messages whose UID is above ``after_uid``, in UID order: a
        large mailbox read a part at a time (``lightmail export``)."""

    def select_mailbox(user_id: int, name: str
                       ) -> Deferred[Optional[tuple[Mailbox, list[MessageInfo]]]]:
        """The mailbox called ``name`` (as :meth:`get_mailbox`) and its messages in UID
        order, in one read (None if there is no such mailbox).  The list holds every
        change up to the mailbox's HIGHESTMODSEQ; it may hold later ones too (never
        fewer), so that a reader who then applies the changes after that MODSEQ ends up
        with the mailbox as it is."""

    def headers_for(mailbox_id: int, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """The top-level header blocks of messages (each with the blank line that ends
        it, see ``blobs.header_block``), by UID, read from SQL in a few queries rather
        than from each blob.  Header blocks not known yet are taken from the blobs
        once and kept.  A UID is missing from the result when its message is gone,
        its header block is too long to keep (HEADER_CAP) or its blob is missing:
        read the blob then."""

    def set_flags(
        mailbox_id: int,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: str = "replace",
    ) -> Deferred[list[MessageInfo]]:
        """Replace, add or remove flags (mode) and return the changed messages
        (through the write port)."""

    def expunge(mailbox_id: int, uids: Sequence[int]) -> Deferred[list[int]]:
        """Remove messages; return the UIDs actually removed (through the write port)."""

    def usage(user_id: int) -> Deferred[int]:
        """Octets stored in all of a user's mailboxes (what the quota counts)."""

    def delete_mailbox(user_id: int, name: str) -> Deferred[None]:
        """Delete a mailbox and its messages (not its children); NoSuchMailbox if absent."""

    def rename_mailbox(user_id: int, old: str, new: str) -> Deferred[None]:
        """Rename a mailbox and its children (``old/...``).  Renaming INBOX moves its
        messages to the new mailbox and leaves INBOX empty (RFC 9051 §6.3.6)."""

    def set_subscribed(mailbox_id: int, subscribed: bool) -> Deferred[None]:
        """Mark a mailbox subscribed or not (LSUB, LIST (SUBSCRIBED))."""

    def subscriptions_without_mailbox(user_id: int) -> Deferred[list[str]]:
        """Names still subscribed whose mailbox was deleted (RFC 9051 §6.3.7: DELETE
        does not unsubscribe); a mailbox made again under the name takes it back."""

    def unsubscribe_name(user_id: int, name: str) -> Deferred[bool]:
        """Forget a subscription to a name that has no mailbox; whether it was there."""

    def status(mailbox_id: int, from_uid: Optional[int] = None) -> Deferred[MailboxStatus]:
        """Message, unseen and deleted counts and total size of a mailbox, and how
        many messages have a UID of ``from_uid`` or more (IMAP's RECENT)."""

    def changes_since(mailbox_id: int, modseq: int) -> Deferred[MailboxChanges]:
        """Messages whose MODSEQ is above ``modseq`` and UIDs expunged after it."""

    def copy(source_id: int, uids: Sequence[int], target_id: int,
             move: bool = False) -> Deferred[Copied]:
        """File the messages ``uids`` of one mailbox into another, sharing their blobs;
        with ``move``, expunge them from the source in the same transaction (through
        the write port)."""


class IQueueStore(Interface):
    """The durable mail queue: one row per message, one per recipient.  Messages are
    queued through the write port (IWritePort.enqueue)."""

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

    def dead(item: QueueItem, owner: str, error: str) -> Deferred[None]:
        """Record a permanent failure of mail that nobody can be told of (a notice to
        the null sender's postmaster that bounced): the message stays in the queue,
        in state ``dead``, for an administrator to look at, requeue or delete."""

    def release_leases(owner: str) -> Deferred[int]:
        """Give back the leases ``owner`` holds (its previous run crashed)."""

    def list_recipients(states: Sequence[str] = ()) -> Deferred[list[dict]]:
        """Queue entries for listing by the admin tools."""

    def find_messages(search: Any) -> Deferred[list[dict]]:
        """A page of queued messages with their recipients (a
        :class:`~lightmail.storage.queuestore.QueueSearch` says which)."""

    def message(queue_id: str) -> Deferred[Optional[dict]]:
        """One queued message with its recipients; None when it is not queued."""

    def claim_message(owner: str, queue_id: str,
                      lease_seconds: float) -> Deferred[list[QueueItem]]:
        """Lease the waiting recipients of one message, due or not (an
        administrator's bounce)."""

    def census() -> Deferred[list[tuple[str, int, float]]]:
        """The recipients in the queue by state: (state, how many, seconds since the
        oldest of their messages arrived), for metrics."""

    def delayed_recipients(queue_id: str) -> Deferred[list[dict]]:
        """The recipients of ``queue_id`` that are waiting after a temporary failure
        and whose sender has not been warned of the delay yet (each a dict of ``id``,
        ``recipient``, ``orcpt``, ``notify``, ``last_error``, ``attempts``)."""


@dataclass(frozen=True)
class NodeRun:
    """One run of a node: what its row says of it."""

    node_id: str
    host: str
    pid: int
    started: int            # ms
    version: str


@dataclass(frozen=True)
class NodeRecord:
    """A row of the nodes table, with the queue leases its node holds."""

    node_id: str
    host: str
    pid: int
    started: int
    heartbeat: int
    state: str                          # running, draining, stopped, dead
    version: str
    drain_requested: int | None = None
    leases: int = 0

    def holds(self, run: NodeRun) -> bool:
        return (self.host, self.pid) == (run.host, run.pid)


@dataclass(frozen=True)
class Beat:
    """What a beat found: ``outcome`` is ``ok``; ``drain`` (a drain was requested);
    ``revived`` (the run had been taken for dead, its leases handed back: it is
    running again); or ``taken`` (another process holds the node id now:
    ``holder``).  ``taken_over``: the dead nodes this beat marked, each with the
    number of queue leases handed back."""

    outcome: str
    taken_over: tuple[tuple[str, int], ...] = ()
    holder: NodeRecord | None = None


class INodeStore(Interface):
    """The nodes sharing the database (the ``nodes`` table): each node's row, its
    heartbeat and state, drain requests, and the hand-back of a dead node's queue
    leases.  Times are the caller's, in ms since the epoch."""

    def register(run: NodeRun, now: int, dead_after_ms: int,
                 pid_alive: Any) -> Deferred[Optional[NodeRecord]]:
        """Make the node's row ``run``'s, running; None when done, or the row of the
        live process that holds the node id (its heartbeat younger than
        ``dead_after_ms``; on ``run``'s host, only when ``pid_alive(pid)``)."""

    def beat(run: NodeRun, now: int, dead_after_ms: int, draining: bool) -> Deferred[Beat]:
        """The heartbeat of ``run``, and the hand-back of the nodes found dead."""

    def set_state(run: NodeRun, state: str, now: int) -> Deferred[bool]:
        """Mark ``run``'s row draining or stopped; False when it is not its own."""

    def nodes() -> Deferred[list[NodeRecord]]:
        """Every node's row, by id, with the queue leases it holds."""

    def request_drain(node_id: str, now: int) -> Deferred[Optional[NodeRecord]]:
        """Ask a running node to drain (it notices at its next beat); its row, or
        None when there is no such node."""


@dataclass(frozen=True)
class MTASTSPolicyRecord:
    """An MTA-STS policy as kept (RFC 8461 §5): ``fetched`` is a Unix time in seconds,
    ``max_age`` seconds; ``mx`` the policy's patterns, in order."""

    domain: str
    policy_id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched: float


class IMTASTSPolicyStore(Interface):
    """The MTA-STS policies fetched, kept across restarts (shared by the nodes of a
    cluster): what the outbound MTA-STS cache reads at start and writes through."""

    def load(now: float) -> Deferred[list[MTASTSPolicyRecord]]:
        """The policies not expired at ``now`` (a Unix time)."""

    def save(record: MTASTSPolicyRecord) -> Deferred[None]:
        """Keep ``record``, in place of the domain's previous one."""

    def forget(domain: str) -> Deferred[None]:
        """Drop the domain's policy (it expired)."""


class IWritePort(Interface):
    """The one way mail becomes durable and is filed: SMTP's acceptance, LMTP's and the
    queue's deliveries, IMAP's APPEND, STORE, EXPUNGE, COPY and MOVE.

    Each operation makes its staged blob durable first (folded into the transaction
    where the engine can: one flush for a group's blobs), commits, announces the
    committed mailbox changes to the store's IChangeListeners, and only then fires:
    a result means durable.  A failure means nothing of that operation committed,
    except where an operation says otherwise.  Which engine runs them (grouped in this
    process, the writer process, an embedder's own) is chosen once, where LightMail
    is wired (lightmail.wiring); callers never ask which one they got.
    """

    def enqueue(envelope: Envelope, blob: IStagedBlob,
                queue_id: Optional[str] = None) -> Deferred[str]:
        """Queue the message for its recipients; fires with the queue id."""

    def accept(filings: Sequence[Filing], blob: IStagedBlob) -> Deferred[list[Filed]]:
        """File one message for several recipients in one transaction, all or nothing
        (SMTP's acceptance, where the 250 then means filed).  Fails with
        :class:`NotFiled` when any of them cannot be filed now (over quota, no
        owner, an error): nothing is filed then, and the blob is durable."""

    def file(filings: Sequence[Filing], blob: IStagedBlob) -> list[Deferred[Filed]]:
        """File one message for each filing, each on its own (LMTP: one recipient's
        failure is not the others'); one Deferred each, in order."""

    def file_queued(filing: Filing, item: QueueItem, owner: str) -> Deferred[Filed]:
        """File a queued recipient's message and, when it is delivered, record that
        in the queue in the same transaction (exactly once after a crash)."""

    def append(mailbox_id: int, blob: IStagedBlob, flags: Sequence[str],
               internal_date: int) -> Deferred[Appended]:
        """IMAP APPEND: the next UID and MODSEQ of the mailbox."""

    def append_many(mailbox_id: int,
                    messages: Sequence[tuple[IStagedBlob, Sequence[str], int]]
                    ) -> Deferred[list[Appended]]:
        """Several APPENDs to one mailbox, in order, in one transaction (RFC 3502's
        MULTIAPPEND; ``lightmail import``): each message is (blob, flags, internal
        date).  Consecutive UIDs, one new MODSEQ for them all; their blobs are made
        durable first, together."""

    def set_flags(mailbox_id: int, uids: Sequence[int], flags: Sequence[str],
                  mode: str) -> Deferred[list[MessageInfo]]:
        """Replace, add or remove flags; the messages changed."""

    def expunge(mailbox_id: int, uids: Sequence[int]) -> Deferred[list[int]]:
        """Remove messages; the UIDs removed."""

    def copy(source_id: int, uids: Sequence[int], target_id: int,
             move: bool) -> Deferred[Copied]:
        """COPY, or MOVE (the source's expunges in the same transaction)."""

    def warn_delayed(recipient_ids: Sequence[int], notice: Envelope,
                     blob: IStagedBlob) -> Deferred[Optional[str]]:
        """Mark the queued recipients as warned of their delay and queue the warning
        ``notice``, in one transaction; fires with the notice's queue id.  When any
        of them was warned meanwhile (by another node, say), nothing changes and it
        fires with None."""


class StorageError(Exception):
    """A storage operation could not be done; the message says why."""


class MailboxExists(StorageError):
    pass


class NoSuchMailbox(StorageError):
    pass


class BlobMissing(StorageError):
    """A blob that metadata refers to is not in the blob store."""


class BlobDamaged(StorageError):
    """A blob's content does not match its id (its SHA-256) or its size."""


class AlreadyWarned(StorageError):
    """A queued recipient was warned of its delay already (IWritePort.warn_delayed)."""


class NotFiled(StorageError):
    """Filing at acceptance was not possible; nothing was filed or committed."""


@implementer(IStagedBlob)
class DurableBlob:
    """A blob that is durable already, as a staged blob with nothing left to do."""

    durable = True
    store = None

    def __init__(self, ref: BlobRef) -> None:
        self.ref = ref

    def commit(self) -> Deferred[BlobRef]:
        return succeed(self.ref)

    def discard(self) -> None:
        pass

    def handoff(self) -> BlobHandoff:
        raise StorageError("a durable blob has nothing to hand over")


def staged(blob: IStagedBlob | BlobRef) -> IStagedBlob:
    """A staged blob for ``blob``: a BlobRef names a blob that is durable already."""
    return DurableBlob(blob) if isinstance(blob, BlobRef) else blob
