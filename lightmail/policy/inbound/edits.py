"""The checks' changes to the message (Findings.header_edits, Findings.body), and the
removal of the fields from outside that claim our checks' verdicts, made in memory
just before the chain writes Authentication-Results, so that the message is
rewritten once."""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Optional

from lightmail.policy.inbound.findings import HeaderEdit

_FIELD_START = re.compile(rb"^(?=[^ \t\r\n])", re.MULTILINE)


@dataclass
class _Field:
    data: bytes
    #: It came with the message (neither added nor changed by an edit).
    received: bool = False


def apply_edits(message: bytes, edits: Sequence[HeaderEdit],
                body: Optional[bytes] = None, remove: Collection[bytes] = ()) -> bytes:
    """The message with ``edits`` made to its header block, in order, its body
    replaced by ``body`` when given, and without the fields named in ``remove``
    (lower-case names) that came with it: those an edit added or changed are a
    milter's, one of our own checks, and stay.  The message itself when there is
    nothing to do."""
    end = header_end(message)
    if not edits and body is None and not has_fields(message[:end], remove):
        return message
    received = header_fields(message[:end])
    fields = [_Field(data, received=True) for data in received]
    for edit in edits:
        _apply(fields, edit)
    fields = [f for f in fields if not (f.received and field_name(f.data) in remove)]
    rest = message[end:]
    if body is not None:
        rest = b"\r\n" + body
    elif not rest:
        rest = b"\r\n"
    return b"".join(f.data for f in fields) + rest


def has_fields(block: bytes, names: Collection[bytes]) -> bool:
    """Whether the header block has a field named in ``names`` (lower-case)."""
    # Asked of every message a listener with verdict fields takes, which seldom has
    # one: a look for the names anywhere in the block spares splitting it into fields.
    lowered = block.lower()
    if not any(name in lowered for name in names):
        return False
    return any(field_name(f) in names for f in header_fields(block))


def header_fields(block: bytes) -> list[bytes]:
    """Each field of a header block with its continuation lines and line end."""
    starts = [m.start() for m in _FIELD_START.finditer(block)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [block[a:b] for a, b in zip(starts, starts[1:] + [len(block)], strict=True)
            if block[a:b]]


def field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower() if b":" in field else b""


def _apply(fields: list[_Field], edit: HeaderEdit) -> None:
    new = _Field(edit.name.encode("ascii") + b":" + edit.value + b"\r\n"
                 if edit.value is not None else b"")
    if edit.action == "append":
        fields.append(new)
    elif edit.action == "insert":
        fields.insert(max(0, min(edit.index, len(fields))), new)
    elif edit.action == "change":
        wanted = edit.name.lower().encode("ascii")
        seen = 0
        for position, field in enumerate(fields):
            if field_name(field.data) == wanted:
                seen += 1
                if seen == max(edit.index, 1):
                    if edit.value is None:
                        del fields[position]
                    else:             # the field keeps its name as written
                        name = field.data.split(b":", 1)[0]
                        fields[position] = _Field(name + b":" + edit.value + b"\r\n")
                    return
        if edit.value is not None:
            fields.append(new)
    else:
        raise ValueError(f"unknown header edit {edit.action!r}")


def header_end(message: bytes) -> int:
    """Where the header block ends (its blank line's start), or the message's end."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        found = message.find(separator)
        if found >= 0:
            return found + len(separator) // 2
    return len(message)
