"""SORT and THREAD (RFC 5256), with DISPLAYFROM/DISPLAYTO (RFC 5957).

* :func:`base_subject` -- the base subject of RFC 5256 §2.1 (what SUBJECT sorts on
  and what threads group by);
* :func:`parse_sort_criteria` and :func:`sort_messages` -- RFC 5256 §3;
* :func:`thread_messages` -- the ORDEREDSUBJECT and REFERENCES algorithms of RFC 5256
  §4, giving a list of :class:`ThreadNode` trees;
* :func:`format_threads` -- those trees as the body of the THREAD response.

Strings compare under :func:`collation_key`, which follows i;unicode-casemap
(RFC 5051, as I18NLEVEL=1 asks in RFC 5256 §1): titlecase each character, then
decompose (NFKD), so "a", "A" and "á" sort together.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lightmail.imap.search import MessageContent, MessageView
from lightmail.imap.tokens import Atom, ParseError

SORT_KEYS = ("ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO",
             "DISPLAYFROM", "DISPLAYTO")
ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")

Item = tuple[MessageView, MessageContent]


# -- base subject (RFC 5256 §2.1, grammar in §5) --------------------------------------

_WSP_RUN = re.compile(r"[ \t\r\n]+")
_BLOB = r"\[[^\[\]]*\][ \t]*"                                   # subj-blob
_REFWD = rf"(?:re|fwd?)[ \t]*(?:{_BLOB})?:"                    # subj-refwd
_LEADER = re.compile(rf"(?:{_BLOB})*{_REFWD}|[ \t]", re.I)      # subj-leader
_TRAILER = re.compile(r"(?:\(fwd\)|[ \t])\Z", re.I)            # subj-trailer
_LEADING_BLOB = re.compile(_BLOB)


def base_subject(subject: str) -> str:
    """The base subject of ``subject`` (already RFC 2047 decoded), RFC 5256 §2.1."""
    return _extract_subject(subject)[0]


def _extract_subject(subject: str) -> tuple[str, bool]:
    """The base subject, and whether the subject marks a reply or forward (it had
    a subj-refwd, a "(fwd)" trailer or a [fwd: ...] wrapper; RFC 5256 §4 step 5)."""
    # (1) Tabs and continuations to a space, runs of spaces to one.
    text = _WSP_RUN.sub(" ", subject)
    reply = False
    while True:
        text, trailed = _strip_trailers(text)       # (2)
        text, led = _strip_leaders(text)            # (3) - (5)
        reply = reply or trailed or led
        # (6) "[fwd:" ... "]" around the whole: unwrap, start again from (2).
        if text[:5].lower() == "[fwd:" and text.endswith("]"):
            text, reply = text[5:-1], True
            continue
        return text, reply                          # (7)


def _strip_trailers(text: str) -> tuple[str, bool]:
    """Step (2): remove subj-trailers ("(fwd)" or white space) until none is left."""
    forwarded = False
    while (match := _TRAILER.search(text)) is not None:
        forwarded = forwarded or match.group() not in (" ", "\t")
        text = text[:match.start()]
    return text, forwarded


def _strip_leaders(text: str) -> tuple[str, bool]:
    """Steps (3) to (5): remove subj-leaders, then a subj-blob if something is left
    after it, until neither applies."""
    reply = False
    while True:
        changed = False
        while (match := _LEADER.match(text)) is not None:
            reply = reply or match.group() not in (" ", "\t")
            text, changed = text[match.end():], True
        match = _LEADING_BLOB.match(text)
        if match is not None and text[match.end():]:
            text, changed = text[match.end():], True
        if not changed:
            return text, reply


def collation_key(text: str) -> str:
    """``text`` in titlecased canonical form (i;unicode-casemap, RFC 5051 §2)."""
    if text.isascii():
        return text.upper()
    titled = "".join(ch.title() for ch in text)
    decomposed = unicodedata.normalize("NFKD", titled)
    return "".join(ch.title() for ch in decomposed)


# -- SORT (RFC 5256 §3) ----------------------------------------------------------------

def parse_sort_criteria(value: Any) -> list[tuple[bool, str]]:
    """``(REVERSE DATE SUBJECT)`` as ``[(True, "DATE"), (False, "SUBJECT")]``."""
    if not isinstance(value, list) or not value:
        raise ParseError("SORT needs a parenthesised list of sort criteria")
    criteria: list[tuple[bool, str]] = []
    reverse = False
    for token in value:
        name = token.upper() if isinstance(token, Atom) else None
        if name == "REVERSE" and not reverse:
            reverse = True
        elif name in SORT_KEYS:
            criteria.append((reverse, name))
            reverse = False
        else:
            raise ParseError(f"invalid sort criterion {str(token)[:30]!r}")
    if reverse:
        raise ParseError("REVERSE must be followed by a sort criterion")
    return criteria


def sort_messages(items: Sequence[Item], criteria: list[tuple[bool, str]]
                  ) -> list[MessageView]:
    """The messages in the order ``criteria`` give; equal ones by sequence number,
    which REVERSE does not turn round (RFC 5256 §3)."""
    ordered = sorted(items, key=lambda item: item[0].seq)
    # Stable sorts from the last criterion to the first; sorted(reverse=True) keeps
    # equal items in their order, so the sequence-number tie-break stays ascending.
    for reverse, name in reversed(criteria):
        value = _SORT_VALUES[name]
        keyed = [(value(view, content), (view, content)) for view, content in ordered]
        keyed.sort(key=lambda pair: pair[0], reverse=reverse)
        ordered = [item for _, item in keyed]
    return [view for view, _ in ordered]


def sent_date(view: MessageView, content: MessageContent) -> float:
    """RFC 5256 §2.2: the Date: header in UTC, else the internal date."""
    sent = content.date()
    return sent if sent is not None else view.internal_date / 1000


def _first_header(content: MessageContent, name: str) -> str:
    values = content.header(name)
    return values[0] if values else ""


def _first_address(content: MessageContent, name: str) -> tuple[str, str, str]:
    """(display name, local part, domain) of the first address in a header, as
    ENVELOPE shows it (a group: its name as the local part), or empty."""
    addresses = content.addresses(name)
    return addresses[0] if addresses else ("", "", "")


def _mailbox(content: MessageContent, name: str) -> str:
    """The IMAP addr-mailbox (local part) of the first address (RFC 5256 §3)."""
    return collation_key(_first_address(content, name)[1])


def _display(content: MessageContent, name: str) -> str:
    """RFC 5957 §3: the display name if not empty, else the addr-spec."""
    display, mailbox, host = _first_address(content, name)
    return collation_key(display.strip() or (f"{mailbox}@{host}" if host else mailbox))


_SORT_VALUES: dict[str, Callable[[MessageView, MessageContent], Any]] = {
    "ARRIVAL": lambda view, content: view.internal_date,
    "CC": lambda view, content: _mailbox(content, "Cc"),
    "DATE": sent_date,
    "FROM": lambda view, content: _mailbox(content, "From"),
    "SIZE": lambda view, content: view.size,
    "SUBJECT": lambda view, content: collation_key(
        base_subject(_first_header(content, "Subject"))),
    "TO": lambda view, content: _mailbox(content, "To"),
    "DISPLAYFROM": lambda view, content: _display(content, "From"),
    "DISPLAYTO": lambda view, content: _display(content, "To"),
}


# -- THREAD (RFC 5256 §4) -------------------------------------------------------------

@dataclass(eq=False)
class ThreadNode:
    """A message in a thread tree; ``message`` is None for a dummy (a message
    referred to but not among those searched, or a subject group's head)."""

    message: Optional[MessageView] = None
    children: list[ThreadNode] = field(default_factory=list)
    parent: Optional[ThreadNode] = field(default=None, repr=False)
    date: tuple[float, int] = (0.0, 0)      # (sent date, sequence number): §2.2
    subject: str = field(default="", repr=False)

    def sort_key(self) -> tuple[float, int]:
        """A dummy sorts as its first child (§4 steps 4 and 6)."""
        node = self
        while node.message is None and node.children:
            node = node.children[0]
        return node.date

    def add(self, child: ThreadNode) -> None:
        child.parent = self
        self.children.append(child)

    def detach(self) -> None:
        if self.parent is not None:
            self.parent.children.remove(self)
            self.parent = None


def thread_messages(algorithm: str, items: Sequence[Item]) -> list[ThreadNode]:
    """The threads of ``items`` by ``algorithm`` (ORDEREDSUBJECT or REFERENCES)."""
    in_order = sorted(items, key=lambda item: item[0].seq)
    nodes = [_leaf(view, content) for view, content in in_order]
    if algorithm.upper() == "ORDEREDSUBJECT":
        return _ordered_subject(nodes)
    if algorithm.upper() == "REFERENCES":
        return _references(nodes, [content for _, content in in_order])
    raise ParseError(f"unknown THREAD algorithm {algorithm[:30]}")


def _leaf(view: MessageView, content: MessageContent) -> ThreadNode:
    return ThreadNode(view, date=(sent_date(view, content), view.seq),
                      subject=_first_header(content, "Subject"))


def _ordered_subject(nodes: list[ThreadNode]) -> list[ThreadNode]:
    """ORDEREDSUBJECT: sort by base subject then sent date; each run of one base
    subject is a thread whose later messages are children of the first; threads in
    order of their first message's sent date (RFC 5256 §4)."""
    keyed = sorted(nodes, key=lambda n: (collation_key(base_subject(n.subject)), n.date))
    threads: list[ThreadNode] = []
    current = None
    for node in keyed:
        subject = collation_key(base_subject(node.subject))
        if threads and subject == current:
            threads[-1].add(node)
        else:
            threads.append(node)
            current = subject
    threads.sort(key=lambda n: n.date)
    return threads


def _references(nodes: list[ThreadNode], contents: list[MessageContent]
                ) -> list[ThreadNode]:
    """REFERENCES: RFC 5256 §4, steps (1) to (6)."""
    every = _link_references(nodes, contents)                       # (1)
    root = ThreadNode()
    for node in every:                                              # (2)
        if node.parent is None:
            root.add(node)
    _prune(root)                                                    # (3)
    for top in root.children:                                       # (4)
        if top.message is None:
            top.children.sort(key=ThreadNode.sort_key)
    root.children.sort(key=ThreadNode.sort_key)
    _gather_subjects(root)                                          # (5)
    _sort_siblings(root)                                            # (6)
    for top in root.children:
        top.parent = None
    return root.children


def _link_references(nodes: list[ThreadNode], contents: list[MessageContent]
                     ) -> list[ThreadNode]:
    """Step (1): parent/child links from each message's references; returns every
    node made, dummies included.  Message IDs compare case-sensitively."""
    table: dict[str, ThreadNode] = {}
    every: list[ThreadNode] = []

    def lookup(message_id: str) -> ThreadNode:
        node = table.get(message_id)
        if node is None:                    # not found: a dummy for this ID
            node = table[message_id] = ThreadNode()
            every.append(node)
        return node

    for node, content in zip(nodes, contents, strict=True):
        node = _place(table, every, node, _message_id(content))
        previous: Optional[ThreadNode] = None
        for reference in _reference_ids(content):               # (1)(A)
            current = lookup(reference)
            if previous is not None and current.parent is None \
                    and not _would_loop(previous, current):
                previous.add(current)
            previous = current
        node.detach()                                           # (1)(B)
        if previous is not None and not _would_loop(previous, node):
            previous.add(node)
    return every


def _place(table: dict[str, ThreadNode], every: list[ThreadNode], node: ThreadNode,
           message_id: Optional[str]) -> ThreadNode:
    """The node for a message: a dummy already made for its ID takes it in; with no
    valid ID, or an ID an earlier message has, it gets a node of its own (that is,
    a unique ID)."""
    existing = table.get(message_id) if message_id else None
    if existing is not None and existing.message is None:
        existing.message, existing.date, existing.subject = \
            node.message, node.date, node.subject
        return existing
    if message_id and existing is None:
        table[message_id] = node
    every.append(node)
    return node


def _would_loop(parent: ThreadNode, child: ThreadNode) -> bool:
    """Whether making ``parent`` the parent of ``child`` would make a loop, that
    is ``parent`` is ``child`` or one of its descendants."""
    node: Optional[ThreadNode] = parent
    while node is not None:
        if node is child:
            return True
        node = node.parent
    return False


def _prune(root: ThreadNode) -> None:
    """Step (3): drop childless dummies; splice other dummies' children in their
    place, except that at the top a dummy with several children stays."""
    stack = [root]
    while stack:
        parent = stack.pop()
        pending = list(reversed(parent.children))
        kept: list[ThreadNode] = []
        while pending:
            node = pending.pop()
            if node.message is None:
                if not node.children:
                    continue
                if parent is not root or len(node.children) == 1:
                    pending.extend(reversed(node.children))   # looked at again
                    continue
            kept.append(node)
        parent.children = []
        for node in kept:
            parent.add(node)
        stack.extend(kept)


def _thread_subject(node: ThreadNode) -> tuple[str, bool]:
    """The base subject of a top-level message, or of a dummy's first child, and
    whether it is a reply or forward."""
    first = node.children[0] if node.message is None and node.children else node
    base, reply = _extract_subject(first.subject)
    return collation_key(base), reply


def _gather_subjects(root: ThreadNode) -> None:
    """Step (5): merge top-level threads whose base subjects are the same."""
    table: dict[str, tuple[ThreadNode, bool]] = {}
    for node in root.children:                                      # (5)(B)
        subject, reply = _thread_subject(node)
        if not subject:
            continue
        held = table.get(subject)
        if held is None or (held[0].message is not None and (
                node.message is None or (held[1] and not reply))):
            table[subject] = (node, reply)
    for node in list(root.children):                                # (5)(C)
        if node.parent is not root:         # already merged into another thread
            continue
        subject, reply = _thread_subject(node)
        held = table.get(subject) if subject else None
        if held is None or held[0] is node:
            continue
        table[subject] = (_merge(root, held[0], held[1], node, reply), held[1])
    # Merged threads were unhooked from the root without the cost of list removal.
    root.children = [node for node in root.children if node.parent is root]


def _merge(root: ThreadNode, held: ThreadNode, held_reply: bool,
           node: ThreadNode, reply: bool) -> ThreadNode:
    """Step (5)(C): merge top-level ``node`` into ``held`` (the table's message);
    returns what the table holds afterwards."""
    node.parent = None
    if held.message is None and node.message is None:
        for child in node.children:         # both dummies: the children become siblings
            held.add(child)
        node.children = []
        return held
    if held.message is None or (reply and not held_reply):
        held.add(node)                      # a child of the table's message
        return held
    dummy = ThreadNode()                    # otherwise both under a new dummy
    root.add(dummy)
    dummy.add(held)
    dummy.add(node)
    return dummy


def _sort_siblings(root: ThreadNode) -> None:
    """Step (6): sort every set of siblings by sent date, deepest first, a dummy
    by its first child."""
    order: list[ThreadNode] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children)
    for node in reversed(order):
        node.children.sort(key=ThreadNode.sort_key)


