"""What the inbound checks share: the interface each implements, the message as they
see it, and what they found about a transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from lightmail.policy.inbound.authresults import ResultClause
from lightmail.storage.interfaces import IBlobStore, IStagedBlob


@dataclass(frozen=True)
class HeaderEdit:
    """One change to the header block, applied in the chain's one rewrite of the
    message (lightmail.policy.inbound.edits), on the fields as the checks saw them
    (our Received field first) and after the edits before it.

    ``action``: ``append`` (a field at the end of the header block), ``insert``
    (before the field at ``index``, 0 being the first; at the end beyond the last)
    or ``change`` (the ``index``-th field named ``name``, 1 being the first, gets
    ``value``, or is removed when ``value`` is None; a new field is appended when
    there are fewer).  ``value`` is all that follows the colon, folded with CR LF and
    white space."""

    action: str
    name: str
    value: Optional[bytes]
    index: int = 0


@dataclass(frozen=True)
class AddedRecipient:
    """A recipient a check adds (a milter's ADDRCPT), with the DSN parameters RCPT TO
    would have given it (RFC 3461 §4.1, §4.2: NOTIFY upper-cased, ORCPT as written),
    already checked by the rules RCPT TO's are."""

    address: str
    notify: Optional[str] = None
    orcpt: Optional[str] = None


@dataclass(frozen=True)
class NewSender:
    """A new MAIL FROM a check gives (a milter's CHGFROM), with the DSN parameters it
    changes (RFC 3461 §4.3, §4.4: RET upper-cased, ENVID as written); None keeps the
    transaction's."""

    address: str
    ret: Optional[str] = None
    envid: Optional[str] = None


@dataclass
class Findings:
    """What the checks found about one transaction; later checks read earlier ones'
    (DMARC reads ``spf`` and ``dkim``)."""

    #: lightmail.policy.spf.IdentityResults, when SPF was checked.
    spf: Any = None
    #: lightmail.policy.dkimverify.SignatureResult per DKIM-Signature, top first.
    dkim: list[Any] = field(default_factory=list)
    #: lightmail.policy.dmarc's result, when DMARC was checked.
    dmarc: Any = None
    #: lightmail.policy.arc's result, when ARC was checked.
    arc: Any = None
    #: lightmail.policy.inbound.dnsbl's DNSBLResult, once weighed (at RCPT TO).
    dnsbl: Any = None
    #: lightmail.policy.reverse's ReverseResult (the client's FCrDNS name), when the
    #: reverse check ran.
    iprev: Any = None
    #: The client or the sender is on an allow list (or the client is trusted): the
    #: checks meant for strangers (SPF, greylisting, DNSBLs, scanners) let it be.
    allowlisted: bool = False
    #: The RFC 5322.From domain, once a check read it (DMARC).
    header_from: Optional[str] = None
    #: File the message in this folder of each local recipient (quarantine), not
    #: where its address leads.
    folder: Optional[str] = None
    #: Why it goes there (logged).
    folder_reason: str = ""
    #: Header fields the checks add (a scanner's X-Spam-Status, say), each a whole
    #: field without its line end; written below Authentication-Results.
    added_headers: list[str] = field(default_factory=list)
    #: Changes to the header block where a check says (a milter's), in order.
    header_edits: list[HeaderEdit] = field(default_factory=list)
    #: A new body (CR LF line ends) in place of the message's, when a check gave one.
    body: Optional[bytes] = None
    #: Why the message is to be accepted and then dropped (a milter's DISCARD).
    discarded: Optional[str] = None
    #: Changes to the envelope (a milter's): recipients added (with their DSN
    #: parameters) and removed (as RCPT TO named them), a new MAIL FROM (with its);
    #: the SMTP handler applies them.
    added_recipients: list[AddedRecipient] = field(default_factory=list)
    removed_recipients: list[str] = field(default_factory=list)
    new_sender: Optional[NewSender] = None

    def add_header(self, name: str, value: str) -> None:
        """Add ``name: value`` (printable ASCII only; anything else becomes ``?``)."""
        text = f"{name}: {value}"
        self.added_headers.append("".join(c if " " <= c <= "~" else "?" for c in text))

    def edit_header(self, edit: HeaderEdit) -> None:
        self.header_edits.append(edit)

    def discard(self, reason: str) -> None:
        """Accept the message (250) but deliver it nowhere (the first reason stays)."""
        if self.discarded is None:
            self.discarded = reason

    def quarantine(self, folder: str, reason: str) -> None:
        """File the message in ``folder`` of each local recipient (the first check to
        ask decides)."""
        if self.folder is None:
            self.folder, self.folder_reason = folder, reason


class Message:
    """The staged message as the checks see it: its header block at once, its whole
    content read once for all the checks that need it."""

    def __init__(self, blobs: IBlobStore, staged: IStagedBlob) -> None:
        self._blobs = blobs
        self.staged = staged
        #: The header block (from the blob writer; b"" for a header block larger
        #: than the writer keeps, which the checks then read from the content).
        self.headers: bytes = staged.ref.headers or b""
        self.size: int = staged.ref.size
        self._content: Optional[bytes] = None

    def content(self) -> Deferred[bytes]:
        if self._content is not None:
            return defer.succeed(self._content)

        def keep(data: bytes) -> bytes:
            self._content = data
            if not self.headers:
                self.headers = header_block(data)
            return data
        return self._blobs.read_staged(self.staged).addCallback(keep)

    def header_block(self) -> Deferred[bytes]:
        if self.headers:
            return defer.succeed(self.headers)
        return self.content().addCallback(lambda _: self.headers)


def header_block(data: bytes) -> bytes:
    """The header block of a message, its terminating blank line excluded."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = data.find(separator)
        if end >= 0:
            return data[:end + len(separator) // 2]
    return data


class IInboundCheck(Interface):
    """One check of the inbound chain (see lightmail.policy.inbound)."""

    name = Attribute("The check's name in [listener:NAME] checks and in logs.")
    verdict_fields = Attribute(
        "The names of the header fields in which this check writes its verdict "
        "(X-Spam-Status...), whichever it writes this time: fields of these names "
        "that came with the message are removed in the chain's rewrite, so that "
        "nobody outside can pre-mark mail (a tuple; empty for none).")

    def connect(session: Any, findings: Findings) -> Deferred[Any]:
        """A new connection, before the greeting (``findings`` are the session's, not
        a transaction's): None to greet, or a Reply (421) to close with."""

    def mail(session: Any, tx: Any, findings: Findings) -> Deferred[Any]:
        """After MAIL FROM: None to go on, or a Reply refusing the transaction."""

    def rcpt(session: Any, tx: Any, address: str, findings: Findings) -> Deferred[Any]:
        """After the handler accepted RCPT TO ``address``: None to go on, or a Reply
        refusing this recipient (client checks are best made here, as Postfix's
        smtpd_delay_reject does: the log then shows who the mail was for)."""

    def content(session: Any, tx: Any, message: Message,
                findings: Findings) -> Deferred[Any]:
        """The whole message, staged: None to go on, or a Reply refusing it."""

    def results(findings: Findings) -> list[ResultClause]:
        """What this check found, for the Authentication-Results header field."""

    def session_ended(session: Any) -> None:
        """The SMTP session is over (whatever became of its transactions): let go of
        what was kept for it (a milter's connection)."""


@implementer(IInboundCheck)
class InboundCheck:
    """A check that looks at nothing: subclasses override the steps they use."""

    name = "nothing"
    verdict_fields: tuple[str, ...] = ()

    def connect(self, session: Any, findings: Findings) -> Deferred[Any]:
        return defer.succeed(None)

    def mail(self, session: Any, tx: Any, findings: Findings) -> Deferred[Any]:
        return defer.succeed(None)

    def rcpt(self, session: Any, tx: Any, address: str,
             findings: Findings) -> Deferred[Any]:
        return defer.succeed(None)

    def content(self, session: Any, tx: Any, message: Message,
                findings: Findings) -> Deferred[Any]:
        return defer.succeed(None)

    def results(self, findings: Findings) -> list[ResultClause]:
        return []

    def session_ended(self, session: Any) -> None:
        pass
