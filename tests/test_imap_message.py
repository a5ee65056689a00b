"""lightmail.imap.message: ENVELOPE, BODYSTRUCTURE, BODY[section] and BINARY[part] of a
stored message (RFC 9051 §6.4.5 and §7.5.2, RFC 3516), and the decoded header and
body text that SEARCH and SORT use.

The last tests give the same messages to Dovecot (the reference peer, started by
tests/dovecot.py) and compare its FETCH answers with ours value by value.
"""

from __future__ import annotations

import random
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lightmail.imap import message as message_module
from lightmail.imap.message import (
    ParsedMessage,
    Section,
    UnknownCTE,
    format_section,
    parse_section,
)
from lightmail.imap.tokens import ParseError


def crlf(text: str) -> bytes:
    """A test message written with \\n line ends, as stored (CRLF)."""
    return text.replace("\n", "\r\n").encode("utf-8")


def values(data: bytes) -> list[Any]:
    """IMAP values as Python ones: lists, bytes for strings (quoted or literal, so
    the two forms compare equal), None for NIL, int for numbers, str for atoms."""
    top: list[Any] = []
    stack = [top]
    position = 0
    while position < len(data):
        char = data[position:position + 1]
        if char in b" \r\n":
            position += 1
        elif char == b"(":
            stack[-1].append([])
            stack.append(stack[-1][-1])
            position += 1
        elif char == b")":
            stack.pop()
            position += 1
        elif char == b'"':
            match = re.compile(rb'"((?:[^"\\]|\\.)*)"').match(data, position)
            assert match is not None, data[position:]
            stack[-1].append(re.sub(rb"\\(.)", rb"\1", match.group(1)))
            position = match.end()
        elif char in b"{~":
            match = re.compile(rb"~?\{(\d+)\}\r\n").match(data, position)
            assert match is not None, data[position:]
            end = match.end() + int(match.group(1))
            stack[-1].append(data[match.end():end])
            position = end
        else:
            match = re.compile(rb"[^ ()\[\r\n]+(?:\[[^\]]*\])?(?:<\d+>)?").match(data, position)
            assert match is not None, data[position:]
            atom = match.group(0)
            stack[-1].append(None if atom == b"NIL" else
                             int(atom) if atom.isdigit() else atom.decode())
            position = match.end()
    assert len(stack) == 1, data
    return top


def value(data: bytes) -> Any:
    [result] = values(data)
    return result


# --- sample messages -----------------------------------------------------------------

SIMPLE = crlf("From: a@example.org\nSubject: hi\n\nHello\n")

NESTED = crlf("""From: "Alice Q. Sender" <alice@example.org>
To: bob@example.net
Subject: nested
Date: Tue, 02 Jan 2024 10:00:00 +0100
Message-ID: <nested@example.org>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

This is the preamble.
--outer
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Caf=C3=A9 =
au lait
--outer
Content-Type: message/rfc822
Content-Disposition: attachment; filename="fwd.eml"

From: Carol <carol@example.com>
To: alice@example.org
Subject: inner
Content-Type: multipart/alternative; boundary=inner

--inner
Content-Type: text/plain

plain
--inner
Content-Type: text/html

<p>html</p>
--inner--
--outer
Content-Type: application/octet-stream; name=blob.bin
Content-Transfer-Encoding: base64

AAEC/w==
--outer--
epilogue
""")

INNER_MESSAGE = crlf("""From: Carol <carol@example.com>
To: alice@example.org
Subject: inner
Content-Type: multipart/alternative; boundary=inner

--inner
Content-Type: text/plain

plain
--inner
Content-Type: text/html

<p>html</p>
--inner--
""")


def rfc9051_example() -> bytes:
    """A message whose BODY is the one in RFC 9051 §7.5.2: two text parts of 1152
    octets in 23 lines and 4554 octets in 73 lines."""
    first = "".join("x" * (48 if n < 21 else 49) + "\r\n" for n in range(23))
    second = "".join("A" * (61 if n < 28 else 60) + "\r\n" for n in range(73))
    assert (len(first), len(second)) == (1152, 4554)
    return crlf("""From: Terry Gray <gray@cac.washington.edu>
MIME-Version: 1.0
Content-Type: MULTIPART/MIXED; BOUNDARY="0-1"

--0-1
Content-Type: TEXT/PLAIN; CHARSET=US-ASCII
Content-Transfer-Encoding: 7BIT

""") + first.encode() + crlf("""
--0-1
Content-Type: TEXT/PLAIN; CHARSET=US-ASCII; NAME=cc.diff
Content-ID: <960723163407.20117h@cac.washington.edu>
Content-Description: Compiler diff
Content-Transfer-Encoding: BASE64

""") + second.encode() + crlf("\n--0-1--\n")


# --- section specifications ----------------------------------------------------------

@pytest.mark.parametrize("inner, section", [
    ("", Section()),
    ("HEADER", Section(text="HEADER")),
    ("text", Section(text="TEXT")),
    ("1", Section((1,))),
    ("1.2", Section((1, 2))),
    ("1.2.TEXT", Section((1, 2), "TEXT")),
    ("2.MIME", Section((2,), "MIME")),
    ("3.header", Section((3,), "HEADER")),
    ("HEADER.FIELDS (From To)", Section(text="HEADER.FIELDS", fields=("From", "To"))),
    ("1.HEADER.FIELDS (Subject)", Section((1,), "HEADER.FIELDS", ("Subject",))),
    ('HEADER.FIELDS.NOT (X-A "Quoted" "sp ace" "q\\"t")',
     Section(text="HEADER.FIELDS.NOT", fields=("X-A", "Quoted", "sp ace", 'q"t'))),
])
def test_parse_section(inner: str, section: Section) -> None:
    assert parse_section(inner) == section


