"""The IMAP command reader and APPEND's streamed message (parser.py), against a blob
writer that records what it is given: which literal streams, in what chunks, the
reader's room meanwhile, and that the literals of a command it drops are thrown away.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lightmail.imap.parser import (
    STREAM_BACKLOG,
    STREAM_CHUNK,
    CommandReader,
    LineTooLong,
    LiteralTooBig,
    StreamedLiteral,
    parse_command,
)
from lightmail.imap.tokens import Atom
from lightmail.storage.interfaces import IBlobStore, IBlobWriter, IStagedBlob


@implementer(IBlobWriter)
class RecordingWriter:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.aborted = False
        self.staged = False
        self.held = 0                   # what backlog() says
        self.waiting: list[Deferred[None]] = []

    def write(self, data: bytes) -> None:
        assert not (self.aborted or self.staged)
        self.writes.append(data)

    def backlog(self) -> int:
        return self.held

    def drained(self) -> Deferred[None]:
        if not self.held:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        return d

    def finish(self) -> Any:
        raise AssertionError("the reader never finishes a blob")

    def stage(self) -> Deferred[IStagedBlob]:
        self.staged = True
        return succeed(cast(IStagedBlob, b"".join(self.writes)))

    def abort(self) -> None:
        self.aborted = True


class RecordingBlobs:
    """The one method of IBlobStore the reader calls."""

    def __init__(self) -> None:
        self.writers: list[RecordingWriter] = []

    def writer(self) -> RecordingWriter:
        self.writers.append(RecordingWriter())
        return self.writers[-1]


def reader(streaming: bool = True) -> tuple[CommandReader, RecordingBlobs]:
    found = CommandReader(max_line=1024, max_literal=10 * 2**20, max_command=11 * 2**20)
    blobs = RecordingBlobs()
    if streaming:
        found.stream_appends(cast(IBlobStore, blobs))
    return found, blobs


def feed(found: CommandReader, data: bytes) -> tuple[str, Any]:
    found.buffer += data
    return found.next()


def test_the_recording_writer_is_a_blob_writer() -> None:
    assert verifyObject(IBlobWriter, RecordingWriter())


def test_appends_message_goes_to_a_writer_a_chunk_at_a_time() -> None:
    found, blobs = reader()
    size = 3 * STREAM_CHUNK + 5
    assert feed(found, b"a APPEND INBOX (\\Seen) {%d}\r\n" % size) == ("continue", size)
    assert found.room() == STREAM_CHUNK
    assert feed(found, b"x" * STREAM_CHUNK) == ("wait", None)
    writer = blobs.writers[0]
    assert writer.writes == [b"x" * STREAM_CHUNK] and found.buffer == b""
    assert found.room() == STREAM_CHUNK
    assert feed(found, b"y" * (2 * STREAM_CHUNK)) == ("wait", None)
    assert found.room() == 5
    kind, parts = feed(found, b"zzzzz\r\nb NOOP\r\n")
    assert kind == "command"
    assert b"".join(writer.writes) == b"x" * STREAM_CHUNK + b"y" * 2 * STREAM_CHUNK + b"zzzzz"
    command = parse_command(parts)
    literal = command.args[-1]
    assert isinstance(literal, StreamedLiteral) and literal.size == size
    assert command.raw_size > size
    assert found.next()[0] == "command"            # b NOOP, from what was left
    assert not writer.aborted and not writer.staged


def test_non_synchronising_and_utf8_forms_stream_too() -> None:
    found, blobs = reader()
    kind, parts = feed(found, b"a APPEND INBOX {5+}\r\nhello\r\n")
    assert kind == "command" and isinstance(parts[1], StreamedLiteral)
    # RFC 6855 §4: UTF8 (literal8).
    kind, parts = feed(found, b'b APPEND INBOX "7-Feb-1994 21:52:25 -0800" UTF8 (~{5+}\r\n'
                              b"hello)\r\n")
    assert kind == "command"
    args = parse_command(parts).args
    assert args[:2] == ["INBOX", "7-Feb-1994 21:52:25 -0800"] and args[2] == Atom("UTF8")
    assert isinstance(args[3][0], StreamedLiteral)
    assert [b"".join(w.writes) for w in blobs.writers] == [b"hello", b"hello"]


def test_other_literals_stay_in_memory() -> None:
    found, blobs = reader()
    # The mailbox name of APPEND is a literal too: in memory; the message streams.
    kind, parts = feed(found, b"a APPEND {5}\r\n")
    assert kind == "continue"
    assert feed(found, b"INBOX {3}\r\n") == ("continue", 3)
    kind, parts = feed(found, b"abc\r\n")
    assert kind == "command"
    assert parts[1] == b"INBOX" and isinstance(parts[3], StreamedLiteral)
    kind, parts = feed(found, b"s SEARCH CHARSET UTF-8 TEXT {3+}\r\nabc\r\n")
    assert kind == "command" and parts[1] == b"abc"
    kind, parts = feed(found, b"l LOGIN {3+}\r\nbob secret\r\n")
    assert kind == "command" and parts[1] == b"bob"
    assert len(blobs.writers) == 1
    # Before login nothing streams.
    unready, none = reader(streaming=False)
    kind, parts = feed(unready, b"a APPEND INBOX {5+}\r\nhello\r\n")
    assert kind == "command" and parts[1] == b"hello" and none.writers == []


def test_a_dropped_command_throws_its_streamed_literals_away() -> None:
    # The rest of the line too long, after the message.
    found, blobs = reader()
    feed(found, b"a APPEND INBOX {5+}\r\nhello")
    with pytest.raises(LineTooLong):
        feed(found, b" " + b"x" * 2000 + b"\r\n")
    assert blobs.writers[0].aborted
    # A literal too big after the message.
    found, blobs = reader()
    with pytest.raises(LiteralTooBig):
        feed(found, b"b APPEND INBOX {5+}\r\nhello {999999999}\r\n")
    assert blobs.writers[0].aborted
    # The connection lost in the middle of the message.
    found, blobs = reader()
    feed(found, b"c APPEND INBOX {50+}\r\nhello")
    found.reset()
    assert blobs.writers[0].aborted and found.streaming is None


def test_a_streamed_literal_is_staged_or_discarded_once() -> None:
    writer = RecordingWriter()
    literal = StreamedLiteral(writer, 5)
    literal.stage()
    literal.discard()                   # the command is done: a no-op now
    assert writer.staged and not writer.aborted
    with pytest.raises(RuntimeError):
        literal.stage()
    other = RecordingWriter()
    dropped = StreamedLiteral(other, 5)
    dropped.discard()
    dropped.discard()
    assert other.aborted


def test_no_room_while_the_writer_is_behind() -> None:
    found, blobs = reader()
    feed(found, b"a APPEND INBOX {%d+}\r\n" % (4 * STREAM_BACKLOG))
    writer = blobs.writers[0]
    assert not found.behind() and found.room() == STREAM_CHUNK
    writer.held = STREAM_BACKLOG + 1
    assert found.behind() and found.room() == 0
    caught_up = found.caught_up()
    assert not caught_up.called
    writer.held = 0
    for d in writer.waiting:
        d.callback(None)
    assert caught_up.called and not found.behind() and found.room() == STREAM_CHUNK
