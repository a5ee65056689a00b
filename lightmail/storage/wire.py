"""What LightMail's processes say to each other: AMP, with storage's records declared.

One scheme for every link between processes (the workers' control link and the
writer process's): Twisted's AMP, whose commands declare their arguments.  Values
that are storage records (a Filing, an Envelope, a MailboxChange...) travel as
:class:`Record` arguments, in pickle's format read by a loader that knows only the
types listed in ``RECORDS`` (pickle's "restricting globals"): a value that names any
other class or function is refused before anything is built from it, so no arbitrary
object ever crosses a socket.  A value longer than AMP's 65,535 octets is split over
several keys.

The writer process's one command is :class:`Write`: an operation of the write port
(lightmail.storage.sqlwrites), its arguments, the staged blob it makes durable
first, and whether its commit must be flushed; the answer is the operation's
(result, changes).  Its declared errors come back as the same exceptions.
"""

from __future__ import annotations

import io
import pickle
import struct
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

#: The types a value may hold: storage's records, and the plain types they are made
#: of.  Nothing else is ever built from what arrives.
RECORDS: tuple[type, ...] = (
    Appended, BlobHandoff, BlobRef, Copied, Envelope, Filed, Filing, FilingTarget,
    MailboxChange, MessageInfo, QueueItem, QueueRecipient)
_ALLOWED = {(cls.__module__, cls.__qualname__): cls for cls in RECORDS}
_ALLOWED[("builtins", "frozenset")] = frozenset

#: AMP's longest value.
_VALUE_MAX = 0xFFFF


class _DeclaredOnly(pickle.Unpickler):
    """pickle's loader, allowed to name the declared types only (pickle's own
    "restricting globals"): a value that names any other class or function - the
    way pickle runs code - is refused before anything is built from it."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not a declared type") from None


def encode(value: Any) -> bytes:
    """``value``: plain values, lists, tuples, dicts, bytes, frozensets, and records
    of the types in RECORDS, as octets (pickle's format, C-fast: a message costs a
    few microseconds each way, where a JSON walk of the records cost 20)."""
    return pickle.dumps(value, protocol=5)


def decode(data: bytes) -> Any:
    """What :func:`encode` made; pickle.UnpicklingError for a value that names a type
    outside RECORDS."""
    return _DeclaredOnly(io.BytesIO(data)).load()


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


# -- AMP's boxes without its dispatch, for the writer process's link -------------------
#
# The writer process answers one command, Write, in a loop of its own, without a
# reactor, and every message filed crosses this link twice.  Twisted's AMP protocol
# objects cost 55 us of CPU a round trip (both ends; generic dispatch, a Deferred
# chain per box, a key parsed at a time): a sequential STORE through them went from
# 257 to 373 us.  The same wire format, read and written here, costs a few; the
# workers' control link, far from that path, uses Twisted's AMP as it is.

_LENGTH = struct.Struct("!H")


def read_boxes(buf: bytearray) -> list[dict[bytes, bytes]]:
    """The complete AMP boxes at the start of ``buf``, which loses them: each box is
    key, value, ..., each with its 2-octet length, ended by an empty key.

    A box's end is found (lengths only) before anything is copied out of it: an
    answer of megabytes arrives in many reads, and parsing and copying it again at
    each one cost the reactor time in the square of its size."""
    boxes = []
    view = memoryview(buf)
    consumed = 0
    try:
        while (end := _box_end(view, consumed)) is not None:
            box: dict[bytes, bytes] = {}
            offset = consumed
            while True:
                (length,) = _LENGTH.unpack_from(view, offset)
                if length == 0:
                    break
                key_end = offset + 2 + length
                (value_length,) = _LENGTH.unpack_from(view, key_end)
                value_end = key_end + 2 + value_length
                box[bytes(view[offset + 2:key_end])] = bytes(view[key_end + 2:value_end])
                offset = value_end
            boxes.append(box)
            consumed = end
    finally:
        view.release()
    del buf[:consumed]
    return boxes


def _box_end(view: memoryview, offset: int) -> int | None:
    """Where the box that starts at ``offset`` ends, if all of it is there."""
    size = len(view)
    while offset + 2 <= size:
        (length,) = _LENGTH.unpack_from(view, offset)
        if length == 0:
            return offset + 2
        key_end = offset + 2 + length
        if key_end + 2 > size:
            return None
        (value_length,) = _LENGTH.unpack_from(view, key_end)
        offset = key_end + 2 + value_length
    return None


def box_bytes(box: dict[bytes, bytes]) -> bytes:
    """An AMP box on the wire (as ``amp.AmpBox.serialize``)."""
    out = []
    for key, value in box.items():
        out += [_LENGTH.pack(len(key)), key, _LENGTH.pack(len(value)), value]
    out.append(b"\0\0")
    return b"".join(out)


def write_request(box: dict[bytes, bytes]) -> tuple[bytes, tuple[str, Any, Any, bool]]:
    """(its ``_ask`` tag, the request) of a Write box; ValueError for another box."""
    if box.get(amp.COMMAND) != b"Write" or amp.ASK not in box:
        raise ValueError(f"not a Write command: {box.get(amp.COMMAND)!r}")
    objects: dict[str, Any] = {}
    Record().fromBox(b"request", box, objects, None)
    return box[amp.ASK], objects["request"]


def write_command(tag: bytes, request: tuple[str, Any, Any, bool]) -> bytes:
    """A Write command's box, asking under ``tag``."""
    strings: dict[bytes, bytes] = {amp.COMMAND: b"Write", amp.ASK: tag}
    Record().toBox(b"request", strings, {"request": request}, None)
    return box_bytes(strings)


