"""An IMAP CommandReader that remembers the longest its buffer ever was: the tests
of input bounds (COMPRESS bombs, streamed APPEND literals) put it in the session."""

from __future__ import annotations

from lightmail.imap.parser import CommandReader


class RecordingReader(CommandReader):
    longest = 0

    @property  # type: ignore[override]
    def buffer(self) -> bytes:
        return self._buffer

    @buffer.setter
    def buffer(self, value: bytes) -> None:
        self._buffer = value
        RecordingReader.longest = max(RecordingReader.longest, len(value))