@pytest.mark.parametrize("inner", [
    "MIME", "0", "1.0", "01", "1.", "1TEXT", ".TEXT", "BODY", "HEADERS", "TEXT.1",
    "HEADER.FIELDS", "HEADER.FIELDS ()", "HEADER.FIELDS (From", "HEADER.FIELDS From",
    "HEADER.FIELDS.NOTX (A)", "1.MIME.TEXT", "TEXT ", "1.2.",
])
def test_parse_section_rejects_malformed(inner: str) -> None:
    with pytest.raises(ParseError):
        parse_section(inner)


@pytest.mark.parametrize("section, label", [
    (Section(), ""),
    (Section(text="HEADER"), "HEADER"),
    (Section((1, 2), "TEXT"), "1.2.TEXT"),
    (Section((4,)), "4"),
    (Section((2,), "MIME"), "2.MIME"),
    # Field names as the client gave them; quoted only when an atom cannot carry them.
    (Section(text="HEADER.FIELDS", fields=("From", "to")), "HEADER.FIELDS (From to)"),
    (Section((1,), "HEADER.FIELDS.NOT", ("X-A", "sp ace", 'q"t', "br]")),
     '1.HEADER.FIELDS.NOT (X-A "sp ace" "q\\"t" "br]")'),
])
def test_format_section(section: Section, label: str) -> None:
    assert format_section(section) == label
    assert parse_section(label) == section


# --- BODYSTRUCTURE and BODY ----------------------------------------------------------

def test_rfc9051_bodystructure_example() -> None:
    # RFC 9051 §7.5.2, "BODYSTRUCTURE" example (the BODY form); case is kept as sent.
    assert ParsedMessage(rfc9051_example()).bodystructure(False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73) '
        b'"MIXED")')


def test_single_part_defaults() -> None:
    message = ParsedMessage(SIMPLE)
    assert message.size == len(SIMPLE) and message.raw is SIMPLE
    assert message.bodystructure(True) == \
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 7 1 NIL NIL NIL NIL)'
    assert message.bodystructure(False) == \
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 7 1)'


def test_single_part_fields_and_extension_data() -> None:
    raw = crlf("""Content-Type: text/html; format=flowed
Content-Transfer-Encoding: Quoted-Printable (comment)
Content-ID: <id@x>
Content-Description: a
 folded description
Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==
Content-Disposition: attachment (c); filename="a b.html"; size=4
Content-Language: en, de-CH
Content-Location: http://example.org/a

<p>x""")
    assert ParsedMessage(raw).bodystructure(True) == (
        b'("text" "html" ("format" "flowed" "charset" "us-ascii") "<id@x>" '
        b'"a folded description" "Quoted-Printable" 4 0 "Q2hlY2sgSW50ZWdyaXR5IQ==" '
        b'("attachment" ("filename" "a b.html" "size" "4")) ("en" "de-CH") '
        b'"http://example.org/a")')


def test_non_text_part_has_no_line_count() -> None:
    raw = crlf("Content-Type: image/png; \nContent-Disposition: inline\n\nxx\n")
    assert ParsedMessage(raw).bodystructure(True) == \
        b'("image" "png" NIL NIL NIL "7bit" 4 NIL ("inline" NIL) NIL NIL)'


def test_nested_multipart_with_message_rfc822() -> None:
    message = ParsedMessage(NESTED)
    inner_envelope = (
        b'(NIL "inner" (("Carol" NIL "carol" "example.com")) '
        b'(("Carol" NIL "carol" "example.com")) (("Carol" NIL "carol" "example.com")) '
        b'((NIL NIL "alice" "example.org")) NIL NIL NIL NIL)')
    assert message.bodystructure(True) == (
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 20 1 '
        b'NIL NIL NIL NIL)'
        b'("message" "rfc822" NIL NIL NIL "7bit" 231 ' + inner_envelope + b' '
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 5 0 NIL NIL NIL NIL)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 11 0 NIL NIL NIL NIL) '
        b'"alternative" ("boundary" "inner") NIL NIL NIL) 14 '
        b'NIL ("attachment" ("filename" "fwd.eml")) NIL NIL)'
        b'("application" "octet-stream" ("name" "blob.bin") NIL NIL "base64" 8 '
        b'NIL NIL NIL NIL) '
        b'"mixed" ("boundary" "outer") NIL NIL NIL)')
    assert message.bodystructure(False) == (
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 20 1)'
        b'("message" "rfc822" NIL NIL NIL "7bit" 231 ' + inner_envelope + b' '
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 5 0)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 11 0) "alternative") 14)'
        b'("application" "octet-stream" ("name" "blob.bin") NIL NIL "base64" 8) "mixed")')
    # The sizes are those of the sections.
    assert len(message.section(Section((2,)))) == 231 == len(INNER_MESSAGE)
    assert len(message.section(Section((1,)))) == 20


def test_digest_parts_default_to_message_rfc822() -> None:
    raw = crlf("""Content-Type: multipart/digest; boundary=d

--d

From: q@r
Subject: inner

body
--d
Content-Type: text/plain

t
--d--
""")
    assert ParsedMessage(raw).bodystructure(False) == (
        b'(("message" "rfc822" NIL NIL NIL "7bit" 33 (NIL "inner" ((NIL NIL "q" "r")) '
        b'((NIL NIL "q" "r")) ((NIL NIL "q" "r")) NIL NIL NIL NIL NIL) '
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 4 0) 3)'
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0) "digest")')


