"""A strict reader of RFC 5424 syslog messages, for the tests' own receivers: every
field is checked against the RFC's ABNF (§6), and anything else is an error."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BOM = b"\xef\xbb\xbf"
_PRINTUSASCII = rb"[\x21-\x7e]"
_HEADER = re.compile(
    rb"<(?P<pri>0|[1-9]\d{0,2})>(?P<version>[1-9]\d{0,2}) "
    rb"(?P<timestamp>-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    rb"(?P<hostname>" + _PRINTUSASCII + rb"{1,255}) "
    rb"(?P<app>" + _PRINTUSASCII + rb"{1,48}) "
    rb"(?P<procid>" + _PRINTUSASCII + rb"{1,128}) "
    rb"(?P<msgid>" + _PRINTUSASCII + rb"{1,32}) ")
# SD-NAME: PRINTUSASCII except '=', ']' and '"' (SP is not printable anyway).
_SD_NAME = re.compile(rb'[\x21\x23-\x3c\x3e-\x5c\x5e-\x7e]{1,32}')


@dataclass
class Message:
    facility: int
    severity: int
    timestamp: str
    hostname: str
    app: str
    procid: str
    msgid: str
    data: dict[str, dict[str, str]] = field(default_factory=dict)
    text: str = ""


def _sd_name(raw: bytes, at: int) -> tuple[str, int]:
    match = _SD_NAME.match(raw, at)
    assert match, f"no SD-NAME at {at}: {raw!r}"
    return match.group().decode("ascii"), match.end()


def _structured_data(raw: bytes, at: int) -> tuple[dict[str, dict[str, str]], int]:
    if raw[at:at + 1] == b"-":
        return {}, at + 1
    elements: dict[str, dict[str, str]] = {}
    assert raw[at:at + 1] == b"[", f"STRUCTURED-DATA must be - or [..]: {raw!r}"
    while raw[at:at + 1] == b"[":
        sd_id, at = _sd_name(raw, at + 1)
        assert sd_id not in elements, f"SD-ID {sd_id} twice: {raw!r}"
        params: dict[str, str] = {}
        while raw[at:at + 1] == b" ":
            name, at = _sd_name(raw, at + 1)
            assert raw[at:at + 2] == b'="', f"expected =\" after {name}: {raw!r}"
            at += 2
            value = bytearray()
            while True:
                char = raw[at:at + 1]
                assert char, f"unterminated PARAM-VALUE: {raw!r}"
                if char == b"\\" and raw[at + 1:at + 2] in (b'"', b"\\", b"]"):
                    value += raw[at + 1:at + 2]
                    at += 2
                    continue
                assert char != b"]", f"unescaped ] in PARAM-VALUE: {raw!r}"
                if char == b'"':
                    at += 1
                    break
                value += char
                at += 1
            params[name] = value.decode("utf-8")       # PARAM-VALUE is UTF-8
        assert raw[at:at + 1] == b"]", f"SD-ELEMENT not closed at {at}: {raw!r}"
        elements[sd_id] = params
        at += 1
    return elements, at


def parse(raw: bytes) -> Message:
    """One RFC 5424 message; AssertionError says what breaks the ABNF."""
    match = _HEADER.match(raw)
    assert match, f"not an RFC 5424 header: {raw[:200]!r}"
    pri = int(match.group("pri"))
    assert pri <= 191, raw
    assert match.group("version") == b"1", raw
    data, at = _structured_data(raw, match.end())
    text = ""
    if at < len(raw):
        assert raw[at:at + 1] == b" ", f"SP expected before MSG: {raw!r}"
        body = raw[at + 1:]
        # LightMail's text is UTF-8, so MSG-UTF8: it starts with the BOM (§6.4).
        assert body.startswith(BOM), f"MSG without BOM: {raw!r}"
        text = body[len(BOM):].decode("utf-8")     # strictly valid UTF-8
    return Message(pri // 8, pri % 8, match.group("timestamp").decode(),
                   match.group("hostname").decode(), match.group("app").decode(),
                   match.group("procid").decode(), match.group("msgid").decode(),
                   data, text)


def octet_counted(buffer: bytearray) -> list[bytes]:
    """The complete RFC 6587 octet-counted frames at the start of ``buffer`` (taken
    out of it)."""
    frames = []
    while True:
        space = buffer.find(b" ")
        if space < 0:
            return frames
        length = buffer[:space]
        assert length.isdigit() and not length.startswith(b"0"), bytes(buffer[:40])
        end = space + 1 + int(length)
        if len(buffer) < end:
            return frames
        frames.append(bytes(buffer[space + 1:end]))
        del buffer[:end]
