"""What every protocol's inputs share: SASL exchanges, MIME bodies, raw mutations of
a generated stream, and cutting it into pipelined pieces.

Strategies return bytes (or an :class:`play.Input`); the per-protocol modules
(``imap_inputs.py``, ``smtp_inputs.py``, ``pop3_inputs.py``) build command streams from
them.  Most of what is generated is nearly valid, since the interesting code runs
after the first syntax check; the mutations then break what the grammar made.
"""

from __future__ import annotations

import base64
import dataclasses
import random

from hypothesis import strategies as st

from fuzzing.play import Input
from fuzzing.world import PASSWORD, USER

# Characters that mean something to one of the parsers.
SPECIALS = [b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b" ", b"(", b")", b"[", b"]", b"{",
            b"}", b'"', b"\\", b"*", b"%", b"<", b">", b":", b",", b".", b"=", b"+",
            b"\r\n.\r\n", b"{5}\r\n", b"{0+}\r\n", b"~{3}\r\n", b"{99999999999}\r\n",
            b"\xc3\xa9", b"\xe2\x82", b"\t", b"..", b"-", b"DONE\r\n", b"*\r\n"]
WORDS = [b"", b"0", b"1", b"-1", b"4294967295", b"18446744073709551616", b"NIL", b"x",
         b"INBOX", b"a" * 300, b"\xc3\xa9t\xc3\xa9", b"bob@example.test", b"=", b"*"]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@st.composite
def sasl_exchange(draw: st.DrawFn) -> tuple[bytes, bytes | None, list[bytes]]:
    """A SASL mechanism name, its initial response (None: none) and the lines the
    client sends after it: right, wrong, cancelled or malformed."""
    # A wrong password or user costs an argon2 verification (tens of milliseconds, in
    # a thread): rare, or they would take most of a run's time.
    user, secret = USER.encode(), PASSWORD.encode()
    if draw(st.integers(0, 29)) == 0:
        user = draw(st.sampled_from([b"nobody@example.test", b"", b"\xff"]))
    if draw(st.integers(0, 29)) == 0:
        secret = b"wrong"
    mechanism = draw(st.sampled_from([b"PLAIN", b"LOGIN", b"plain", b"CRAM-MD5", b"X"]))
    plain = draw(st.sampled_from([b"\0" + user + b"\0" + secret,
                                  user + b"\0" + user + b"\0" + secret,
                                  b"\0" + user, b"", b"\0\0\0\0"]))
    lines = {b"PLAIN": [b64(plain)], b"plain": [b64(plain)],
             b"LOGIN": [b64(user), b64(secret)]}.get(mechanism, [b64(b"x")])
    initial = None
    if mechanism.upper() == b"PLAIN" and draw(st.booleans()):
        initial, lines = lines[0], []
    if draw(st.integers(0, 5)) == 0:
        lines = draw(st.lists(st.sampled_from([b"*", b"=", b"!!!", b64(b"\0"), b""] + lines),
                              max_size=3))
    return mechanism, initial, lines


@st.composite
def header(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from([b"From", b"To", b"Cc", b"Subject", b"Date", b"Message-ID",
                                 b"In-Reply-To", b"References", b"Content-Type",
                                 b"Content-Transfer-Encoding", b"MIME-Version",
                                 b"Content-Disposition", b"Received", b"X-\xc3\xa9", b""]))
    value = draw(st.sampled_from([
        b"Ann <ann@example.org>", b"=?utf-8?b?w6k=?= <x@y>", b"undisclosed-recipients:;",
        b"multipart/mixed; boundary=zz", b"text/plain; charset=\"utf-8\"; format=flowed",
        b"message/rfc822", b"base64", b"quoted-printable", b"8bit", b"Mon, 7 Feb 1994 "
        b"21:52:25 -0800", b"Thu, 31 Feb 99999 99:99:99 +9999", b"<a@b> <c@d>", b"",
        b"attachment; filename*0*=utf-8''%C3%A9; filename*1=x", b"(((((", b"\xff\xfe"]))
    folded = b"\r\n\t" + draw(st.binary(max_size=10)) if draw(st.integers(0, 7)) == 0 else b""
    return name + b": " + value + folded + b"\r\n"