def test_rfc2231_continuations_are_joined() -> None:
    raw = crlf("Content-Type: application/x; name*0=\"long \"; NAME*1=name.txt; "
               "title*=utf-8''%E2%82%AC; t*0*=utf-8''a; t*1*=%20b\n\nx")
    assert ParsedMessage(raw).bodystructure(False) == (
        b'("application" "x" ("name" "long name.txt" "title*" "utf-8\'\'%E2%82%AC" '
        b'"t*" "utf-8\'\'a%20b") NIL NIL "7bit" 1)')


def test_boundary_matching_is_by_prefix_innermost_first() -> None:
    # RFC 2046 §5.1.1: a boundary may not be the prefix of a line in the part, so
    # "--xy" ends a part of boundary "x", unless "xy" is the inner boundary.
    outer_x = crlf("""Content-Type: multipart/mixed; boundary=x

--x
Content-Type: multipart/mixed; boundary=xy

--xy

a
--xy

b
--xy--
--x--
""")
    assert ParsedMessage(outer_x).bodystructure(False) == (
        b'((("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0)'
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0) "mixed") "mixed")')
    flat = crlf("Content-Type: multipart/mixed; boundary=x\n\n--x  \n\na\n--xy\n\nb\n--x--\n")
    assert ParsedMessage(flat).section(Section((2,))) == b"b"


# --- malformed MIME ------------------------------------------------------------------

EMPTY_PART = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'


@pytest.mark.parametrize("raw, structure", [
    # No boundary parameter: a multipart without parts, shown with one empty part.
    (crlf("Content-Type: multipart/mixed\n\nHello\n"),
     b"(" + EMPTY_PART + b' "mixed" NIL NIL NIL NIL)'),
    # The boundary never occurs.
    (crlf("Content-Type: multipart/mixed; boundary=x\n\nHello\n"),
     b"(" + EMPTY_PART + b' "mixed" ("boundary" "x") NIL NIL NIL)'),
    # No close delimiter: the last part runs to the end.
    (crlf("Content-Type: multipart/mixed; boundary=x\n\n--x\n\none\n"),
     b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 5 1 NIL NIL NIL NIL) '
     b'"mixed" ("boundary" "x") NIL NIL NIL)'),
    # An inner multipart closed by the outer close delimiter.
    (crlf("Content-Type: multipart/mixed; boundary=o\n\n--o\n"
          "Content-Type: multipart/alternative; boundary=i\n\n--i\n\nA\n--o--\n"),
     b'((("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0 NIL NIL NIL NIL) '
     b'"alternative" ("boundary" "i") NIL NIL NIL) "mixed" ("boundary" "o") NIL NIL NIL)'),
    # Unparseable Content-Type: text/plain (RFC 2045 §5.2); a type without subtype.
    (crlf("Content-Type: bad type/x\n\nzz\n"),
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 4 1 NIL NIL NIL NIL)'),
    (crlf("Content-Type: text\n\nzz\n"),
     b'("text" "" ("charset" "us-ascii") NIL NIL "7bit" 4 1 NIL NIL NIL NIL)'),
    # A message/rfc822 in base64 is not parsed (RFC 2046 §5.2.1).
    (crlf("Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
          "RnJvbTogYUBiDQoNCmJvZHkNCg==\n"),
     b'("message" "rfc822" NIL NIL NIL "base64" 30 (NIL NIL NIL NIL NIL NIL NIL NIL NIL '
     b'NIL) ' + EMPTY_PART + b" 1 NIL NIL NIL NIL)"),
    # A header and no body, no blank line, no line end.
    (b"Subject: x", b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL '
     b'NIL NIL)'),
    (b"", b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'),
])
def test_malformed_mime_degrades(raw: bytes, structure: bytes) -> None:
    assert ParsedMessage(raw).bodystructure(True) == structure


def test_part_header_cut_by_a_delimiter() -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=x\n\n--x\nContent-Type: text/html\n"
               "--x\n--x\nContent-Type: text/plain\n\nbody\n--x--\n")
    message = ParsedMessage(raw)
    assert message.section(Section((1,), "MIME")) == b"Content-Type: text/html"
    assert message.section(Section((1,))) == b""
    assert message.section(Section((2,))) == b""
    assert message.section(Section((3,))) == b"body"
    assert [part[1] for part in value(message.bodystructure(False))[:3]] == \
        [b"html", b"plain", b"plain"]


def test_deep_nesting_is_cut_off() -> None:
    depth = 300
    raw = b"".join(b"Content-Type: multipart/mixed; boundary=b%04d\r\n\r\n--b%04d\r\n" % (n, n)
                   for n in range(depth)) + b"\r\nleaf\r\n"
    structure = ParsedMessage(raw).bodystructure(True)
    assert structure.count(b'"mixed"') == message_module.MAX_DEPTH
    assert b'"application" "octet-stream"' in structure
    # The message/rfc822 below the limit is shown, not parsed.
    nested = b"Content-Type: message/rfc822\r\n\r\n" * depth + b"\r\nx"
    structure = ParsedMessage(nested).bodystructure(False)
    assert structure.count(b'"rfc822"') == message_module.MAX_DEPTH + 1
    assert structure.count(b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)") == \
        message_module.MAX_DEPTH + 1


