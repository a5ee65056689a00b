"""The checks' changes to the message (Findings.header_edits, Findings.body), made
in memory just before the chain writes Authentication-Results, so that the message
is rewritten once."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

from lightmail.policy.inbound.findings import HeaderEdit

_FIELD_START = re.compile(rb"^(?=[^ \t\r\n])", re.MULTILINE)


def apply_edits(message: bytes, edits: Sequence[HeaderEdit],
                body: Optional[bytes] = None) -> bytes:
    """The message with ``edits`` made to its header block, in order, and its body
    replaced by ``body`` when given; the message itself when there is nothing to do."""
    if not edits and body is None:
        return message
    end = header_end(message)
    fields = header_fields(message[:end])
    for edit in edits:
        _apply(fields, edit)
    rest = message[end:]
    if body is not None:
        rest = b"\r\n" + body
    elif not rest:
        rest = b"\r\n"
    return b"".join(fields) + rest


def header_fields(block: bytes) -> list[bytes]:
    """Each field of a header block with its continuation lines and line end."""
    starts = [m.start() for m in _FIELD_START.finditer(block)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [block[a:b] for a, b in zip(starts, starts[1:] + [len(block)], strict=True)
            if block[a:b]]


def field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower() if b":" in field else b""


def _apply(fields: list[bytes], edit: HeaderEdit) -> None:
    new = (edit.name.encode("ascii") + b":" + edit.value + b"\r\n"
           if edit.value is not None else b"")
    if edit.action == "append":
        fields.append(new)
    elif edit.action == "insert":
        fields.insert(max(0, min(edit.index, len(fields))), new)
    elif edit.action == "change":
        wanted = edit.name.lower().encode("ascii")
        seen = 0
        for position, field in enumerate(fields):
            if field_name(field) == wanted:
                seen += 1
                if seen == max(edit.index, 1):
                    if edit.value is None:
                        del fields[position]
                    else:             # the field keeps its name as written
                        fields[position] = field.split(b":", 1)[0] + b":" + edit.value + b"\r\n"
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
