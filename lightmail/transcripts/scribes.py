"""What a session's octets say, line by line, with its secrets masked: one scribe per
protocol family (SMTP, submission and LMTP; IMAP; POP3).

A scribe is fed what the client sent and what the server wrote, in the order they
crossed, and returns transcript lines.  It follows the protocol only as far as
masking needs:

* SASL, everywhere: an AUTH/AUTHENTICATE command's initial response, and every line
  the client sends while the exchange goes on (after a 334 / ``+`` challenge): PLAIN,
  LOGIN, SCRAM, CRAM-MD5, XOAUTH2 and OAUTHBEARER alike, whatever the mechanism;
* IMAP LOGIN's password, as an atom, a quoted string or a literal; POP3 PASS, and
  APOP's digest;
* message content (SMTP DATA and BDAT, IMAP APPEND and FETCH literals, POP3 RETR and
  TOP): its size only, or its first ``body_octets`` octets.
"""

from __future__ import annotations

import re
from collections import deque

from lightmail.logs import escape

MASK = "****"
#: A line longer than this without its end is shown in pieces (a client that never
#: ends its line must not make the transcript hold it).
LINE_MAX = 16384


class Content:
    """A message's octets as they pass: counted, the first ``limit`` kept to show."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.kept = bytearray()

    def add(self, data: bytes) -> None:
        self.size += len(data)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    def lines(self, who: str, what: str) -> list[str]:
        shown = [f"{who}| {escape(line.decode('utf-8', 'replace'))}"
                 for line in bytes(self.kept).splitlines()]
        rest = "" if not shown else f", the first {len(self.kept)} shown above"
        return shown + [f"{who}[{what}: {self.size} octets{rest}]"]


class Stream:
    """One direction's octets: whole lines, or ``raw`` octets taken as they come."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.raw = 0
        self.content: Content | None = None


class Scribe:
    """The common part: lines and raw runs of each direction, handed to the
    protocol's ``client_line``/``server_line``."""

    def __init__(self, body_octets: int = 0) -> None:
        self.body_octets = body_octets
        self.streams = {"C": Stream(), "S": Stream()}
        self.out: list[str] = []

    def client(self, data: bytes) -> list[str]:
        return self._feed("C", data)

    def server(self, data: bytes) -> list[str]:
        return self._feed("S", data)

    def _feed(self, who: str, data: bytes) -> list[str]:
        self.out = []
        stream = self.streams[who]
        stream.buffer += data
        while stream.buffer:
            if stream.raw:
                take = bytes(stream.buffer[:stream.raw])
                del stream.buffer[:len(take)]
                stream.raw -= len(take)
                assert stream.content is not None
                stream.content.add(take)
                if not stream.raw:
                    self.raw_done(who, stream.content)
                    stream.content = None
                continue
            end = stream.buffer.find(b"\n")
            if end < 0:
                if len(stream.buffer) <= LINE_MAX:
                    break
                end = LINE_MAX - 1
            line = bytes(stream.buffer[:end + 1])
            del stream.buffer[:end + 1]
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            if who == "C":
                self.client_line(text, line)
            else:
                self.server_line(text, line)
        return self.out

    def say(self, who: str, text: str) -> None:
        self.out.append(f"{who}: {escape(text)}")

    def take_raw(self, who: str, count: int, limit: int) -> None:
        """The next ``count`` octets from ``who`` are content, not lines."""
        stream = self.streams[who]
        stream.raw = count
        stream.content = Content(limit)
        if not count:
            self.raw_done(who, stream.content)
            stream.content = None

    def raw_done(self, who: str, content: Content) -> None:
        self.out.extend(content.lines(f"{who}: ", "literal"))

    def client_line(self, text: str, line: bytes) -> None:
        self.say("C", text)

    def server_line(self, text: str, line: bytes) -> None:
        self.say("S", text)


def _auth_line(text: str, words: int) -> str:
    """``text`` up to its ``words``-th word (the verb and mechanism), the rest masked."""
    parts = text.split(" ", words)
    if len(parts) <= words:
        return text
    return " ".join(parts[:words]) + " " + MASK


class SMTPScribe(Scribe):
    """SMTP, submission and LMTP (RFC 5321, 4954, 3030, 2033)."""

    def __init__(self, body_octets: int = 0) -> None:
        super().__init__(body_octets)
        self.sasl = False           # the next client line answers a 334
        self.data: Content | None = None

    def client_line(self, text: str, line: bytes) -> None:
        if self.data is not None:
            if text == ".":
                self.out.extend(self.data.lines("C: ", "message"))
                self.data = None
                self.say("C", ".")
            else:
                self.data.add(line)
            return
        if self.sasl:
            self.sasl = False
            self.say("C", MASK)
            return
        verb = text.split(" ", 1)[0].upper()
        if verb == "AUTH":
            self.say("C", _auth_line(text, 2))
            return
        self.say("C", text)
        if verb == "BDAT":
            match = re.match(r"(?i)BDAT\s+(\d+)", text)
            if match:
                self.take_raw("C", int(match.group(1)), self.body_octets)

    def server_line(self, text: str, line: bytes) -> None:
        self.say("S", text)
        if text.startswith("334"):
            self.sasl = True
        elif text.startswith("354"):
            self.data = Content(self.body_octets)

    def raw_done(self, who: str, content: Content) -> None:
        self.out.extend(content.lines(f"{who}: ", "BDAT chunk"))