def test_mutated_messages_never_raise() -> None:
    samples = [SIMPLE, NESTED, rfc9051_example(), ENVELOPE_SAMPLE]
    junk = [b"--outer", b"--outer--", b"--inner", b"\r\n", b"\n", b"\r\n\r\n", b":", b"(",
            b")", b'"', b"\\", b"<", b">", b"@", b",", b";", b"=?", b"?=", b"\0", b"\xff",
            b"Content-Type: multipart/mixed; boundary=outer\r\n",
            b"Content-Type: message/rfc822\r\n", b" ", b"\t", b"=", b"*0*="]
    rng = random.Random(9051)
    sections = [Section(), Section(text="HEADER"), Section(text="TEXT"),
                Section(text="HEADER.FIELDS", fields=("From", "Subject")),
                Section(text="HEADER.FIELDS.NOT", fields=("From",))]
    sections += [Section(part, text) for part in [(1,), (2,), (2, 1), (2, 2), (3,), (1, 1)]
                 for text in ("", "MIME", "HEADER", "TEXT")]
    for _ in range(1500):
        raw = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(raw) + 1)
            if rng.random() < 0.5:
                raw[at:at] = rng.choice(junk)
            elif rng.random() < 0.5:
                del raw[at:at + rng.randint(1, 8)]
            else:
                raw[at:at + 1] = bytes([rng.randrange(256)])
        message = ParsedMessage(bytes(raw))
        value(message.bodystructure(True))           # well-formed IMAP, and no error
        value(message.bodystructure(False))
        value(message.envelope())
        message.header("subject"), message.header_text(), message.body_text()
        message.date()
        for section in sections:
            message.section(section)
        for part in [(), (1,), (2,), (2, 1), (3,)]:
            try:
                message.binary(part)
            except UnknownCTE:
                pass


# --- BODY[section] -------------------------------------------------------------------

@pytest.mark.parametrize("section, expected", [
    (Section(), NESTED),
    (Section(text="HEADER"), NESTED[:NESTED.index(b"\r\n\r\n") + 4]),
    (Section(text="TEXT"), NESTED[NESTED.index(b"\r\n\r\n") + 4:]),
    (Section((1,)), b"Caf=C3=A9 =\r\nau lait"),
    (Section((1,), "MIME"), crlf("Content-Type: text/plain; charset=utf-8\n"
                                 "Content-Transfer-Encoding: quoted-printable\n\n")),
    (Section((2,)), INNER_MESSAGE),
    (Section((2,), "MIME"), crlf("Content-Type: message/rfc822\n"
                                 "Content-Disposition: attachment; filename=\"fwd.eml\"\n\n")),
    (Section((2,), "HEADER"), INNER_MESSAGE[:INNER_MESSAGE.index(b"\r\n\r\n") + 4]),
    (Section((2,), "TEXT"), INNER_MESSAGE[INNER_MESSAGE.index(b"\r\n\r\n") + 4:]),
    (Section((2,), "HEADER.FIELDS", ("subject",)), b"Subject: inner\r\n\r\n"),
    (Section((2, 1)), b"plain"),
    (Section((2, 2)), b"<p>html</p>"),
    (Section((2, 2), "MIME"), b"Content-Type: text/html\r\n\r\n"),
    (Section((3,)), b"AAEC/w=="),
    # A part that is not a multipart has a part 1: itself (as in Dovecot).
    (Section((3, 1)), b"AAEC/w=="),
    # Parts that do not exist, and HEADER/TEXT of a part that is no message.
    (Section((4,)), b""),
    (Section((4,), "MIME"), b""),
    (Section((3, 2)), b""),
    (Section((2, 3)), b""),
    (Section((2, 1, 1, 1)), b""),
    (Section((1,), "HEADER"), b""),
    (Section((1,), "TEXT"), b""),
])
def test_sections_of_a_nested_message(section: Section, expected: bytes) -> None:
    assert ParsedMessage(NESTED).section(section) == expected


def test_part_1_of_a_single_part_message_is_its_body() -> None:
    message = ParsedMessage(SIMPLE)
    assert message.section(Section((1,))) == b"Hello\r\n"
    assert message.section(Section((1,), "MIME")) == b"From: a@example.org\r\nSubject: hi\r\n\r\n"
    assert message.section(Section((1, 1))) == b""
    assert message.section(Section((2,))) == b""


def test_parts_of_an_encapsulated_single_part_message() -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=x\n\n--x\n"
               "Content-Type: message/rfc822\n\nSubject: in\nX-Y: z\n\ninner body\n--x--\n")
    message = ParsedMessage(raw)
    assert message.section(Section((1,))) == b"Subject: in\r\nX-Y: z\r\n\r\ninner body"
    assert message.section(Section((1, 1))) == b"inner body"
    assert message.section(Section((1, 1), "MIME")) == b"Subject: in\r\nX-Y: z\r\n\r\n"
    assert message.section(Section((1,), "TEXT")) == b"inner body"
    assert message.section(Section((1, 1, 1))) == b""


HEADERS = crlf("""Subject: a
\tfolded subject
X-A: one
   two
From: x@example.org
x-a: three
Received: from a
  by b

body
""")


def test_header_fields_with_folded_lines() -> None:
    message = ParsedMessage(HEADERS)
    assert message.section(Section(text="HEADER.FIELDS", fields=("SUBJECT", "x-A"))) == \
        crlf("Subject: a\n\tfolded subject\nX-A: one\n   two\nx-a: three\n\n")
    assert message.section(Section(text="HEADER.FIELDS.NOT", fields=("subject", "X-A"))) \
        == crlf("From: x@example.org\nReceived: from a\n  by b\n\n")
    assert message.section(Section(text="HEADER.FIELDS", fields=("Nothing",))) == b"\r\n"