def write_reply(box: dict[bytes, bytes]) -> tuple[bytes, bool, Any]:
    """(tag, ok, outcome or exception) of the answer to a Write command: a declared
    error comes back as itself, any other as amp.UnknownRemoteError."""
    if amp.ANSWER in box:
        objects: dict[str, Any] = {}
        Record().fromBox(b"outcome", box, objects, None)
        return box[amp.ANSWER], True, objects["outcome"]
    code = box.get(amp.ERROR_CODE, amp.UNKNOWN_ERROR_CODE)
    text = box.get(amp.ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
    kind = _ERROR_KINDS.get(code)
    error = kind(text) if kind is not None else amp.UnknownRemoteError(text)
    return box.get(amp.ERROR, b""), False, error


def write_answer(tag: bytes, outcome: Any) -> bytes:
    strings: dict[bytes, bytes] = {amp.ANSWER: tag}
    Record().toBox(b"outcome", strings, {"outcome": outcome}, None)
    return box_bytes(strings)


def write_error(tag: bytes, error: BaseException) -> bytes:
    """The error answer: a declared error's code and text, else AMP's UNKNOWN."""
    code = next((code for kind, code in STORAGE_ERRORS.items() if isinstance(error, kind)),
                None)
    text = str(error) if code is not None else "Unknown Error"
    return box_bytes({amp.ERROR: tag, amp.ERROR_CODE: code or amp.UNKNOWN_ERROR_CODE,
                      amp.ERROR_DESCRIPTION: text.encode("utf-8", "replace")})


_ERROR_KINDS = {code: kind for kind, code in STORAGE_ERRORS.items()}

# -- Stats: the writer process's metrics, asked for at each scrape ---------------------
#
# Its answer carries lightmail.metrics.federation's encoding in one AMP value: the
# writer's few families (SQL latency, group commit sizes) take a few kilobytes.

_STATS = b"Stats"
_SNAPSHOT = b"snapshot"


def stats_command(tag: bytes) -> bytes:
    return box_bytes({amp.COMMAND: _STATS, amp.ASK: tag})


def is_stats(box: dict[bytes, bytes]) -> bool:
    return box.get(amp.COMMAND) == _STATS and amp.ASK in box


def stats_answer(tag: bytes, snapshot: bytes) -> bytes:
    return box_bytes({amp.ANSWER: tag, _SNAPSHOT: snapshot})


def stats_reply(box: dict[bytes, bytes]) -> bytes | None:
    """The snapshot an answer to Stats carries (None: the box answers a Write)."""
    return box.get(_SNAPSHOT) if amp.ANSWER in box else None


class Write(amp.Command):
    """Run a write port operation in the writer process's next group.

    ``request``: (operation name, its arguments, the BlobHandoff it makes durable
    first or None, whether its commit must be flushed).  One argument rather than
    four: AMP parses a box key by key in Python, and this command is on the path of
    every message (measured: 77 to 56 us a round trip, both ends)."""

    arguments = [(b"request", Record())]
    response = [(b"outcome", Record())]          # (result, changes)
    errors = STORAGE_ERRORS