_MSG_ID = re.compile(r"<([^<>]*)>")


def _message_id(content: MessageContent) -> Optional[str]:
    ids = _message_ids(content.header("Message-ID"))
    return ids[0] if ids else None


def _reference_ids(content: MessageContent) -> list[str]:
    """References, or else the first message ID of In-Reply-To (RFC 5256 §4)."""
    references = _message_ids(content.header("References"))
    return references or _message_ids(content.header("In-Reply-To"))[:1]


def _message_ids(values: Iterable[str]) -> list[str]:
    """The valid message IDs in header values, normalised so that quoting makes no
    difference (RFC 5256 §4): ``<"a b"@x>`` and ``<a b@x>`` are one ID."""
    out = []
    for value in values:
        for inner in _MSG_ID.findall(value):
            left, at, right = inner.rpartition("@")
            if not at:
                continue
            left = re.sub(r'\\(.)', r"\1", left.replace('"', "")).strip()
            right = "".join(right.split())
            if left and right:
                out.append(f"{left}@{right}")
    return out


# -- the THREAD response (RFC 5256 §4 thread-list) ---------------------------------

def format_threads(threads: Iterable[ThreadNode], use_uid: bool) -> bytes:
    """The threads as ``(2)(3 6 (4 23)(44 7 96))``: a chain of single children is
    written flat, several children each as a parenthesised list."""
    return "".join(f"({_format_thread(top, use_uid)})" for top in threads).encode()


def _format_thread(top: ThreadNode, use_uid: bool) -> str:
    out: list[str] = []
    stack: list[Any] = [top]        # nodes, and the closing ")" as plain strings
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        numbers = []
        node = item
        while True:
            if node.message is not None:
                numbers.append(str(node.message.uid if use_uid else node.message.seq))
            if len(node.children) != 1:
                break
            node = node.children[0]
        out.append(" ".join(numbers))
        if node.children:
            if numbers:
                out.append(" ")
            for child in reversed(node.children):
                stack.extend([")", child, "("])
    return "".join(out)