def test_header_fields_without_a_blank_line() -> None:
    # RFC 9051 §6.4.5: no blank line for "a message which has no body and no blank
    # line"; a subset of its fields still ends with one, as Dovecot sends it.
    message = ParsedMessage(b"Subject: x\r\nFrom: y")
    assert message.section(Section(text="HEADER")) == b"Subject: x\r\nFrom: y"
    assert message.section(Section(text="HEADER.FIELDS", fields=("from", "subject"))) == \
        b"Subject: x\r\nFrom: y\r\n\r\n"
    assert message.section(Section(text="HEADER.FIELDS", fields=("xyz",))) == b"\r\n"
    assert message.section(Section(text="TEXT")) == b""


# --- BINARY --------------------------------------------------------------------------

def test_binary_decodes_parts() -> None:
    message = ParsedMessage(NESTED)
    assert message.binary((1,)) == "Café au lait".encode()
    assert message.binary((3,)) == b"\x00\x01\x02\xff"
    assert message.binary((2, 1)) == b"plain"
    assert message.binary((2,)) == INNER_MESSAGE          # nothing encoded inside
    assert message.binary((9,)) == b""


def test_binary_of_a_single_part_message() -> None:
    raw = crlf("Subject: x\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n"
               "SGVs\nbG8=\n")
    message = ParsedMessage(raw)
    assert message.binary((1,)) == b"Hello"
    # BINARY[] is the whole message, decoded and labelled so (as Dovecot does).
    assert message.binary(()) == crlf("Subject: x\nContent-Type: text/plain\n"
                                      "Content-Transfer-Encoding: binary\n\nHello")


def test_binary_of_the_whole_message_and_of_an_encapsulated_one() -> None:
    raw = crlf("""Subject: x
Content-Type: multipart/mixed; boundary=x

--x
Content-Type: message/rfc822

Subject: in
Content-Transfer-Encoding: base64

SGVsbG8=
--x
Content-Type: text/plain
Content-Transfer-Encoding: Quoted-Printable

a=3Db{SPACES}
c=
d
--x--
""".replace("{SPACES}", "  "))
    message = ParsedMessage(raw)
    assert message.binary((1,)) == crlf("Subject: in\nContent-Transfer-Encoding: binary\n\n"
                                        "Hello")
    assert message.binary((1, 1)) == b"Hello"
    # RFC 2045 §6.7: trailing white space is not data, "=" at the end is a soft break.
    assert message.binary((2,)) == b"a=b\r\ncd"
    assert message.binary(()) == crlf("""Subject: x
Content-Type: multipart/mixed; boundary=x

--x
Content-Type: message/rfc822

Subject: in
Content-Transfer-Encoding: binary

Hello
--x
Content-Type: text/plain
Content-Transfer-Encoding: binary

a=b
cd
--x--
""")


def test_lenient_base64() -> None:
    raw = crlf("Content-Transfer-Encoding: base64\n\nSGVs*bG8g\nd29y!bGQ\n")
    assert ParsedMessage(raw).binary((1,)) == b"Hello world"


def test_unknown_cte() -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=x\n\n--x\n"
               "Content-Transfer-Encoding: x-uuencode\n\nbegin 644 a\n--x\n\nplain\n--x--\n")
    message = ParsedMessage(raw)
    with pytest.raises(UnknownCTE):
        message.binary((1,))
    with pytest.raises(UnknownCTE):
        message.binary(())
    assert message.binary((2,)) == b"plain"
    # BODY[] still gives the octets, and BODYSTRUCTURE the encoding's name.
    assert message.section(Section((1,))) == b"begin 644 a"
    assert b'"x-uuencode"' in message.bodystructure(False)


# --- ENVELOPE ------------------------------------------------------------------------

def test_rfc9051_envelope_example() -> None:
    raw = crlf("""Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)
From: Terry Gray <gray@cac.washington.edu>
Subject: IMAP4rev2 WG mtg summary and minutes
To: imap@cac.washington.edu
cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>
Message-Id: <B27397-0100000@cac.washington.edu>
MIME-Version: 1.0
Content-Type: TEXT/PLAIN; CHARSET=US-ASCII

Hi
""")
    assert ParsedMessage(raw).envelope() == (
        b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev2 WG mtg summary and minutes" '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'((NIL NIL "imap" "cac.washington.edu")) '
        b'((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) '
        b'NIL NIL "<B27397-0100000@cac.washington.edu>")')


ENVELOPE_SAMPLE = crlf("""From: "Doe, John" <j@x.example>, plain@x.example (Plain Comment),
 <angle@x.example>
To: undisclosed-recipients:;
Cc: A Group: a@b.example, "Q \\"N\\"" <c@d.example>;, e@f.example
Bcc: =?utf-8?q?J=C3=B6rg?= <jorg@x.example>
Sender: nohost
Reply-To: <@route1,@route2:r@x.example>
Subject:   folded
  subject\t
In-Reply-To: <a@b>
 <c@d>
Message-ID:

body
""")


def test_envelope_addresses_groups_and_raw_strings() -> None:
    assert value(ParsedMessage(ENVELOPE_SAMPLE).envelope()) == [
        None, b"folded subject",
        [[b"Doe, John", None, b"j", b"x.example"],
         [b"Plain Comment", None, b"plain", b"x.example"],
         [None, None, b"angle", b"x.example"]],
        [[None, None, b"nohost", b"MISSING_DOMAIN"]],
        [[None, b"@route1,@route2", b"r", b"x.example"]],
        [[None, None, b"undisclosed-recipients", None], [None, None, None, None]],
        [[None, None, b"A Group", None], [None, None, b"a", b"b.example"],
         [b'Q "N"', None, b"c", b"d.example"], [None, None, None, None],
         [None, None, b"e", b"f.example"]],
        # RFC 2047 words stay encoded in ENVELOPE.
        [[b"=?utf-8?q?J=C3=B6rg?=", None, b"jorg", b"x.example"]],
        b"<a@b> <c@d>",
        b"",                               # present but empty: "", absent: NIL
    ]


