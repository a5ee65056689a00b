"""What the coverage-guided fuzzing of IMAP's parsers runs (``atheris_parsers.py``).

The session fuzzing (``run.py``) is bound by storage round trips, a few hundred
inputs a second; the parsers alone take tens of thousands, and libFuzzer's coverage
feedback finds the inputs that reach new branches.  One input is cut in two: the
first octet chooses inflate sizes, the rest is the client's octets.  It goes through
:class:`~lightmail.imap.parser.Inflater` (as deflate data, at the sizes chosen) and
:class:`~lightmail.imap.parser.CommandReader` (as plain input), then every command
read through ``parse_command`` and the argument parsers of FETCH, STORE's sequence
set, SEARCH and LIST names.  They may refuse (ParseError, Bad, BadCharset, BadName,
zlib.error, the reader's limits): anything else they raise is a defect, and so is an
input that takes longer than libFuzzer's ``-timeout``.
"""

from __future__ import annotations

import zlib
from typing import Any

from lightmail.imap.core import Bad
from lightmail.imap.fetch import parse_fetch_items
from lightmail.imap.names import BadName, decode_name
from lightmail.imap.parser import (
    CommandReader,
    Inflater,
    LineTooLong,
    LiteralTooBig,
    parse_command,
)
from lightmail.imap.search import BadCharset, parse_search
from lightmail.imap.sequence import parse_sequence_set
from lightmail.imap.tokens import ParseError, astring

REFUSALS = (ParseError, Bad, BadCharset, BadName, LineTooLong, LiteralTooBig)


def one_input(data: bytes) -> None:
    if not data:
        return
    sizes, data = data[0], data[1:]
    inflater = Inflater()
    inflater.feed(data)
    try:
        while inflater.inflate(1 + sizes * 37):
            pass
    except zlib.error:
        pass
    reader = CommandReader(8192, 16384, 32768)
    reader.buffer = data
    for _ in range(64):
        try:
            kind, value = reader.next()
        except (LineTooLong, LiteralTooBig):
            continue
        if kind == "wait":
            return
        if kind == "command":
            try:
                arguments(value)
            except REFUSALS:
                pass


def arguments(parts: list[bytes]) -> None:
    command = parse_command(parts)
    args: list[Any] = command.args
    name = command.name.removeprefix("UID ")
    if name in ("FETCH", "STORE", "COPY", "MOVE") and args:
        parse_sequence_set(astring(args[0]))
        if name == "FETCH" and len(args) > 1:
            parse_fetch_items(args[1])
    elif name == "SEARCH":
        parse_search(args, utf8=command.tag.startswith("u"))
    elif name in ("LIST", "SELECT", "CREATE", "STATUS") and args:
        decode_name(astring(args[-1]), utf8=command.tag.startswith("u"))

