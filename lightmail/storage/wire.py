"""What LightMail's processes say to each other: AMP, with storage's records declared.

One scheme for every link between processes (the workers' control link and the
writer process's): Twisted's AMP, whose commands declare their arguments.  Values
that are storage records (a Filing, an Envelope, a MailboxChange...) travel as
:class:`Record` arguments: JSON in which each record is named by its type, and only
the types listed in ``RECORDS`` can be named - nothing else is ever built from what
arrives (no pickle).  A value longer than AMP's 65,535 octets is split over several
keys.

The writer process's one command is :class:`Write`: an operation of the write port
(lightmail.storage.sqlwrites), its arguments, the staged blob it makes durable
first, and whether its commit must be flushed; the answer is the operation's
(result, changes).  Its declared errors come back as the same exceptions.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from twisted.protocols import amp

from lightmail.storage.interfaces import (
    AlreadyWarned,
    Appended,
    BlobHandoff,
    BlobMissing,
    BlobRef,
    Copied,
    Envelope,
    Filed,
    Filing,
    FilingTarget,
    MailboxChange,
    MailboxExists,
    MessageInfo,
    NoSuchMailbox,
    NotFiled,
    QueueItem,
    QueueRecipient,
    StorageError,
)

#: The record types a message may name: type name -> (type, its field names).
RECORDS: dict[str, tuple[type, tuple[str, ...]]] = {}
for _type in (Appended, BlobHandoff, BlobRef, Copied, Envelope, Filed, Filing,
              FilingTarget, MailboxChange, QueueItem, QueueRecipient):
    RECORDS[_type.__name__] = (_type, tuple(f.name for f in dataclasses.fields(_type)))
RECORDS["MessageInfo"] = (MessageInfo, MessageInfo._fields)
_NAMES = {cls: (name, names) for name, (cls, names) in RECORDS.items()}

#: AMP's longest value.
_VALUE_MAX = 0xFFFF


def _tree(value: Any) -> Any:
    kind = type(value)
    if value is None or kind is str or kind is int or kind is bool or kind is float:
        return value
    named = _NAMES.get(kind)
    if named is not None:
        name, fields = named
        return {"r": name, "v": [_tree(getattr(value, field)) for field in fields]}
    if kind is list:
        return [_tree(item) for item in value]
    if kind is tuple:
        return {"t": [_tree(item) for item in value]}
    if kind is bytes:
        return {"b": value.decode("latin-1")}
    if kind is frozenset:
        return {"s": sorted(value)}
    if kind is dict:
        return {"d": [[_tree(k), _tree(v)] for k, v in value.items()]}
    raise TypeError(f"{kind.__name__} is not a declared record type")


def _object(obj: dict[str, Any]) -> Any:
    if "r" in obj:
        try:
            record, _ = RECORDS[obj["r"]]
        except KeyError:
            raise ValueError(f"undeclared record type {obj['r']!r}") from None
        return record(*obj["v"])
    if "t" in obj:
        return tuple(obj["t"])
    if "b" in obj:
        return obj["b"].encode("latin-1")
    if "s" in obj:
        return frozenset(obj["s"])
    if "d" in obj:
        return {key: value for key, value in obj["d"]}
    raise ValueError("not a declared value")


def encode(value: Any) -> bytes:
    """``value`` (plain values, lists, tuples, bytes, frozensets, dicts, and records
    of the types in RECORDS) as octets."""
    return json.dumps(_tree(value), ensure_ascii=False, separators=(",", ":")).encode()


def decode(data: bytes) -> Any:
    """What :func:`encode` made; ValueError for anything it would not make."""
    return json.loads(data, object_hook=_object)


class Record(amp.Argument):
    """An AMP argument holding any value :func:`encode` takes, of any length."""

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        data = encode(objects[amp._wireNameToPythonIdentifier(name)])
        strings[name] = data[:_VALUE_MAX]
        for index, start in enumerate(range(_VALUE_MAX, len(data), _VALUE_MAX), 1):
            strings[name + b".%d" % index] = data[start:start + _VALUE_MAX]

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        parts = [strings[name]]
        index = 1
        while (part := strings.get(name + b".%d" % index)) is not None:
            parts.append(part)
            index += 1
        objects[amp._wireNameToPythonIdentifier(name)] = decode(b"".join(parts))


#: Exceptions that come back as themselves (with their message); any other is
#: amp.UnknownRemoteError, and the writer process logs it.
STORAGE_ERRORS: dict[type[Exception], bytes] = {
    NotFiled: b"NOT_FILED", AlreadyWarned: b"ALREADY_WARNED",
    BlobMissing: b"BLOB_MISSING", NoSuchMailbox: b"NO_MAILBOX",
    MailboxExists: b"MAILBOX_EXISTS", StorageError: b"STORAGE"}


class Write(amp.Command):
    """Run a write port operation in the writer process's next group."""

    arguments = [(b"op", amp.Unicode()), (b"args", Record()),
                 (b"blob", Record()),            # a BlobHandoff, or None
                 (b"durable", amp.Boolean())]
    response = [(b"outcome", Record())]          # (result, changes)
    errors = STORAGE_ERRORS