def test_envelope_of_a_message_without_headers() -> None:
    assert ParsedMessage(b"\r\nbody\r\n").envelope() == \
        b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def test_envelope_sender_and_reply_to_default_to_from() -> None:
    raw = crlf("From: a@b.example\nSender:\nReply-To: (nobody)\nTo: ,,c@d.example,,\n\n")
    envelope = value(ParsedMessage(raw).envelope())
    assert envelope[2] == envelope[3] == envelope[4] == [[None, None, b"a", b"b.example"]]
    assert envelope[5] == [[None, None, b"c", b"d.example"]]


def test_envelope_odd_addresses() -> None:
    raw = crlf('From: Joe Q. Public <john.q.public@example.com>\n'
               'To: Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>\n'
               'Cc: "" <x@y>, Name Only <>, joe @ example . com, a.b@[1.2.3.4]\n'
               'Bcc: a@b (c) d@e, group: ;\n'
               'Subject: one\nSubject: two\n\n')
    envelope = value(ParsedMessage(raw).envelope())
    assert envelope[1] == b"two"                    # the last one, as Dovecot
    assert envelope[2] == [[b"Joe Q. Public", None, b"john.q.public", b"example.com"]]
    assert envelope[5] == [[b"Pete", None, b"pete", b"silly.test"]]
    assert envelope[6] == [[None, None, b"x", b"y"],
                           [b"Name Only", None, b"MISSING_MAILBOX", b"MISSING_DOMAIN"],
                           [None, None, b"joe", b"example.com"],
                           [None, None, b"a.b", b"[1.2.3.4]"]]
    assert envelope[7] == [[b"c", None, b"a", b"b"], [None, None, b"group", None],
                           [None, None, None, None]]


def test_envelope_keeps_8bit_and_uses_literals_when_needed() -> None:
    raw = "Subject: café\r\nFrom: Zoë <z@example.org>\r\n\r\n".encode()
    envelope = value(ParsedMessage(raw).envelope())
    assert envelope[1] == "café".encode()
    assert envelope[2] == [["Zoë".encode(), None, b"z", b"example.org"]]


# --- decoded text for SEARCH and SORT ------------------------------------------------

def test_header_decodes_rfc2047_words() -> None:
    raw = crlf("""Subject: =?utf-8?q?Caf=C3=A9?= =?utf-8?b?IGF1?=
 =?UTF-8?Q?_lait?= and more
From: =?iso-8859-1?q?Andr=E9?= <andre@example.org>
To: =?x-unknown?q?a=FFb?= <t@example.org>
X-Split: =?utf-8?b?w6k=?=
X-Split: =?utf-8?q?=C3?= =?utf-8?q?=A9?=
X-Raw: café

""")
    message = ParsedMessage(raw)
    assert message.header("subject") == ["Café au lait and more"]
    assert message.header("FROM") == ["André <andre@example.org>"]
    assert message.header("to") == ["a\ufffdb <t@example.org>"]
    assert message.header("x-split") == ["é", "é"]       # a character split in two words
    assert message.header("x-raw") == ["café"]
    assert message.header("missing") == []
    text = message.header_text()
    assert "Subject: Café au lait and more\r\n" in text and "From: André" in text


def test_body_text() -> None:
    raw = crlf("""Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Caf=C3=A9
--b
Content-Type: text/html; charset=iso-8859-1
Content-Transfer-Encoding: base64

PGI+Y2Fm6TwvYj4=
--b
Content-Type: application/octet-stream

not text
--b
Content-Type: message/rfc822

Subject: inner

inner text
--b
Content-Type: text/plain; charset=bogus-charset

ok
--b--
""").replace(b"ok\r\n", b"ok\xff\r\n")
    text = ParsedMessage(raw).body_text()
    assert "Café" in text and "<b>café</b>" in text and "inner text" in text
    assert "not text" not in text
    assert "ok\ufffd" in text
    assert ParsedMessage(SIMPLE).body_text() == "Hello\r\n"


@pytest.mark.parametrize("date, expected", [
    ("Tue, 02 Jan 2024 10:00:00 +0100", 1704186000.0),
    ("2 Jan 2024 09:00:00 GMT", 1704186000.0),
    ("Tue, 02 Jan 2024 09:00:00 -0000", 1704186000.0),
    ("Tue, 02 Jan 2024\n 10:00:00 +0100", 1704186000.0),
    ("garbage", None),
    ("", None),
])
def test_date(date: str, expected: float | None) -> None:
    assert ParsedMessage(crlf(f"Date: {date}\n\n")).date() == expected


def test_date_missing() -> None:
    assert ParsedMessage(SIMPLE).date() is None


# --- laziness ------------------------------------------------------------------------

def test_parsed_lazily_and_once(monkeypatch: pytest.MonkeyPatch) -> None:
    passes = []
    parse = message_module._Parser.parse

    def counting(self: Any, start: int, stack: tuple[bytes, ...], *args: Any) -> Any:
        if start == 0 and not stack:
            passes.append(start)
        return parse(self, start, stack, *args)

    monkeypatch.setattr(message_module._Parser, "parse", counting)
    blob = b"QUJD" * 19 + b"\r\n"
    raw = NESTED.replace(b"AAEC/w==\r\n", blob * 200_000)        # a 16 MB attachment
    message = ParsedMessage(raw)
    message.envelope(), message.header("subject"), message.date()
    message.section(Section(text="HEADER.FIELDS", fields=("From",)))
    assert passes == []                                 # the header alone
    assert message.section(Section((3,))) == (blob * 200_000)[:-2]
    message.bodystructure(True), message.bodystructure(False), message.binary((1,))
    message.section(Section((2, 1))), message.body_text()
    assert len(passes) == 1