def _part(draw: st.DrawFn, depth: int) -> bytes:
    headers = b"".join(draw(st.lists(header(), max_size=4)))
    kind = draw(st.integers(0, 5 if depth < 3 else 2))
    if kind <= 1:
        body = draw(st.sampled_from([b"plain text\r\n", b"caf=C3=A9=\r\n=ZZ\r\n",
                                     b"AAECAwQF/w==\r\n", b"SGVsbG8gd29y\r\nbGQ=\r\n",
                                     b".\r\n..\r\n", b"", b"\x00\x01\xff\r\n"]))
        return headers + b"\r\n" + body
    if kind == 2:
        return headers + b"\r\n" + draw(st.binary(max_size=200))
    if kind == 3:
        inner = _part(draw, depth + 1)
        return headers + b"Content-Type: message/rfc822\r\n\r\n" + inner
    boundary = draw(st.sampled_from([b"zz", b"a b", b"", b"--", b"\xc3\xa9" * 40]))
    children = [_part(draw, depth + 1) for _ in range(draw(st.integers(0, 3)))]
    body = b"".join(b"--" + boundary + b"\r\n" + child + b"\r\n" for child in children)
    end = b"--" + boundary + b"--\r\n" if draw(st.integers(0, 4)) else b""
    return (headers + b"Content-Type: multipart/" + draw(st.sampled_from(
        [b"mixed", b"alternative", b"digest", b"related"])) + b"; boundary=\"" + boundary
        + b"\"\r\n\r\npreamble\r\n" + body + end)


@st.composite
def message(draw: st.DrawFn) -> bytes:
    """A MIME message: nested parts, odd headers, encodings, and sometimes junk."""
    content = _part(draw, 0)
    if draw(st.integers(0, 9)) == 0:
        content += draw(st.sampled_from([b"L" * 1500 + b"\r\n", b"\n" * 50,
                                         b"x" * 20000 + b"\r\n"]))
    return content


def dot_stuffed(content: bytes) -> bytes:
    out = content.replace(b"\n.", b"\n..")
    return (b"." + out if out.startswith(b".") else out) + (
        b"" if out.endswith(b"\r\n") else b"\r\n") + b".\r\n"


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few raw edits: a byte changed, bytes inserted, a range deleted,
    duplicated or moved, the stream cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        op = draw(st.integers(0, 6))
        if op == 0 and out:
            out[min(at, len(out) - 1)] = draw(st.integers(0, 255))
        elif op == 1:
            out[at:at] = draw(st.sampled_from(SPECIALS))
        elif op == 2:
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == 3:
            del out[at:at + draw(st.integers(1, 64))]
        elif op == 4:
            out[at:at] = out[at:at + draw(st.integers(1, 200))] * draw(st.integers(1, 3))
        elif op == 5:
            out[at:at] = draw(st.sampled_from(WORDS))
        else:
            del out[at:]
    return bytes(out)


@st.composite
def cuts(draw: st.DrawFn) -> tuple[int, ...]:
    """Where the stream is cut into ``dataReceived`` calls: nowhere (one pipelined
    batch), at a few random points, or octet by octet for the first ones."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return ()
    if kind == 3:
        start = draw(st.integers(0, 200))
        return tuple(range(start, start + draw(st.integers(1, 24))))
    return tuple(draw(st.lists(st.integers(0, 1 << 16), max_size=8)))


@st.composite
def finish(draw: st.DrawFn, listener: str, plain: bytes, deflated: bytes = b"") -> Input:
    """The Input: the stream mutated one time in four, and cut."""
    if draw(st.integers(0, 3)) == 0:
        if deflated and draw(st.booleans()):
            deflated = draw(mutated(deflated))
        else:
            plain = draw(mutated(plain))
    corrupt = None
    if deflated and draw(st.integers(0, 7)) == 0:
        corrupt = draw(st.integers(0, 1 << 16))
    return Input(listener, plain, deflated, draw(cuts()), corrupt)


def vary(given: Input, rng: random.Random) -> Input:
    """A cheap variant of ``given``: cut elsewhere, and one time in two with a few
    raw edits.  Hypothesis takes ten milliseconds and more to draw one stream; the
    long run plays several variants of each (``driver.fuzz``'s ``variants``)."""
    def edit(data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(out))
            op = rng.randint(0, 3)
            if op == 0 and out:
                out[min(at, len(out) - 1)] = rng.randrange(256)
            elif op == 1:
                out[at:at] = rng.choice(SPECIALS + WORDS)
            elif op == 2:
                del out[at:at + rng.randint(1, 32)]
            else:
                out[at:at] = out[at:at + rng.randint(1, 100)]
        return bytes(out)

    plain, deflated = given.plain, given.deflated
    if rng.random() < 0.5:
        if deflated and rng.random() < 0.5:
            deflated = edit(deflated)
        else:
            plain = edit(plain)
    size = len(plain) + len(deflated) + 1
    cuts = tuple(rng.randrange(size) for _ in range(rng.randint(0, 6)))
    return dataclasses.replace(given, plain=plain, deflated=deflated, cuts=cuts)
