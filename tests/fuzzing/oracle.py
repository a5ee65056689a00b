"""What counts as a defect in one played session (``play.Played``).

* a failure was logged (an internal error, an unhandled error in a Deferred);
* the session stayed busy (hung), or a storage thread never finished;
* a command the session took got no reply.  IMAP: every tag it dispatched has its
  tagged OK/NO/BAD, in order (the output is read as a client reads it: literals
  skipped, inflated after COMPRESS).  SMTP and LMTP: as many final reply lines
  (``NNN text``) as command lines, after the greeting.  POP3: each command line has
  its ``+OK``/``-ERR``/``+`` line, multi-line answers read to their dot.  When the
  server closed the connection (too many errors, LOGOUT, QUIT, a corrupt deflate
  stream...) the command it closed on may go unanswered;
* the session neither ended nor went on: after the resync, the probe got no answer;
* it held more input than its limits allow, or left timers behind;
* one reactor iteration took more than HOLD_LIMIT of CPU.
"""

from __future__ import annotations

import re
import zlib

from fuzzing.play import CORRUPT, MISMATCH, PROBE_TAG, WAITING, Played

# The bound: no input holds the reactor longer than this.
HOLD_LIMIT = 0.050

_LITERAL = re.compile(rb"~?\{(\d+)\}$")
_STATUS = re.compile(rb"^(\S+) (OK|NO|BAD)(?: |$)")
_MULTILINE = {"CAPA", "RETR", "TOP"}
_MULTILINE_WITHOUT_ARG = {"LIST", "UIDL", "AUTH"}


def judge(played: Played) -> list[str]:
    problems = [f"logged failure: {text}" for text in played.failures]
    if played.hung:
        problems.append(f"hung: {played.hung}")
    if played.memory:
        problems.append(f"memory: {played.memory}")
    if played.delayed_calls > 0:
        problems.append(f"{played.delayed_calls} timers left after the session ended")
    if played.hold > HOLD_LIMIT:
        problems.append(f"reactor held {played.hold * 1000:.1f} ms (CPU) in one iteration")
    check = {"imap": _imap, "pop3": _pop3}.get(played.protocol, _smtp)
    problems += check(played)
    if (played.probe_at is not None and not played.closed
            and len(played.dispatched) <= played.probe_at):
        problems.append("the probe command was not taken as a command")
    return problems


def _allowance(played: Played) -> int:
    """Commands that may go unanswered: the one the server closed the session on, the
    one whose literal or BDAT chunk is still on its way, or, when the client broke its
    deflate stream or sends deflated what the server reads as text (its COMPRESS was
    mangled on the way), the one that waits for what the client meant to send (an
    IDLE for its DONE, say)."""
    return 1 if played.closed or played.no_probe in (WAITING, CORRUPT, MISMATCH) else 0


def _smtp(played: Played) -> list[str]:
    finals = [line for line in played.output.split(b"\r\n")
              if len(line) >= 3 and line[:3].isdigit() and line[3:4] in (b"", b" ")]
    if not finals or not finals[0].startswith(b"220"):
        return ["no 220 greeting"]
    answered = len(finals) - 1
    missing = len(played.dispatched) - _allowance(played) - answered
    if missing > 0:
        return [f"{missing} of {len(played.dispatched)} commands got no reply"]
    return []


def _pop3(played: Played) -> list[str]:
    # Lines end at LF, as poplib and most clients read them: a stored message with
    # bare LFs is sent with them (see docs/fuzzing.rst, "not fixed").
    lines = [line.removesuffix(b"\r") for line in played.output.split(b"\n")]
    if not lines[0].startswith(b"+OK"):
        return ["no +OK greeting"]
    at = 1
    for number, command in enumerate(played.dispatched):
        if at >= len(lines) or not lines[at]:
            if number >= len(played.dispatched) - _allowance(played):
                return []
            return [f"command {number + 1} ({command[:40]!r}) of "
                    f"{len(played.dispatched)} got no reply"]
        line = lines[at]
        if not line.startswith((b"+OK", b"-ERR", b"+ ")):
            return [f"reply to {command[:40]!r} is {line[:60]!r}"]
        at += 1
        # Split as the session splits it (str.strip() also drops "\x1e" and the like).
        verb, _, arg = command.decode("utf-8", "replace").strip().partition(" ")
        verb = verb.upper()
        if line.startswith(b"+OK") and (
                verb in _MULTILINE or (verb in _MULTILINE_WITHOUT_ARG and not arg.strip())):
            while at < len(lines) and lines[at] != b".":
                at += 1
            if at >= len(lines):
                return [f"multi-line reply to {command[:40]!r} has no end"]
            at += 1
    return []


def imap_output(output: bytes) -> bytes:
    """The output as the client reads it: what follows ``OK DEFLATE active`` inflated."""
    match = re.search(rb"^\S+ OK DEFLATE active\r\n", output, re.M)
    if match is None:
        return output
    inflater = zlib.decompressobj(-15)
    return output[:match.end()] + inflater.decompress(output[match.end():])


def imap_statuses(output: bytes) -> list[bytes]:
    """The tag of each tagged status response (and "*" of ``* BAD``/``* NO``)."""
    tags, at = [], 0
    while at < len(output):
        line = b""
        while True:                      # a line, and the literals it announces
            end = output.find(b"\r\n", at)
            if end < 0:
                return tags
            piece, at = output[at:end], end + 2
            line += piece
            literal = _LITERAL.search(piece)
            if literal is None:
                break
            at += int(literal.group(1))
        match = _STATUS.match(line)
        if match and line[:1] != b"+" and not (match.group(1) == b"*"
                                              and match.group(2) == b"OK"):
            tags.append(match.group(1))
    return tags


def _imap(played: Played) -> list[str]:
    try:
        output = imap_output(played.output)
    except zlib.error as exc:
        return [f"the server's deflate stream is corrupt: {exc}"]
    if not output.startswith(b"* OK"):
        return ["no * OK greeting"]
    statuses = imap_statuses(output)
    at, problems = 0, []
    for number, tag in enumerate(played.dispatched):
        try:
            at = statuses.index(tag, at) + 1
        except ValueError:
            if number >= len(played.dispatched) - _allowance(played):
                break
            problems.append(f"command {number + 1} of {len(played.dispatched)} "
                            f"(tag {tag[:30]!r}) got no tagged reply")
            break
    if (played.probe_at is not None and not played.closed
            and PROBE_TAG.encode() not in played.dispatched[played.probe_at:]):
        problems.append("the probe was not answered as a command")
    return problems