# --- Dovecot, the reference peer -----------------------------------------------------

DOVECOT_USER, DOVECOT_PASSWORD = "message@dovecot.test", "secret-1"

COMPARED = [
    SIMPLE,
    NESTED,
    ENVELOPE_SAMPLE,
    rfc9051_example().replace(b"CHARSET=US-ASCII\r\n", b"CHARSET=ISO-8859-1\r\n"),
    crlf("Subject: no body\n\n"),
    crlf("From: a@b.example\nContent-Type: TEXT/Plain\nContent-Transfer-Encoding: Base64\n\n"
         "SGVsbG8=\n"),
    crlf("""Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)
From: Joe Q. Public <john.q.public@example.com>
To: Mary Smith <mary@x.test>, jdoe@example.org, Who? <one@y.test>
Cc: <boss@nil.test>, "Giant; \\"Big\\" Box" <sysservices@example.net>
Sender: A Group:Ed Jones <c@a.test>,joe@where.test,John <jdoe@one.test>;
Reply-To: Undisclosed recipients:;
Bcc: Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>
Subject: =?iso-8859-1?q?caf=E9?=
In-Reply-To: <a@b>
Message-ID: <x@y>
Subject: second

body
"""),
    crlf("""Subject: parts
Content-Type: Multipart/MIXED; Boundary="x"

--x
Content-Type: text/PLAIN; format=flowed

one
--x
Content-Type: Message/Rfc822

Subject: in

body
--x
Content-Type: text/html; charset="UTF-8"; Format=flowed
Content-Disposition: attachment; filename="a b.txt"
Content-Language: en, de
Content-Location: http://x/y
Content-ID: <id@x>
Content-Description: desc
Content-MD5: abc

two

--x
Content-Type: application/octet-stream; name*0="a"; name*1="b"
Content-Transfer-Encoding: base64

AAEC/w==
--x
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

caf=C3=A9 =
soft=20
--x--
epilogue
"""),
    crlf("""Subject: digest
Content-Type: multipart/digest; boundary=d

--d

From: q@r
Subject: inner

body
--d
Content-Type: text/plain

t
--d--
"""),
    crlf("""Subject: malformed
Content-Type: multipart/mixed; boundary=x

--x
Content-Type: multipart/alternative; boundary=xy

--xy

a
--x
Content-Type: multipart/mixed

lost
--x
Content-Type: message/rfc822

Subject: in2
Content-Type: multipart/alternative; boundary=y

--y

A
--y--
--x
Content-Type: multipart/related; boundary=never

nothing
--x--junk
more
--x
"""),
]
COMPARED_ITEMS = ["BODYSTRUCTURE", "BODY", "ENVELOPE"]
COMPARED_SECTIONS = ["", "HEADER", "TEXT", "1", "1.MIME", "2", "2.MIME", "2.HEADER",
                     "2.TEXT", "2.1", "2.1.MIME", "2.2", "3", "3.1", "3.MIME", "4", "5",
                     "HEADER.FIELDS (Subject From)", "HEADER.FIELDS.NOT (Subject)",
                     "2.HEADER.FIELDS (Subject)"]
COMPARED_BINARY = ["", "1", "2", "2.1", "4", "5"]


class _RawIMAP:
    """Just enough of an IMAP client to read whole responses, literals included."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.tag = 0

    def command(self, text: bytes, literal: bytes | None = None) -> bytes:
        self.tag += 1
        tag = b"T%d" % self.tag
        if literal is None:
            self.sock.sendall(tag + b" " + text + b"\r\n")
        else:
            self.sock.sendall(tag + b" " + text + b" {%d+}\r\n" % len(literal) + literal
                              + b"\r\n")
        out = b""
        while True:
            line = self.file.readline()
            if line.startswith(tag + b" "):
                assert line.startswith(tag + b" OK"), (line, out)
                return out
            out += line
            while line.endswith(b"}\r\n"):
                size = int(line[line.rindex(b"{") + 1:-3])
                out += self.file.read(size)
                line = self.file.readline()
                out += line

    def close(self) -> None:
        self.command(b"LOGOUT")
        self.file.close()
        self.sock.close()


@pytest.fixture(scope="module")
def dovecot_fetch() -> Iterator[Callable[[int, str], Any]]:
    """FETCH from a Dovecot that holds COMPARED: fetch(index, item) -> the item's value."""
    from dovecot import DovecotInstance

    instance = DovecotInstance()
    instance.add_user(DOVECOT_USER, DOVECOT_PASSWORD)
    instance.start()
    client = None
    try:
        client = _RawIMAP(instance.imap_port)
        client.command(b"LOGIN %s %s" % (DOVECOT_USER.encode(), DOVECOT_PASSWORD.encode()))
        for raw in COMPARED:
            client.command(b"APPEND INBOX", raw)
        client.command(b"SELECT INBOX")

        def fetch(index: int, item: str) -> Any:
            assert client is not None
            response = values(client.command(b"FETCH %d (%s)" % (index + 1, item.encode())))
            name = item.replace(".PEEK", "").split("[")[0]
            for at in range(len(response) - 3):     # other untagged responses may come
                if response[at:at + 3] == ["*", index + 1, "FETCH"]:
                    data = response[at + 3]
                    for key, found in zip(data[::2], data[1::2], strict=True):
                        if key.split("[")[0] == name:
                            return found
            raise AssertionError(f"no {item} in {response!r}")

        yield fetch
    finally:
        if client is not None:
            client.close()
        instance.stop()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMPARED)))