_LITERAL = re.compile(r"~?\{(\d+)\+?\}$")
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|~?\{\d+\+?\}$|\([^)]*\)|[^\s()]+)')


class IMAPScribe(Scribe):
    """IMAP4rev1/rev2 (RFC 3501, 9051; literals of RFC 7888)."""

    def __init__(self, body_octets: int = 0) -> None:
        super().__init__(body_octets)
        self.login_arg = -1         # in a LOGIN command: the arguments seen so far
        self.secret_literal = False
        self.auth_tag = ""          # in an AUTHENTICATE exchange: its tag
        self.append = False

    def client_line(self, text: str, line: bytes) -> None:
        if self.auth_tag:
            self.say("C", MASK)     # a response to a "+" challenge, or "*"
            return
        literal = _LITERAL.search(text)
        if self.login_arg >= 0:
            self.say("C", self._login_part(text))
        else:
            words = text.split(" ", 2)
            command = words[1].upper() if len(words) > 1 else ""
            if command == "AUTHENTICATE":
                self.say("C", _auth_line(text, 3))
                self.auth_tag = words[0]
                return
            if command == "LOGIN":
                self.login_arg = 0
                self.say("C", f"{words[0]} {words[1]} "
                         + self._login_part(words[2] if len(words) > 2 else ""))
            else:
                self.say("C", text)
                self.append = command == "APPEND"
        if literal:
            self._client_literal(int(literal.group(1)))
        else:
            self.login_arg = -1     # the command ends with this line
            self.append = False

    def _login_part(self, text: str) -> str:
        """LOGIN's arguments on this line: the user name shown, the password not."""
        shown = []
        for token in _TOKEN.findall(text):
            self.login_arg += 1
            if self.login_arg >= 2:
                shown.append(MASK if not _LITERAL.match(token) else token)
                self.secret_literal = True
            else:
                shown.append(token)
                self.secret_literal = False
        return " ".join(shown)

    def _client_literal(self, size: int) -> None:
        if self.login_arg >= 0:
            self.take_raw("C", size, 0 if self.secret_literal else 1024)
        elif self.append:
            self.take_raw("C", size, self.body_octets)
        else:
            self.take_raw("C", size, 1024)

    def raw_done(self, who: str, content: Content) -> None:
        if who == "C" and self.login_arg >= 0 and self.secret_literal:
            self.out.append(f"C: [literal: {MASK}]")
        elif who == "C" and self.login_arg >= 0:
            self.out.append(f"C: [literal] {escape(content.kept.decode('utf-8', 'replace'))}")
        else:
            self.out.extend(content.lines(f"{who}: ", "literal"))

    def server_line(self, text: str, line: bytes) -> None:
        self.say("S", text)
        if self.auth_tag and text.startswith(self.auth_tag + " "):
            self.auth_tag = ""
        literal = _LITERAL.search(text)
        if literal:
            # FETCH's message content and header fields: shown as content is.
            self.take_raw("S", int(literal.group(1)), self.body_octets)


class POP3Scribe(Scribe):
    """POP3 (RFC 1939, 2449, 5034)."""

    MULTILINE = {"CAPA", "LIST", "UIDL", "RETR", "TOP", "AUTH"}

    def __init__(self, body_octets: int = 0) -> None:
        super().__init__(body_octets)
        self.commands: deque[tuple[str, bool]] = deque()  # (verb, has arguments)
        self.sasl = False
        self.listing: Content | None = None     # a RETR/TOP answer going on
        self.multiline = False                  # another multi-line answer

    def client_line(self, text: str, line: bytes) -> None:
        if self.sasl:
            self.say("C", MASK)
            return
        words = text.split(" ")
        verb = words[0].upper()
        if verb == "PASS":
            self.say("C", _auth_line(text, 1))
        elif verb == "APOP":
            self.say("C", _auth_line(text, 2))
        elif verb == "AUTH":
            self.say("C", _auth_line(text, 2))
            self.sasl = len(words) > 1
        else:
            self.say("C", text)
        self.commands.append((verb, len(words) > 1))

    def server_line(self, text: str, line: bytes) -> None:
        if self.listing is not None:
            if text == ".":
                self.out.extend(self.listing.lines("S: ", "message"))
                self.listing = None
                self.say("S", ".")
            else:
                self.listing.add(line)
            return
        if self.multiline:
            self.say("S", text)
            self.multiline = text != "."
            return
        self.say("S", text)
        if text.startswith("+ ") or text == "+":
            return                                  # a SASL challenge
        if not self.commands:
            return                                  # the greeting
        verb, has_args = self.commands.popleft()
        self.sasl = False
        if not text.startswith("+OK"):
            return
        if verb in ("RETR", "TOP"):
            self.listing = Content(self.body_octets)
        elif verb in self.MULTILINE and not (verb in ("LIST", "UIDL", "AUTH") and has_args):
            self.multiline = True


def scribe_for(protocol: str, body_octets: int) -> Scribe:
    """The scribe of a listener's ``protocol``; a protocol it does not know (an
    embedder's) gets its lines as they are."""
    if protocol in ("smtp", "submission", "lmtp"):
        return SMTPScribe(body_octets)
    if protocol == "imap":
        return IMAPScribe(body_octets)
    if protocol == "pop3":
        return POP3Scribe(body_octets)
    return Scribe(body_octets)
