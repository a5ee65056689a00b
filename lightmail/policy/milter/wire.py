"""The milter protocol's wire format, version 6, from the MTA's side: packets, the
option negotiation, the commands we send and the answers we read.

A packet is a 4-octet length in network order, then a command octet, then data
(the length counts the command octet and the data).  Strings are NUL-terminated;
numbers are 4-octet (ports 2-octet) in network order.  There is no RFC: the
reference is Sendmail's libmilter (``include/libmilter/mfdef.h``, ``libmilter/
engine.c``) and Postfix's client (``src/milter/milter8.c``), whose behaviour this
follows where they agree.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

from lightmail.smtp.codes import Reply

VERSION = 6
#: Most data in one BODY packet (libmilter's MILTER_CHUNK_SIZE).
BODY_CHUNK = 65535
#: Most data we take in one packet from a milter: libmilter's largest (SMFIP_MDS_1M)
#: and some room; a length beyond it is garbage, not a packet.
MAX_PACKET = 1024 * 1024 + 64

# Commands, MTA to milter (mfdef.h SMFIC_*).
ABORT, BODY, CONNECT, MACRO, EOB = b"A", b"B", b"C", b"D", b"E"
HELO, HEADER, MAIL, EOH, OPTNEG = b"H", b"L", b"M", b"N", b"O"
QUIT, RCPT, DATA = b"Q", b"R", b"T"

# Answers, milter to MTA (SMFIR_*): the verdicts ...
ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL = b"a", b"c", b"d", b"r", b"t"
REPLYCODE, SKIP, PROGRESS = b"y", b"s", b"p"
VERDICTS = {ACCEPT: "accept", CONTINUE: "continue", DISCARD: "discard",
            REJECT: "reject", TEMPFAIL: "tempfail", REPLYCODE: "reply", SKIP: "skip"}
# ... and the edits, at end of message only.
ADDRCPT, DELRCPT, ADDRCPT_PAR, REPLBODY, CHGFROM = b"+", b"-", b"2", b"b", b"e"
ADDHEADER, INSHEADER, CHGHEADER, QUARANTINE = b"h", b"i", b"m", b"q"

# Actions a milter may take (SMFIF_*): we offer them all.
ACT_ADDHDRS, ACT_CHGBODY, ACT_ADDRCPT, ACT_DELRCPT = 0x01, 0x02, 0x04, 0x08
ACT_CHGHDRS, ACT_QUARANTINE, ACT_CHGFROM, ACT_ADDRCPT_PAR = 0x10, 0x20, 0x40, 0x80
ACT_SETSYMLIST = 0x100
ACTIONS = 0x1FF

# Protocol flags (SMFIP_*): steps a milter does not want, answers it will not send.
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 0x1, 0x2, 0x4, 0x8
P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = 0x10, 0x20, 0x40, 0x80
P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
P_HDR_LEADSPC = 0x100000
P_MDS_256K, P_MDS_1M = 0x10000000, 0x20000000
#: What we can honour: every step skipped, every answer left out, SKIP, header values
#: with their leading space, bigger packets.  Not RCPT_REJ: refused recipients are
#: not shown to milters (Postfix does not either).
PROTOCOL = 0x1FFFFF & ~P_RCPT_REJ | P_MDS_256K | P_MDS_1M
#: The flags each older version knew (what Postfix masks with): version 2 has no
#: "no reply" flags, no DATA and no SKIP.
_VERSION_FLAGS = {2: 0x7F, 3: 0x17F, 4: 0x3FF, 5: 0x3FF}
#: The commands each no-reply flag silences.
NO_REPLY = {CONNECT: P_NR_CONN, HELO: P_NR_HELO, MAIL: P_NR_MAIL, RCPT: P_NR_RCPT,
            DATA: P_NR_DATA, HEADER: P_NR_HDR, EOH: P_NR_EOH, BODY: P_NR_BODY}

# Macro stages (SMFIM_*), as a milter's symbol lists name them.
STAGE_CONNECT, STAGE_HELO, STAGE_MAIL, STAGE_RCPT = 0, 1, 2, 3
STAGE_DATA, STAGE_EOM, STAGE_EOH = 4, 5, 6
STAGE_OF = {CONNECT: STAGE_CONNECT, HELO: STAGE_HELO, MAIL: STAGE_MAIL,
            RCPT: STAGE_RCPT, DATA: STAGE_DATA, EOB: STAGE_EOM, EOH: STAGE_EOH}


class ProtocolError(Exception):
    """The milter said something the protocol does not allow."""


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def cstrings(*values: str | bytes) -> bytes:
    """NUL-terminated strings (NULs inside a value would cut it: they become spaces)."""
    out = []
    for value in values:
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        out.append(raw.replace(b"\0", b" ") + b"\0")
    return b"".join(out)


def split_cstrings(data: bytes, count: Optional[int] = None) -> list[bytes]:
    """The NUL-terminated strings of ``data``; exactly ``count`` when given."""
    if data and not data.endswith(b"\0"):
        raise ProtocolError("a string is not NUL-terminated")
    parts = data[:-1].split(b"\0") if data else []
    if count is not None and len(parts) != count:
        raise ProtocolError(f"expected {count} strings, got {len(parts)}")
    return parts


class PacketReader:
    """Cuts the byte stream from a milter into (command, data) packets."""

    def __init__(self, limit: int = MAX_PACKET) -> None:
        self.buffer = b""
        self.limit = limit

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bytes]]:
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack("!I", self.buffer[:4])
            if length == 0 or length > self.limit:
                raise ProtocolError(f"a packet of length {length}")
            if len(self.buffer) < 4 + length:
                return
            body, self.buffer = self.buffer[4:4 + length], self.buffer[4 + length:]
            yield body[:1], body[1:]


# --- negotiation -----------------------------------------------------------------------

@dataclass(frozen=True)
class Negotiated:
    """What the milter agreed to: its version, the actions it may take, the protocol
    flags in force, and the macros it asked for at each stage (SETSYMLIST)."""

    version: int
    actions: int
    protocol: int
    macros: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def wants(self, flag: int) -> bool:
        return bool(self.protocol & flag)

    def may(self, action: int) -> bool:
        return bool(self.actions & action)


def offer() -> bytes:
    return packet(OPTNEG, struct.pack("!III", VERSION, ACTIONS, PROTOCOL))


def read_negotiation(command: bytes, data: bytes) -> Negotiated:
    """The milter's answer to our OPTNEG.  Versions 2 to 6 are spoken (each with the
    flags it knew); asking for an action we did not offer is an error."""
    if command != OPTNEG or len(data) < 12:
        raise ProtocolError(f"expected an option negotiation, got {command!r}")
    version, actions, protocol = struct.unpack("!III", data[:12])
    if version < 2:
        raise ProtocolError(f"milter protocol version {version} is too old (2 to 6)")
    version = min(version, VERSION)
    if actions & ~ACTIONS:
        raise ProtocolError(f"actions 0x{actions:x} beyond those offered")
    if version < VERSION:
        protocol &= _VERSION_FLAGS[version]
    # Flags we did not offer (RCPT_REJ) are left out, as Postfix does: they only
    # ask for more than we send.
    protocol &= PROTOCOL
    macros: dict[int, tuple[str, ...]] = {}
    rest = data[12:]
    while len(rest) >= 4 and actions & ACT_SETSYMLIST:
        (stage,) = struct.unpack("!I", rest[:4])
        end = rest.find(b"\0", 4)
        if end < 0 or stage > STAGE_EOH:
            raise ProtocolError("a bad macro list in the negotiation")
        names = rest[4:end].decode("ascii", "replace")
        macros[stage] = tuple(_macro_name(name) for name in names.split() if name)
        rest = rest[end + 1:]
    return Negotiated(version, actions, protocol, macros)


def _macro_name(name: str) -> str:
    """Macro names as we keep them: ``{name}`` for long ones, ``j`` for one letter."""
    return name if len(name) == 1 or name.startswith("{") else "{" + name.strip("{}") + "}"


def macro_packet(command: bytes, macros: Sequence[tuple[str, str]]) -> bytes:
    return packet(MACRO, command + cstrings(*[part for pair in macros for part in pair]))


# --- what the milter answers -----------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """A milter's answer to a command: ``kind`` is continue, accept, reject, tempfail,
    discard, reply (``reply`` says which) or skip."""

    kind: str
    reply: Optional[Reply] = None


CONTINUED = Verdict("continue")


@dataclass(frozen=True)
class Edit:
    """One change asked for at end of message: ``command`` is the SMFIR_ octet; for
    header edits ``index`` (INSHEADER: position, CHGHEADER: occurrence), ``name`` and
    ``value``; the address (and ESMTP arguments) for envelope changes; a body chunk
    or a quarantine reason in ``value``."""

    command: bytes
    name: str = ""
    value: bytes = b""
    index: int = 0


_REPLY = re.compile(rb"^([45])\d\d(?:[ -]|$)")
_STATUS = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")


def read_verdict(command: bytes, data: bytes) -> Verdict:
    if command not in VERDICTS:
        raise ProtocolError(f"unexpected answer {command!r}")
    if command == REPLYCODE:
        return Verdict("reply", smtp_reply(data))
    return Verdict(VERDICTS[command])


def smtp_reply(data: bytes) -> Reply:
    """A REPLYCODE's text as a Reply: a 4xx or 5xx code (anything else is an error),
    its enhanced status kept when it matches the code's class (4.7.1 or 5.7.1
    otherwise), the text printable ASCII, at most 8 lines of 400 characters
    (libmilter's %% is a single %)."""
    [text] = split_cstrings(data, 1) if data.endswith(b"\0") else [data]
    lines = [line for line in re.split(rb"\r?\n", text.strip()) if line]
    if not lines or not _REPLY.match(lines[0]):
        raise ProtocolError(f"a reply code that is not 4xx or 5xx: {text[:40]!r}")
    code = int(lines[0][:3])
    status = ""
    texts = []
    for line in lines[:8]:
        if not line[:3].isdigit() or int(line[:3]) != code:
            raise ProtocolError("a multi-line reply whose lines differ in code")
        rest = line[4:].decode("ascii", "replace").replace("%%", "%")
        first, _, after = rest.partition(" ")
        if _STATUS.match(first):
            status = status or first
            rest = after
        texts.append(re.sub(r"[^\x20-\x7e]", "?", rest).strip()[:400])
    if not status or status[0] != str(code)[0]:
        status = f"{str(code)[0]}.7.1"
    return Reply(code, status, "\n".join(texts) or "Rejected by a mail filter")


def read_edit(command: bytes, data: bytes) -> Edit:
    """An end-of-message edit (ProtocolError for one that is not)."""
    if command in (ADDHEADER,):
        name, value = split_cstrings(data, 2)
        return Edit(command, _header_name(name), value)
    if command in (INSHEADER, CHGHEADER):
        if len(data) < 4:
            raise ProtocolError("a header edit without its index")
        (index,) = struct.unpack("!I", data[:4])
        name, value = split_cstrings(data[4:], 2)
        return Edit(command, _header_name(name), value, index)
    if command in (ADDRCPT, DELRCPT):
        [address] = split_cstrings(data, 1)
        return Edit(command, _address(address))
    if command in (ADDRCPT_PAR, CHGFROM):
        parts = split_cstrings(data)
        if not parts:
            raise ProtocolError("an envelope change without an address")
        return Edit(command, _address(parts[0]), b" ".join(parts[1:]))
    if command == REPLBODY:
        return Edit(command, value=data)
    if command == QUARANTINE:
        reason = data[:-1] if data.endswith(b"\0") else data
        return Edit(command, value=reason)
    raise ProtocolError(f"unexpected answer {command!r} at end of message")


_FIELD_NAME = re.compile(r"^[!-9;-~]{1,200}$")


def _header_name(raw: bytes) -> str:
    """RFC 5322 §2.2: printable ASCII but the colon (anything else would break the
    header block)."""
    name = raw.decode("ascii", "replace")
    if not _FIELD_NAME.match(name):
        raise ProtocolError(f"a bad header field name {raw[:40]!r}")
    return name


def _address(raw: bytes) -> str:
    """An address as milters send it (``<a@b>`` or bare), without the brackets."""
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text or any(c in text for c in "<>\r\n\t ") or len(text) > 320:
        raise ProtocolError(f"a bad address {raw[:60]!r}")
    return text