def test_same_structure_as_dovecot(dovecot_fetch: Callable[[int, str], Any],
                                   index: int) -> None:
    message = ParsedMessage(COMPARED[index])
    ours = {"BODYSTRUCTURE": message.bodystructure(True),
            "BODY": message.bodystructure(False), "ENVELOPE": message.envelope()}
    for item in COMPARED_ITEMS:
        assert value(ours[item]) == dovecot_fetch(index, item), item


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMPARED)))
def test_same_sections_as_dovecot(dovecot_fetch: Callable[[int, str], Any],
                                  index: int) -> None:
    message = ParsedMessage(COMPARED[index])
    for inner in COMPARED_SECTIONS:
        assert message.section(parse_section(inner)) == \
            dovecot_fetch(index, f"BODY.PEEK[{inner}]"), inner
    for inner in COMPARED_BINARY:
        part = tuple(int(n) for n in inner.split(".")) if inner else ()
        assert message.binary(part) == dovecot_fetch(index, f"BINARY.PEEK[{inner}]"), inner


@pytest.mark.parametrize("raw", [
    b"From: A <a@example.org>\r\nTo: b@example.test, c@example.test\r\n"
    b"Subject: =?utf-8?q?h=C3=A9?=\r\n"
    b"Date: Tue, 1 Dec 2026 10:00:00 +0100\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n\r\nmore\r\n",
    b"Subject: folded\n\tline\nFrom: a@b\n\nbody\n",
    b"Subject: no body\r\nFrom: a@b\r\n",
    b"\r\nbody only\r\n",
])
def test_header_block_answers_header_items_like_the_whole_message(raw: bytes) -> None:
    """FETCH and SEARCH of header fields parse the header block kept in SQL
    (blobs.header_block) instead of the message: same answers."""
    from lightmail.imap.message import Section
    from lightmail.storage.blobs import header_block
    whole, head = ParsedMessage(raw), ParsedMessage(header_block(raw))
    assert head.envelope() == whole.envelope()
    for section in (Section(text="HEADER"),
                    Section(text="HEADER.FIELDS", fields=("From", "Subject")),
                    Section(text="HEADER.FIELDS.NOT", fields=("From",))):
        assert head.section(section) == whole.section(section)
    for name in ("From", "To", "Subject", "Date", "X-None"):
        assert head.header(name) == whole.header(name)
    assert head.date() == whole.date()


def test_header_cache_keeps_the_most_recently_used_blobs_within_its_memory() -> None:
    from lightmail.imap.headcache import HeaderCache, entry_cost
    first, second, third = (ParsedMessage(b"Subject: %d\r\n\r\n" % n) for n in range(3))
    cache = HeaderCache(budget=2 * entry_cost(first))
    assert cache.put("a", first) is first
    cache.put("b", second)
    assert cache.get("a") is first          # now the most recent
    cache.put("c", third)                   # evicts "b", the least recent
    assert cache.get("b") is None
    assert cache.get("a") is first and cache.get("c") is third
    assert len(cache.entries) == 2 and cache.used == 2 * entry_cost(first)
    cache.put("a", first)                   # again: counted once
    assert cache.used == 2 * entry_cost(first)
    big = ParsedMessage(b"X: " + b"y" * 1000 + b"\r\n\r\n")
    assert cache.put("big", big) is big and cache.get("big") is None   # over the budget
    cache.resize(entry_cost(first))
    assert list(cache.entries) == ["a"] and cache.used == entry_cost(first)
    cache.resize(0)
    assert not cache.entries and cache.used == 0


def test_header_cache_size_comes_from_the_configuration(tmp_path: Path) -> None:
    from lightmail.config import load_config
    from lightmail.imap.headcache import DEFAULT_BUDGET, HEADERS
    from lightmail.imap.session import build_imap_factory
    config_file = tmp_path / "lightmail.conf"
    config_file.write_text(
        f"[server]\nstate_dir = {tmp_path}\n[imap]\nheader_cache = 3M\n"
        "[listener:imap]\nprotocol = imap\nendpoint = tcp:0\n")
    config = load_config(config_file)
    from lightmail.imap.hub import MailboxHub
    from lightmail.metrics.registry import Metrics
    from lightmail.policy.training import NO_TRAINER
    services = type("Services", (), {"config": config, "imap_hub": MailboxHub(),
                                     "metrics": Metrics(), "trainer": NO_TRAINER})()
    try:
        build_imap_factory(config.listeners[0], services)
        assert HEADERS.budget == 3 * 1024**2
    finally:
        HEADERS.resize(DEFAULT_BUDGET)


def test_header_fields_answers_are_kept_per_section_and_bounded() -> None:
    from lightmail.imap import message as module
    parsed = ParsedMessage(b"From: a@b\r\nTo: c@d\r\nSubject: hi\r\n\r\nbody\r\n")
    wanted = Section(text="HEADER.FIELDS", fields=("From", "Subject"))
    first = parsed.section(wanted)
    assert first == b"From: a@b\r\nSubject: hi\r\n\r\n"
    assert parsed.section(Section(text="HEADER.FIELDS", fields=("From", "Subject"))) is first
    assert parsed.section(Section(text="HEADER.FIELDS.NOT", fields=("From",))) == \
        b"To: c@d\r\nSubject: hi\r\n\r\n"
    for n in range(module._FIELDS_KEPT * 2):
        assert parsed.section(Section(text="HEADER.FIELDS", fields=(f"X-{n}",))) == b"\r\n"
    assert len(parsed.__dict__["_fields"]) <= module._FIELDS_KEPT
    assert parsed.section(wanted) == first
